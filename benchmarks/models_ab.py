"""Two models side by side: `heartbatch run` wall time on the same folder, interleaved.

    python benchmarks/models_ab.py OLD.onnx NEW.onnx --n 300 --repeats 5
    python benchmarks/models_ab.py OLD.onnx NEW.onnx --code-a ../old-checkout   # A with another heartbatch

Runs A, B, A, B, ... (so machine noise hits both alike), each a fresh
`heartbatch run --force` over the same JPEG Baseline DICOMs (1024 x 1024,
built from the shared chest films), and prints every time and the medians
in images per second. ``--code-a`` runs A with the heartbatch of another
checkout (a model and the code that loads it are compared together).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from _common import REPO, build_folder, print_machine, timed_command


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--code-a", type=Path, help="a checkout whose heartbatch runs A (default: this one)")
    args = p.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp) / "studies", args.n)
        times: dict[str, list[float]] = {"a": [], "b": []}
        code = {"a": args.code_a.resolve() if args.code_a else REPO, "b": REPO}
        for _ in range(args.repeats):
            for key, model in (("a", args.a.resolve()), ("b", args.b.resolve())):
                seconds, _, result = timed_command([sys.executable, "-m", "heartbatch", "run", str(folder), "--out",
                                                str(Path(tmp) / f"{key}.csv"), "--model", str(model), "--quiet",
                                                "--force"], cwd=code[key],
                                               env={**os.environ, "PYTHONPATH": str(code[key])})
                if result.returncode != 0:
                    raise SystemExit(f"heartbatch run with {model} exited {result.returncode}: {result.stderr}")
                times[key].append(seconds)
    for key, model in (("a", args.a), ("b", args.b)):
        median = statistics.median(times[key])
        print(f"{key} {model}: " + " ".join(f"{t:.2f}" for t in times[key])
              + f" s; median {median:.2f} s = {args.n / median:.1f} img/s")
    ratio = statistics.median(times["a"]) / statistics.median(times["b"])
    print(f"b / a throughput: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
