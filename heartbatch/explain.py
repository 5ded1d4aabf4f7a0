"""Occlusion sensitivity: which parts of the image the predicted heart box depends on.

A patch filled with the image mean slides over the model input (S x S, the
preprocessed image); for each position the model runs on the occluded copy
(copies are batched) and the shift of the heart box, the L1 distance of its
four coordinates in original-image pixels, is recorded.  A pixel's value is
the mean shift of the patches covering it.  Only onnxruntime (through
:class:`~heartbatch.model.BoxModel`) is needed; the colour map comes from
matplotlib when installed (extra ``[report]``), else a plain red overlay.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .model import BoxModel

GRID = 16  # patch positions per side by default: stride S/16, patch S/8


def _starts(size: int, patch: int, stride: int) -> list[int]:
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)  # the last row/column of patches reaches the edge
    return starts


def occlusion_map(model: BoxModel, image: np.ndarray, rows: int | None = None, columns: int | None = None,
                  patch: int | None = None, stride: int | None = None, batch_size: int = 32) -> np.ndarray:
    """Heart-box shift (original-image pixels; model-input pixels without ``rows``/``columns``)
    when each region of ``image`` (``[S, S]`` model input) is covered: float64 ``[S, S]``."""
    size = image.shape[0]
    if image.shape != (size, size):
        raise ValueError(f"expected a square model input, got shape {image.shape}")
    patch = patch or max(1, 2 * size // GRID)
    stride = stride or max(1, size // GRID)
    scale = np.array([columns or size, rows or size] * 2, dtype=np.float64)
    image = np.asarray(image, dtype=np.float32)
    base = model.predict(image[None])[0, :4]
    fill = np.float32(image.mean())
    positions = [(y, x) for y in _starts(size, patch, stride) for x in _starts(size, patch, stride)]
    total = np.zeros((size, size), np.float64)
    covered = np.zeros((size, size), np.float64)
    for i in range(0, len(positions), batch_size):
        chunk = positions[i:i + batch_size]
        batch = np.repeat(image[None], len(chunk), axis=0)
        for copy, (y, x) in zip(batch, chunk):
            copy[y:y + patch, x:x + patch] = fill
        heart = model.predict(batch)[:, :4]
        shifts = np.nan_to_num(np.abs(heart - base) * scale, nan=0.0, posinf=0.0).sum(axis=1)
        for shift, (y, x) in zip(shifts, chunk):
            total[y:y + patch, x:x + patch] += shift
            covered[y:y + patch, x:x + patch] += 1
    return total / np.maximum(covered, 1)


def _colormap(values01: np.ndarray) -> np.ndarray:
    """``[H, W]`` in [0, 1] -> ``[H, W, 3]`` float RGB in [0, 1]."""
    try:
        from matplotlib import colormaps
    except ImportError:
        rgb = np.zeros(values01.shape + (3,))
        rgb[..., 0] = 1.0  # no matplotlib: plain red, strength by alpha
        return rgb
    return colormaps["turbo"](values01)[..., :3]


def blend(image: Image.Image, heat: np.ndarray, alpha: float = 0.6, grid: int = GRID) -> Image.Image:
    """``heat`` blended on ``image``: averaged to its ``grid x grid`` resolution (the patch
    stride), upsampled smoothly to the image, scaled min to max; the more sensitive a region,
    the more colour.  A uniform map leaves the image as it is."""
    w, h = image.size
    coarse = Image.fromarray(np.asarray(heat, np.float32), mode="F").resize((grid, grid), Image.Resampling.BOX)
    upsampled = np.asarray(coarse.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float64)
    lo, hi = upsampled.min(), upsampled.max()
    norm = np.clip((upsampled - lo) / (hi - lo), 0.0, 1.0) if hi > lo else np.zeros_like(upsampled)
    weight = (alpha * norm)[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    out = base * (1 - weight) + _colormap(norm) * weight
    return Image.fromarray(np.round(out * 255).astype(np.uint8), mode="RGB")
