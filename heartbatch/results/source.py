"""What every result takes from its source image: the header it copies the patient and study
from, the checks that a record can have a result, and the boxes in the image's pixel coordinates.

highdicom's warnings about the *source* header (a patient name with a single component, a
non-standard value it copies) are silenced while a result is built: they are not about our output,
and a batch run would print them once per file.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pydicom

from ..records import Record

#: Type 2 attributes of the Patient and General Study modules the results copy from the source.
#: Anonymised and hand-made films often leave them out; type 2 lets them be empty, so they are
#: copied empty rather than refused (highdicom expects them present).
COPIED_EMPTY_IF_MISSING = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                           "ReferringPhysicianName", "StudyID", "AccessionNumber")
#: What a result cannot be filed without: its study, the referenced image's series and class.
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def read_source_header(path: str | Path) -> pydicom.Dataset:
    """The source image's header (no pixel data), its missing type 2 patient and study attributes
    empty. ``force``: heartbatch also measures DICOM datasets written without the preamble; a file
    that is not DICOM at all, or an image without the UIDs a result refers to, is a ValueError."""
    try:
        source = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on a damaged header
        raise ValueError(f"cannot read the DICOM header of {path}: {exc}") from exc
    missing = [keyword for keyword in REQUIRED if not str(source.get(keyword, "") or "")]
    if missing:
        raise ValueError(f"the image has no {', '.join(missing)}: a DICOM result cannot refer to it")
    for keyword in COPIED_EMPTY_IF_MISSING:
        if keyword not in source:
            setattr(source, keyword, None)
    return source


def check_record(record: Record) -> None:
    """Raise ValueError unless ``record`` is ok and has what every result draws: a heart box and
    the image size."""
    if not record.ok:
        raise ValueError(f"no DICOM result for a {record.status!r} record ({record.path}): {record.reason}")
    if record.heart is None:
        raise ValueError(f"record for {record.path} has no heart box")
    if record.header is None or not (record.header.rows and record.header.columns):
        raise ValueError(f"record for {record.path} has no image size")


def source_sop_uid(source: pydicom.Dataset, record: Record) -> str:
    """The source's SOP Instance UID, every result UID's seed, after :func:`check_record`; a
    ValueError when it has none."""
    check_record(record)
    sop = str(getattr(source, "SOPInstanceUID", "") or "")
    if not sop:
        raise ValueError(f"source dataset has no SOP Instance UID ({record.path})")
    return sop


def box_corners(box):
    """Closed polyline of a box's corners, (column, row) pixel coordinates. Box edges are the
    sub-pixel coordinates DICOM uses (0,0 is the top left corner of the top left pixel), so an
    exclusive x1/y1 is exactly the right/bottom edge."""
    import numpy as np

    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float64)


@contextlib.contextmanager
def source_warnings_silenced():
    """Silence highdicom's and pydicom's UserWarnings while an object is built from the source
    header: they are about that header (e.g. a patient name with one component), which is copied
    as it is, not about what we write."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield
