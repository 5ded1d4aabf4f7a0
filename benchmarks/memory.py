"""Peak memory of `heartbatch run` over a large folder (main process + decode workers).

    python benchmarks/memory.py [--n 2000] [--model model.onnx]

Builds N frontal CR DICOMs (1024 x 1024, 8-bit JPEG Baseline, from the shared PNGs)
plus one 8000 x 8000 16-bit uncompressed image in --workdir, runs `heartbatch run`
on them as a user would, and prints the peak summed RSS sampled every 50 ms.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_folder, chest_dicom, print_machine, timed_command  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "heartbatch-bench")
    p.add_argument("--model", type=Path)
    args = p.parse_args()
    print_machine()
    folder = build_folder(args.workdir / f"jpeg-{args.n}", args.n)
    big = args.workdir / "big" / "8000x8000-16bit.dcm"
    if not big.is_file():
        big.parent.mkdir(parents=True, exist_ok=True)
        ramp = np.add.outer(np.arange(8000, dtype=np.uint32), np.arange(8000, dtype=np.uint32)) % 65536
        chest_dicom(big, ramp.astype(np.uint16), bits=16, syntax="raw")
    results = {}
    for name, target in (("big_8000x8000_16bit", big.parent), (f"folder_{args.n}", folder)):
        out = args.workdir / f"memory-{name}.csv"
        for suffix in ("", ".state"):
            path = Path(str(out) + suffix)
            if path.is_dir():
                __import__("shutil").rmtree(path)
            elif path.exists():
                path.unlink()
        cmd = [sys.executable, "-m", "heartbatch", "run", str(target), "--out", str(out), "--quiet"]
        if args.model:
            cmd += ["--model", str(args.model)]
        seconds, peak, result = timed_command(cmd, cwd=REPO)
        summary = json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else result.stderr
        results[name] = {"seconds": round(seconds, 1), "peak_rss_mb": round(peak / 2**20), "result": summary}
        print(f"{name}: {seconds:.1f} s, peak RSS (all processes) {peak / 2**20:.0f} MB; {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
