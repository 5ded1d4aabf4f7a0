"""`evaluate-robustness`: a model on the validation split as it is and corrupted, with its review flag.

    evaluate-robustness heartbatch/models/heartbox.onnx --data ../shared/data/cxr-ctr \\
        --split heartbatch/models/heartbox.split.json

The validation split is optimistic for ward films.  This applies each ward
corruption of :mod:`exporter.corrupt` (seeded: the same corrupted set every
time, masks moved with the image and the boxes recomputed from them) and a
mix of one to three of them, and reports per set: CTR MAE, CTR > 0.5
agreement, the share off by more than 0.05, how many films were refused by
the content check, and how the review flag does (the share flagged, the CTR
error of flagged and unflagged rows, the share of rows off by more than 0.03
and 0.05 that it catches).  Each film goes through the runtime's own
:func:`heartbatch.records.measure`, so the flag is the one `heartbatch run`
would set.  ``--ward FOLDER`` (real ward films, no labels, see exporter/ward.py)
also reports how many of them are refused and flagged, per reason, for the
patients `trust-onnx --ward` held out and for those it fitted on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from heartbatch.confidence import Policy
from heartbatch.dicom import DicomHeader
from heartbatch.labels import LabelError, SplitError, load_labels, read_split
from heartbatch.masks import boxes_from_masks
from heartbatch.metrics import ctrs
from heartbatch.model import BoxModel, ContractError
from heartbatch.records import measure

from . import corrupt
from .datasets import build_dataset
from .ward import patient_split, read_ward

SETS = ("clean", *sorted(corrupt.WARD), "ward_mix")


def corrupted(images: np.ndarray, masks: np.ndarray, keys: list[str], kind: str, seed: int):
    """The validation films with one corruption (or a mix), and their boxes from the moved masks."""
    out_images, out_masks = [], []
    for image, mask, key in zip(images, masks, keys):
        rng = corrupt.seeded(seed, key, kind)
        if kind == "ward_mix":
            image, mask = corrupt.ward(image, mask, rng)
        elif kind != "clean":
            image, mask = corrupt.WARD[kind](image, mask, rng)
        out_images.append(image)
        out_masks.append(mask)
    boxes = boxes_from_masks(np.stack(out_masks))
    return np.stack(out_images), boxes


def score_set(model: BoxModel, policy: Policy, images: np.ndarray, truth: np.ndarray) -> dict:
    size = images.shape[-1]
    header = DicomHeader(rows=size, columns=size)
    records = []
    for start in range(0, len(images), 16):
        for prediction in model.infer(images[start:start + 16]):
            records.append(measure("", header, prediction, model.info.model_id, policy))
    measured = np.array([r.ok for r in records])
    ctr = np.array([r.ctr if r.ok else np.nan for r in records])
    true_ctr = ctrs(truth)
    err = np.abs(ctr - true_ctr)
    flagged = np.array([bool(r.review) for r in records])
    m = measured
    row = {"n": len(records), "measured": float(m.mean()), "ctr_mae": float(np.nanmean(err[m])),
           "agreement": float(np.mean((ctr[m] > 0.5) == (true_ctr[m] > 0.5))),
           "off_0.05": float(np.mean(err[m] > 0.05)), "flagged": float(flagged[m].mean()),
           "mae_flagged": float(err[m & flagged].mean()) if (m & flagged).any() else None,
           "mae_unflagged": float(err[m & ~flagged].mean()) if (m & ~flagged).any() else None}
    for cut in (0.03, 0.05):
        bad = m & (err > cut)
        row[f"caught_{cut}"] = float(flagged[bad].mean()) if bad.any() else None
        good = m & (err <= cut)
        row[f"flagged_good_{cut}"] = float(flagged[good].mean()) if good.any() else None
    bad, good = m & (err > 0.05), m & (err <= 0.05)
    row["counts"] = {"refused": int((~m).sum()), "off_0.05": int(bad.sum()), "caught_0.05": int((flagged & bad).sum()),
                     "within_0.05": int(good.sum()), "flagged_within_0.05": int((flagged & good).sum())}
    reasons: dict[str, int] = {}
    for r in records:
        for reason in filter(None, r.review_reason.split("; ")):
            reasons[reason] = reasons.get(reason, 0) + 1
    row["reasons"] = reasons
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="evaluate-robustness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, help="ONNX model")
    p.add_argument("--data", required=True, help="labeled chest films (cxr-ctr layout)")
    p.add_argument("--labels", help="label CSV for --data")
    p.add_argument("--split", type=Path, help="evaluate its validation list (default: every image in --data)")
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS), help="which sets (all)")
    p.add_argument("--seed", type=int, default=0, help="corruption seed (0: the model card's sets)")
    p.add_argument("--json", type=Path, help="also write the table as JSON")
    p.add_argument("--ward", type=Path, help="also real ward films: a folder with FOLDER.csv (file, patient[, view])")
    p.add_argument("--ward-seed", type=int, default=0, help="the patient split's seed (trust-onnx --seed; 0)")
    args = p.parse_args(argv)
    try:
        model = BoxModel(args.model)
        items = load_labels(args.data, args.labels)
        if args.split:
            keep = set(read_split(args.split, [i.key for i in items])["val"])
            items = [i for i in items if i.key in keep]
    except (ContractError, LabelError, SplitError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if model.info.outputs != 8:
        print("error: robustness is measured on the CTR: the model needs heart and thorax boxes", file=sys.stderr)
        return 2
    data = build_dataset(items, model.info.input_size)
    images, masks = data.images[:, 0].numpy(), data.masks.numpy()
    policy = Policy.for_model(model.info.metadata)
    table = {}
    print(f"{'set':12}{'n':>5}{'measured':>9}{'CTR MAE':>9}{'agree':>7}{'>0.05':>7}{'flagged':>8}"
          f"{'MAE flag':>9}{'MAE rest':>9}{'catch.03':>9}{'catch.05':>9}{'flag ok.05':>11}", flush=True)
    for kind in args.sets:
        x, truth = corrupted(images, masks, data.keys, kind, args.seed)
        row = table[kind] = score_set(model, policy, x, truth)
        print(f"{kind:12}{row['n']:5d}{row['measured']:9.3f}{row['ctr_mae']:9.4f}{row['agreement']:7.3f}"
              f"{row['off_0.05']:7.3f}{row['flagged']:8.3f}{_f(row['mae_flagged']):>9}{_f(row['mae_unflagged']):>9}"
              f"{_f(row['caught_0.03']):>9}{_f(row['caught_0.05']):>9}{_f(row['flagged_good_0.05']):>11}", flush=True)
    corrupt_sets = [k for k in table if k != "clean"]
    if corrupt_sets:
        print_together(table, corrupt_sets)
    ward = {}
    if args.ward:
        try:
            fit, held = patient_split(read_ward(args.ward), args.ward_seed)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for name, films in (("held out", held), ("fitted on", fit)):
            ward[name] = row = ward_rows(model, policy, films)
            print(f"ward films, patients {name} (seed {args.ward_seed}): {row['n']} films ({row['views']}); "
                  f"refused {row['refused']}, measured {row['measured']}, flagged {row['flagged']} "
                  f"({row['flagged'] / max(row['measured'], 1):.0%} of measured); CTR median {row['ctr_median']}")
            for reason, count in row["reasons"].items():
                print(f"  {count:4d}  {reason}")
    if args.json:
        args.json.write_text(json.dumps({"model_id": model.info.model_id, "seed": args.seed, "sets": table,
                                         "ward": ward}, indent=1, sort_keys=True))
    return 0


def print_together(table: dict, kinds: list[str]) -> None:
    """The corrupted sets as one: what the review flag catches and costs, and why it fires."""
    total = {k: sum(table[kind]["counts"][k] for kind in kinds) for k in table[kinds[0]]["counts"]}
    n = sum(table[kind]["n"] for kind in kinds)
    print(f"corrupted sets together: {n} films, refused {total['refused']}; off by more than 0.05: "
          f"{total['off_0.05']}, flagged {total['caught_0.05']}; within 0.05: {total['within_0.05']}, flagged "
          f"{total['flagged_within_0.05']} ({total['flagged_within_0.05'] / max(total['within_0.05'], 1):.1%})")
    for name, sets in (("clean", [k for k in ("clean",) if k in table]), ("corrupted", kinds)):
        reasons: dict[str, int] = {}
        for kind in sets:
            for reason, count in table[kind]["reasons"].items():
                reasons[reason] = reasons.get(reason, 0) + count
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            print(f"  {count:4d}  flagged ({name}): {reason}")


def ward_rows(model: BoxModel, policy: Policy, films) -> dict:
    """Real ward films through the runtime's measurement: refused, measured, flagged, by reason."""
    from collections import Counter

    from heartbatch.images import load_image
    from heartbatch.pixels import preprocess

    size = model.info.input_size
    images = np.stack([preprocess(load_image(f.path), size) for f in films]) if films else np.zeros((0, size, size))
    header = DicomHeader(rows=size, columns=size)
    records = [measure(str(f.path), header, p, model.info.model_id, policy)
               for start in range(0, len(films), 16)
               for f, p in zip(films[start:start + 16], model.infer(images[start:start + 16]))]
    measured = [r for r in records if r.ok]
    reasons = Counter(f"refused: {r.reason}" for r in records if not r.ok)
    reasons.update(f"flagged: {reason}" for r in measured if r.review for reason in r.review_reason.split("; "))
    ctr = [r.ctr for r in measured if not r.review]
    return {"n": len(records), "views": ", ".join(f"{v} {n}" for v, n in sorted(Counter(f.view or "?" for f in films).items())),
            "refused": len(records) - len(measured), "measured": len(measured),
            "flagged": sum(bool(r.review) for r in measured), "reasons": dict(reasons.most_common()),
            "ctr_median": round(float(np.median(ctr)), 3) if ctr else None}


def _f(value) -> str:
    return "-" if value is None else f"{value:.3f}"
