"""Two models side by side: `heartbatch run` wall time on the same folder, interleaved.

    python benchmarks/models_ab.py OLD.onnx NEW.onnx --n 300 --repeats 5

Runs A, B, A, B, ... (so machine noise hits both alike), each a fresh
`heartbatch run --force` over the same JPEG Baseline DICOMs (1024 x 1024,
built from the shared chest films), and prints every time and the medians
in images per second.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from _common import build_folder, timed_command


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp) / "studies", args.n)
        times: dict[str, list[float]] = {"a": [], "b": []}
        for _ in range(args.repeats):
            for key, model in (("a", args.a), ("b", args.b)):
                seconds, _, result = timed_command([sys.executable, "-m", "heartbatch", "run", str(folder), "--out",
                                                str(Path(tmp) / f"{key}.csv"), "--model", str(model), "--quiet",
                                                "--force"])
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
