"""A training checkpoint (``heartbatch-checkpoint/1``): written by heartbatch-train, read back by
``--resume``, ``--init`` and export-onnx.

One module holds the format, the keys each side uses and the rebuilding of the network, so the
writer and its readers cannot drift apart.  A checkpoint is a ``torch.save`` dict:

``format``, ``model`` (state dict), ``config`` (network and run settings, see :func:`config`),
``epoch`` (0-based, the last finished), ``metrics`` (validation), ``best_score``, ``optimizer``,
``scheduler``, ``averaged`` (AveragedModel state or None), ``generator`` (batch-order RNG),
``split`` and ``train_seconds``; ``averaged.pt`` adds ``averaged_epochs``.
"""

from __future__ import annotations

import pickle
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

import heartbatch
from heartbatch.errors import HeartbatchError
from heartbatch.files import replacing

from .net import HeartBoxNet

CHECKPOINT_FORMAT = "heartbatch-checkpoint/1"
ARCH = "resnet18-fpn-softargmax"


class CheckpointError(HeartbatchError):
    """A file that is not a usable checkpoint (missing, foreign, incomplete): exit 2, no traceback."""


def code_version() -> str:
    """This package's version and, in a git checkout, its commit: recorded in every checkpoint."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"heartbatch {heartbatch.__version__}" + (f" ({rev})" if rev else "")


# --- reading ---------------------------------------------------------------------------

def load(path: Path, trust_pickle: bool = False, map_location="cpu") -> dict:
    """The checkpoint dict at ``path``.  weights_only unless ``trust_pickle``: a checkpoint is
    data, and unpickling runs code (the trainer trusts the files it wrote itself)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from None
        found = re.search(r"GLOBAL (\S+)", str(exc))
        raise CheckpointError(f"{path}: the checkpoint holds objects beyond tensors and plain data"
                              + (f" ({found.group(1)})" if found else "")
                              + "; if you trust the file, rerun with --trust-pickle") from None
    except Exception as exc:  # a corrupt or foreign file fails in many ways inside the unpickler
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, got {type(ckpt).__name__}")
    return ckpt


@dataclass(frozen=True)
class NetworkSpec:
    """What rebuilding the network takes from a checkpoint's config."""

    size: int
    outputs: int
    mean: float
    std: float
    mask_head: bool = False


def network_spec(ckpt: dict, path: Path) -> NetworkSpec:
    """The checked format and network settings of a heartbatch checkpoint."""
    fmt = ckpt.get("format")
    if fmt != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {fmt!r} is not supported (expected {CHECKPOINT_FORMAT!r})")
    try:
        cfg, _ = ckpt["config"], ckpt["model"]
        return NetworkSpec(size=int(cfg["size"]), outputs=int(cfg.get("outputs", 8)),
                           mean=float(cfg["mean"]), std=float(cfg["std"]), mask_head=bool(cfg.get("mask_head", False)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: incomplete {CHECKPOINT_FORMAT} checkpoint (missing {exc})") from None


def network(ckpt: dict, spec: NetworkSpec, path: Path) -> HeartBoxNet:
    """The trained network (normalization inside), in train mode as built."""
    model = HeartBoxNet(outputs=spec.outputs, mean=spec.mean, std=spec.std, mask_head=spec.mask_head)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit HeartBoxNet: {exc}") from None
    return model


def restore(state: dict, model, optimizer, scheduler, averaged, gen: torch.Generator) -> tuple[int, float]:
    """``--resume``: put a checkpoint's training state back; (first epoch to run, best score)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if averaged is not None and state.get("averaged"):
        averaged.load_state_dict(state["averaged"])
    gen.set_state(state["generator"])
    return state["epoch"] + 1, state["best_score"]


# --- writing ---------------------------------------------------------------------------

def config(args, mean: float, std: float, train_images: int, val_images: int) -> dict:
    """The ``config`` entry: the network's settings (what export reads) and the run's options."""
    return {"size": args.size, "outputs": 8, "mean": mean, "std": std, "arch": ARCH, "mask_head": args.mask_head,
            "train_only": args.train_only,
            "data": str(args.data), "labels": args.labels, "seed": args.seed, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr,
            "augment": None if args.no_augment else {"scale": list(args.aug_scale), "rotate_deg": args.aug_rotate,
                                                     "translate": args.aug_translate},
            "train_images": train_images, "val_images": val_images,
            "ward": 0.0 if args.no_augment else args.ward, "holdout_source": args.holdout_source,
            "iou_weight": args.iou_weight, "average_from": args.average_from, "average_lr": args.average_lr,
            "imagenet_init": args.imagenet_weights is not None, "init": str(args.init) if args.init else None,
            "code_version": code_version()}


def epoch_state(model, config: dict, epoch: int, metrics: dict, best_score: float, optimizer, scheduler,
                averaged, gen: torch.Generator, split: dict, train_seconds: float) -> dict:
    """What last.pt and best.pt hold after ``epoch``: enough to resume exactly."""
    return {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "config": config,
            "epoch": epoch, "metrics": metrics, "best_score": best_score,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "averaged": averaged.state_dict() if averaged is not None else None,
            "generator": gen.get_state(), "split": split,
            "train_seconds": train_seconds}


def averaged_state(last: dict, model, metrics: dict, epochs: int) -> dict:
    """averaged.pt: the last epoch's checkpoint with the averaged weights and their metrics."""
    return {**last, "model": model.state_dict(), "metrics": metrics, "averaged_epochs": epochs}


def save(state: dict, path: Path) -> None:
    """Through a temporary file and one rename: a run killed while saving keeps its previous
    resume point whole."""
    with replacing(path) as tmp:
        torch.save(state, tmp)
