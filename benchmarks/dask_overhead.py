"""Dask overhead: `heartbatch run --scheduler local:N` vs the plain local run, same folder.

    python benchmarks/dask_overhead.py [--n 100] [--size 1024] [--repeats 2] [--workers 2] [--json out.json]

Builds (outside the repo, in --workdir) N frontal CR DICOMs, JPEG Baseline
8-bit MONOCHROME2, from the shared PNGs, then times, alternately, `repeats`
runs of each, as a user runs them (a subprocess, startup included, --force so
every file is measured):

  plain:  heartbatch run FOLDER --out R --quiet --force
  dask:   heartbatch run FOLDER --out R --quiet --force --scheduler local:N

and reports images/s (files / wall seconds) for both, the overhead per file
((dask - plain) / N, median seconds), and the fixed cost of starting and
closing a LocalCluster of N worker processes, timed on its own, so the
overhead per file can be read with and without it.  The reports of the two
runs are compared (same files and text cells, largest numeric difference) as a
correctness check.

On a machine whose cores are all in use by a local run, Dask cannot be faster:
the point is its overhead.  Say what else was running when you quote numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, build_folder, print_machine, timed_command  # noqa: E402

sys.path.insert(0, str(REPO))


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), e.get("PYTHONPATH", "")) if p)
    return e


def one_run(folder: Path, out: Path, model: Path | None, scheduler: str | None) -> tuple[float, float, dict]:
    """(wall seconds, peak RSS MB, the --quiet JSON)."""
    cmd = [sys.executable, "-m", "heartbatch", "run", str(folder), "--out", str(out), "--quiet", "--force"]
    if model:
        cmd += ["--model", str(model)]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    seconds, peak, result = timed_command(cmd, cwd=REPO, env=env())
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr[-2000:]}")
    return seconds, peak / 2**20, json.loads(result.stdout.strip().splitlines()[-1])


def stand_in_model(path: Path) -> Path:
    """The shipped network (HeartBoxNet, S=224) with random weights, when no trained model is at hand:
    the same inference cost, so the same timings (needs the [train] extra)."""
    if path.is_file():
        return path
    import torch

    from exporter.export import DEFAULT_OPSET, export
    from exporter.net import HeartBoxNet
    from heartbatch import contract as C
    from heartbatch.pixels import PIPELINE_VERSION, pipeline_description

    class StandIn(torch.nn.Module):
        """Random soft-argmax outputs sit near the centre (empty boxes): keep the whole network's
        cost, and nudge a plausible heart and thorax box by its output."""

        def __init__(self):
            super().__init__()
            self.net = HeartBoxNet()
            self.register_buffer("box", torch.tensor([0.35, 0.45, 0.65, 0.8, 0.15, 0.2, 0.85, 0.9]))

        def forward(self, x):
            return self.box + 0.05 * torch.tanh(self.net(x) - 0.5)

    torch.manual_seed(0)
    meta = {C.META_FORMAT: C.FORMAT_VERSION, C.META_INPUT_SIZE: "224", C.META_OUTPUT_LAYOUT: C.OUTPUT_LAYOUTS[8],
            C.META_PREPROCESSING: pipeline_description(), C.META_PIXELS_VERSION: PIPELINE_VERSION,
            C.META_NORMALIZATION: "mean=0.5,std=0.25 (inside the graph)",
            C.META_TRAINING_DATA: "none: random weights, a timing stand-in", C.META_VALIDATION: "{}",
            C.META_CODE_VERSION: "benchmarks/dask_overhead.py"}
    export(StandIn(), 224, meta, path, DEFAULT_OPSET)
    return path


def cluster_start_seconds(workers: int) -> float:
    """Start a LocalCluster of `workers` processes, connect, run one trivial task on each, close."""
    from distributed import Client, LocalCluster

    start = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           host="127.0.0.1")
    try:
        with Client(cluster, set_as_default=False) as client:
            client.run(os.getpid)
    finally:
        cluster.close()
    return time.perf_counter() - start


def compare(a: Path, b: Path) -> tuple[bool, float]:
    """(same files, statuses and text cells; largest difference of a numeric cell)."""
    import csv

    def rows(path):
        with open(path, encoding="utf-8", newline="") as fh:
            return sorted(csv.reader(fh), key=lambda r: r[0])

    ra, rb = rows(a), rows(b)
    if len(ra) != len(rb):
        return False, float("inf")
    worst = 0.0
    for x, y in zip(ra, rb):
        for u, v in zip(x, y):
            try:
                worst = max(worst, abs(float(u) - float(v)))
            except ValueError:
                if u != v:
                    return False, float("inf")
    return True, worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--size", type=int, default=1024, help="image side in pixels (1024)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="N of local:N (2)")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "heartbatch-bench-dask")
    p.add_argument("--model", type=Path, help="ONNX model (default: the shipped model; without one, the same "
                                              "network with random weights, built with the [train] extra)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    print_machine()

    model = args.model
    if model is None:
        from heartbatch.model import default_model_path

        if not default_model_path().is_file():
            model = stand_in_model(args.workdir / "heartboxnet-random.onnx")
            print(f"note: no shipped model; timing {model} (HeartBoxNet, random weights)", file=sys.stderr)
    folder = build_folder(args.workdir / f"jpeg-{args.size}-{args.n}", args.n, size=args.size)
    scheduler = f"local:{args.workers}"
    plain_out, dask_out = args.workdir / "plain.csv", args.workdir / "dask.csv"
    runs: dict[str, list[dict]] = {"plain": [], "dask": []}
    for r in range(args.repeats):
        for name, sched, out in (("plain", None, plain_out), ("dask", scheduler, dask_out)):
            seconds, peak, info = one_run(folder, out, model, sched)
            runs[name].append({"wall_s": seconds, "run_s": info["seconds"], "peak_rss_mb": peak,
                               "processed": info["processed"], "img_s": info["processed"] / seconds})
            print(f"repeat {r + 1}/{args.repeats} {name:5}: {info['processed']} files in {seconds:.2f} s "
                  f"({info['processed'] / seconds:.1f} images/s; run() {info['seconds']:.2f} s)", file=sys.stderr)
    same, max_diff = compare(plain_out, dask_out)
    startup = cluster_start_seconds(args.workers)

    def med(name, key):
        return statistics.median(x[key] for x in runs[name])

    n = args.n
    plain_s, dask_s = med("plain", "wall_s"), med("dask", "wall_s")
    result = {
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "n": n, "size": args.size, "repeats": args.repeats, "scheduler": scheduler,
        "plain_img_s": n / plain_s, "dask_img_s": n / dask_s,
        "plain_wall_s": plain_s, "dask_wall_s": dask_s,
        "overhead_per_file_ms": (dask_s - plain_s) / n * 1000,
        "cluster_start_close_s": startup,
        "overhead_per_file_without_cluster_start_ms": (dask_s - startup - plain_s) / n * 1000,
        "plain_peak_rss_mb": max(x["peak_rss_mb"] for x in runs["plain"]),
        "dask_peak_rss_mb": max(x["peak_rss_mb"] for x in runs["dask"]),  # client + worker processes
        "reports_same_rows": same,
        "reports_max_numeric_difference": max_diff,
        "raw": runs,
    }
    print(f"N={n} JPEG Baseline {args.size}x{args.size}, {args.repeats} repeats, medians, {os.cpu_count()} cores")
    print(f"plain local run          {result['plain_img_s']:7.1f} images/s  ({plain_s:.2f} s)")
    print(f"--scheduler {scheduler:<12} {result['dask_img_s']:7.1f} images/s  ({dask_s:.2f} s)")
    print(f"overhead per file        {result['overhead_per_file_ms']:7.1f} ms  (all of it)")
    print(f"LocalCluster start+close {startup:7.2f} s")
    print(f"overhead per file        {result['overhead_per_file_without_cluster_start_ms']:7.1f} ms  "
          f"(less the cluster start)")
    print(f"reports: same files and text cells {same}; largest numeric difference {max_diff:g}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
