"""Drawing the measurement on the image: heart box (red), thorax box (blue), widths, CTR
(± its uncertainty), the content check's chest score and the review flag.

The display image comes from the same pixel pipeline as the model input
(:func:`heartbatch.dicom.read_dicom`, then :func:`heartbatch.pixels.display`,
which resizes keeping the aspect ratio); boxes come in pixels of the original
image, from a :class:`~heartbatch.records.Record` or a report row, and are
scaled to the display size here.  A model's masks (the record's, or those the
report's ledger keeps) are drawn as outlines.  Used by `heartbatch show`, by the
HTML report's thumbnails and by the review page's outline layer.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .records import Box, Record

HEART = (255, 0, 0)        # pure red / blue, so tests and eyes find them on a grey image
THORAX = (0, 90, 255)
TEXT = (255, 255, 255)
FLAG = (255, 170, 0)
HEART_TEXT = (255, 120, 120)  # lighter tints read better on the dark label background
THORAX_TEXT = (120, 175, 255)
#: mask outlines (a model with masks): heart (pink), right lung (green), left lung (cyan)
OUTLINES = ((255, 80, 170), (0, 220, 120), (0, 200, 255))


@dataclass(frozen=True)
class Marks:
    """What is drawn: boxes in original-image pixels (x1/y1 exclusive) and the numbers."""
    heart: Box | None
    thorax: Box | None = None
    ctr: float | None = None
    heart_width_mm: float | None = None
    thoracic_width_mm: float | None = None
    enlarged: bool | None = None
    chest_score: float | None = None
    uncertainty: float | None = None   # one standard deviation of the CTR
    review: bool | None = None
    review_reason: str = ""
    masks: np.ndarray | None = field(default=None, compare=False, repr=False)  # [3, H, W] model-grid probabilities

    @classmethod
    def from_record(cls, record: Record) -> "Marks":
        return cls(record.heart, record.thorax, record.ctr, record.heart_width_mm,
                   record.thoracic_width_mm, record.enlarged, record.chest_score, record.uncertainty,
                   record.review, record.review_reason, record.masks)

    @classmethod
    def from_row(cls, row: Mapping[str, str], threshold: float | None = None) -> "Marks":
        """A report row (strings, empty = missing).  With ``threshold``, `enlarged` is
        recomputed from the CTR instead of taken from the row."""
        def number(key: str) -> float | None:
            try:
                value = float(row.get(key, "") or "nan")
            except ValueError:
                return None
            return value if math.isfinite(value) else None

        def box(prefix: str) -> Box | None:
            values = [number(f"{prefix}_{k}") for k in ("x0", "y0", "x1", "y1")]
            return None if any(v is None for v in values) else tuple(values)  # type: ignore[return-value]

        ctr = number("ctr")
        if threshold is not None and ctr is not None:
            enlarged = ctr > threshold
        else:
            enlarged = {"true": True, "false": False}.get(str(row.get("enlarged", "")).lower())
        return cls(box("heart"), box("thorax"), ctr, number("heart_width_mm"), number("thoracic_width_mm"),
                   enlarged, number("chest_score"), number("uncertainty"),
                   {"true": True, "false": False}.get(str(row.get("review", "")).lower()),
                   str(row.get("review_reason") or ""))


def load_display(path: str | Path, max_side: int) -> tuple[int, int, np.ndarray]:
    """``(rows, columns, image)``: the DICOM's original size and its [0, 1] display image
    with the longer side at most ``max_side`` (raises dicom.Skipped / ReadError)."""
    from .dicom import read_dicom
    from .pixels import display

    dicom = read_dicom(path)
    rows, columns = dicom.image.shape
    return rows, columns, display(dicom.image, max_side)


def to_rgb(image01: np.ndarray) -> Image.Image:
    grey = np.round(np.clip(image01, 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def scale_box(box: Box, sx: float, sy: float) -> tuple[int, int, int, int]:
    """Original-pixel box (exclusive x1/y1) -> inclusive display pixels for Pillow."""
    x0, y0, x1, y1 = box
    left, top = round(x0 * sx), round(y0 * sy)
    return left, top, max(left, round(x1 * sx) - 1), max(top, round(y1 * sy) - 1)


def _hline(draw: ImageDraw.ImageDraw, x0: int, x1: int, y: int, color, width: int) -> None:
    """A measurement line with end ticks."""
    tick = 3 * width
    draw.line([(x0, y), (x1, y)], fill=color, width=width)
    for x in (x0, x1):
        draw.line([(x, y - tick), (x, y + tick)], fill=color, width=width)


def _label(draw: ImageDraw.ImageDraw, xy, text: str, color, font, anchor: str = "la") -> int:
    """Text on a dark box, readable on any part of a radiograph; returns the box's bottom edge."""
    x0, y0, x1, y1 = draw.textbbox(xy, text, font=font, anchor=anchor)
    pad = max(2, (y1 - y0) // 5)
    draw.rectangle([x0 - pad, y0 - pad, x1 + pad, y1 + pad], fill=(0, 0, 0))
    draw.text(xy, text, fill=color, font=font, anchor=anchor)
    return y1 + pad


def _length(pixels: float, mm: float | None) -> str:
    return f"{mm:.0f} mm" if mm is not None else f"{pixels:.0f} px"


def draw_marks(image: Image.Image, rows: int, columns: int, marks: Marks, note: str = "") -> Image.Image:
    """Draw boxes, width lines and the CTR onto ``image`` (an RGB display image of an
    original ``rows x columns`` image), in place; returns it."""
    draw = ImageDraw.Draw(image)
    w, h = image.size
    sx, sy = w / columns, h / rows
    line = _line_width(w, h)
    font = _font(max(11, round(max(w, h) / 32)))
    small = _font(max(10, round(max(w, h) / 45)))
    labels = max(w, h) >= 400   # thumbnails carry the numbers in their caption
    if marks.masks is not None:
        draw_outlines(image, marks.masks, outline_width(w, h))
    for box, color in ((marks.thorax, THORAX), (marks.heart, HEART)):
        if box is not None:
            draw.rectangle(scale_box(box, sx, sy), outline=color, width=line)
    if marks.heart is not None:
        hx0, hy0, hx1, hy1 = scale_box(marks.heart, sx, sy)
        y = (hy0 + hy1) // 2
        _hline(draw, hx0 + line, hx1 - line, y, HEART, max(1, line // 2))
        if labels:
            text = "heart " + _length(marks.heart[2] - marks.heart[0], marks.heart_width_mm)
            _label(draw, ((hx0 + hx1) / 2, y - 4 * line), text, HEART_TEXT, small, "md")
    if marks.thorax is not None:
        tx0, ty0, tx1, ty1 = scale_box(marks.thorax, sx, sy)
        # thoracic width is read low in the chest, near the diaphragm: at the heart's lower edge
        y = scale_box(marks.heart, sx, sy)[3] - 3 * line if marks.heart is not None else (ty0 + ty1) // 2
        y = min(max(y, ty0 + 3 * line), ty1 - 3 * line)
        _hline(draw, tx0 + line, tx1 - line, y, THORAX, max(1, line // 2))
        if labels:
            text = "thorax " + _length(marks.thorax[2] - marks.thorax[0], marks.thoracic_width_mm)
            _label(draw, ((tx0 + tx1) / 2, y + 4 * line), text, THORAX_TEXT, small, "ma")
    y = line * 3
    if marks.ctr is not None:
        sd = f" ± {marks.uncertainty:.3f}" if marks.uncertainty is not None else ""
        text = f"CTR {marks.ctr:.3f}{sd}" + (" enlarged" if marks.enlarged else "")
        y = _label(draw, (line * 3, y), text, FLAG if marks.enlarged else TEXT, font) + line * 2
    if marks.chest_score is not None and labels:
        y = _label(draw, (line * 3, y), f"chest score {marks.chest_score:.2f}", TEXT, small) + line * 2
    if marks.review:  # drawn at any size: the one thing a reader must not miss
        reason = marks.review_reason[:80] or "check this measurement"
        _label(draw, (line * 3, y), f"REVIEW: {reason}", FLAG, small)
    if note:
        _label(draw, (line * 3, h - line * 3), note, TEXT, small, "ld")
    return image


def _line_width(w: int, h: int) -> int:
    """The boxes' line width on a ``w x h`` display image."""
    return max(2, round(max(w, h) / 200))


def outline_width(w: int, h: int) -> int:
    """The mask outlines' width on a ``w x h`` display image: half the boxes' line, so the boxes
    stay on top to the eye."""
    return max(1, _line_width(w, h) // 2)


def _outline_pixels(masks: np.ndarray, rows: int, columns: int, width: int):
    """``(edge, colour)`` of each mask on a ``rows x columns`` display grid: the mask resampled as the
    boxes are mapped (:func:`heartbatch.masks.solid_on_grid`), its boundary ``width`` pixels wide."""
    from .masks import outline, solid_on_grid

    for solid, color in zip(solid_on_grid(masks, rows, columns), OUTLINES):
        edge = outline(solid)
        for _ in range(width - 1):  # thicken inwards, so the outline stays inside the structure
            edge |= outline(solid & ~edge)
        yield edge, color


def draw_outlines(image: Image.Image, masks: np.ndarray, width: int = 1) -> Image.Image:
    """The outlines of the model's masks (``[3, H, W]`` probabilities on the model input's grid)
    on ``image``, a display image of the whole film, in place."""
    w, h = image.size
    pixels = np.array(image)
    for edge, color in _outline_pixels(masks, h, w, width):
        pixels[edge] = color
    image.paste(Image.fromarray(pixels))
    return image


def outline_layer(masks: np.ndarray, rows: int, columns: int) -> Image.Image:
    """The outlines alone (the pixels :func:`draw_outlines` draws, at its width for this size) on a
    transparent ``rows x columns`` RGBA image, to lay over a display image of the film of that size:
    the review page shows or hides them without sending the film again."""
    pixels = np.zeros((rows, columns, 4), np.uint8)
    for edge, color in _outline_pixels(masks, rows, columns, outline_width(columns, rows)):
        pixels[edge] = (*color, 255)
    return Image.fromarray(pixels)


def render(path: str | Path, marks: Marks, max_side: int = 256) -> Image.Image:
    """The DICOM at ``path`` with ``marks`` drawn on it, longer side at most ``max_side``."""
    rows, columns, image = load_display(path, max_side)
    return draw_marks(to_rgb(image), rows, columns, marks)


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    """PNG, or JPEG without chroma subsampling (thin red/blue lines stay red/blue)."""
    buffer = io.BytesIO()
    if fmt.upper() == "JPEG":
        image.save(buffer, format="JPEG", quality=90, subsampling=0)
    else:
        image.save(buffer, format=fmt)
    return buffer.getvalue()
