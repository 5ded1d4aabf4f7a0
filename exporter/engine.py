"""One epoch of training, prediction, and the loss: the loop kept out of train.py."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from heartbatch.metrics import REFERENCE_SIZE, box_metrics

from . import corrupt
from .augment import AugmentConfig, augment_batch
from .datasets import TensorDataset

SMOOTH_L1_BETA_PX = 2.0
WIDTH_WEIGHT = 1.0
SEG_WEIGHT = 5.0


class NonFiniteLoss(FloatingPointError):
    """The loss of a batch is NaN or infinite: training stops before stepping on it."""


def heart_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the heart boxes (columns 0-3, normalized), differentiable."""
    w = (torch.minimum(pred[:, 2], target[:, 2]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    h = (torch.minimum(pred[:, 3], target[:, 3]) - torch.maximum(pred[:, 1], target[:, 1])).clamp(min=0)
    inter = w * h
    area = lambda b: (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)  # noqa: E731
    return inter / (area(pred) + area(target) - inter).clamp(min=1e-6)


def box_loss(pred: torch.Tensor, target: torch.Tensor, iou_weight: float = 0.0) -> torch.Tensor:
    """SmoothL1 on coordinates plus L1 on box widths, in 224-pixel units,
    plus ``iou_weight`` x (1 - heart IoU).

    Rows without a thorax box (NaN) contribute only their heart terms.  Widths
    get their own term because CTR is a ratio of widths.  The IoU term weighs
    an edge error against the box's size across it, as the IoU metric does
    (so the short, vertically ambiguous side counts more).
    """
    known = torch.isfinite(target)
    target = torch.nan_to_num(target)
    diff = (pred - target) * REFERENCE_SIZE
    coord = F.smooth_l1_loss(diff, torch.zeros_like(diff), beta=SMOOTH_L1_BETA_PX, reduction="none")
    coord = (coord * known).sum() / known.sum().clamp(min=1)
    width_err = (diff[:, [2, 6]] - diff[:, [0, 4]]).abs()
    width_known = known[:, [0, 4]]
    width = (width_err * width_known).sum() / width_known.sum().clamp(min=1)
    loss = coord + WIDTH_WEIGHT * width
    if iou_weight:
        loss = loss + iou_weight * (1 - heart_iou(pred, target)).mean()
    return loss


def seg_loss(logits: torch.Tensor, masks: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    if not real.any():
        return logits.sum() * 0
    target = F.adaptive_avg_pool2d(masks[real], logits.shape[-2:])
    return F.binary_cross_entropy_with_logits(logits[real], target)


def iterate_batches(n: int, batch_size: int, gen: torch.Generator, shuffle: bool):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def train_one_epoch(model, data: TensorDataset, optimizer, scheduler, gen: torch.Generator,
                    batch_size: int, device: torch.device, augment: AugmentConfig | None,
                    on_step=None, iou_weight: float = 0.0, epoch: int = 0, seed: int = 0) -> dict:
    """One pass over ``data``; mean losses.  A batch whose loss is not finite raises
    :class:`NonFiniteLoss` before the optimizer or the scheduler steps on it.  With
    ``augment.ward`` > 0, each sample's ward corruptions come from a numpy generator
    fixed by (``seed``, ``epoch``, its key): the same films every run, resumed or not."""
    model.train()
    totals = {"loss": 0.0, "box": 0.0, "seg": 0.0}
    steps = 0
    for idx in iterate_batches(len(data), batch_size, gen, shuffle=True):
        if len(idx) < 2:  # BatchNorm needs two samples
            continue
        images, masks, boxes = data.images[idx], data.masks[idx], data.boxes[idx].clone()
        if augment is not None:
            rngs = ([corrupt.seeded(seed, "ward", epoch, data.keys[i]) for i in idx.tolist()]
                    if augment.ward > 0 else None)
            images, masks, warped = augment_batch(images, masks, augment, gen, rngs)
            boxes = torch.where(torch.isfinite(boxes), warped, boxes)
        images, masks, boxes = images.to(device), masks.to(device), boxes.to(device)
        pred, seg_logits = model.forward_train(images)
        lb = box_loss(pred, boxes, iou_weight)
        ls = seg_loss(seg_logits, masks, data.real_masks[idx].to(device))
        loss = lb + SEG_WEIGHT * ls
        if not math.isfinite(loss.item()):
            # checked before any step: the weights, optimizer and schedule stay those of the last
            # good step (a NaN step would poison every weight and Adam's moments for good)
            raise NonFiniteLoss(f"training loss is not finite (box {lb.item():.4g}, seg {ls.item():.4g}) "
                                f"at step {steps + 1} of this epoch; the weights were not updated by it")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        totals["loss"] += loss.item()
        totals["box"] += lb.item()
        totals["seg"] += ls.item()
        steps += 1
        if on_step is not None:
            on_step()
    return {k: v / max(steps, 1) for k, v in totals.items()}


@torch.no_grad()
def recompute_batchnorm(model, data: TensorDataset, batch_size: int, device: torch.device) -> None:
    """Set BatchNorm statistics to exact averages over ``data`` (unaugmented).

    Averaged weights were never run forward, so the running statistics
    collected while training belong to none of them.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    for start in range(0, len(data), batch_size):
        model(data.images[start:start + batch_size].to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int, device: torch.device) -> np.ndarray:
    model.eval()
    out = [model(images[i:i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def evaluate(model, data: TensorDataset, batch_size: int, device: torch.device,
             threshold: float = 0.5) -> dict:
    pred = predict(model, data.images, batch_size, device)
    return box_metrics(pred, data.boxes.numpy(), threshold, data.expert_ctr.numpy())
