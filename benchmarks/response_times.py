"""How soon heartbatch gives up or refuses: the timings the test suite no longer asserts.

    python benchmarks/response_times.py [--repeats 3] [--json out.json] [--skip-dask]

The suite checks what happens (exit status, message, error row); this prints how
long it takes, on this machine, as the median (and max) of --repeats tries:

  lock_refusal_s          `heartbatch run` on a report whose ledger another process holds:
                          from start to exit 2 (it must not wait for the lock; includes
                          interpreter start-up and imports)
  time_limit_inprocess_s  prepare() of a file whose reader blocks for 30 s, with a 0.5 s limit
  time_limit_pool_s       the same in a 2-worker WorkerPool with a 2 s limit, ten files
                          (one hanging), from submit to the last result
  dask_unreachable_s      `run --scheduler tcp://127.0.0.1:1` with a 2 s connect timeout,
                          in this process, to exit 2 (needs heartbatch[dask]; --skip-dask)

Each line says what it is compared against (the limit, or what the suite used to assert).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, print_machine, shared_pngs  # noqa: E402

sys.path[:0] = [str(REPO), str(REPO / "tests")]  # crashers, dicom_factory, onnx_models (test helpers)


def _chest(path: Path, index: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    from dicom_factory import write_dicom

    with Image.open(shared_pngs()[index]) as im:
        pixels = np.asarray(im.convert("L").resize((96, 96)), dtype=np.uint8)
    return write_dicom(path, pixels, patient_id=f"RT{index:03d}")


def lock_refusal(workdir: Path, model: Path) -> float:
    from heartbatch.report.ledger import Ledger
    from heartbatch.report.paths import ReportFiles

    folder = workdir / "lock" / "studies"
    if not folder.is_dir():
        _chest(folder / "a.dcm")
    out = workdir / "lock" / "report.csv"
    holder = Ledger(ReportFiles.of(out).state_dir)
    try:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "heartbatch", "run", str(folder), "--out", str(out),
                               "--model", str(model), "--workers", "0", "--quiet"],
                              capture_output=True, text=True, cwd=REPO, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        seconds = time.perf_counter() - started
    finally:
        holder.close()
    if proc.returncode != 2 or "lock" not in proc.stderr.lower():
        raise SystemExit(f"expected a refusal (exit 2, lock); got {proc.returncode}: {proc.stderr[-2000:]}")
    return seconds


def _hang_files(workdir: Path) -> list[str]:
    folder = workdir / "hang"
    names = [f"file{i}.dcm" for i in range(9)] + ["hang.dcm"]
    return [str(p if p.is_file() else _chest(p, i)) for i, p in enumerate(folder / n for n in names)]


def time_limit_inprocess(workdir: Path) -> float:
    import crashers

    hang = next(p for p in _hang_files(workdir) if p.endswith("hang.dcm"))
    started = time.perf_counter()
    result = crashers.hang_on_marker(hang, 224, 0.5)
    seconds = time.perf_counter() - started
    if getattr(result, "status", "") != "error":
        raise SystemExit(f"the 0.5 s limit did not stop the reader: {result!r}")
    return seconds


def time_limit_pool(workdir: Path) -> float:
    import crashers
    from heartbatch.workers import WorkerPool

    files = _hang_files(workdir)
    pool = WorkerPool(workers=2, size=224, timeout=2.0, many=crashers.each(crashers.hang_on_marker), chunk=1)
    try:
        started = time.perf_counter()
        results = list(pool.map(files))
        seconds = time.perf_counter() - started
    finally:
        pool.close()
    if len(results) != len(files):
        raise SystemExit(f"{len(results)} results for {len(files)} files")
    return seconds


def dask_unreachable(workdir: Path, model: Path) -> float:
    import contextlib
    import io

    import dask

    from heartbatch import cli

    folder = workdir / "dask" / "studies"
    if not folder.is_dir():
        _chest(folder / "a.dcm")
    started = time.perf_counter()
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}), \
            contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["run", str(folder), "--out", str(workdir / "dask" / "r.csv"), "--model", str(model),
                         "--scheduler", "tcp://127.0.0.1:1", "--quiet"])
    seconds = time.perf_counter() - started
    if code != 2:
        raise SystemExit(f"expected exit 2 for an unreachable scheduler, got {code}")
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "heartbatch-bench" / "response")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    p.add_argument("--skip-dask", action="store_true", help="leave out the unreachable-scheduler timing")
    args = p.parse_args()
    print_machine()
    args.workdir.mkdir(parents=True, exist_ok=True)

    import onnx_models

    model = onnx_models.constant_box_model(args.workdir / "constant.onnx")
    measures = [
        ("lock_refusal_s", lambda: lock_refusal(args.workdir, model), "must not wait; the suite used to assert < 30 s"),
        ("time_limit_inprocess_s", lambda: time_limit_inprocess(args.workdir), "limit 0.5 s; the reader blocks 30 s"),
        ("time_limit_pool_s", lambda: time_limit_pool(args.workdir), "limit 2 s; the reader blocks 30 s"),
    ]
    if not args.skip_dask:
        try:
            import distributed  # noqa: F401
        except ImportError:
            print("dask_unreachable_s: skipped (install heartbatch[dask])")
        else:
            measures.append(("dask_unreachable_s", lambda: dask_unreachable(args.workdir, model),
                             "connect timeout 2 s; the suite used to assert < 30 s"))
    results: dict = {"machine": {"cores": os.cpu_count(), "python": platform.python_version()},
                     "repeats": args.repeats}
    for name, measure, against in measures:
        times = [measure() for _ in range(args.repeats)]
        results[name] = {"median": round(statistics.median(times), 3), "max": round(max(times), 3)}
        print(f"{name:24} median {statistics.median(times):7.3f} s   max {max(times):7.3f} s   ({against})",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
