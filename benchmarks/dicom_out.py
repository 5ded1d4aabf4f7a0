"""What `--dicom-out` costs: `heartbatch run` wall time without it, with it (SR + presentation
state) and with `--dicom-out-capture` (SR + burned-in secondary capture), interleaved.

    python benchmarks/dicom_out.py --n 300 --repeats 5

Each run is a fresh `heartbatch run --force` over the same JPEG Baseline DICOMs (1024 x 1024, built
from the shared chest films) with the shipped model; prints every time, the medians in images per
second and each mode's throughput relative to the plain run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import build_folder, print_machine, timed_command

MODES = {"plain": [], "dicom-out": ["--dicom-out", "{tmp}/results"],
         "capture": ["--dicom-out", "{tmp}/captures", "--dicom-out-capture"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, help="passed to heartbatch run (default: its own)")
    args = p.parse_args()
    print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_folder(Path(tmp) / "studies", args.n)
        times: dict[str, list[float]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode, extra in MODES.items():
                command = [sys.executable, "-m", "heartbatch", "run", str(folder), "--out",
                           str(Path(tmp) / f"{mode}.csv"), "--quiet", "--force",
                           *(a.format(tmp=tmp) for a in extra)]
                if args.workers is not None:
                    command += ["--workers", str(args.workers)]
                seconds, _, result = timed_command(command)
                if result.returncode != 0:
                    raise SystemExit(f"{' '.join(command)} exited {result.returncode}: {result.stderr}")
                written = json.loads(result.stdout.splitlines()[-1])
                if extra and (written["dicom_failed"] or written["dicom_results"] != 2 * written["ok"]):
                    raise SystemExit(f"{mode}: results not written for every ok row: {written}\n{result.stderr}")
                times[mode].append(seconds)
    plain = statistics.median(times["plain"])
    for mode in MODES:
        median = statistics.median(times[mode])
        print(f"{mode:>9}: " + " ".join(f"{t:.2f}" for t in times[mode])
              + f" s; median {median:.2f} s = {args.n / median:.1f} img/s; throughput vs plain {plain / median:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
