"""Joint image + mask augmentation on batches, and boxes recomputed from masks.

Geometry: one random affine per sample (scale, rotation, translation) applied
to the image and its masks with the same sampling grid.  No horizontal flip:
the heart lies left of the midline and the model may rely on it.
Photometry: gamma, contrast, brightness and Gaussian noise on the image only.
Ward corruptions (``AugmentConfig.ward``, a probability per sample): before
the affine, 1-3 of :data:`exporter.corrupt.WARD` (ECG leads and lines, haze,
contrast, noise, resampling, JPEG, grid, AP geometry, collimation, tight crop)
on the image and its masks together, each sample with its own numpy generator
(seeded by the caller, e.g. from the seed, the epoch and the image key), so a
run is reproducible.  Boxes always come from the moved masks, by the runtime's
:func:`heartbatch.masks.boxes_from_masks` (:func:`boxes_of`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from heartbatch.masks import boxes_from_masks

from . import corrupt


@dataclass
class AugmentConfig:
    scale: tuple[float, float] = (0.9, 1.1)
    rotate_deg: float = 7.0
    translate: float = 0.05      # fraction of the image size
    gamma: tuple[float, float] = (0.7, 1.4)
    contrast: float = 0.2
    brightness: float = 0.08
    noise: float = 0.03
    ward: float = 0.0            # probability per sample of 1-3 ward corruptions (exporter.corrupt)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def random_affine(n: int, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """``[n, 2, 3]`` matrices for ``affine_grid`` (output coords -> input coords)."""
    scale = _uniform(n, *cfg.scale, gen)
    angle = _uniform(n, -cfg.rotate_deg, cfg.rotate_deg, gen) * (math.pi / 180)
    shift = _uniform(2 * n, -cfg.translate, cfg.translate, gen).view(n, 2) * 2  # [-1,1] frame
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                        torch.stack([sin, cos, shift[:, 1]], 1)], 1)


def warp(images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor):
    stacked = torch.cat([images, masks], 1)
    grid = F.affine_grid(theta, list(stacked.shape), align_corners=False)
    out = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[:, :1], out[:, 1:].clamp(0, 1)


def boxes_of(masks: torch.Tensor) -> torch.Tensor:
    """``[n, 3, S, S]`` moved masks -> ``[n, 8]`` normalized boxes, by the runtime's own
    :func:`heartbatch.masks.boxes_from_masks` (NaN where a warp or crop took the heart or both lungs
    out of the image: the box loss skips those coordinates)."""
    return torch.from_numpy(boxes_from_masks(masks.detach().cpu().numpy())).float()


def photometric(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    n = len(images)
    shape = (n, 1, 1, 1)
    gamma = torch.exp(_uniform(n, math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), gen)).view(shape)
    contrast = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, gen).view(shape)
    brightness = _uniform(n, -cfg.brightness, cfg.brightness, gen).view(shape)
    sigma = _uniform(n, 0, cfg.noise, gen).view(shape)
    out = images.clamp(0, 1) ** gamma
    out = (out - 0.5) * contrast + 0.5 + brightness
    out = out + sigma * torch.randn(images.shape, generator=gen)
    return out.clamp(0, 1)


def ward_batch(images: torch.Tensor, masks: torch.Tensor, probability: float, rngs) -> tuple:
    """With ``probability`` per sample, :func:`exporter.corrupt.ward` (1-3 ward corruptions) on the
    image ``[n, 1, S, S]`` and its masks ``[n, k, S, S]`` together; ``rngs``: one numpy generator
    per sample, which decides both whether and how."""
    out_images, out_masks = [], []
    for image, mask, rng in zip(images.numpy(), masks.numpy(), rngs):
        if probability > 0 and rng.random() < probability:
            picture, mask = corrupt.ward(image[0], mask, rng)
            image = picture[None]
        out_images.append(np.asarray(image, dtype=np.float32))
        out_masks.append(np.asarray(mask, dtype=np.float32))
    return torch.from_numpy(np.stack(out_images)), torch.from_numpy(np.stack(out_masks))


def consistency_views(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, rngs) -> tuple:
    """Two views of unlabeled films ``[n, 1, S, S]`` with the same geometry: ``weak`` (the affine
    alone) and ``strong`` (the same affine, then 1-3 ward corruptions that leave the anatomy where
    it was, :data:`exporter.corrupt.SAME_BOXES`, and the photometry), so the boxes of the weak view
    are the right answer for the strong one."""
    theta = random_affine(len(images), cfg, gen)
    weak, _ = warp(images, images[:, :0], theta)
    strong = [corrupt.ward(image[0], None, rng, kinds=corrupt.SAME_BOXES)[0][None]
              for image, rng in zip(weak.numpy(), rngs)]
    return weak, photometric(torch.from_numpy(np.stack(strong).astype(np.float32)), cfg, gen)


def augment_batch(images, masks, cfg: AugmentConfig, gen: torch.Generator, rngs=None):
    """Augmented images, their warped masks and the boxes of those masks.

    ``rngs`` (one numpy generator per sample) is needed when ``cfg.ward`` > 0:
    the ward corruptions come first, then the affine and the photometry.
    """
    if cfg.ward > 0:
        if rngs is None:
            raise ValueError("ward corruptions need one numpy generator per sample (rngs)")
        images, masks = ward_batch(images, masks, cfg.ward, rngs)
    theta = random_affine(len(images), cfg, gen)
    images, masks = warp(images, masks, theta)
    return photometric(images, cfg, gen), masks, boxes_of(masks)
