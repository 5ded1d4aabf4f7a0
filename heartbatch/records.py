"""The per-file result: what the report writes and what the Python API returns."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .dicom import DicomHeader

OK, SKIPPED, ERROR = "ok", "skipped", "error"

Box = tuple[float, float, float, float]


@dataclass
class Record:
    path: str
    status: str
    reason: str = ""
    header: DicomHeader | None = None
    heart: Box | None = None          # pixels of the original image, x1/y1 exclusive
    thorax: Box | None = None
    ctr: float | None = None
    heart_width_mm: float | None = None
    thoracic_width_mm: float | None = None
    enlarged: bool | None = None
    model_id: str = ""
    chest_score: float | None = None  # content check, 0-1: how surely a frontal chest film (None: model has none)
    uncertainty: float | None = None  # one standard deviation of the CTR (None: model has none)
    review: bool | None = None        # ok rows: a person should check this measurement
    review_reason: str = ""
    detail: str = ""                  # traceback for --debug logs; never written to the report
    code: str = ""                    # short machine-readable reason ("not_dicom", "truncated"...); not in the CSV

    @property
    def ok(self) -> bool:
        return self.status == OK


def measure(path: str, header: DicomHeader, boxes, model_id: str, threshold: float) -> Record:
    """Normalized model output for one image -> a complete record (or an error record)."""
    from .geometry import ctr as ctr_of, to_pixels, width

    values = [float(v) for v in boxes]
    if not all(math.isfinite(v) for v in values):
        return Record(path, ERROR, "model returned a non-finite box for this image", header, model_id=model_id)
    pixel = to_pixels(boxes, header.rows, header.columns)
    heart = tuple(float(v) for v in pixel[:4])
    thorax = tuple(float(v) for v in pixel[4:8]) if len(values) == 8 else None
    for name, box in (("heart", heart), ("thorax", thorax)):
        if box is not None and not (box[2] > box[0] and box[3] > box[1]):
            return Record(path, ERROR, f"model returned an empty {name} box", header, model_id=model_id)
    record = Record(path, OK, "", header, heart=heart, thorax=thorax, model_id=model_id)
    spacing = header.pixel_spacing_mm
    if spacing is not None:
        record.heart_width_mm = width(heart) * spacing[1]
    if thorax is not None:
        record.ctr = ctr_of(heart, thorax)
        record.enlarged = record.ctr > threshold
        if spacing is not None:
            record.thoracic_width_mm = width(thorax) * spacing[1]
    return record
