"""Pixel values to model input: the one preprocessing implementation.

The runtime (DICOM) and training (DICOM, PNG, JPEG) both end here, so what the
model saw in training is exactly what it sees in production.  Input is a 2-D
float image already in display orientation (bright = dense, i.e. after the
modality LUT, the VOI LUT and MONOCHROME1 inversion); output is a float32
``size x size`` array in [0, 1].

The image is resized first and scaled second: percentiles of a few thousand
pixels cost microseconds, percentiles of an 8000 x 8000 image cost seconds,
and the two orders differ only in where clipping happens.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

#: Percentiles that map to 0 and 1: robust to burned-in text, markers and
#: collimator edges whatever the stored bit depth.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

#: Recorded in model metadata; bump when the pipeline's output changes.
PIPELINE_VERSION = "1"


def pipeline_description() -> str:
    """Human-readable summary stored in ONNX metadata next to the version."""
    return (
        f"heartbatch pixels v{PIPELINE_VERSION}: modality LUT, VOI LUT/window, "
        f"MONOCHROME1 inverted, anti-aliased bilinear resize to SxS (full image, no crop/pad), "
        f"percentile scale p{LOW_PERCENTILE}-p{HIGH_PERCENTILE} to [0,1], clipped"
    )


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D image to ``size x size`` (Pillow bilinear, which widens its
    kernel when shrinking, so it anti-aliases).

    The whole image extent maps onto the whole output extent (pixel edges to
    pixel edges), so a normalized coordinate u means ``u * width`` pixels in
    the original: that is what makes boxes map back exactly.
    """
    return resize_to(image, size, size)


def resize_to(image: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """Resize a 2-D image to ``rows x columns``, as :func:`resize` does."""
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    src = np.ascontiguousarray(image, dtype=np.float32)
    if src.shape == (rows, columns):
        return src.copy()
    resized = Image.fromarray(src, mode="F").resize((columns, rows), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def fit(rows: int, columns: int, max_side: int) -> tuple[int, int]:
    """``(rows, columns)`` scaled so the longer side is at most ``max_side`` (aspect kept, never enlarged)."""
    scale = min(1.0, max_side / max(rows, columns))
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def scale_to_unit(image: np.ndarray) -> np.ndarray:
    """Map the robust intensity range to [0, 1]; a flat image becomes zeros."""
    lo, hi = np.percentile(image, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    out = (image - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def preprocess(image: np.ndarray, size: int) -> np.ndarray:
    """Display-oriented 2-D image -> float32 ``[size, size]`` model input."""
    return scale_to_unit(resize(image, size))


def display(image: np.ndarray, max_side: int) -> np.ndarray:
    """Display-oriented 2-D image -> float32 [0, 1] at display size (aspect kept): the
    model's resize and intensity scale, for reports and overlays."""
    return scale_to_unit(resize_to(image, *fit(*image.shape, max_side)))
