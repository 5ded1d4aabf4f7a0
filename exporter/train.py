"""`heartbatch-train`: train the heart/thorax box regressor.

    heartbatch-train --data ../shared/data/cxr-ctr --out runs/default

Writes to --out: ``split.json`` (the persisted train/validation split),
``metrics.jsonl`` (one line per epoch), ``last.pt`` (resume point) and
``best.pt`` (best validation score), all reproducible from the seed.  A batch
whose loss is not finite (NaN/inf: usually too high a learning rate) stops
training before any weight is stepped on it: exit status 1, the checkpoints
keep the last finished epoch.  With
``--average-from K`` the learning rate is held constant from epoch K on and
the weights are averaged once per epoch (stochastic weight averaging); the
average is saved as ``averaged.pt``: one model fixed in advance by the
schedule, not picked on the validation split.

``--ward P`` corrupts each training sample with probability P like a ward film
(exporter/corrupt.py: ECG leads, lines, haze, noise, JPEG, AP geometry,
collimation, tight crops...), image and masks together, before the affine
augmentation.  ``--holdout-source wingspan`` validates on every image of that
source folder and trains on the others.  ``--show-augmentations OUT.png``
draws a few training films plain and with every ward corruption, and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from heartbatch.images import load_image
from heartbatch.labels import LabelError, load_labels, read_split
from heartbatch.masks import boxes_from_masks
from heartbatch.pixels import preprocess

from . import checkpoint, corrupt, engine
from .augment import AugmentConfig, augment_batch
from .checkpoint import CheckpointError
from .datasets import TensorDataset, build_dataset, holdout_split, load_or_make_split, source_of, split_keys
from .engine import NonFiniteLoss
from .net import HeartBoxNet
from .ward import patient_split, read_ward

#: --show-augmentations: how many training films (rows), the columns, the label band above them (px)
SHOW_FILMS = 4
SHOW_COLUMNS = ("plain", *corrupt.WARD, "ward_mix", "ward+affine")
SHOW_LABEL_PX = 14


#: Measured (MODEL_CARD, "A mask head"): from scratch, the consistency target is the untrained
#: network's own boxes, and the term fights the labels for the first epochs.
SCRATCH_WARD_FILMS = ("--ward-films from scratch: the network's own boxes are no target yet, and "
                      "training from scratch with them learned worse (MODEL_CARD, \"A mask head\"); "
                      "train without them first, then fine-tune with --init and --ward-films (a ramp-up, "
                      "--ward-films-ramp, cut that loss by half or more over the first 19 epochs, not all of it)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="heartbatch-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="cxr-ctr style folder, image folder, or box CSV")
    p.add_argument("--labels", help="label CSV (original project's format or a box CSV) for --data")
    p.add_argument("--out", type=Path, help="run folder (created; required unless --show-augmentations)")
    p.add_argument("--size", type=int, default=224, help="input size S, 224 or larger (default 224)")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--split", type=Path, metavar="SPLIT_JSON",
                   help="use this persisted train/validation split (e.g. runs/default/split.json), so that "
                        "runs with different seeds hold out the same images (default: the run folder's own, "
                        "made from --seed and --val-fraction on the first run)")
    p.add_argument("--holdout-source", metavar="SOURCE",
                   help="cross-source split: every image of this source folder of --data (e.g. wingspan or "
                        "jsrt) in validation, the other sources in training; not with --split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--aug-scale", type=float, nargs=2, default=list(AugmentConfig.scale), metavar=("LO", "HI"),
                   help="random zoom range (default 0.9 1.1)")
    p.add_argument("--aug-rotate", type=float, default=AugmentConfig.rotate_deg, metavar="DEG",
                   help="random rotation, +- degrees (default 7)")
    p.add_argument("--aug-translate", type=float, default=AugmentConfig.translate, metavar="FRAC",
                   help="random shift, +- fraction of the image size (default 0.05)")
    p.add_argument("--ward", type=float, default=0.0, metavar="P",
                   help="probability per training sample of 1-3 ward-film corruptions (exporter/corrupt.py: "
                        "ECG leads, lines, haze, contrast, noise, resampling, JPEG, grid, AP geometry, "
                        "collimation, tight crop), image and masks together, before the affine (default 0: off)")
    p.add_argument("--ward-films", type=Path, metavar="FOLDER",
                   help="real ward films without labels (FOLDER.csv beside it: file, patient), as for trust-onnx "
                        "--ward: the fitting half of the patients (split by --ward-films-seed, trust-onnx's --seed) "
                        "joins every step, trained so that their boxes (and masks, with --mask-head) under ward "
                        "corruptions match the network's own on the plain film; the other patients are never seen")
    p.add_argument("--ward-films-weight", type=float, default=1.0, help="weight of that consistency loss (default 1)")
    p.add_argument("--ward-films-per-step", type=int, default=4, help="ward films per step (default 4)")
    p.add_argument("--ward-films-ramp", type=int, default=0, metavar="EPOCHS",
                   help="raise that weight over the first EPOCHS epochs (sigmoid ramp-up, from about 0.7 %% of "
                        "it), as consistency training from scratch usually does (default 0: full weight at once)")
    p.add_argument("--ward-films-seed", type=int, default=0,
                   help="patient split of --ward-films; keep it equal to trust-onnx's --seed (default 0)")
    p.add_argument("--show-augmentations", type=Path, metavar="OUT_PNG",
                   help="write a grid of a few training films, plain and with every ward corruption (heart box "
                        "red, thorax blue, from the moved masks) to OUT_PNG and exit without training")
    p.add_argument("--imagenet-weights", type=Path,
                   help="local torchvision resnet18 ImageNet state dict (optional; default: from scratch)")
    p.add_argument("--resume", type=Path, help="checkpoint to continue from (e.g. runs/NAME/last.pt)")
    p.add_argument("--init", type=Path,
                   help="start from this checkpoint's weights (and normalization) with a fresh optimizer "
                        "and schedule: fine-tuning, e.g. a second cycle or another data set")
    p.add_argument("--extra-labels", type=Path, action="append", default=[], metavar="CSV",
                   help="more labeled films, always trained on (never validated on): a box CSV (path, heart and "
                        "thorax box in pixels), e.g. what `heartbatch review --export` writes of a site's reviewed "
                        "films; with --init, site adaptation. May be given more than once")
    p.add_argument("--mask-head", action="store_true",
                   help="add the exported mask head (heart, right lung, left lung at stride 4: the model's optional "
                        "masks output, which the runtime measures from), trained jointly with the boxes on the masks of "
                        "--data; with --init from a network without one, the head starts fresh")
    p.add_argument("--train-only", choices=engine.TRAIN_ONLY,
                   help="train only this part, the rest of the network frozen (its BatchNorm statistics too): "
                        "masks = the mask head on an --init network, whose boxes stay exactly as they were")
    p.add_argument("--iou-weight", type=float, default=0.0,
                   help="add this weight x (1 - heart box IoU) to the loss (default 0: coordinates only)")
    p.add_argument("--average-from", type=int, default=0, metavar="K",
                   help="from epoch K on, hold the learning rate at --average-lr and average the weights "
                        "after every epoch; saves averaged.pt (default: off)")
    p.add_argument("--average-lr", type=float, default=1e-4)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: all cores)")
    return p.parse_args(argv)


def augment_config(args) -> AugmentConfig:
    return AugmentConfig(scale=tuple(args.aug_scale), rotate_deg=args.aug_rotate, translate=args.aug_translate,
                         ward=args.ward)


def usage_error(args) -> str | None:
    """What is wrong with a combination of options (exit 2), or None."""
    if args.out is None and not args.show_augmentations:
        return "--out is required (the run folder), unless --show-augmentations"
    if args.split is not None and args.holdout_source is not None:
        return ("--split and --holdout-source both choose the validation images: give one (--holdout-source "
                "makes the split; a run folder keeps it in split.json)")
    if not 0.0 <= args.ward <= 1.0:
        return f"--ward is a probability per sample, from 0 to 1 (got {args.ward:g})"
    if args.ward > 0 and args.no_augment:
        return "--ward is an augmentation: not with --no-augment"
    if args.train_only == "masks" and not (args.mask_head and (args.init or args.resume)):
        return "--train-only masks trains the mask head of an existing network: give --mask-head and --init"
    if args.ward_films is not None and (args.ward_films_weight <= 0 or args.ward_films_per_step < 1
                                        or args.ward_films_ramp < 0):
        return ("--ward-films needs a positive --ward-films-weight and --ward-films-per-step, "
                "and --ward-films-ramp of 0 or more epochs")
    return None


def _show_films(args, items) -> list:
    """A few training films (from --split, --holdout-source or the seeded split), sources in turn."""
    keys = [i.key for i in items]
    if args.split is not None:
        train = read_split(args.split, keys)["train"]
    elif args.holdout_source is not None:
        train = holdout_split(keys, args.holdout_source)["train"]
    else:
        train = split_keys(keys, args.val_fraction, args.seed)["train"]
    by_source: dict[str, list[str]] = {}
    for key in sorted(train):
        by_source.setdefault(source_of(key), []).append(key)
    chosen, queues = [], list(by_source.values())
    while len(chosen) < SHOW_FILMS and any(queues):
        for queue in queues:
            if queue and len(chosen) < SHOW_FILMS:
                chosen.append(queue.pop(0))
    by_key = {i.key: i for i in items}
    return [by_key[k] for k in chosen]


def _tile(image: np.ndarray, masks: np.ndarray) -> Image.Image:
    """One grey film as RGB with the heart (red) and thorax (blue) boxes of its masks."""
    size = image.shape[-1]
    tile = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(tile)
    boxes = boxes_from_masks(np.asarray(masks)[None])[0] * size
    for box, colour in ((boxes[:4], (255, 40, 40)), (boxes[4:], (60, 120, 255))):
        x0, y0, x1, y1 = box
        if np.isfinite(box).all() and x1 > x0 and y1 > y0:
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), outline=colour, width=max(1, size // 224))
    return tile


def show_augmentations(args, items, console) -> int:
    """--show-augmentations: rows of training films; columns plain, each ward corruption, a mix of
    1-3 (as --ward applies them) and the whole training augmentation with the --aug-* strengths (ward mix,
    affine, photometry; plain with --no-augment)."""
    try:
        films = _show_films(args, items)
    except (ValueError, OSError) as exc:
        return _error(console, str(exc), 2)
    data = build_dataset(films, args.size)
    size = args.size
    sheet = Image.new("RGB", (len(SHOW_COLUMNS) * size, SHOW_LABEL_PX + len(films) * size), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for col, name in enumerate(SHOW_COLUMNS):
        draw.text((col * size + 3, 1), name, fill=(0, 0, 0))
    gen = torch.Generator().manual_seed(args.seed)
    cfg = dataclasses.replace(augment_config(args), ward=1.0)
    for row, key in enumerate(data.keys):
        image, masks = data.images[row, 0].numpy(), data.masks[row].numpy()
        for col, name in enumerate(SHOW_COLUMNS):
            rng = corrupt.seeded(args.seed, "show", key, name)
            if name == "plain":
                out, moved = image, masks
            elif name == "ward_mix":
                out, moved = corrupt.ward(image, masks, rng)
            elif name == "ward+affine":
                if args.no_augment:
                    out, moved = image, masks
                else:
                    batch, moved_batch, _ = augment_batch(data.images[row:row + 1], data.masks[row:row + 1], cfg,
                                                          gen, [rng])
                    out, moved = batch[0, 0].numpy(), moved_batch[0].numpy()
            else:
                out, moved = corrupt.WARD[name](image, masks, rng)
            sheet.paste(_tile(out, moved), (col * size, SHOW_LABEL_PX + row * size))
    args.show_augmentations.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.show_augmentations)
    console.print(f"{len(films)} training films x {len(SHOW_COLUMNS)} ({', '.join(SHOW_COLUMNS)}) at {size}px "
                  f"-> {args.show_augmentations}; heart box red, thorax blue (from the masks); nothing trained",
                  highlight=False, soft_wrap=True)
    return 0


def load_ward_films(args, size: int) -> tuple[engine.Unlabeled | None, dict | None]:
    """--ward-films: the fitting patients' films at the model's input size (the runtime's
    preprocessing), and what the config records of them."""
    if args.ward_films is None:
        return None, None
    fit, held = patient_split(read_ward(args.ward_films), args.ward_films_seed)
    images = torch.from_numpy(np.stack([preprocess(load_image(f.path), size) for f in fit]))[:, None]
    unlabeled = engine.Unlabeled(images, [f.key for f in fit], args.ward_films_weight, args.ward_films_per_step,
                                 args.ward_films_ramp)
    record = {"folder": str(args.ward_films), "seed": args.ward_films_seed, "films": len(fit),
              "patients": sorted({f.patient for f in fit}), "held_out_patients": sorted({f.patient for f in held}),
              "weight": args.ward_films_weight, "per_step": args.ward_films_per_step,
              "ramp_epochs": args.ward_films_ramp}
    return unlabeled, record


def load_extra_labels(paths: list[Path], size: int, validation: set[Path]) -> TensorDataset | None:
    """--extra-labels: their films as training samples (filled boxes as masks, so only the box loss
    learns from them).  A film of the validation split among them is refused: it would be
    measured on what it was trained on."""
    if not paths:
        return None
    items = [item for path in paths for item in load_labels(path)]
    shared = sorted({Path(item.image_path).resolve() for item in items} & validation)
    if shared:
        raise ValueError(f"--extra-labels lists {len(shared)} validation films of this run (e.g. {shared[0]}); "
                         "leave them out of the labels or out of the validation split")
    items = [dataclasses.replace(item, name=f"extra{i}/{item.key}") for i, item in enumerate(items)]
    return build_dataset(items, size)


def make_plan(args, device: torch.device, unlabeled: engine.Unlabeled | None = None) -> engine.Plan:
    return engine.Plan(out=args.out, epochs=args.epochs, batch_size=args.batch_size, device=device,
                       augment=None if args.no_augment else augment_config(args), lr=args.lr,
                       weight_decay=args.weight_decay, iou_weight=args.iou_weight, seed=args.seed,
                       average_from=args.average_from, average_lr=args.average_lr, unlabeled=unlabeled,
                       train_only=args.train_only)


def _error(console, message: str, status: int) -> int:
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    return status


def load_images(items, split: dict, size: int, console) -> tuple[TensorDataset, TensorDataset]:
    """The training and validation images of ``split``, with one progress bar over both."""
    by_key = {i.key: i for i in items}
    with Progress(TextColumn("loading images"), BarColumn(), MofNCompleteColumn(), console=console) as bar:
        task = bar.add_task("load", total=len(items))
        return tuple(build_dataset([by_key[k] for k in split[part]], size, lambda: bar.advance(task))
                     for part in ("train", "val"))


def build_model(args, train_data: TensorDataset, val_data: TensorDataset, console) -> tuple[HeartBoxNet, dict]:
    """The network (from scratch, ImageNet weights, or --init's weights) and the checkpoints' config.
    The input normalization is the training images' own, or --init's: the weights were trained with it."""
    mean, std = train_data.images.mean().item(), train_data.images.std().item()
    init = checkpoint.load(args.init, trust_pickle=True) if args.init else None
    if init is not None:
        mean, std = init["config"]["mean"], init["config"]["std"]
    model = HeartBoxNet(mean=mean, std=std, imagenet_weights=args.imagenet_weights, mask_head=args.mask_head)
    if init is not None:
        fresh = {k for k in model.state_dict() if k.startswith("decoder.")} - set(init["model"])
        missing, unexpected = model.load_state_dict(init["model"], strict=False)
        if set(missing) - fresh or unexpected:
            raise CheckpointError(f"{args.init}: weights do not fit the network (missing {sorted(set(missing) - fresh)[:4]}, "
                                  f"unexpected {sorted(unexpected)[:4]})"
                                  + ("; it has a mask head: add --mask-head" if any(k.startswith("decoder.") for k in unexpected) else ""))
        if fresh:
            console.print(f"the mask head starts fresh ({args.init} has none)")
        origin = init["config"].get("recovered_from")
        console.print(f"initialised from {args.init} "  # soft_wrap: paths stay whole, however long
                      + (f"(rebuilt from {origin})" if origin else f"(epoch {init['epoch'] + 1})"), soft_wrap=True)
    return model, checkpoint.config(args, mean, std, len(train_data), len(val_data))


def resume(run: engine.Run, path: Path, device: torch.device, console) -> None:
    run.last = checkpoint.load(path, trust_pickle=True, map_location=device)
    run.start_epoch, run.best = checkpoint.restore(run.last, run.model, run.optimizer, run.scheduler,
                                                   run.averaged, run.gen)
    console.print(f"resumed from {path} at epoch {run.start_epoch}", soft_wrap=True)


def stopped_message(exc: NonFiniteLoss, args, start_epoch: int) -> str:
    """What happened to a run stopped by a non-finite loss, what it kept, and what to try."""
    epoch = exc.epoch
    kept = (f"{args.out / 'last.pt'} holds epoch {epoch}, the last finished one" if epoch > start_epoch
            else "this run wrote no checkpoint")
    return (f"epoch {epoch + 1}: {exc}. Training stopped; {kept}. Lower --lr (now {args.lr:g}"
            + (f", --average-lr {args.average_lr:g}" if exc.averaging else "")
            + ") and train again in a new --out, or fine-tune from a good checkpoint with --init.")


def main(argv=None) -> int:
    args = parse_args(argv)
    console = Console(stderr=True)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    usage = usage_error(args)
    if usage:
        return _error(console, usage, 2)
    try:
        items = load_labels(args.data, args.labels)
    except (LabelError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    if args.show_augmentations:
        return show_augmentations(args, items, console)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        split = load_or_make_split(args.out / "split.json", [i.key for i in items], args.val_fraction, args.seed,
                                   source=args.split, holdout_source=args.holdout_source)
    except (ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2
    train_data, val_data = load_images(items, split, args.size, console)
    try:
        unlabeled, ward_record = load_ward_films(args, args.size)
        by_key = {i.key: i for i in items}
        extra = load_extra_labels(args.extra_labels, args.size,
                                  {Path(by_key[k].image_path).resolve() for k in split["val"]})
    except (ValueError, OSError) as exc:
        return _error(console, str(exc), 2)
    if extra is not None:
        train_data = train_data.plus(extra)
        console.print(f"{len(extra)} films of {', '.join(map(str, args.extra_labels))} added to training")
    console.print(f"{len(train_data)} training, {len(val_data)} validation images at {args.size}px on {device}"
                  + (f" (validation: every {args.holdout_source} image)" if args.holdout_source else "")
                  + (f"; {ward_record['films']} unlabeled ward films of {len(ward_record['patients'])} patients "
                     f"({len(ward_record['held_out_patients'])} patients held out)" if ward_record else ""))
    if unlabeled is not None and not (args.init or args.resume or args.ward_films_ramp):
        console.print(f"[yellow]warning:[/yellow] {SCRATCH_WARD_FILMS}", soft_wrap=True)
    plan = make_plan(args, device, unlabeled)
    try:
        model, config = build_model(args, train_data, val_data, console)
        config["ward_films"] = ward_record
        config["extra_labels"] = {"files": [str(p) for p in args.extra_labels], "films": len(extra)} if extra else None
        run = engine.start(model.to(device), plan, len(train_data))
        if args.resume:
            resume(run, args.resume, device, console)
    except CheckpointError as exc:
        return _error(console, str(exc), 2)
    try:
        best = engine.fit(run, plan, train_data, val_data, config, split, console)
    except NonFiniteLoss as exc:
        return _error(console, stopped_message(exc, args, run.start_epoch), 1)
    console.print(f"done: best score {best:.3f}; checkpoints in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
