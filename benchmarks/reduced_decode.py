"""Accuracy of a reduced decode against a full one: the validation split written as DICOM.

    python benchmarks/reduced_decode.py [--syntax j2k] [--side 2048] [--model M.onnx]

Writes each validation film of the shipped model's split (heartbatch/models/heartbox.split.json)
as a DICOM of SIDE x SIDE (bilinear upsampling of the 512-pixel shared PNG, 12 bits; --syntax
as in benchmarks/_common.SYNTAXES, default JPEG 2000 lossless), then measures the model on
three inputs of the same films: the PNG (what training reads), the DICOM decoded whole
(pipeline v1) and the DICOM decoded at a reduced scale (`heartbatch run`'s path since v2).
Prints heart and thorax IoU, CTR MAE against the masks, agreement, and how far each film's
boxes and CTR move between the full and the reduced decode.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, REPO, SYNTAXES, chest_dicom, print_machine  # noqa: E402

from heartbatch.dicom import read_dicom  # noqa: E402
from heartbatch.images import load_image  # noqa: E402
from heartbatch.labels import load_labels, read_split  # noqa: E402
from heartbatch.metrics import box_metrics, ctrs  # noqa: E402
from heartbatch.model import BoxModel  # noqa: E402
from heartbatch.pixels import preprocess  # noqa: E402


def write_films(items, folder: Path, side: int, syntax: str) -> list[Path]:
    bits = 8 if syntax == "jpeg" else 12
    paths = []
    for i, item in enumerate(items):
        path = folder / f"val{i:04d}.dcm"
        if not path.exists():
            with Image.open(item.image_path) as im:
                film = np.asarray(im.convert("L").resize((side, side), Image.Resampling.BILINEAR), np.float64)
            chest_dicom(path, film if bits == 8 else np.round(film / 255 * 4095), bits=bits, syntax=syntax, index=i)
        paths.append(path)
    return paths


def predict(model: BoxModel, images) -> np.ndarray:
    size = model.info.input_size
    return np.concatenate([model.predict(np.stack([preprocess(im, size) for im in images[i:i + 16]]))
                           for i in range(0, len(images), 16)])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--syntax", choices=sorted(SYNTAXES), default="j2k")
    p.add_argument("--side", type=int, default=2048)
    p.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    p.add_argument("--split", type=Path, default=REPO / "heartbatch" / "models" / "heartbox.split.json")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "heartbatch-reduced")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    print_machine()
    items = load_labels(DATA / "cxr-ctr")
    wanted = set(read_split(args.split, [i.key for i in items])["val"])
    items = [i for i in items if i.key in wanted]
    folder = args.workdir / f"{args.syntax}-{args.side}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = write_films(items, folder, args.side, args.syntax)
    model = BoxModel(args.model, threads=1)
    size = model.info.input_size
    true = np.stack([i.boxes for i in items])
    seconds = {}
    inputs = {
        "png (training's input)": lambda: [load_image(i.image_path) for i in items],
        "dicom, full decode": lambda: [read_dicom(p).image for p in paths],
        "dicom, reduced decode": lambda: [read_dicom(p, min_side=size).image for p in paths],
    }
    preds = {}
    for name, load in inputs.items():
        start = time.perf_counter()
        images = load()
        seconds[name] = time.perf_counter() - start
        preds[name] = predict(model, images)
        shapes = sorted({im.shape for im in images})
        print(f"{name}: decoded {len(images)} films at {shapes} in {seconds[name]:.1f} s")
    results = {name: box_metrics(pred, true) for name, pred in preds.items()}
    print(f"\n{len(items)} validation films as {SYNTAXES[args.syntax]} {args.side} x {args.side}, "
          f"model {model.info.model_id}")
    print(f"{'input':<24} {'heart IoU':>9} {'heart MAE px':>12} {'thorax IoU':>10} {'CTR MAE':>8} {'agree':>6}")
    for name, m in results.items():
        print(f"{name:<24} {m['heart_iou_mean']:>9.4f} {m['heart_mae_px224']:>12.3f} {m['thorax_iou_mean']:>10.4f} "
              f"{m['ctr_mae']:>8.4f} {m['ctr_agreement']['accuracy']:>6.3f}")
    full, reduced = preds["dicom, full decode"], preds["dicom, reduced decode"]
    box_move = np.abs(full - reduced).max(axis=1) * size
    ctr_move = np.abs(ctrs(full) - ctrs(reduced))
    print(f"full -> reduced, per film: largest box coordinate move median {np.median(box_move):.2f} px "
          f"(max {box_move.max():.2f}) at {size}; CTR move median {np.median(ctr_move):.4f} (max {ctr_move.max():.4f})")
    png = preds["png (training's input)"]
    png_full = np.abs(ctrs(png) - ctrs(full))
    print(f"for scale: png -> full decode CTR move median {np.median(png_full):.4f} (max {png_full.max():.4f})")
    if args.json:
        args.json.write_text(json.dumps({"syntax": args.syntax, "side": args.side, "model": model.info.model_id,
                                         "metrics": results, "seconds": seconds,
                                         "box_move_px": box_move.tolist(), "ctr_move": ctr_move.tolist()},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
