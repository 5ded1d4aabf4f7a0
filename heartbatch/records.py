"""The per-file result: what the report writes and what the Python API returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .confidence import Policy, Prediction, ctr_uncertainty, refusal, review_reasons
from .dicom import DicomHeader
from .errors import Status

OK, SKIPPED, ERROR = Status.OK, Status.SKIPPED, Status.ERROR

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
    results: tuple[str, ...] = ()     # --dicom-out: names of the DICOM result files written for this row
    results_error: str = ""           # --dicom-out: why they could not be written
    masks: np.ndarray | None = field(default=None, compare=False, repr=False)  # ok rows of a model with masks: [3, H, W] probabilities on the model
    #                                   input's grid (heart, right lung, left lung); never in the CSV, and
    #                                   dropped before a record leaves a worker process
    packed_masks: bytes | None = field(default=None, compare=False, repr=False)  # those masks, small
    #                                   (heartbatch.masks.encode_masks, a few KB): what leaves the worker,
    #                                   kept in the ledger for the outlines of the HTML report and review

    @property
    def ok(self) -> bool:
        return self.status == OK


def measure(path: str, header: DicomHeader, prediction: Prediction, model_id: str, policy: Policy) -> Record:
    """One image's model outputs -> a complete record: skipped by its content, measured (and
    perhaps flagged for review), or an error."""
    from .geometry import ctr as ctr_of, to_pixels, width

    boxes = np.asarray(prediction.boxes, dtype=np.float64)
    if not np.isfinite(boxes).all() and prediction.masks is not None:
        from .masks import PRESENT

        masks = np.nan_to_num(np.asarray(prediction.masks, dtype=np.float64), nan=0.0)
        missing = "heart" if masks[0].max() < PRESENT else "lungs" if masks[1:].max() < PRESENT else None
        if missing is not None:
            return Record(path, ERROR, f"the model's masks show no {missing} on this image", header,
                          model_id=model_id)
    if not np.isfinite(boxes).all():
        return Record(path, ERROR, "model returned a non-finite box for this image", header, model_id=model_id)
    score = prediction.chest_score
    score = None if score is None or not math.isfinite(score) else float(score)
    reason = refusal(prediction, policy)
    if reason is not None:
        return Record(path, SKIPPED, reason, header, model_id=model_id, chest_score=score, code="content")
    pixel = to_pixels(boxes, header.rows, header.columns)
    heart = tuple(float(v) for v in pixel[:4])
    thorax = tuple(float(v) for v in pixel[4:8]) if len(boxes) == 8 else None
    for name, box in (("heart", heart), ("thorax", thorax)):
        if box is not None and not (box[2] > box[0] and box[3] > box[1]):
            return Record(path, ERROR, f"model returned an empty {name} box", header, model_id=model_id)
    record = Record(path, OK, "", header, heart=heart, thorax=thorax, model_id=model_id, chest_score=score,
                    masks=prediction.masks)
    spacing = header.pixel_spacing_mm
    if spacing is not None:
        record.heart_width_mm = width(heart) * spacing[1]
    if thorax is not None:
        record.ctr = ctr_of(heart, thorax)
        record.enlarged = record.ctr > policy.threshold
        if spacing is not None:
            record.thoracic_width_mm = width(thorax) * spacing[1]
    sd = prediction.uncertainty
    record.uncertainty = ctr_uncertainty(boxes, sd) if sd is not None and np.isfinite(sd).all() else None
    reasons = review_reasons(prediction, policy, record.uncertainty,
                             header.rows / header.columns if header.columns else 1.0)
    if prediction.chest_score is not None and score is None:
        reasons.insert(0, "content check gave no score (non-finite model output)")
    record.review = bool(reasons)
    record.review_reason = "; ".join(reasons)
    return record
