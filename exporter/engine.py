"""The training loop kept out of train.py: the loss, one epoch, evaluation, and the epochs
with their checkpoints, metrics log and weight-averaging phase (:func:`fit`)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from heartbatch.masks import measured_boxes
from heartbatch.metrics import REFERENCE_SIZE, box_metrics

from . import checkpoint, corrupt
from .augment import AugmentConfig, augment_batch, consistency_views
from .datasets import TensorDataset, heart_and_lungs

SMOOTH_L1_BETA_PX = 2.0
WIDTH_WEIGHT = 1.0
SEG_WEIGHT = 5.0


class NonFiniteLoss(FloatingPointError):
    """The loss of a batch is NaN or infinite: training stops before stepping on it.  :func:`fit`
    adds the epoch (0-based) and whether it was in the averaging phase, for the message."""

    epoch: int | None = None
    averaging: bool = False


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
    """BCE against the masks' coverage on the logits' grid (area averages: what the runtime reads
    sub-pixel edges from), for the samples with real masks.  Three channels (the exported mask
    head) also get a soft Dice term, so that the small heart weighs as much as the lungs; two
    (the training-only head) take the heart and both lungs together."""
    if not real.any():
        return logits.sum() * 0
    logits, masks = logits[real], masks[real]
    if logits.shape[1] == 2 and masks.shape[1] == 3:
        masks = heart_and_lungs(masks)
    target = F.adaptive_avg_pool2d(masks, logits.shape[-2:])
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if logits.shape[1] == 3:
        prob = torch.sigmoid(logits)
        overlap = (prob * target).sum((2, 3))
        dice = (2 * overlap + 1) / (prob.sum((2, 3)) + target.sum((2, 3)) + 1)
        loss = loss + (1 - dice).mean()
    return loss


def iterate_batches(n: int, batch_size: int, gen: torch.Generator, shuffle: bool):
    order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: a last batch of one sample is skipped (BatchNorm)."""
    return sum(1 for s in range(0, n, batch_size) if n - s >= 2)


@dataclass(frozen=True)
class Unlabeled:
    """Real films without labels (ward films) for consistency training: every step adds
    ``per_step`` of them, and their boxes under ward corruptions are pulled towards the
    network's own boxes on the same film uncorrupted (``weight`` x SmoothL1, 224-pixel units)."""

    images: torch.Tensor  # [M, 1, S, S]
    keys: list[str]
    weight: float = 1.0
    per_step: int = 4
    ramp_epochs: int = 0

    def weight_at(self, epoch: int) -> float:
        """The term's weight in ``epoch`` (0-based): ``weight`` after ``ramp_epochs``, before them the
        sigmoid ramp-up of consistency training, exp(-5 (1 - t)^2), from about 0.007 of it at epoch 0.
        From scratch the target is the untrained network's own output; the ramp keeps it from pulling
        against the labels before the network reads boxes."""
        if epoch >= self.ramp_epochs:
            return self.weight
        return self.weight * math.exp(-5.0 * (1.0 - epoch / self.ramp_epochs) ** 2)


def unlabeled_batches(unlabeled: Unlabeled, steps: int, gen: torch.Generator):
    """``steps`` index batches of ``per_step`` films, through the films in shuffled passes."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while len(order) < unlabeled.per_step:
            order = torch.cat([order, torch.randperm(len(unlabeled.keys), generator=gen)])
        yield order[:unlabeled.per_step]
        order = order[unlabeled.per_step:]


@torch.no_grad()
def _targets(model, images: torch.Tensor, train_only: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The network's boxes (and, with a mask head, its mask probabilities) on the weak view, in eval
    mode: a target that moves with training but takes no gradient (and leaves the BatchNorm
    statistics alone)."""
    model.eval()
    out = model(images)
    set_train_mode(model, train_only)
    return (out[0], out[1]) if isinstance(out, tuple) else (out, None)


def boxes_only(out) -> torch.Tensor:
    """The boxes of a forward pass (a mask head's network also returns its masks)."""
    return out[0] if isinstance(out, tuple) else out


TRAIN_ONLY = ("masks",)


def set_train_mode(model, train_only: str | None) -> None:
    """Training mode for the part being trained; with ``train_only="masks"`` every other module stays in
    eval mode, so that the frozen network's BatchNorm statistics stay those it was trained with."""
    model.train()
    if train_only == "masks":
        for name, module in model.named_children():
            if name != "decoder":
                module.eval()


def trainable_parameters(model, train_only: str | None) -> list:
    """What the optimizer steps: everything, or only the mask decoder (the rest frozen)."""
    if train_only is None:
        return list(model.parameters())
    if train_only != "masks" or not getattr(model, "has_masks", False):
        raise ValueError(f"--train-only {train_only}: the network has no mask head to train")
    trained = model.mask_parameters()
    keep = set(map(id, trained))
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return trained


def consistency_loss(pred: torch.Tensor, target: torch.Tensor, mask_logits: torch.Tensor | None = None,
                     mask_target: torch.Tensor | None = None) -> torch.Tensor:
    """Boxes of the corrupted view against those of the plain view; with a mask head, also its masks
    against the plain view's probabilities (BCE, weighted like the labeled masks), so that the masks
    the runtime measures from learn the ward films too, not only the regressed boxes.  The two views
    share their geometry, so the masks are compared cell by cell."""
    diff = (pred - target) * REFERENCE_SIZE
    loss = F.smooth_l1_loss(diff, torch.zeros_like(diff), beta=SMOOTH_L1_BETA_PX)
    if mask_target is not None:  # a mask head: its logits are the same grid as the target
        loss = loss + SEG_WEIGHT * F.binary_cross_entropy_with_logits(mask_logits, mask_target)
    return loss


def train_one_epoch(model, data: TensorDataset, optimizer, scheduler, gen: torch.Generator,
                    batch_size: int, device: torch.device, augment: AugmentConfig | None,
                    on_step=None, iou_weight: float = 0.0, epoch: int = 0, seed: int = 0,
                    unlabeled: Unlabeled | None = None, train_only: str | None = None) -> dict:
    """One pass over ``data``; mean losses.  A batch whose loss is not finite raises
    :class:`NonFiniteLoss` before the optimizer or the scheduler steps on it.  With
    ``augment.ward`` > 0, each sample's ward corruptions come from a numpy generator
    fixed by (``seed``, ``epoch``, its key): the same films every run, resumed or not.
    With ``unlabeled`` films, each step also trains their corrupted views towards the
    network's boxes on their plain views, in the same forward pass as the labeled batch (so
    BatchNorm sees both kinds of film together).  ``train_only="masks"``: only the mask decoder
    learns (:func:`set_train_mode`)."""
    set_train_mode(model, train_only)
    totals = {"loss": 0.0, "box": 0.0, "seg": 0.0}
    if unlabeled is not None:
        totals["consistency"] = 0.0
        extra = unlabeled_batches(unlabeled, steps_per_epoch(len(data), batch_size), gen)
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
        if unlabeled is not None:
            films = next(extra)
            rngs = [corrupt.seeded(seed, "consistency", epoch, unlabeled.keys[i]) for i in films.tolist()]
            weak, strong = consistency_views(unlabeled.images[films], augment or AugmentConfig(), gen, rngs)
            target, mask_target = _targets(model, weak.to(device), train_only)
            images = torch.cat([images, strong.to(device)])
        pred, seg_logits = model.forward_train(images)
        labeled = len(idx)
        lb = box_loss(pred[:labeled], boxes, iou_weight)
        ls = seg_loss(seg_logits[:labeled], masks, data.real_masks[idx].to(device))
        loss = lb + SEG_WEIGHT * ls
        if unlabeled is not None:
            lc = consistency_loss(pred[labeled:], target, seg_logits[labeled:], mask_target)
            loss = loss + unlabeled.weight_at(epoch) * lc
            totals["consistency"] += lc.item()
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
def recompute_batchnorm(model, data: TensorDataset, batch_size: int, device: torch.device,
                        only_masks: bool = False) -> None:
    """Set BatchNorm statistics to exact averages over ``data`` (unaugmented).

    Averaged weights were never run forward, so the running statistics
    collected while training belong to none of them.  ``only_masks``: the mask decoder's alone
    (the rest was frozen and keeps its own).
    """
    part = model.decoder if only_masks else model
    norms = [m for m in part.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    set_train_mode(model, "masks" if only_masks else None)
    for start in range(0, len(data), batch_size):
        model(data.images[start:start + batch_size].to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray | None]:
    """(regressed boxes ``[N, 8]``, mask probabilities ``[N, 3, H, W]`` or None without a mask head)."""
    model.eval()
    boxes, masks = [], []
    for i in range(0, len(images), batch_size):
        out = model(images[i:i + batch_size].to(device))
        boxes.append(boxes_only(out).cpu())
        if isinstance(out, tuple):
            masks.append(out[1].cpu())
    return torch.cat(boxes).numpy(), (torch.cat(masks).numpy() if masks else None)


def evaluate(model, data: TensorDataset, batch_size: int, device: torch.device,
             threshold: float = 0.5) -> dict:
    """Box metrics of what the runtime would measure: the masks' boxes with a mask head (then the
    regressed boxes' metrics under ``"regressed"``, to compare), else the regressed boxes."""
    pred, masks = predict(model, data.images, batch_size, device)
    truth, expert = data.boxes.numpy(), data.expert_ctr.numpy()
    if masks is None:
        return box_metrics(pred, truth, threshold, expert)
    measured, missing = measured_boxes(pred, masks)
    return {**box_metrics(measured, truth, threshold, expert), "regressed": box_metrics(pred, truth, threshold, expert),
            "mask_missing": int(missing.sum())}


def score(metrics: dict) -> float:
    """Lower is better: heart error first, thorax and CTR close behind."""
    value = metrics["heart_mae_px224"]
    if math.isfinite(metrics.get("thorax_mae_px224", math.nan)):
        value += 0.5 * metrics["thorax_mae_px224"] + 100 * metrics["ctr_mae"]
    return value


# --- the epochs ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """How the epochs run: the command line's choices, fixed for the run."""

    out: Path
    epochs: int
    batch_size: int
    device: torch.device
    augment: AugmentConfig | None = None
    lr: float = 1e-3
    weight_decay: float = 1e-4
    iou_weight: float = 0.0
    seed: int = 0
    average_from: int = 0  # K > 0: from epoch K on, lr held at average_lr and the weights averaged
    average_lr: float = 1e-4
    unlabeled: Unlabeled | None = None  # real films without labels, for consistency training
    train_only: str | None = None  # "masks": train the mask decoder alone, the rest frozen


@dataclass
class Run:
    """What the epochs change, all of it saved in each checkpoint so that a resumed run goes on
    exactly as an uninterrupted one."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    averaged: torch.optim.swa_utils.AveragedModel | None
    gen: torch.Generator
    start_epoch: int = 0
    best: float = math.inf
    last: dict | None = None  # the latest checkpoint: the resumed one until an epoch ends


def start(model, plan: Plan, train_size: int) -> Run:
    """AdamW with one learning-rate cycle over the epochs before the averaging phase (none when
    it starts at once), and the weight average when there is that phase."""
    optimizer = torch.optim.AdamW(trainable_parameters(model, plan.train_only), lr=plan.lr,
                                  weight_decay=plan.weight_decay)
    cycle_epochs = plan.average_from - 1 if plan.average_from > 0 else plan.epochs
    steps = steps_per_epoch(train_size, plan.batch_size)
    scheduler = (torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=plan.lr, pct_start=0.05,
                                                     total_steps=cycle_epochs * steps)
                 if cycle_epochs > 0 else None)
    averaged = torch.optim.swa_utils.AveragedModel(model) if plan.average_from > 0 else None
    return Run(model, optimizer, scheduler, averaged, torch.Generator().manual_seed(plan.seed))


def fit(run: Run, plan: Plan, train_data: TensorDataset, val_data: TensorDataset, config: dict, split: dict,
        console) -> float:
    """The epochs from ``run.start_epoch``: each one a metrics.jsonl line, last.pt, and best.pt when
    the score improves; then averaged.pt when weights were averaged.  Returns the best score."""
    started = time.monotonic()
    with open(plan.out / "metrics.jsonl", "a") as log, \
            Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                     TimeRemainingColumn(), console=console, transient=True) as bar:
        for epoch in range(run.start_epoch, plan.epochs):
            task = bar.add_task("train", total=steps_per_epoch(len(train_data), plan.batch_size), epoch=epoch + 1)
            losses, metrics = run_epoch(run, plan, epoch, train_data, val_data, lambda: bar.advance(task))
            bar.remove_task(task)
            current = score(metrics)
            record = {"epoch": epoch + 1, "seconds": round(time.monotonic() - started, 1),
                      "lr": run.optimizer.param_groups[0]["lr"], **losses, "val": metrics, "score": current}
            log.write(json.dumps(record) + "\n")
            log.flush()
            console.print(
                f"epoch {epoch + 1:3d}  loss {losses['loss']:.3f}  heart IoU {metrics['heart_iou_mean']:.3f}"
                f"  {metrics['heart_mae_px224']:.2f}px  thorax IoU {metrics.get('thorax_iou_mean', math.nan):.3f}"
                f"  CTR MAE {metrics.get('ctr_mae', math.nan):.4f}"
                f"  agree {metrics.get('ctr_agreement', {}).get('accuracy', math.nan):.3f}"
                + (f"  ward consistency {losses['consistency']:.3f}" if "consistency" in losses else "")
                + _regressed(metrics))
            run.last = checkpoint.epoch_state(run.model, config, epoch, metrics, min(run.best, current),
                                              run.optimizer, run.scheduler, run.averaged, run.gen, split,
                                              time.monotonic() - started)
            if current < run.best:
                run.best = current
                checkpoint.save(run.last, plan.out / "best.pt")
            checkpoint.save(run.last, plan.out / "last.pt")
    if run.averaged is not None and run.averaged.n_averaged.item() > 0:
        save_average(run, plan, train_data, val_data, console)
    return run.best


def run_epoch(run: Run, plan: Plan, epoch: int, train_data: TensorDataset, val_data: TensorDataset,
              on_step=None) -> tuple[dict, dict]:
    """Train one epoch (in the averaging phase at the constant lr, then averaged in) and evaluate
    the trained weights: (mean losses, validation metrics)."""
    averaging = run.averaged is not None and epoch + 1 >= plan.average_from
    if averaging:
        for group in run.optimizer.param_groups:
            group["lr"] = plan.average_lr
    try:
        losses = train_one_epoch(run.model, train_data, run.optimizer, None if averaging else run.scheduler,
                                 run.gen, plan.batch_size, plan.device, plan.augment, on_step=on_step,
                                 iou_weight=plan.iou_weight, epoch=epoch, seed=plan.seed,
                                 unlabeled=plan.unlabeled, train_only=plan.train_only)
    except NonFiniteLoss as exc:
        exc.epoch, exc.averaging = epoch, averaging
        raise
    if averaging:
        run.averaged.update_parameters(run.model)
    return losses, evaluate(run.model, val_data, plan.batch_size, plan.device)


def save_average(run: Run, plan: Plan, train_data: TensorDataset, val_data: TensorDataset, console) -> None:
    """Recompute BatchNorm for the averaged weights, evaluate them, save averaged.pt."""
    averaged = run.averaged
    device = next(averaged.parameters()).device
    recompute_batchnorm(averaged.module, train_data, plan.batch_size, device, only_masks=plan.train_only == "masks")
    metrics = evaluate(averaged.module, val_data, plan.batch_size, device)
    state = checkpoint.averaged_state(run.last, averaged.module, metrics, int(averaged.n_averaged.item()))
    checkpoint.save(state, plan.out / "averaged.pt")
    console.print(f"averaged {state['averaged_epochs']} epochs: heart IoU {metrics['heart_iou_mean']:.3f}"
                  f"  {metrics['heart_mae_px224']:.2f}px  thorax IoU {metrics.get('thorax_iou_mean', math.nan):.3f}"
                  f"  CTR MAE {metrics.get('ctr_mae', math.nan):.4f}{_regressed(metrics)} -> {plan.out / 'averaged.pt'}")


def _regressed(metrics: dict) -> str:
    """With a mask head the metrics are the masks' boxes': the regressed boxes' beside them."""
    other = metrics.get("regressed")
    if not other:
        return ""
    return (f"  (from masks; regressed: heart IoU {other['heart_iou_mean']:.3f}"
            f"  CTR MAE {other.get('ctr_mae', math.nan):.4f})")
