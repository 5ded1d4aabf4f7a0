"""Ward-film corruptions and wrong-film transforms on preprocessed images (numpy).

Every function takes a model input (``S x S`` float32 in [0, 1]), optional
masks (``[k, S, S]`` soft coverage, moved with the image by the geometric
ones) and a ``numpy.random.Generator``, and returns ``(image, masks)``.  The
result is scaled again with the runtime's percentile scale
(:func:`heartbatch.pixels.scale_to_unit`), as the runtime would see such a
film.  Three users: the content check's training films (what a frontal chest
film may look like, and what is not one), the seeded "corrupted validation"
set, and training augmentation.

Ward corruptions (still a frontal chest film; strengths at S = 224):

=============  ==================================================================
devices        3-6 ECG electrodes (bright discs, r 2-5 px) with leads, 0-2 lines or
               tubes from the top, 0-2 clips, 1-2 text / side markers
haze           soft density at one or both bases (pleural / soft-tissue haze), up
               to +0.35
contrast       range compressed to 35-80 %, gamma 0.5-2.0
noise          Gaussian, sigma 0.02-0.08
resample       down- and upscaled by 2-4x (figure-quality images)
jpeg           JPEG quality 8-35
grid           faint anti-scatter grid lines every 2-4 px, amplitude 0.02-0.06
ap_geometry    magnification 1.0-1.2 about the heart, rotation +-10 deg, lordotic
               tilt (rows squeezed 0-12 % at the top)
collimation    dark or bright bands 3-12 % wide on 1-3 sides
tight_crop     the bottom 8-20 % (costophrenic angles) and up to 8 % of each side
               cut off, the rest stretched back to S x S
whiteout       one or both lungs opacified (pneumonia, ARDS, effusion): patchy
               density +0.2-0.7 over the lung masks (two ellipses without masks),
               heaviest at the bases, which hides the heart borders it touches
sitting        a sitting or semi-erect film: the abdomen bright below the
               diaphragm (+0.15-0.45 over the bottom 15-35 %), bases in its glare
text           heavy burned-in annotation: 2-5 lines of text (12-22 px at 224),
               labels on white boxes, side markers, anywhere at the edges
=============  ==================================================================

Geometric corruptions (they move the anatomy, so the masks move with the image):
``ap_geometry`` and ``tight_crop``; the others leave every box where it was
(:data:`SAME_BOXES`, the corruptions consistency training applies to unlabeled films).

Wrong films (not measured): ``negative``, ``turned_90``, ``turned_270``,
``upside_down``, ``quarter_crop``, ``heavy_blur``, ``heavy_noise``,
``near_constant``; ``mirrored`` is still a chest film but flagged.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from heartbatch.pixels import scale_to_unit

Masks = "np.ndarray | None"


def _rescale(image: np.ndarray) -> np.ndarray:
    return scale_to_unit(np.asarray(image, dtype=np.float32))


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(image, dtype=np.float32), mode="F")


def _affine(array: np.ndarray, matrix: tuple, fill: float = 0.0) -> np.ndarray:
    """Pillow affine (output -> input pixel coordinates), bilinear."""
    size = array.shape[::-1]
    return np.asarray(_pil(array).transform(size, Image.Transform.AFFINE, matrix,
                                            Image.Resampling.BILINEAR, fillcolor=fill), dtype=np.float32)


def _warp(image, masks, matrix, fill=0.0):
    out = _affine(image, matrix, fill)
    if masks is not None:
        masks = np.stack([np.clip(_affine(m, matrix), 0, 1) for m in masks])
    return out, masks


def _crop_resize(image, masks, box):
    """``box`` = (x0, y0, x1, y1) in pixels, stretched back to the full size."""
    size = image.shape[::-1]
    x0, y0, x1, y1 = box
    matrix = ((x1 - x0) / size[0], 0, x0, 0, (y1 - y0) / size[1], y0)
    return _warp(image, masks, matrix)


# --- ward corruptions ------------------------------------------------------------

def devices(image, masks, rng):
    s = image.shape[0]
    canvas = _pil(image)
    draw = ImageDraw.Draw(canvas)
    bright = float(np.percentile(image, 99.5)) + 0.3
    for _ in range(rng.integers(3, 7)):  # ECG electrodes with leads
        cx, cy = rng.uniform(0.15, 0.85) * s, rng.uniform(0.2, 0.85) * s
        r = rng.uniform(2, 5) * s / 224
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=bright, outline=bright)
        points = [(cx, cy)]
        for _ in range(3):
            points.append((points[-1][0] + rng.uniform(-0.2, 0.2) * s, points[-1][1] + rng.uniform(-0.1, 0.3) * s))
        draw.line(points, fill=bright * 0.8, width=max(1, int(s / 224)))
    for _ in range(rng.integers(0, 3)):  # lines and tubes from the top
        x = rng.uniform(0.3, 0.7) * s
        points = [(x, 0)]
        for _ in range(4):
            points.append((points[-1][0] + rng.uniform(-0.08, 0.08) * s, points[-1][1] + rng.uniform(0.05, 0.2) * s))
        draw.line(points, fill=bright, width=int(rng.integers(1, 4) * s / 224) or 1)
    for _ in range(rng.integers(0, 3)):  # clips
        x, y = rng.uniform(0.2, 0.8) * s, rng.uniform(0.1, 0.9) * s
        w, h = rng.uniform(2, 6) * s / 224, rng.uniform(4, 10) * s / 224
        draw.rectangle((x, y, x + w, y + h), fill=bright)
    for _ in range(rng.integers(1, 3)):  # text and side markers near the edges
        x = rng.choice([rng.uniform(0.02, 0.15), rng.uniform(0.75, 0.9)]) * s
        y = rng.choice([rng.uniform(0.02, 0.12), rng.uniform(0.8, 0.92)]) * s
        draw.text((x, y), rng.choice(["R", "L", "AP", "PORTABLE", "SUPINE", "ERECT"]), fill=bright)
    return _rescale(np.asarray(canvas)), masks


def haze(image, masks, rng):
    s = image.shape[0]
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    out = image.copy()
    sides = [(0.3, 0.75)] if rng.random() < 0.3 else [(rng.choice([0.3, 0.7]), 0.75)]
    for cx, cy in sides:
        sx, sy = rng.uniform(0.12, 0.25), rng.uniform(0.1, 0.2)
        cx += rng.uniform(-0.05, 0.05)
        cy += rng.uniform(-0.05, 0.1)
        out += rng.uniform(0.1, 0.35) * np.exp(-((xx - cx) / sx) ** 2 - ((yy - cy) / sy) ** 2)
    return _rescale(out), masks


def contrast(image, masks, rng):
    out = np.clip(image, 0, 1) ** np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    span = rng.uniform(0.35, 0.8)
    out = 0.5 + (out - 0.5) * span + rng.uniform(-0.1, 0.1)
    return _rescale(out), masks


def noise(image, masks, rng):
    return _rescale(image + rng.normal(0, rng.uniform(0.02, 0.08), image.shape).astype(np.float32)), masks


def resample(image, masks, rng):
    s = image.shape[0]
    small = max(8, int(s / rng.uniform(2, 4)))
    out = _pil(image).resize((small, small), Image.Resampling.BILINEAR).resize((s, s), Image.Resampling.BILINEAR)
    return _rescale(np.asarray(out)), masks


def jpeg(image, masks, rng):
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(buffer, "JPEG",
                                                                        quality=int(rng.integers(8, 36)))
    return _rescale(np.asarray(Image.open(buffer), dtype=np.float32) / 255), masks


def grid(image, masks, rng):
    s = image.shape[0]
    period = rng.integers(2, 5)
    lines = (np.arange(s) % period == 0).astype(np.float32) * rng.uniform(0.02, 0.06)
    out = image + (lines[None, :] if rng.random() < 0.5 else lines[:, None])
    return _rescale(out), masks


def ap_geometry(image, masks, rng):
    s = image.shape[0]
    zoom = rng.uniform(1.0, 1.2)
    angle = np.deg2rad(rng.uniform(-10, 10))
    tilt = rng.uniform(0, 0.12)
    cx, cy = 0.55 * s, 0.55 * s  # about the heart
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    # output -> input: rotate/scale about (cx, cy); rows squeezed towards the top by `tilt`
    a, b = cos, -sin * (1 + tilt)
    d, e = sin, cos * (1 + tilt)
    c = cx - a * cx - b * (cy - tilt * s * 0.5)
    f = cy - d * cx - e * (cy - tilt * s * 0.5)
    return _warp(image, masks, (a, b, c, d, e, f), fill=float(image.mean() * 0.3))


def collimation(image, masks, rng):
    s = image.shape[0]
    out = image.copy()
    value = 0.0 if rng.random() < 0.6 else 1.0
    for side in rng.choice(4, size=rng.integers(1, 4), replace=False):
        w = int(rng.uniform(0.03, 0.12) * s)
        if side == 0:
            out[:w] = value
        elif side == 1:
            out[-w:] = value
        elif side == 2:
            out[:, :w] = value
        else:
            out[:, -w:] = value
    return _rescale(out), masks


def tight_crop(image, masks, rng):
    s = image.shape[0]
    left, right = rng.uniform(0, 0.08) * s, s - rng.uniform(0, 0.08) * s
    top, bottom = rng.uniform(0, 0.05) * s, s - rng.uniform(0.08, 0.2) * s
    image, masks = _crop_resize(image, masks, (left, top, right, bottom))
    return _rescale(image), masks


def _lung_cover(masks, s: int) -> np.ndarray:
    """Where the lungs are: the lung masks (channels 1 and 2, right and left lung), or two ellipses
    where a film has no masks."""
    if masks is not None and masks.shape[0] > 1 and masks[1:].max() > 0:
        return masks[1:].max(0)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    return np.clip(sum(1.0 - ((xx - cx) / 0.18) ** 2 - ((yy - 0.5) / 0.3) ** 2 > 0 for cx in (0.3, 0.7)), 0, 1)


def _smooth_field(rng, s: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1]: coarse noise upsampled bilinearly."""
    coarse = rng.uniform(0, 1, size=(cells, cells)).astype(np.float32)
    return np.asarray(_pil(coarse).resize((s, s), Image.Resampling.BILINEAR), dtype=np.float32)


def whiteout(image, masks, rng):
    s = image.shape[0]
    lungs = _lung_cover(masks, s)
    yy = np.mgrid[0:s, 0:s][0].astype(np.float32) / s
    side = rng.choice(["left", "right", "both"])
    keep = np.ones((s, s), np.float32)
    if side != "both":  # the lung on one half of the film
        xx = np.mgrid[0:s, 0:s][1].astype(np.float32) / s
        keep = (xx < 0.5) if side == "left" else (xx >= 0.5)
    grey = Image.fromarray(np.uint8(np.clip(lungs * keep, 0, 1) * 255))  # Pillow blurs 8-bit images only
    cover = np.asarray(grey.filter(ImageFilter.GaussianBlur(rng.uniform(2, 6) * s / 224)), dtype=np.float32) / 255
    patchy = 0.6 + 0.4 * _smooth_field(rng, s, int(rng.integers(3, 7)))
    basal = np.clip(0.3 + yy * rng.uniform(0.8, 1.6), 0, 1.2)  # consolidation and effusion gather low
    return _rescale(image + rng.uniform(0.35, 0.9) * cover * patchy * basal), masks


def sitting(image, masks, rng):
    s = image.shape[0]
    yy = np.mgrid[0:s, 0:s][0].astype(np.float32) / s
    top = 1.0 - rng.uniform(0.15, 0.35)
    ramp = np.clip((yy - top) / rng.uniform(0.1, 0.25), 0, 1) ** 1.5
    return _rescale(image + rng.uniform(0.15, 0.45) * ramp), masks


TEXT_WORDS = ("PORTABLE", "AP", "SUPINE", "SEMI-ERECT", "ICU", "BED 12", "08:42", "L", "R", "CHEST",
              "1 VIEW", "TECH JD", "65 kVp", "2.5 mAs", "MOBILE", "STAT", "UPRIGHT", "COVID")


def text(image, masks, rng):
    s = image.shape[0]
    canvas = _pil(image)
    draw = ImageDraw.Draw(canvas)
    bright = float(np.percentile(image, 99.5)) + 0.3
    for _ in range(rng.integers(2, 6)):
        size = int(rng.uniform(12, 22) * s / 224)
        font = ImageFont.load_default(size=size)
        words = " ".join(rng.choice(TEXT_WORDS, size=int(rng.integers(1, 4))))
        x = rng.choice([rng.uniform(0.01, 0.2), rng.uniform(0.55, 0.75)]) * s
        y = rng.choice([rng.uniform(0.01, 0.12), rng.uniform(0.82, 0.93), rng.uniform(0.15, 0.8)]) * s
        if rng.random() < 0.3:  # a label on a white box
            left, top, right, bottom = draw.textbbox((x, y), words, font=font)
            draw.rectangle((left - 2, top - 2, right + 2, bottom + 2), fill=bright)
            draw.text((x, y), words, fill=0.0, font=font)
        else:
            draw.text((x, y), words, fill=bright, font=font)
    return _rescale(np.asarray(canvas)), masks


WARD = {f.__name__: f for f in (devices, haze, contrast, noise, resample, jpeg, grid, ap_geometry, collimation,
                                tight_crop, whiteout, sitting, text)}
SAME_BOXES = tuple(name for name in WARD if name not in ("ap_geometry", "tight_crop"))


def ward(image, masks, rng, n: int | None = None, kinds=None):
    """``n`` (1-3 when None) ward corruptions of ``kinds`` (every one when None) in random order."""
    names = rng.choice(sorted(kinds or WARD), size=n or int(rng.integers(1, 4)), replace=False)
    for name in names:
        image, masks = WARD[name](image, masks, rng)
    return image, masks


# --- wrong films ---------------------------------------------------------------------

def negative(image, masks, rng):
    return _rescale(1.0 - image), masks


def turned_90(image, masks, rng):
    return np.ascontiguousarray(np.rot90(image, 1)), None


def turned_270(image, masks, rng):
    return np.ascontiguousarray(np.rot90(image, 3)), None


def upside_down(image, masks, rng):
    out = np.rot90(image, 2) if rng.random() < 0.5 else image[::-1]
    return np.ascontiguousarray(out), None


def mirrored(image, masks, rng):
    return np.ascontiguousarray(image[:, ::-1]), None if masks is None else np.ascontiguousarray(masks[:, :, ::-1])


def quarter_crop(image, masks, rng):
    s = image.shape[0]
    side = rng.uniform(0.35, 0.55) * s
    x0, y0 = rng.uniform(0, s - side), rng.uniform(0, s - side)
    out, _ = _crop_resize(image, None, (x0, y0, x0 + side, y0 + side))
    return _rescale(out), None


def heavy_blur(image, masks, rng):
    s = image.shape[0]
    small = max(2, int(s / rng.uniform(16, 40)))  # Pillow blurs no float images: shrink and grow back
    out = _pil(image).resize((small, small), Image.Resampling.BOX).resize((s, s), Image.Resampling.BICUBIC)
    return _rescale(np.asarray(out)), None


def heavy_noise(image, masks, rng):
    return _rescale(image * rng.uniform(0, 0.5) + rng.normal(0, 1, image.shape).astype(np.float32)), None


def near_constant(image, masks, rng):
    out = np.full(image.shape, rng.uniform(0, 1), np.float32) + image * rng.uniform(0, 0.02)
    return _rescale(out + rng.normal(0, 0.003, image.shape).astype(np.float32)), None


WRONG = {f.__name__: f for f in (negative, turned_90, turned_270, upside_down, quarter_crop, heavy_blur,
                                 heavy_noise, near_constant)}


def seeded(seed: int, *key) -> np.random.Generator:
    """A generator fixed by a seed and a key (image name, kind): the same corrupted set every time."""
    import hashlib

    digest = hashlib.sha256(repr((seed,) + key).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))
