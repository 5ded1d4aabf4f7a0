"""Latency of `heartbatch watch`: from a complete file landing in a watched folder to its row.

    python benchmarks/watch_latency.py [--n 20] [--model M] [--settle 1.0] [--pause 0.5] [--json out.json]

Starts `heartbatch watch` as a subprocess on a fresh temporary folder and waits
until it is ready (a file present at start has its row: catch-up done, observer
running).  Then drops N complete chest DICOMs one at a time: each is written
next to the folder and moved in with os.rename, so a complete file lands at
once, and the time from the rename to its row in the report CSV (polled every
10 ms) is measured.  Prints each latency and the median / p90 / max.

Target: median under 3 s on an idle machine.  With the default settle time
(1 s: a file must stay unchanged that long before it is read) the floor is
about settle + the watcher's 0.2 s poll + one file's decode and inference.

The DICOM is the real SIIM chest CR from the shared data (1024 x 1024, JPEG
baseline; --dicom to use another).  The model defaults to the shipped
heartbatch/models/heartbox.onnx, or, when the package has none yet, a constant
test model built with tests/onnx_models.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA, REPO, print_machine  # noqa: E402

SHIPPED_MODEL = REPO / "heartbatch" / "models" / "heartbox.onnx"
SIIM = DATA / "dicom" / "siim-cxr-pa-jpeg-baseline.dcm"


def default_model(workdir: Path) -> tuple[Path, str]:
    if SHIPPED_MODEL.is_file():
        return SHIPPED_MODEL, "shipped model"
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    import onnx_models

    return onnx_models.constant_box_model(workdir / "constant.onnx"), "constant test model (no shipped model yet)"


def source_dicom(path: Path | None, workdir: Path) -> Path:
    if path is not None:
        return path
    if SIIM.is_file():
        return SIIM
    from PIL import Image
    import numpy as np

    from _common import chest_dicom, shared_pngs

    with Image.open(shared_pngs()[0]) as im:
        pixels = np.asarray(im.convert("L"), dtype=np.uint8)
    made = workdir / "chest.dcm"
    chest_dicom(made, pixels)
    return made


class ReportTail:
    """Reads the report CSV as it grows; knows which paths have a row."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = 0
        self.pending = b""
        self.paths: set[str] = set()

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                if size < self.offset:  # rewritten from the ledger: read it again
                    self.offset, self.pending, self.paths = 0, b"", set()
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        for line in lines:
            # the path is the first field; these test paths need no CSV quoting
            self.paths.add(line.split(b",", 1)[0].decode("utf-8", "replace"))


def wait_for_row(tail: ReportTail, path: str, proc: subprocess.Popen, timeout: float, interval: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tail.poll()
        if path in tail.paths:
            return True
        if proc.poll() is not None:
            raise SystemExit(f"heartbatch watch exited with {proc.returncode}")
        time.sleep(interval)
    return False


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20, help="files to drop, one at a time (20)")
    parser.add_argument("--model", type=Path, help="ONNX model (default: the shipped model, else a test model)")
    parser.add_argument("--dicom", type=Path, help="the DICOM to drop (default: the shared SIIM chest CR)")
    parser.add_argument("--settle", type=float, help="passed to `heartbatch watch --settle` (its default: 1.0)")
    parser.add_argument("--workers", type=int, help="passed to `heartbatch watch --workers`")
    parser.add_argument("--polling", action="store_true", help="passed to `heartbatch watch`")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between a row and the next drop (0.5)")
    parser.add_argument("--poll-interval", type=float, default=0.01, help="how often the CSV is read (0.01 s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up on a file after this long (60 s)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print_machine()

    with tempfile.TemporaryDirectory(prefix="hb-latency-") as tmp:
        tmp = Path(tmp)
        model, model_note = (args.model, "given") if args.model else default_model(tmp)
        source = source_dicom(args.dicom, tmp)
        watched, staging = tmp / "incoming", tmp / "staging"
        watched.mkdir()
        staging.mkdir()
        report = tmp / "report.csv"
        shutil.copyfile(source, watched / "ready.dcm")  # present at start: its row means "ready"

        command = [sys.executable, "-m", "heartbatch", "watch", str(watched), "--out", str(report),
                   "--model", str(model), "--quiet"]
        if args.settle is not None:
            command += ["--settle", str(args.settle)]
        if args.workers is not None:
            command += ["--workers", str(args.workers)]
        if args.polling:
            command.append("--polling")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        log = open(tmp / "watch.log", "wb")
        started = time.monotonic()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        latencies: list[float] = []
        timeouts = 0
        try:
            tail = ReportTail(report)
            if not wait_for_row(tail, str(watched / "ready.dcm"), proc, 120, 0.05):
                raise SystemExit("heartbatch watch was not ready within 120 s")
            print(f"watch ready after {time.monotonic() - started:.2f} s (start-up and catch-up of one file); "
                  f"model: {model.name} ({model_note}); file: {source.name} ({source.stat().st_size // 1024} kB); "
                  f"settle: {args.settle if args.settle is not None else 'default (1.0)'} s")
            for i in range(args.n):
                name = f"drop_{i:03d}.dcm"
                shutil.copyfile(source, staging / name)  # complete before it lands
                landed = time.monotonic()
                os.rename(staging / name, watched / name)
                if wait_for_row(tail, str(watched / name), proc, args.timeout, args.poll_interval):
                    latency = time.monotonic() - landed
                    latencies.append(latency)
                    print(f"file {i + 1:3d}: {latency:6.3f} s", flush=True)
                else:
                    timeouts += 1
                    print(f"file {i + 1:3d}: no row within {args.timeout:g} s", flush=True)
                time.sleep(args.pause)
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log.close()

    if not latencies:
        print("no latencies measured")
        return 1
    median = statistics.median(latencies)
    result = {
        "n": len(latencies), "timeouts": timeouts,
        "median_s": round(median, 3), "p90_s": round(percentile(latencies, 90), 3),
        "max_s": round(max(latencies), 3), "min_s": round(min(latencies), 3),
        "latencies_s": [round(v, 3) for v in latencies],
        "settle_s": args.settle if args.settle is not None else 1.0, "model": str(model), "model_note": model_note,
        "dicom": str(source), "workers": args.workers, "polling": args.polling,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(f"median {result['median_s']:.3f} s, p90 {result['p90_s']:.3f} s, max {result['max_s']:.3f} s, "
          f"min {result['min_s']:.3f} s over {len(latencies)} files"
          + (f" ({timeouts} timed out)" if timeouts else ""))
    print(f"target (median under 3 s): {'met' if median < 3 and not timeouts else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if median < 3 and not timeouts else 1


if __name__ == "__main__":
    sys.exit(main())
