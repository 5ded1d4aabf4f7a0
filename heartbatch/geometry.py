"""Boxes between the model's normalized frame and the original pixel grid, and CTR.

Boxes are ``(x0, y0, x1, y1)`` with x to the right and y down; ``x1``/``y1``
are exclusive edges, so a box covering pixel columns 10..19 is ``x0=10, x1=20``
and its width is ``x1 - x0``.  The model sees the whole image resized to
``S x S``, so normalized ``u`` is ``u * columns`` pixels, whatever S is and
whether or not the image is square.
"""

from __future__ import annotations

import math

import numpy as np


def to_pixels(normalized: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Normalized ``[..., 4k]`` boxes -> pixel boxes on a ``rows x columns`` grid."""
    scale = np.tile(np.array([columns, rows], dtype=np.float64), normalized.shape[-1] // 2)
    return np.asarray(normalized, dtype=np.float64) * scale


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Bounding box (exclusive edges) of a boolean mask; None when it is empty."""
    cols = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


def width(box) -> float:
    return float(box[2] - box[0])


def ctr(heart_box, thorax_box) -> float:
    """Cardiothoracic ratio: heart box width over thorax box width (NaN if undefined)."""
    thorax_width = width(thorax_box)
    if not thorax_width > 0:
        return math.nan
    return width(heart_box) / thorax_width


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of matching rows of two ``[N, 4]`` box arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a + area_b - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, 0.0)
