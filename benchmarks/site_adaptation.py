"""What reviewing N films of a new site buys: fine-tune a model trained without that site on N of
its films, measure on the site's other films.

    python benchmarks/site_adaptation.py --base runs/xs/new/averaged.pt --out runs/adapt --n 0 10 25 50

The proxy of the model card: ``--base`` is a model trained on JSRT only (``heartbatch-train
--holdout-source wingspan``); the new site is Wingspan.  ``--reviewed`` (50) Wingspan films are
drawn once (seeded), and the first N of them play the films a radiologist reviewed: their mask
boxes are the corrections, written as the box CSV `heartbatch review --export` writes.  For every N
the same command a site would run (``heartbatch-train --init BASE --extra-labels labels.csv``,
a short schedule fixed in advance) fine-tunes the base; N = 0 runs the same schedule with no site
film, so the table separates the site's films from the extra epochs.  Every model is measured on
the same Wingspan films (every Wingspan film not among the ``--reviewed``): CTR MAE and bias
(mean signed error) against the mask CTR, and against the expert CTR where there is one.
Prints one line per N; ``--json`` keeps them.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import DATA, REPO, print_machine

from heartbatch.labels import BOX_COLUMNS, load_labels
from heartbatch.metrics import ctrs

SITE = "wingspan"


def reviewed_films(items, count: int, seed: int) -> list:
    site = sorted((i for i in items if i.key.startswith(SITE + "/")), key=lambda i: i.key)
    return random.Random(seed).sample(site, count)


def write_labels(films, path: Path) -> None:
    """The films' mask boxes in pixels, as `heartbatch review --export` writes corrections."""
    from heartbatch.images import image_size

    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["path", *BOX_COLUMNS])
        for film in films:
            rows, columns = image_size(film.image_path)
            scale = np.array([columns, rows] * 4, dtype=np.float64)
            out.writerow([str(film.image_path), *(f"{v:.2f}" for v in film.boxes * scale)])


def measure(checkpoint: Path, films, size: int) -> dict:
    import torch

    from exporter import checkpoint as ckpt_io
    from exporter.datasets import build_dataset
    from exporter.engine import predict

    state = ckpt_io.load(checkpoint, trust_pickle=True)
    model = ckpt_io.network(state, ckpt_io.network_spec(state, checkpoint), checkpoint)
    data = build_dataset(films, size)
    pred = ctrs(predict(model, data.images, 16, torch.device("cpu")).astype(np.float64))
    truth = ctrs(data.boxes.numpy().astype(np.float64))
    expert = data.expert_ctr.numpy().astype(np.float64)
    known = np.isfinite(expert)
    return {"n_films": len(films), "ctr_mae": float(np.mean(np.abs(pred - truth))),
            "ctr_bias": float(np.mean(pred - truth)),
            "n_expert": int(known.sum()),
            "expert_mae": float(np.mean(np.abs(pred[known] - expert[known]))) if known.any() else None,
            "expert_bias": float(np.mean(pred[known] - expert[known])) if known.any() else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, required=True, help="checkpoint trained without the site's films")
    p.add_argument("--data", type=Path, default=DATA / "cxr-ctr")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, nargs="+", default=[0, 10, 25, 50])
    p.add_argument("--reviewed", type=int, default=50, help="site films that may be reviewed (the rest are measured)")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if max(args.n) > args.reviewed:
        p.error("every --n must be at most --reviewed")
    print_machine()
    items = load_labels(args.data)
    reviewed = reviewed_films(items, args.reviewed, args.seed)
    held = sorted((i for i in items if i.key.startswith(SITE + "/") and i not in reviewed), key=lambda i: i.key)
    args.out.mkdir(parents=True, exist_ok=True)
    split = args.out / "split.json"  # train on every other source; validate on the measured site films
    split.write_text(json.dumps({"train": sorted(i.key for i in items if not i.key.startswith(SITE + "/")),
                                 "val": [i.key for i in held]}, indent=1))
    print(f"base {args.base}; {len(reviewed)} {SITE} films reviewable, {len(held)} measured; "
          f"fine-tune {args.epochs} epochs, lr {args.lr:g}", flush=True)
    print(f"{'N':>4} {'CTR MAE':>8} {'bias':>8} {'expert MAE':>10} {'expert bias':>11} {'minutes':>8}", flush=True)
    base = measure(args.base, held, 224)
    print(f"base {base['ctr_mae']:8.4f} {base['ctr_bias']:+8.4f} {base['expert_mae']:10.4f} "
          f"{base['expert_bias']:+11.4f}", flush=True)
    rows = [{"n": None, **base}]
    for n in args.n:
        run = args.out / f"n{n}"
        command = [sys.executable, "-m", "exporter.train", "--data", str(args.data), "--out", str(run),
                   "--split", str(split), "--init", str(args.base), "--epochs", str(args.epochs),
                   "--lr", str(args.lr), "--seed", str(args.seed), "--threads", str(args.threads),
                   "--aug-scale", "0.85", "1.15", "--aug-rotate", "10", "--aug-translate", "0.08", "--ward", "0.7"]
        if n:
            labels = args.out / f"labels_{n}.csv"
            write_labels(reviewed[:n], labels)
            command += ["--extra-labels", str(labels)]
        started = time.monotonic()
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
            return 1
        row = {"n": n, "minutes": round((time.monotonic() - started) / 60, 1),
               **measure(run / "last.pt", held, 224)}
        rows.append(row)
        print(f"{n:4d} {row['ctr_mae']:8.4f} {row['ctr_bias']:+8.4f} {row['expert_mae']:10.4f} "
              f"{row['expert_bias']:+11.4f} {row['minutes']:8.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
