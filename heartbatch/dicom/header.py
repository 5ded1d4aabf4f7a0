"""The header fields a report row carries, read from a dataset: identifiers, geometry, spacing.

A leaf of :mod:`heartbatch.dicom`: reading (:mod:`.read`) fills it, the candidate rules
(:mod:`.select`) and every later step read it.  Patient identifiers only travel here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from .. import sanitize
from .values import cell, integer, text


@dataclass(frozen=True)
class DicomHeader:
    """The header fields the report needs; patient identifiers only travel here."""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    study_date: str = ""
    modality: str = ""
    view_position: str = ""
    rows: int = 0
    columns: int = 0
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column) spacing
    patient_id: str = ""
    accession_number: str = ""


def pixel_spacing(ds: Dataset, keywords: tuple[str, ...] = ("PixelSpacing", "ImagerPixelSpacing")
                  ) -> tuple[float, float] | None:
    """PixelSpacing, else ImagerPixelSpacing (the first of ``keywords`` present and valid), row then
    column, in mm; None when absent, zero or malformed."""
    for keyword in keywords:
        try:
            value = ds.get(keyword)
            if value is None:
                continue
            values = [float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]
        except Exception:  # noqa: BLE001 - malformed strings such as "abc"
            continue
        if len(values) == 1:
            values = values * 2
        if len(values) >= 2 and all(math.isfinite(v) and v > 0 for v in values[:2]):
            return values[0], values[1]
    return None


def header_of(ds: Dataset) -> DicomHeader:
    """The report's header fields of a dataset (raw values made valid by :mod:`heartbatch.sanitize`)."""
    return DicomHeader(
        sop_instance_uid=cell(ds, "SOPInstanceUID"),
        study_instance_uid=cell(ds, "StudyInstanceUID"),
        series_instance_uid=cell(ds, "SeriesInstanceUID"),
        study_date=cell(ds, "StudyDate"),
        modality=cell(ds, "Modality"),
        view_position=cell(ds, "ViewPosition"),
        rows=integer(ds, "Rows"),
        columns=integer(ds, "Columns"),
        pixel_spacing_mm=pixel_spacing(ds),
        patient_id=sanitize.patient_cell("PatientID", text(ds, "PatientID")),
        accession_number=sanitize.patient_cell("AccessionNumber", text(ds, "AccessionNumber")),
    )
