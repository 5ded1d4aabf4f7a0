"""Labeled images as in-memory tensors at the model's input size.

Images go through :func:`heartbatch.pixels.preprocess`, the runtime's one
preprocessing implementation.  Every sample also gets three soft masks (heart,
right lung, left lung: the channels of :mod:`heartbatch.masks`) at the same size: the real masks
where the data set has them, filled boxes otherwise (the thorax box in both lung channels).  Augmentation warps image and masks together and recomputes
the boxes from the warped masks, so labels stay exact under rotation.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from heartbatch.images import load_image
from heartbatch.labels import LabeledImage, read_split
from heartbatch.pixels import preprocess, resize


@dataclass
class TensorDataset:
    images: torch.Tensor      # [N, 1, S, S] in [0, 1]
    masks: torch.Tensor       # [N, 3, S, S] soft coverage: heart, right lung, left lung
    boxes: torch.Tensor       # [N, 8] normalized; thorax NaN when unknown
    real_masks: torch.Tensor  # [N] bool: masks are segmentations, not filled boxes
    expert_ctr: torch.Tensor  # [N], NaN when unknown
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)

    def plus(self, other: "TensorDataset") -> "TensorDataset":
        """Both sets of samples, this one's first."""
        return TensorDataset(torch.cat([self.images, other.images]), torch.cat([self.masks, other.masks]),
                             torch.cat([self.boxes, other.boxes]), torch.cat([self.real_masks, other.real_masks]),
                             torch.cat([self.expert_ctr, other.expert_ctr]), self.keys + other.keys)

    def subset(self, index: list[int]) -> "TensorDataset":
        idx = torch.as_tensor(index, dtype=torch.long)
        return TensorDataset(self.images[idx], self.masks[idx], self.boxes[idx],
                             self.real_masks[idx], self.expert_ctr[idx],
                             [self.keys[i] for i in index])


def _coverage(lo: float, hi: float, size: int) -> np.ndarray:
    """Fraction of each of ``size`` unit cells covered by the interval [lo, hi)."""
    edges = np.arange(size, dtype=np.float64)
    return np.clip(np.minimum(edges + 1, hi) - np.maximum(edges, lo), 0.0, 1.0)


def box_mask(box, size: int) -> np.ndarray:
    """A filled normalized box as a soft ``size x size`` mask (exact edge coverage)."""
    if not np.all(np.isfinite(box)):
        return np.zeros((size, size), dtype=np.float32)
    x0, y0, x1, y1 = (float(v) * size for v in box)
    return np.outer(_coverage(y0, y1, size), _coverage(x0, x1, size)).astype(np.float32)


def _soft_mask(path: Path, size: int) -> np.ndarray:
    return np.clip(resize(load_image(path) / 255.0, size), 0.0, 1.0)


def _sample_masks(item: LabeledImage, size: int) -> tuple[np.ndarray, bool]:
    paths = item.mask_paths
    if paths.get("heart") and paths.get("left_lung") and paths.get("right_lung"):
        return np.stack([_soft_mask(paths[name], size) for name in ("heart", "right_lung", "left_lung")]), True
    thorax = box_mask(item.thorax, size)
    return np.stack([box_mask(item.heart, size), thorax, thorax]), False


def heart_and_lungs(masks: torch.Tensor) -> torch.Tensor:
    """``[N, 3, S, S]`` (heart, right lung, left lung) -> ``[N, 2, S, S]`` (heart, both lungs): the
    targets of the training-only stride-8 mask head."""
    return torch.stack([masks[:, 0], masks[:, 1:].amax(1)], 1)


def build_dataset(items: list[LabeledImage], size: int, progress=None) -> TensorDataset:
    images, masks, real = [], [], []
    for item in items:
        images.append(preprocess(load_image(item.image_path), size))
        m, is_real = _sample_masks(item, size)
        masks.append(m)
        real.append(is_real)
        if progress is not None:
            progress()
    return TensorDataset(
        images=torch.from_numpy(np.stack(images))[:, None],
        masks=torch.from_numpy(np.stack(masks)),
        boxes=torch.tensor(np.stack([item.boxes for item in items]), dtype=torch.float32),
        real_masks=torch.tensor(real),
        expert_ctr=torch.tensor([item.expert_ctr for item in items], dtype=torch.float32),
        keys=[item.key for item in items],
    )


def split_keys(keys: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded split, stratified by source folder so each source is in validation."""
    rng = random.Random(seed)
    groups: dict[str, list[str]] = {}
    for key in sorted(keys):
        groups.setdefault(key.rsplit("/", 1)[0] if "/" in key else "", []).append(key)
    train, val = [], []
    for members in groups.values():
        rng.shuffle(members)
        n_val = round(len(members) * val_fraction)
        val += members[:n_val]
        train += members[n_val:]
    return {"seed": seed, "val_fraction": val_fraction, "train": sorted(train), "val": sorted(val)}


def source_of(key: str) -> str:
    """The source folder of an image key (``jsrt/JPCLN001.png`` -> ``jsrt``), as :func:`split_keys` groups."""
    return key.rsplit("/", 1)[0] if "/" in key else ""


def holdout_split(keys: list[str], source: str) -> dict[str, list[str]]:
    """Cross-source split: every image of the source folder ``source`` in validation, the rest
    in training ("train on JSRT, validate on Wingspan").  ValueError naming the sources there
    are when ``source`` holds no image or every image."""
    name = source.strip("/")
    val = sorted(k for k in keys if source_of(k) == name or source_of(k).startswith(name + "/"))
    train = sorted(set(keys) - set(val))
    if not val or not train:
        sources = ", ".join(sorted({source_of(k) or "(top level)" for k in keys}))
        raise ValueError(f"--holdout-source {source}: "
                         + ("no image of the data is in that source folder" if not val
                            else "every image of the data is in that source folder, none would be left to train on")
                         + f"; the sources are: {sources}")
    return {"holdout_source": name, "train": train, "val": val}


def load_or_make_split(path: Path, keys: list[str], val_fraction: float, seed: int,
                       source: Path | None = None, holdout_source: str | None = None) -> dict:
    """``source``'s split when given (it must match one already at ``path``), else the
    cross-source split of ``holdout_source`` when given (same condition), else
    the one persisted at ``path`` (so resumed and repeated runs agree), else a
    new one; saved at ``path`` either way.  A split file that is not one, or names
    images not in ``keys``, raises :class:`heartbatch.labels.SplitError` (a ValueError)."""
    hint = "use a new --out or delete the split"
    if source is not None and holdout_source is not None:
        raise ValueError("--split and --holdout-source both choose the validation images; give one")
    if source is not None:
        split = read_split(source, keys, hint="give the --data the split was made from")
        if path.is_file() and read_split(path) != split:
            raise ValueError(f"{path} holds a different split than {source}; use a new --out")
    elif holdout_source is not None:
        split = holdout_split(keys, holdout_source)
        if path.is_file():
            old = read_split(path, keys, hint=hint)
            if (sorted(old["train"]), sorted(old["val"])) != (split["train"], split["val"]):
                raise ValueError(f"{path} holds a different split than --holdout-source {holdout_source}; "
                                 "use a new --out")
    elif path.is_file():
        split = read_split(path, keys, hint=hint)
    else:
        split = split_keys(keys, val_fraction, seed)
    path.write_text(json.dumps(split, indent=1))
    return split
