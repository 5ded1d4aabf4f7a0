"""Training films for the content check, and fitting its classifier and distance.

Positives are the training split's chest films, as they are and made to look
like ward films (:mod:`exporter.corrupt`); negatives are the same films made
wrong (negative, turned, upside down, a crop of one part, heavy blur or noise,
near-constant), the non-chest images that pip packages ship (pydicom's and
pydicom-data's CT, MR, NM, US, extremity CR, test patterns, treated as if
they were radiographs) and drawn test patterns.  A mirrored film is its own
class: still a chest film, measured, but flagged.

Real ward films (``trust-onnx --ward``: the fitting patients' films, as they are,
mirrored and made wrong) teach it that portable, sick and cluttered films are
chest films.  Real lateral views and most body parts are not available here, so
the classifier is not trusted alone: a Mahalanobis distance of the layer4
features from the training films (chest and ward films) flags, never refuses,
an image unlike anything seen in training ("unlike the films the model was
trained on"): a chest film is never refused for being unusual.
"""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from heartbatch.pixels import display_image, preprocess, scale_to_unit

from . import corrupt
from .net import LAYER4_DIMS

CHEST, MIRRORED, NEGATIVE, TURNED, UPSIDE_DOWN, CROPPED, OTHER = range(7)
CLASSES = ("chest", "mirrored", "negative", "turned", "upside_down", "cropped", "other")
WRONG_CLASS = {"negative": NEGATIVE, "turned_90": TURNED, "turned_270": TURNED, "upside_down": UPSIDE_DOWN,
               "quarter_crop": CROPPED, "heavy_blur": OTHER, "heavy_noise": OTHER, "near_constant": OTHER}
#: pydicom / pydicom-data files that are chest radiographs: never negatives (kept out of fitting)
CHEST_FILES = ("RG1_",)


@dataclass
class Samples:
    images: list[np.ndarray] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)   # what made it, for per-kind accuracy
    groups: list[str] = field(default_factory=list)  # source image, so held-out checks never share one

    def add(self, image: np.ndarray, label: int, kind: str, group: str) -> None:
        self.images.append(np.asarray(image, np.float32))
        self.labels.append(label)
        self.kinds.append(kind)
        self.groups.append(group)

    def extend(self, other: "Samples") -> None:
        for name in ("images", "labels", "kinds", "groups"):
            getattr(self, name).extend(getattr(other, name))


def chest_samples(images: dict[str, np.ndarray], seed: int, ward_copies: int = 2, wrong_copies: int = 1) -> Samples:
    """Each chest film as it is, ``ward_copies`` ward versions, mirrored, and every wrong kind."""
    out = Samples()
    for key, image in sorted(images.items()):
        out.add(image, CHEST, "chest", key)
        for i in range(ward_copies):
            out.add(corrupt.ward(image, None, corrupt.seeded(seed, key, "ward", i))[0], CHEST, "ward", key)
        rng = corrupt.seeded(seed, key, "mirrored")
        base = corrupt.ward(image, None, rng)[0] if rng.random() < 0.5 else image
        out.add(corrupt.mirrored(base, None, rng)[0], MIRRORED, "mirrored", key)
        for name, function in corrupt.WRONG.items():
            for i in range(wrong_copies):
                rng = corrupt.seeded(seed, key, name, i)
                base = corrupt.ward(image, None, rng)[0] if rng.random() < 0.5 else image
                out.add(function(base, None, rng)[0], WRONG_CLASS[name], name, key)
    return out


def package_files() -> list[str]:
    """The DICOM files that pydicom and pydicom-data ship (found on disk; nothing is downloaded)."""
    import pydicom

    roots = [os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")]
    try:
        import data_store  # pydicom-data

        roots.append(os.path.join(os.path.dirname(data_store.__file__), "data"))
    except ImportError:
        pass
    files = [f for root in roots for f in glob.glob(os.path.join(root, "**", "*"), recursive=True)]
    return sorted(f for f in files if os.path.isfile(f))


def package_image(path: str, size: int) -> np.ndarray | None:
    """Any 2-D image in a DICOM file as a model input, header checks ignored (None when none)."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # test files are odd on purpose; what matters is their pixels
        try:
            ds = pydicom.dcmread(path, force=True)
            pixels = np.asarray(ds.pixel_array, dtype=np.float32)
        except Exception:  # noqa: BLE001 - many test files are broken on purpose
            return None
        colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1
        if colour:
            pixels = pixels.mean(-1)
        while pixels.ndim > 2:
            pixels = pixels[pixels.shape[0] // 2]
        if min(pixels.shape) < 32 or float(pixels.std()) == 0.0:
            return None
        try:
            image = pixels if colour else display_image(pixels, ds)
        except Exception:  # noqa: BLE001
            image = pixels
    return preprocess(image, size)


def package_samples(size: int, seed: int, copies: int = 4) -> Samples:
    """Non-chest images from the packages; identical pixel data is counted once."""
    out, seen = Samples(), set()
    for path in package_files():
        name = os.path.basename(path)
        if name.startswith(CHEST_FILES):
            continue
        image = package_image(path, size)
        if image is None:
            continue
        digest = np.round(image[::8, ::8], 1).tobytes()
        if digest in seen:
            continue
        seen.add(digest)
        group = "pkg:" + name.split("_")[0].split(".")[0].split("-")[0]
        out.add(image, OTHER, "package", group)
        for i in range(copies):  # turned, cropped, zoomed versions of the same image
            rng = corrupt.seeded(seed, name, "pkg", i)
            variant = rng.choice(["turned_90", "upside_down", "quarter_crop", "ward"])
            fn = corrupt.ward if variant == "ward" else corrupt.WRONG[variant]
            out.add(fn(image, None, rng)[0], OTHER, "package", group)
    return out


def pattern_samples(size: int, seed: int, n: int = 60) -> Samples:
    """Test patterns: bars, grey steps, checkerboards, circles, gradients, text."""
    out = Samples()
    for i in range(n):
        rng = corrupt.seeded(seed, "pattern", i)
        canvas = Image.new("F", (size, size), float(rng.uniform(0, 1)))
        draw = ImageDraw.Draw(canvas)
        kind = i % 5
        if kind == 0:  # bars / grey steps
            steps = int(rng.integers(4, 12))
            for k in range(steps):
                box = (k * size / steps, 0, (k + 1) * size / steps, size)
                draw.rectangle(box if rng.random() < 0.5 else (0, box[0], size, box[2]), fill=float(rng.uniform()))
        elif kind == 1:  # checkerboard
            cell = int(rng.integers(4, 40))
            yy, xx = np.mgrid[0:size, 0:size]
            canvas = Image.fromarray((((yy // cell) + (xx // cell)) % 2).astype(np.float32), mode="F")
        elif kind == 2:  # circles
            for _ in range(int(rng.integers(1, 8))):
                cx, cy, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(5, size / 2)]
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=float(rng.uniform()), width=int(rng.integers(1, 6)))
        elif kind == 3:  # gradients
            yy, xx = np.mgrid[0:size, 0:size] / size
            a, b = rng.normal(size=2)
            canvas = Image.fromarray((a * xx + b * yy + rng.normal(0, 0.05, (size, size))).astype(np.float32), mode="F")
        else:  # text
            for _ in range(int(rng.integers(3, 15))):
                draw.text(tuple(rng.uniform(0, size * 0.9, 2)), "TEST 123 SMPTE", fill=float(rng.uniform()))
        out.add(scale_to_unit(np.asarray(canvas, np.float32)), OTHER, "pattern", f"pattern:{kind}")
    return out


# --- fitting ------------------------------------------------------------------------

@dataclass
class ContentHead:
    classes: tuple[str, ...]
    mu: np.ndarray            # feature standardization
    sd: np.ndarray
    w: np.ndarray             # [D, K] on standardized features
    b: np.ndarray             # [K]
    l4_mean: np.ndarray       # Mahalanobis distance of the layer4 features
    whiten: np.ndarray
    distance_cut: float = 3.0     # per-dimension distance beyond which a film is flagged as unlike the training films

    def chest_mask(self) -> np.ndarray:
        return np.array([c in ("chest", "mirrored") for c in self.classes])

    def probabilities(self, features: np.ndarray) -> np.ndarray:
        logits = ((features - self.mu) / self.sd) @ self.w + self.b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    def distance(self, features: np.ndarray) -> np.ndarray:

        d = (features[:, :LAYER4_DIMS] - self.l4_mean) @ self.whiten
        return (d * d).sum(1) / LAYER4_DIMS

    def score(self, features: np.ndarray) -> np.ndarray:
        """What the graph computes as ``chest_score``: P(chest or mirrored)."""
        return self.probabilities(features)[:, self.chest_mask()].sum(1)

    def far(self, features: np.ndarray) -> np.ndarray:
        """Unlike the training films: flagged for review, never refused for it."""
        return self.distance(features) > self.distance_cut


def fit_classifier(features: np.ndarray, labels: np.ndarray, classes: int, l2: float = 1e-3,
                   steps: int = 400, lr: float = 0.05, weights: np.ndarray | None = None):
    """Multinomial logistic regression (full-batch Adam) on standardized features."""
    mu, sd = features.mean(0), features.std(0) + 1e-6
    x = (features - mu) / sd
    y = np.eye(classes)[labels]
    sample_w = np.ones(len(x)) if weights is None else weights
    sample_w = sample_w / sample_w.sum()
    w, b = np.zeros((x.shape[1], classes)), np.zeros(classes)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    for t in range(1, steps + 1):
        logits = x @ w + b
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(1, keepdims=True)
        g = (p - y) * sample_w[:, None]
        grads = [x.T @ g + l2 * w, g.sum(0)]
        for i, (param, grad) in enumerate(zip((w, b), grads)):
            m[i] = 0.9 * m[i] + 0.1 * grad
            v[i] = 0.999 * v[i] + 0.001 * grad ** 2
            param -= lr * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    return mu, sd, w, b


def fit_distance(l4: np.ndarray, shrink: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitening matrix L (d^2 = |(f - mean) L|^2) with a shrunk covariance."""
    mean = l4.mean(0)
    cov = np.cov(l4 - mean, rowvar=False)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    return mean, np.linalg.cholesky(np.linalg.inv(cov))
