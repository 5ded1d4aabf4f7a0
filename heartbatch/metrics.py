"""Accuracy measures shared by `heartbatch evaluate` and the training loop.

All inputs are normalized boxes ``[N, 8]`` (heart then thorax; thorax may be
NaN where unknown).  Coordinate error is reported in pixels of a 224 x 224
image, the original project's measure.
"""

from __future__ import annotations

import math

import numpy as np

from .geometry import box_iou

REFERENCE_SIZE = 224


def ctrs(boxes: np.ndarray) -> np.ndarray:
    """Heart width / thorax width of ``[N, 8]`` normalized boxes (NaN where the thorax has no width)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return (boxes[:, 2] - boxes[:, 0]) / (boxes[:, 6] - boxes[:, 4])


def _mean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else math.nan


def _median(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(np.median(values)) if values.size else math.nan


def agreement(pred_ctr: np.ndarray, true_ctr: np.ndarray, threshold: float) -> dict:
    """Agreement of the 'CTR above threshold' call: accuracy, sensitivity, specificity."""
    ok = np.isfinite(pred_ctr) & np.isfinite(true_ctr)
    pred = pred_ctr[ok] > threshold
    true = true_ctr[ok] > threshold
    positives, negatives = int(true.sum()), int((~true).sum())
    return {
        "n": int(ok.sum()),
        "accuracy": float((pred == true).mean()) if ok.any() else math.nan,
        "sensitivity": float((pred & true).sum() / positives) if positives else math.nan,
        "specificity": float((~pred & ~true).sum() / negatives) if negatives else math.nan,
        "positives": positives,
    }


def box_metrics(pred: np.ndarray, true: np.ndarray, threshold: float = 0.5,
                expert_ctr: np.ndarray | None = None) -> dict:
    """All evaluation numbers for predicted vs reference normalized boxes."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    heart_iou = box_iou(pred[:, :4], true[:, :4])
    result = {
        "n": int(len(true)),
        "heart_iou_mean": _mean(heart_iou),
        "heart_iou_median": _median(heart_iou),
        "heart_mae_px224": _mean(np.abs(pred[:, :4] - true[:, :4]).mean(axis=1) * REFERENCE_SIZE),
    }
    if pred.shape[1] < 8:
        return result
    has_thorax = np.isfinite(true[:, 4:8]).all(axis=1)
    thorax_iou = box_iou(pred[has_thorax, 4:8], true[has_thorax, 4:8])
    pred_ctr, true_ctr = ctrs(pred), ctrs(true)
    result.update({
        "thorax_n": int(has_thorax.sum()),
        "thorax_iou_mean": _mean(thorax_iou),
        "thorax_iou_median": _median(thorax_iou),
        "thorax_mae_px224": _mean(np.abs(pred[has_thorax, 4:8] - true[has_thorax, 4:8]).mean(axis=1)
                                  * REFERENCE_SIZE),
        "ctr_mae": _mean(np.abs(pred_ctr - true_ctr)),
        "ctr_agreement": agreement(pred_ctr, true_ctr, threshold),
    })
    if expert_ctr is not None:
        expert_ctr = np.asarray(expert_ctr, dtype=np.float64)
        has_expert = np.isfinite(expert_ctr)
        result["expert_n"] = int(has_expert.sum())
        result["expert_ctr_mae"] = _mean(np.abs(pred_ctr[has_expert] - expert_ctr[has_expert]))
        result["expert_ctr_agreement"] = agreement(pred_ctr[has_expert], expert_ctr[has_expert], threshold)
    return result
