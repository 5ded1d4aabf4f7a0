"""Reading DICOM files, split as pydicom splits its pixel code:

- :mod:`.read`: opening a file and the top-level flow (:func:`read_dicom`),
- :mod:`.header`: the header fields a report row carries,
- :mod:`.select`: which files are frontal chest radiographs, and why others are skipped,
- :mod:`.decode`: which decoder decodes the stored pixels, and decoding at a reduced scale,
- :mod:`.values`: element values as text, for decisions and (sanitized) for outputs.

What stored values become on screen and for the model (modality LUT, VOI LUT/window,
MONOCHROME1 inversion) is :mod:`heartbatch.pixels`, under its ``PIPELINE_VERSION``.
"""

from ..errors import ReadError, Skipped
from .decode import DECODER_PREFERENCE, decode
from .header import DicomHeader, pixel_spacing
from .read import DicomImage, looks_like_raw_dataset, read_any_header, read_dicom, read_header
from .select import check_candidate

__all__ = ["DECODER_PREFERENCE", "DicomHeader", "DicomImage", "ReadError", "Skipped", "check_candidate",
           "decode", "looks_like_raw_dataset", "pixel_spacing", "read_any_header", "read_dicom",
           "read_header"]
