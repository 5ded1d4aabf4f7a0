"""DICOM results for one measured image, written with highdicom: a TID 1500 Measurement Report
(Comprehensive 3D SR, :mod:`.sr`) and either a Grayscale Softcopy Presentation State that draws the
boxes on the source image (:mod:`.presentation`), or a Secondary Capture image with the boxes and
numbers burned in (:mod:`.capture`).

Every object references the source image and copies its patient and study modules
(:mod:`.source`), so it files next to it in the same PACS study. Their UIDs are derived from the
source SOP Instance UID and the model id alone (:mod:`.uids`): measuring the same image with the
same model again replaces the result (same UIDs, same file name) rather than adding a second one; a
different model gives a new result.

:func:`write_results` (:mod:`.write`) is what a batch run calls, once per ok record, in its worker
processes: it reads the source header itself and returns the names of the files it wrote. What
does not depend on the record (coded concepts, :mod:`.vocabulary`; the algorithm and observer
context items of a model) is built once per process.

highdicom is an optional dependency (``pip install 'heartbatch[dicom]'``), imported only inside
the writers, when a result is written.
"""

from .capture import CAPTURE_MAX_SIDE, SC_SERIES_NUMBER, write_capture
from .output import MANUFACTURER
from .presentation import PR_SERIES_NUMBER, write_presentation_state
from .source import COPIED_EMPTY_IF_MISSING, REQUIRED, read_source_header
from .sr import CTR_DECIMALS, SR_SERIES_NUMBER, WIDTH_DECIMALS, write_sr
from .uids import result_uid
from .vocabulary import SCHEME
from .write import ResultOptions, write_results

__all__ = [
    "CAPTURE_MAX_SIDE", "COPIED_EMPTY_IF_MISSING", "CTR_DECIMALS", "MANUFACTURER", "PR_SERIES_NUMBER", "REQUIRED",
    "SCHEME", "SC_SERIES_NUMBER", "SR_SERIES_NUMBER", "WIDTH_DECIMALS", "ResultOptions", "read_source_header",
    "result_uid", "write_capture", "write_presentation_state", "write_results", "write_sr",
]
