"""The same films on this CPU's fast int8 kernels and in exact arithmetic: do the rows agree?

    python benchmarks/parity.py ../shared/data/cxr-ctr ../shared/data/ward [--model M.onnx]

Every image under the folders (PNG, or DICOM) is preprocessed once and measured twice with the
runtime's own code: with onnxruntime's fused kernels as this CPU runs them (no fallback, even
when the model's probe fails) and in exact arithmetic (no graph fusion: dequantize, float,
quantize), the arithmetic the model's probe outputs are recorded in. Prints the CPU, the number
of films whose status differs, and the largest CTR, box and chest-score differences. On a CPU
with VNNI both are exact; the AVX2 path can be run on any x86 host with
`qemu-x86_64 -cpu Haswell .venv/bin/python benchmarks/parity.py ...` (slow: a few films).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_machine  # noqa: E402

from heartbatch.arithmetic import EXACT, FUSED  # noqa: E402
from heartbatch.confidence import Policy  # noqa: E402
from heartbatch.dicom import DicomHeader  # noqa: E402
from heartbatch.images import load_image  # noqa: E402
from heartbatch.model import BoxModel, _session  # noqa: E402
from heartbatch.pixels import preprocess  # noqa: E402
from heartbatch.records import measure  # noqa: E402

SUFFIXES = {".png", ".dcm", ".jpg", ".jpeg"}


def images_under(folders: list[Path]) -> list[Path]:
    found = []
    for folder in folders:
        found += sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and "mask" not in p.parts)
    return found


def records(model: BoxModel, films: np.ndarray):
    header, policy = DicomHeader(rows=films.shape[-1], columns=films.shape[-1]), Policy.for_model(model.info.metadata)
    out = []
    for start in range(0, len(films), 16):
        out += [measure("", header, p, model.info.model_id, policy) for p in model.infer(films[start:start + 16])]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", type=Path)
    p.add_argument("--model", type=Path, help="ONNX model (default: the shipped one)")
    p.add_argument("--limit", type=int, help="at most this many films (under emulation: a few)")
    args = p.parse_args()
    print_machine()
    fast = BoxModel(args.model, threads=None)
    fast._session = _session(fast.info.path, None, FUSED)  # as this CPU runs it, whatever the probe said
    exact = BoxModel(args.model, start=EXACT)
    paths = images_under(args.folders)[:args.limit]
    films = np.stack([preprocess(load_image(path), fast.info.input_size) for path in paths])
    a, b = records(fast, films), records(exact, films)
    status = [(path, x.status, y.status) for path, x, y in zip(paths, a, b) if x.status != y.status]
    both = [(x, y) for x, y in zip(a, b) if x.ok and y.ok]
    ctr = max((abs(x.ctr - y.ctr) for x, y in both), default=0.0)
    heart = max((max(abs(u - v) for u, v in zip(x.heart, y.heart)) / films.shape[-1] for x, y in both), default=0.0)
    score = max((abs(x.chest_score - y.chest_score) for x, y in zip(a, b) if x.chest_score is not None), default=0.0)
    review = sum(bool(x.review) != bool(y.review) for x, y in both)
    print(f"model {fast.info.model_id}; {len(paths)} films under {', '.join(map(str, args.folders))}")
    print(f"fused (this CPU) vs exact: {len(status)} status differences, {review} review-flag differences; "
          f"largest CTR difference {ctr:.4f}, heart box {heart:.4f} of the input side, chest score {score:.4f}")
    print(f"statuses (fused): " + ", ".join(f"{s} {sum(r.status == s for r in a)}" for s in ("ok", "skipped", "error")))
    for path, x, y in status[:20]:
        print(f"  {path}: fused {x}, exact {y}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
