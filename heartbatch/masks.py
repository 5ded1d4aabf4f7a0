"""Measuring from the model's optional ``masks`` output (numpy only).

``masks`` is float32 ``[N, 3, H, W]``: probabilities of the heart, the right lung and the left lung
(the patient's right and left) on the model input's grid.  The model input is the whole film
resized to ``S x S``, so a mask cell ``(i, j)`` of an ``H x W`` grid covers the normalized square
``[j / W, (j + 1) / W] x [i / H, (i + 1) / H]`` of the film, whatever its size: the same
normalized frame as the ``boxes`` output, mapped to the film's pixels by
:func:`heartbatch.geometry.to_pixels` (boxes) and :func:`to_grid` (the masks themselves).

:func:`boxes_from_masks` is *the* implementation of "boxes from masks" of the runtime and of
evaluation, and of training, whose box targets are the boxes of the moved masks
(``exporter.augment.boxes_of``): the heart box is the heart mask's extent, the thorax box the extent
of both lungs together.  :func:`mask_problems` gives the review reasons the masks alone can give.
:func:`encode_masks` and :func:`decode_masks` keep a row's masks small (a few KB) in the report's
ledger, for the outlines of the HTML report and the review page.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

HEART, RIGHT_LUNG, LEFT_LUNG = 0, 1, 2
CHANNELS = ("heart", "right lung", "left lung")

#: A structure is present when its probability reaches this somewhere; its pixels are those at or
#: above it (outlines, pieces, areas, DICOM Segmentation).
PRESENT = 0.5
#: How many cells before the first cell at :data:`PRESENT` the edge's soft coverage is counted
#: from: the partially covered cells of an edge (area sampling: one; a bilinear warp or a model's
#: blur: two or three), but not a faint speck or haze further out.
RAMP = 3

#: A lung piece smaller than this fraction of the grid is a speck, not a piece.
SPECK = 0.005
#: Plausible areas, as fractions of the film (mask cells at :data:`PRESENT`): the heart and both
#: lungs together. The 446 films of ../shared/data/cxr-ctr, masks resized to 224 x 224 and cut at
#: half: heart 5.0-16.8 % (1st-99th percentile 6.0-15.6 %), lungs 12.2-45.8 % (14.5-42.9 %); every
#: lung in one piece (pieces of at least :data:`SPECK`), every right lung on the image left.
#: The ranges are those widened by a margin.
HEART_AREA = (0.03, 0.25)
LUNGS_AREA = (0.08, 0.60)


def _edges(profile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sub-pixel first/last edge of coverage profiles ``[..., L]`` (values 0..1), normalized to
    ``[0, 1]`` of the profile's length; NaN where the profile never reaches :data:`PRESENT`.

    The cumulative maximum of the coverage profile; the empty mass before it first reaches full
    coverage is the leading edge: exact for area-sampled masks, whose edge cells hold the covered
    fraction.  Made fit for a model's probabilities:

    * **normalized by the profile's maximum**: a model's interior probabilities are 0.97 or 0.99,
      never exactly 1; without it every cell counts ``1 - 0.99`` of empty mass and the edge drifts
      by a pixel per hundred cells (2 px at 224).  Thresholding at 0.5 with a linear interpolation
      of the crossing was the other choice: it is robust but not exact on area-sampled masks (an
      edge cell covered 25 % gives the edge 0.08 px off), and the trainer's targets are area
      sampled; the normalized coverage is exact on them.
    * **counted from :data:`RAMP` cells before the first cell at :data:`PRESENT`** (after the
      normalization): the coverage of the edge's own partial cells counts, a faint speck or haze
      further away does not (the cumulative maximum would otherwise carry it to the edge).
    """
    profile = np.nan_to_num(np.asarray(profile, dtype=np.float64), nan=0.0)
    length = profile.shape[-1]
    peak = profile.max(axis=-1, keepdims=True)
    present = peak[..., 0] >= PRESENT
    q = np.clip(profile / np.where(peak > 0, peak, 1.0), 0.0, 1.0)

    def lead(values: np.ndarray) -> np.ndarray:
        first = np.argmax(values >= PRESENT, axis=-1)               # first cell at PRESENT
        start = np.maximum(first - RAMP, 0)[..., None]
        index = np.arange(length)
        window = np.where(index >= start, values, 0.0)               # nothing before the ramp counts
        return (1.0 - np.maximum.accumulate(window, axis=-1)).sum(axis=-1)

    x0 = lead(q) / length
    x1 = (length - lead(q[..., ::-1])) / length
    return np.where(present, x0, np.nan), np.where(present, x1, np.nan)


def channel_boxes(masks: np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` probabilities -> ``[N, C, 4]`` normalized boxes ``x0, y0, x1, y1`` of each
    channel's extent (NaN for a channel that is nowhere at :data:`PRESENT`)."""
    masks = np.asarray(masks, dtype=np.float64)
    x0, x1 = _edges(masks.max(axis=2))   # column profile
    y0, y1 = _edges(masks.max(axis=3))   # row profile
    return np.stack([x0, y0, x1, y1], axis=-1)


def lungs(masks: np.ndarray) -> np.ndarray:
    """Both lungs as one soft mask ``[N, H, W]`` (their union: the larger probability)."""
    masks = np.asarray(masks)
    return np.maximum(masks[:, RIGHT_LUNG], masks[:, LEFT_LUNG])


def boxes_from_masks(masks: np.ndarray) -> np.ndarray:
    """``[N, 3, H, W]`` probabilities (heart, right lung, left lung) -> ``[N, 8]`` normalized
    boxes: the heart mask's extent, then the extent of both lungs together (the thorax box), each
    ``x0, y0, x1, y1`` in ``[0, 1]`` of the grid's width / height, edges to sub-pixel precision
    (see :func:`_edges`); NaN where the heart or both lungs are missing."""
    masks = np.asarray(masks, dtype=np.float64)
    if masks.ndim != 4 or masks.shape[1] != 3:
        raise ValueError(f"masks must be [N, 3, H, W], not {list(masks.shape)}")
    pair = np.stack([masks[:, HEART], lungs(masks)], axis=1)
    return channel_boxes(pair).reshape(len(masks), 8)


def measured_boxes(regressed: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What a masks model's rows report, for fitting and evaluating it over many films: the masks'
    boxes, and the regressed ``boxes`` where a mask is empty (the runtime makes such a row an
    error instead; a calibration or a metric needs a number). Also which rows fell back."""
    from_masks = boxes_from_masks(masks)
    missing = ~np.isfinite(from_masks).all(axis=1)
    return np.where(missing[:, None], np.asarray(regressed, dtype=np.float64), from_masks), missing


# --- regions -----------------------------------------------------------------------------------

def pieces(mask: np.ndarray) -> list[int]:
    """Sizes (cells) of the 8-connected pieces of a boolean 2-D mask, largest first. Run-length
    union-find: every row's runs found at once by numpy, then joined row to row in plain Python (a
    lung has one or two runs per row, so that loop is short; per-row numpy calls cost more than it)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    starts, ends = np.nonzero(step == 1), np.nonzero(step == -1)   # row-major: paired in order
    parent = list(range(len(starts[0])))
    size = (ends[1] - starts[1]).tolist()

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    previous: list[tuple[int, int, int]] = []
    current: list[tuple[int, int, int]] = []
    row_of = None
    for label, (row, start, end) in enumerate(zip(starts[0].tolist(), starts[1].tolist(), ends[1].tolist())):
        if row != row_of:
            previous = current if row_of is not None and row == row_of + 1 else []
            current, row_of = [], row
        for p_start, p_end, p_label in previous:
            if p_start <= end and start <= p_end:   # touching, diagonals included (8-connected)
                a, b = find(label), find(p_label)
                if a != b:
                    parent[b] = a
                    size[a] += size[b]
        current.append((start, end, label))
    return sorted((size[i] for i in range(len(parent)) if parent[i] == i), reverse=True)


def mask_problems(masks: np.ndarray, boxes: np.ndarray | None = None) -> list[str]:
    """Review reasons, in plain words, from one image's ``[3, H, W]`` masks: a lung in pieces
    (specks ignored), the heart's centre outside the lungs' span, the heart or the lungs of an
    implausible area, the lungs on the wrong sides.  ``boxes``: the row's normalized boxes when
    they are these masks' already (the runtime's), so they are not taken again."""
    masks = np.nan_to_num(np.asarray(masks, dtype=np.float64), nan=0.0)
    cells = masks.shape[1] * masks.shape[2]
    solid = masks >= PRESENT
    problems = []
    for channel in (RIGHT_LUNG, LEFT_LUNG):
        name = CHANNELS[channel]
        parts = [n for n in pieces(solid[channel]) if n >= SPECK * cells]
        if not parts:
            problems.append(f"{name} not found in the masks")
        elif len(parts) > 1:
            problems.append(f"{name} in {len(parts)} pieces")
    heart_area = solid[HEART].sum() / cells
    lungs_area = (solid[RIGHT_LUNG] | solid[LEFT_LUNG]).sum() / cells
    if solid[HEART].any() and not HEART_AREA[0] <= heart_area <= HEART_AREA[1]:
        problems.append(f"heart area {heart_area:.0%} of the film, outside "
                        f"{HEART_AREA[0]:.0%}-{HEART_AREA[1]:.0%}")
    if lungs_area > 0 and not LUNGS_AREA[0] <= lungs_area <= LUNGS_AREA[1]:
        problems.append(f"lung area {lungs_area:.0%} of the film, outside "
                        f"{LUNGS_AREA[0]:.0%}-{LUNGS_AREA[1]:.0%}")
    centre = _centre(masks[HEART])
    box = (boxes_from_masks(masks[None])[0] if boxes is None or len(boxes) < 8
           else np.asarray(boxes, dtype=np.float64))[4:8]
    if centre is not None and np.isfinite(box).all():
        x, y = centre[0] / masks.shape[2], centre[1] / masks.shape[1]
        if not (box[0] <= x <= box[2] and box[1] <= y <= box[3]):
            problems.append("heart centre outside the span of the lungs")
    right, left = _centre(masks[RIGHT_LUNG]), _centre(masks[LEFT_LUNG])
    if right is not None and left is not None and right[0] > left[0]:
        problems.append("right lung on the image right (mirrored film or swapped lungs?)")
    return problems


def _centre(mask: np.ndarray) -> tuple[float, float] | None:
    """Probability-weighted centre ``(x, y)`` in cells (cell centres at +0.5) of the cells at
    :data:`PRESENT`; None when there are none."""
    weight = np.where(mask >= PRESENT, mask, 0.0)
    total = weight.sum()
    if not total > 0:
        return None
    rows, cols = np.indices(mask.shape)
    return float((weight * (cols + 0.5)).sum() / total), float((weight * (rows + 0.5)).sum() / total)


# --- back to the film's pixels -------------------------------------------------------------------

def to_grid(mask: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """One ``[H, W]`` probability map resampled onto a ``rows x columns`` grid covering the same
    film (float32): the normalized frame is shared, so grid cell centres map linearly (the
    mapping of :func:`heartbatch.geometry.to_pixels`, cell centres at +0.5), bilinear between."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(mask, dtype=np.float32), mode="F")
    return np.asarray(image.resize((int(columns), int(rows)), Image.BILINEAR), dtype=np.float32)


def solid_on_grid(masks: np.ndarray, rows: int, columns: int) -> np.ndarray:
    """``[C, H, W]`` probabilities -> ``[C, rows, columns]`` booleans (at :data:`PRESENT`) on the
    film's grid."""
    return np.stack([to_grid(m, rows, columns) >= PRESENT for m in np.asarray(masks)])


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary cells of a boolean 2-D mask: set cells with an unset 4-neighbour (or on the
    grid's edge)."""
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1, constant_values=False)
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~inner


# --- kept with the row ---------------------------------------------------------------------------

#: The stored form's header: a tag, then the grid's channels, rows and columns (big-endian).
STORED = struct.Struct(">4sBHH")
STORED_TAG = b"HBM1"
#: The longest side of the grid kept with a row: a model's masks come at stride 4 (56 cells at
#: S = 224, 128 at S = 512) and are kept as they are; a finer grid is area-averaged down to this, so
#: that a row's masks stay a few KB (outlines on a 1024-pixel film need no more).
STORED_SIDE = 128
#: zlib's level for them: 6 (its default) packs a model's masks within a few percent of 9 at half the time.
ZLIB_LEVEL = 6


def _area_weights(n: int, m: int) -> np.ndarray:
    """``[m, n]`` weights: each of ``m`` target cells the mean of the ``n`` source cells under its
    extent (both grids span the same film)."""
    step = n / m
    lo = (np.arange(m) * step)[:, None]
    cells = np.arange(n)[None]
    overlap = np.clip(np.minimum(lo + step, cells + 1) - np.maximum(lo, cells), 0.0, None)
    return overlap / step


def encode_masks(masks: np.ndarray) -> bytes:
    """One image's ``[C, H, W]`` probabilities -> compact bytes to keep with its row (the ledger):
    a header (:data:`STORED`), then the probabilities as 0-255 steps, zlib-compressed. A model's
    masks are mostly 0 or 1, so a 56 x 56 grid takes 1-2 KB. A grid finer than :data:`STORED_SIDE`
    is area-averaged down to it first (the same normalized frame: the grid spans the whole film)."""
    masks = np.clip(np.nan_to_num(np.asarray(masks, dtype=np.float64), nan=0.0), 0.0, 1.0)
    if masks.ndim != 3 or masks.shape[0] > 255:
        raise ValueError(f"masks must be [C, H, W], not {list(masks.shape)}")
    channels, rows, columns = masks.shape
    scale = STORED_SIDE / max(rows, columns)
    if scale < 1:
        rows, columns = max(1, round(rows * scale)), max(1, round(columns * scale))
        masks = np.einsum("ih,chw,jw->cij", _area_weights(masks.shape[1], rows), masks,
                          _area_weights(masks.shape[2], columns))
    steps = np.round(masks * 255).astype(np.uint8)
    return STORED.pack(STORED_TAG, channels, rows, columns) + zlib.compress(steps.tobytes(), ZLIB_LEVEL)


def decode_masks(data: bytes) -> np.ndarray:
    """Bytes of :func:`encode_masks` -> float32 ``[C, H, W]`` probabilities (within 1/510 of those
    encoded, on the grid kept). Raises ValueError for bytes that are not such masks."""
    data = bytes(data)
    if len(data) < STORED.size or data[:4] != STORED_TAG:
        raise ValueError("not masks stored by heartbatch (unknown header)")
    _, channels, rows, columns = STORED.unpack_from(data)
    expected = channels * rows * columns
    try:  # never more than the grid holds, whatever the bytes say
        steps = zlib.decompressobj().decompress(data[STORED.size:], expected + 1)
    except zlib.error as exc:
        raise ValueError(f"stored masks are damaged ({exc})") from None
    if len(steps) != expected:
        raise ValueError(f"stored masks are damaged ({len(steps)} values for a {channels} x {rows} x {columns} grid)")
    return np.frombuffer(steps, dtype=np.uint8).reshape(channels, rows, columns).astype(np.float32) / np.float32(255)
