"""Pixel values to model input: the one preprocessing implementation.

The runtime (DICOM) and training (DICOM, PNG, JPEG) both end here, so what the
model saw in training is exactly what it sees in production.  Every step that
changes what the model sees lives in this module, under :data:`PIPELINE_VERSION`:
for DICOM, the display transforms (:func:`display_image`: modality LUT, VOI
LUT/window, MONOCHROME1 inversion) turn stored values into a display-oriented
image (bright = dense), which is also where PNG and JPEG input starts; then
:func:`preprocess` resizes it and scales it to a float32 ``size x size`` array
in [0, 1].  Decoding the stored values is :mod:`heartbatch.dicom`'s concern.

The image is resized first and scaled second: percentiles of a few thousand
pixels cost microseconds, percentiles of an 8000 x 8000 image cost seconds,
and the two orders differ only in where clipping happens.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Percentiles that map to 0 and 1: robust to burned-in text, markers and
#: collimator edges whatever the stored bit depth.
LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5

#: Recorded in model metadata (a model is trained with one version); bump when the
#: output of any step here (or of reduced decoding in heartbatch.dicom) changes.
#: tests/test_pixels.py ties it to a checksum.  v2: DICOM stored values of every encoding
#: are reduced by an exact integer factor before the display transforms (JPEG DCT scaling,
#: JPEG 2000 resolution levels, a block mean), not only JPEG Baseline's.
PIPELINE_VERSION = "2"

#: Pipeline versions of models this heartbatch runs.  v1 and v2 differ only in how
#: heartbatch run reduces DICOM pixels other than JPEG Baseline's before preprocessing;
#: training on PNG/JPEG files sees the same input under both, and on the validation split
#: written as 12-bit JPEG 2000 (benchmarks/reduced_decode.py) v1 and v2 give the same
#: accuracy (README, "The DICOM pixel pipeline").  Any other version is refused.
RUNS_MODELS_OF = ("1", "2")


def pipeline_description() -> str:
    """Human-readable summary stored in ONNX metadata next to the version."""
    return (
        f"heartbatch pixels v{PIPELINE_VERSION}: DICOM values reduced by an exact integer factor to no less "
        f"than S a side (JPEG DCT scaling, JPEG 2000 resolution levels, block mean), modality LUT, VOI LUT/window, "
        f"MONOCHROME1 inverted, anti-aliased bilinear resize to SxS (full image, no crop/pad), "
        f"percentile scale p{LOW_PERCENTILE}-p{HIGH_PERCENTILE} to [0,1], clipped"
    )


# --- DICOM display transforms: stored values -> display-oriented image ---------------

def apply_modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> float32 modality values (rescale slope/intercept or LUT)."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    image = stored.astype(np.float32)
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    if slope != 1.0 and math.isfinite(slope) and slope != 0:
        np.multiply(image, slope, out=image)
    if intercept != 0.0 and math.isfinite(intercept):
        np.add(image, intercept, out=image)
    return image


def voi_window(ds: Dataset) -> tuple[float, float, str] | None:
    """First VOI window (center, width, function), or None when absent or unusable."""
    # imported here: heartbatch.dicom imports this module, and PNG-only use needs no pydicom
    from pydicom.multival import MultiValue

    from .dicom.values import text

    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center = float(center[0] if isinstance(center, MultiValue) else center)
        width = float(width[0] if isinstance(width, MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    function = text(ds, "VOILUTFunction").upper() or "LINEAR"
    if not (math.isfinite(center) and math.isfinite(width) and width >= 1):
        return None
    return center, width, function


def apply_voi(image: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI LUT sequence or window, in place where possible; identity when absent."""
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi as pydicom_apply_voi

        try:
            return np.asarray(pydicom_apply_voi(image, ds), dtype=np.float32)
        except Exception:  # noqa: BLE001 - a broken LUT: fall back to the window
            pass
    voi = voi_window(ds)
    if voi is None:
        return image
    center, width, function = voi
    if function == "SIGMOID":
        np.subtract(image, center, out=image)
        np.multiply(image, -4.0 / width, out=image)
        np.exp(image, out=image)
        np.add(image, 1.0, out=image)
        np.reciprocal(image, out=image)
        return image
    if function == "LINEAR_EXACT":
        offset, scale = center, 1.0 / width
    else:  # LINEAR, PS3.3 C.11.2.1.2.1
        offset, scale = center - 0.5, 1.0 / max(width - 1.0, 1.0)
    np.subtract(image, offset, out=image)
    np.multiply(image, scale, out=image)
    np.add(image, 0.5, out=image)
    return np.clip(image, 0.0, 1.0, out=image)


def display_image(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored pixel values -> display-oriented float32 (bright = dense)."""
    from .dicom.values import text

    image = apply_modality(stored, ds)
    windowed = apply_voi(image.copy() if voi_window(ds) else image, ds)
    lo, hi = np.percentile(windowed[::8, ::8], [1, 99])
    if hi > lo:  # a window that flattens the image is worse than none
        image = windowed
    if text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        np.negative(image, out=image)
    return image


# --- display-oriented image (DICOM, PNG, JPEG) -> model input ------------------------

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

