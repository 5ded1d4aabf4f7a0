"""Which files we measure: 2-D greyscale frontal chest radiographs, and why others are skipped.

The tables below are the whole policy; :func:`check_candidate` applies them to a
header read with the pixel data deferred, so a lateral view or a CT slice is
rejected without decoding it.  Decisions read raw values; reasons show them only
through :mod:`heartbatch.sanitize`.
"""

from __future__ import annotations

import re

from pydicom.dataset import Dataset
from pydicom.uid import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                         DigitalXRayImageStorageForProcessing, MediaStorageDirectoryStorage,
                         SecondaryCaptureImageStorage)

from .. import sanitize
from ..errors import Skipped
from .header import DicomHeader
from .values import integer, named, shown, text, uid_name

MAX_PIXELS = 20000 * 20000
MIN_SIDE = 64

# SOP classes of projection radiographs (CR, DX for presentation/processing)
# and of secondary captures, which we accept when nothing says otherwise.
CR_DX_SOP_CLASSES = {
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
}
SECONDARY_CAPTURE_PREFIX = SecondaryCaptureImageStorage  # a prefix: the multi-frame SCs are under it
DICOMDIR_SOP_CLASS = MediaStorageDirectoryStorage
PROJECTION_MODALITIES = {"CR", "DX"}
SC_MODALITIES = {"", "OT", "SC", "CR", "DX"}
CHEST_WORDS = ("CHEST", "THORAX", "THORAC", "TORAX", "LUNG", "HEART", "CARDIAC", "THX", "CXR")
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LDEC", "RDEC"}
LATERAL_TEXT = re.compile(r"\b(LAT|LATERAL|LL|RL)\b", re.IGNORECASE)


def check_candidate(ds: Dataset, header: DicomHeader) -> None:
    """Raise :class:`Skipped` unless this is a 2-D greyscale frontal chest radiograph."""
    sop_keyword = "SOPClassUID"
    sop_class = text(ds, sop_keyword)
    if not sop_class and hasattr(ds, "file_meta"):
        sop_keyword, sop_class = "MediaStorageSOPClassUID", text(ds.file_meta, "MediaStorageSOPClassUID")
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise Skipped("DICOMDIR (a directory index, not an image)", code="dicomdir")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise Skipped(f"no pixel data ({uid_name(sop_keyword, sop_class, 'unknown SOP class')})",
                      code="no_pixels")
    modality = text(ds, "Modality").upper()
    is_projection = modality in PROJECTION_MODALITIES or sop_class in CR_DX_SOP_CLASSES
    is_sc = sop_class.startswith(SECONDARY_CAPTURE_PREFIX) and modality in SC_MODALITIES
    if not (is_projection or is_sc):
        valid = sanitize.value("Modality", modality)
        what = f"modality {valid or 'unknown'}" if valid is not None else sanitize.invalid("Modality")
        raise Skipped(f"{what} is not a projection radiograph (CR/DX expected)", code="not_projection")
    body_part = text(ds, "BodyPartExamined").upper()
    if body_part and not any(word in body_part for word in CHEST_WORDS):
        valid = sanitize.value("BodyPartExamined", body_part)
        raise Skipped(f"body part {valid!r} is not the chest" if valid is not None else
                      f"body part is not the chest ({sanitize.invalid('BodyPartExamined')})", code="not_chest")
    view = text(ds, "ViewPosition").upper()
    if view in LATERAL_VIEWS:
        raise Skipped(f"lateral view (ViewPosition {view}); only frontal PA/AP views are measured", code="lateral")
    if not view:
        for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription"):
            if LATERAL_TEXT.search(text(ds, keyword)):
                raise Skipped(f"lateral view ({named(ds, keyword)}); only frontal views are measured",
                              code="lateral")
    frames = integer(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise Skipped(f"multi-frame image ({frames} frames); single projection images expected", code="multi_frame")
    samples = integer(ds, "SamplesPerPixel", 1)
    photometric = text(ds, "PhotometricInterpretation").upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        what = shown(ds, "PhotometricInterpretation") if photometric else f"{samples} samples per pixel"
        raise Skipped(f"colour image ({what}); greyscale expected", code="colour")
    if header.rows < MIN_SIDE or header.columns < MIN_SIDE:
        raise Skipped(f"image too small ({header.rows} x {header.columns} pixels)", code="too_small")
    if header.rows * header.columns > MAX_PIXELS:
        raise Skipped(f"image too large ({header.rows} x {header.columns} pixels)", code="too_large")
