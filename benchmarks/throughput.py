"""Throughput: the original project's prediction path vs `heartbatch run` vs this machine's limit.

    python benchmarks/throughput.py [--n 300] [--repeats 3] [--json out.json]

Builds (outside the repo, in --workdir) N frontal CR DICOMs, 1024 x 1024, 8-bit
MONOCHROME2, JPEG Baseline, from the shared PNGs, and a 12-bit JPEG 2000
lossless variant, then measures end-to-end images/s of:

  (a) original: pydicom dcmread -> pixel_array / 255 -> resize 224 -> PyTorch
      eager network, one image at a time (the same network as the shipped model,
      loaded from --checkpoint; needs the [train] extra);
  (b) heartbatch run with its defaults, as a user runs it (a subprocess, startup included);
  (c) the floor: decode+preprocess only (1 process, and a pool of one per core),
      inference only (onnxruntime, best batch size and threads), and the ideal
      pipelined rate those imply on this machine's cores:
      cores / (1/decode_per_core + 1/infer_per_core);
  (d) what any cold run of N files must pay on top: the start-up floor (a new
      interpreter importing the decoders and onnxruntime and loading the model,
      before its first image) and the all-cores rate (one process per core, each
      decoding and measuring its share in heartbatch's batches, all at once, no
      IPC, sharing caches and memory bandwidth), giving the cold-start bound
      N / (start-up + N / all-cores rate).

Each measurement is repeated; medians are reported with b/a and b/ideal.

    python benchmarks/throughput.py --syntaxes [--n 100] [--sides 1024 2048] [--before ../old-checkout]

instead prints a table per transfer syntax (uncompressed 16-bit, RLE, JPEG Baseline, JPEG
Lossless SV1, JPEG-LS lossless, JPEG 2000 lossless and lossy; 12 bits stored but JPEG
Baseline's 8) and film size: decode + preprocess alone (one process) and the whole
`heartbatch run`, in images/s, and each run's share of JPEG Baseline's on the same films.
With ``--before`` a checkout of another heartbatch is measured beside this one, interleaved.
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SYNTAXES, build_folder, print_machine, timed_command  # noqa: E402

from heartbatch.arithmetic import cpu, onnxruntime_version  # noqa: E402


def original_path(files: list[Path], net) -> float:
    """images/s of the original project's way: one file at a time, torch eager."""
    import pydicom
    import torch
    from PIL import Image

    start = time.perf_counter()
    with torch.no_grad():
        for f in files:
            img = pydicom.dcmread(f).pixel_array / 255
            img = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((224, 224)))
            net(torch.tensor(img)[None, None].float())
    return len(files) / (time.perf_counter() - start)


def load_torch_net(checkpoints: list[Path]):
    """The shipped model's network(s) in PyTorch; several checkpoints: their average, as exported."""
    import torch

    from exporter.export import Averaged
    from exporter.net import HeartBoxNet

    nets = []
    for checkpoint in checkpoints:
        if checkpoint.is_file():
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            net = HeartBoxNet(mean=state["config"]["mean"], std=state["config"]["std"])
            net.load_state_dict(state["model"])
        else:
            print(f"note: {checkpoint} not found; timing a randomly initialised network of the same shape")
            net = HeartBoxNet()
        nets.append(net.eval())
    torch.set_num_threads(os.cpu_count() or 1)
    return nets[0] if len(nets) == 1 else Averaged(nets).eval()


def heartbatch_run(folder: Path, workdir: Path, model: Path | None, code: Path = REPO) -> tuple[float, int]:
    out = workdir / f"report-{time.monotonic_ns()}.csv"
    cmd = [sys.executable, "-m", "heartbatch", "run", str(folder), "--out", str(out), "--quiet"]
    if model:
        cmd += ["--model", str(model)]
    seconds, peak, result = timed_command(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
    if result.returncode != 0:
        raise SystemExit(f"heartbatch run failed ({result.returncode}): {result.stderr[-2000:]}")
    n = json.loads(result.stdout.strip().splitlines()[-1])["ok"]
    return n / seconds, peak


def decode_only(files: list[Path], size: int, workers: int) -> float:
    from heartbatch.workers import WorkerPool

    pool = WorkerPool(workers, size)
    try:
        if workers:
            list(pool.map(str(f) for f in files[:8]))  # start the pool outside the timing
        start = time.perf_counter()
        results = list(pool.map(str(f) for f in files))
        seconds = time.perf_counter() - start
    finally:
        pool.close()
    assert all(not hasattr(r, "status") for r in results), "decode-only run hit unreadable files"
    return len(files) / seconds


def inference_only(model_path: Path | None, threads: int, batch: int, n: int) -> float:
    from heartbatch.model import BoxModel

    model = BoxModel(model_path, threads=threads)
    size = model.info.input_size
    images = np.random.default_rng(0).random((batch, size, size), dtype=np.float32)
    model.predict(images)
    rounds = max(1, n // batch)
    start = time.perf_counter()
    for _ in range(rounds):
        model.predict(images)
    return rounds * batch / (time.perf_counter() - start)


STARTUP_PROBE = ("import heartbatch.workers, onnxruntime\n"
                 "from heartbatch.model import BoxModel\n"
                 "BoxModel({model!r})")


def startup_floor(model_path: Path | None) -> float:
    """Seconds for a new interpreter to import what a run needs and load the model, then exit."""
    code = STARTUP_PROBE.format(model=None if model_path is None else str(model_path))
    seconds, _, result = timed_command([sys.executable, "-c", code], cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"start-up probe failed: {result.stderr[-2000:]}")
    return seconds


def _measure_share(paths: list[str], model_path: str | None, barrier, results) -> None:
    """One core's share: load the model, warm up, wait for the others, then time the files."""
    from heartbatch.model import BoxModel, remember
    from heartbatch.pipeline import FILES_PER_TASK
    from heartbatch.confidence import Policy
    from heartbatch.workers import measure_files

    model = BoxModel(model_path, threads=1)
    ref, size = remember(model), model.info.input_size
    measure_files(paths[:FILES_PER_TASK], size, None, model=ref, policy=Policy(), threads=1)
    barrier.wait()
    start = time.perf_counter()
    for i in range(0, len(paths), FILES_PER_TASK):
        measure_files(paths[i:i + FILES_PER_TASK], size, None, model=ref, policy=Policy(), threads=1)
    results.put(time.perf_counter() - start)


def all_cores_rate(files: list[Path], model_path: Path | None, cores: int) -> float:
    """images/s with one process per core each reading, decoding and measuring its own files."""
    from heartbatch.worker_context import context

    ctx = context()
    barrier, results = ctx.Barrier(cores), ctx.Queue()
    shares = [[str(f) for f in files[i::cores]] for i in range(cores)]
    procs = [ctx.Process(target=_measure_share, args=(share, None if model_path is None else str(model_path),
                                                      barrier, results)) for share in shares]
    for proc in procs:
        proc.start()
    seconds = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return len(files) / max(seconds)


DECODE_PROBE = """
import sys, time
from pathlib import Path
from heartbatch import workers
files = sorted(str(p) for p in Path(sys.argv[1]).glob("*.dcm"))
Pool = getattr(workers, "WorkerPool", None) or getattr(workers, "DecodePool")  # the name of older checkouts
pool = Pool(0, int(sys.argv[2]))
list(pool.map(files[:2]))
start = time.perf_counter()
results = list(pool.map(files))
seconds = time.perf_counter() - start
assert all(not hasattr(r, "status") for r in results), "unreadable files"
print(len(files) / seconds)
"""


def decode_rate(folder: Path, size: int, code: Path) -> float:
    """decode + preprocess images/s of one process, with the heartbatch of ``code``."""
    _, _, result = timed_command([sys.executable, "-c", DECODE_PROBE, str(folder), str(size)], cwd=code,
                                 env={**os.environ, "PYTHONPATH": str(code)})
    if result.returncode != 0:
        raise SystemExit(f"decode probe with {code} failed: {result.stderr[-2000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def syntax_table(args) -> int:
    """images/s per transfer syntax and film size, this checkout (and --before), interleaved."""
    from heartbatch.model import BoxModel

    size = BoxModel(args.model).info.input_size
    if args.only and "jpeg" not in args.only:
        args.only = [*args.only, "jpeg"]
    codes = {"after": REPO} | ({"before": args.before.resolve()} if args.before else {})
    folders = {(syntax, side): build_folder(args.workdir / f"{syntax}-{side}-{args.n}", args.n, size=side,
                                            bits=8 if syntax == "jpeg" else 12, syntax=syntax)
               for side in args.sides for syntax in SYNTAXES if syntax in (args.only or SYNTAXES)}
    rates: dict[tuple, list[float]] = {}
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)
        for key, folder in folders.items():
            for name, code in codes.items():
                rates.setdefault((*key, name, "decode"), []).append(decode_rate(folder, size, code))
                rates.setdefault((*key, name, "run"), []).append(heartbatch_run(folder, args.workdir, args.model,
                                                                                code)[0])
    table = {k: median(v) for k, v in rates.items()}
    names = list(codes)
    head = ["syntax", "side"] + [f"decode {n}" for n in names] + [f"run {n}" for n in names] + \
        [f"run/JPEG {n}" for n in names]
    print(f"N={args.n} films per folder, {args.repeats} repeats, medians, images/s")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (syntax, side) in folders:
        cells = [SYNTAXES[syntax], str(side)]
        cells += [f"{table[(syntax, side, n, 'decode')]:.1f}" for n in names]
        cells += [f"{table[(syntax, side, n, 'run')]:.1f}" for n in names]
        cells += [f"{table[(syntax, side, n, 'run')] / table[('jpeg', side, n, 'run')]:.2f}" for n in names]
        print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"n": args.n, "repeats": args.repeats, "codes": {k: str(v) for k, v in codes.items()},
                                         "raw": {"/".join(map(str, k)): v for k, v in rates.items()}}, indent=2) + "\n")
    return 0


def median(values):
    return statistics.median(values)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "heartbatch-bench")
    p.add_argument("--model", type=Path, help="ONNX model (default: the shipped model)")
    p.add_argument("--checkpoint", type=Path, nargs="+", default=[REPO / "runs" / "default" / "best.pt"],
                   help="torch checkpoint(s) of the shipped model's network(s), for the original path")
    p.add_argument("--skip-original", action="store_true", help="no torch: skip (a)")
    p.add_argument("--json", type=Path)
    p.add_argument("--syntaxes", action="store_true", help="the table per transfer syntax instead (see above)")
    p.add_argument("--sides", type=int, nargs="+", default=[1024, 2048], help="film sizes for --syntaxes")
    p.add_argument("--before", type=Path, help="with --syntaxes: another checkout measured beside this one")
    p.add_argument("--only", nargs="+", choices=sorted(SYNTAXES), help="with --syntaxes: these encodings only "
                   "(JPEG Baseline, the reference, is always measured)")
    args = p.parse_args()
    print_machine()
    if args.syntaxes:
        return syntax_table(args)

    cores = os.cpu_count() or 1
    jpeg = build_folder(args.workdir / f"jpeg-{args.n}", args.n)
    j2k = build_folder(args.workdir / f"j2k12-{args.n}", args.n, bits=12, syntax="j2k")
    files = sorted(jpeg.glob("*.dcm"))
    j2k_files = sorted(j2k.glob("*.dcm"))
    from heartbatch.model import BoxModel

    size = BoxModel(args.model).info.input_size
    net = None if args.skip_original else load_torch_net(args.checkpoint)

    runs: dict[str, list[float]] = {k: [] for k in ("a", "b", "b_j2k", "decode1", "decode_pool", "decode1_j2k",
                                                    "startup", "all_cores")}
    peaks = []
    for r in range(args.repeats):
        print(f"repeat {r + 1}/{args.repeats}", file=sys.stderr)
        if net is not None:
            runs["a"].append(original_path(files, net))
        rate, peak = heartbatch_run(jpeg, args.workdir, args.model)
        runs["b"].append(rate)
        peaks.append(peak)
        runs["b_j2k"].append(heartbatch_run(j2k, args.workdir, args.model)[0])
        runs["decode1"].append(decode_only(files, size, 0))
        runs["decode_pool"].append(decode_only(files, size, cores))
        runs["decode1_j2k"].append(decode_only(j2k_files[: max(20, args.n // 5)], size, 0))
        runs["startup"].append(startup_floor(args.model))
        runs["all_cores"].append(all_cores_rate(files, args.model, cores))
    grid = {}
    for threads in sorted({1, cores}):
        for batch in (1, 8, 16, 32):
            grid[(threads, batch)] = median([inference_only(args.model, threads, batch, 64)
                                             for _ in range(args.repeats)])
    best_all = max(grid.items(), key=lambda kv: kv[1])
    best_one_thread = max(v for (t, _), v in grid.items() if t == 1)
    d1 = median(runs["decode1"])
    ideal = cores / (1 / d1 + 1 / best_one_thread)
    d1_j2k = median(runs["decode1_j2k"])
    ideal_j2k = cores / (1 / d1_j2k + 1 / best_one_thread)
    startup, all_cores = median(runs["startup"]), median(runs["all_cores"])
    bound = args.n / (startup + args.n / all_cores)
    result = {
        "machine": {"cores": cores, "python": sys.version.split()[0], "cpu": cpu().as_dict(),
                    "onnxruntime": onnxruntime_version()},
        "n": args.n, "repeats": args.repeats,
        "a_original_img_s": median(runs["a"]) if runs["a"] else None,
        "b_heartbatch_run_img_s": median(runs["b"]),
        "b_heartbatch_run_j2k12_img_s": median(runs["b_j2k"]),
        "decode_1proc_img_s": d1,
        "decode_pool_img_s": median(runs["decode_pool"]),
        "decode_1proc_j2k12_img_s": d1_j2k,
        "inference_best": {"threads": best_all[0][0], "batch": best_all[0][1], "img_s": best_all[1]},
        "inference_1thread_best_img_s": best_one_thread,
        "inference_grid": {f"threads={t},batch={b}": v for (t, b), v in grid.items()},
        "ideal_pipelined_img_s": ideal,
        "ideal_pipelined_j2k12_img_s": ideal_j2k,
        "startup_floor_s": startup,
        "all_cores_img_s": all_cores,
        "cold_start_bound_img_s": bound,
        "peak_rss_mb_b": max(peaks) / 2**20,
        "raw": runs,
    }
    b = result["b_heartbatch_run_img_s"]
    result["b_over_a"] = b / result["a_original_img_s"] if result["a_original_img_s"] else None
    result["b_over_ideal"] = b / ideal
    result["b_j2k_over_ideal"] = result["b_heartbatch_run_j2k12_img_s"] / ideal_j2k
    result["b_over_cold_start_bound"] = b / bound
    result["cold_start_bound_over_ideal"] = bound / ideal

    def f(v, d=1):
        return "–" if v is None else f"{v:.{d}f}"

    rows = [
        ("(a) original path (dcmread, /255, resize, torch eager, 1 at a time)", f(result["a_original_img_s"])),
        ("(b) heartbatch run, defaults (JPEG Baseline 8-bit)", f(b)),
        ("(b) heartbatch run, defaults (JPEG 2000 lossless 12-bit)", f(result["b_heartbatch_run_j2k12_img_s"])),
        ("decode+preprocess, 1 process (JPEG Baseline)", f(d1)),
        (f"decode+preprocess, pool of {cores} (JPEG Baseline)", f(result["decode_pool_img_s"])),
        ("decode+preprocess, 1 process (J2K 12-bit)", f(d1_j2k)),
        (f"inference only, best (threads={best_all[0][0]}, batch={best_all[0][1]})", f(best_all[1])),
        ("inference only, 1 thread, best batch", f(best_one_thread)),
        (f"ideal pipelined on {cores} cores (JPEG Baseline)", f(ideal)),
        (f"ideal pipelined on {cores} cores (J2K 12-bit)", f(ideal_j2k)),
        ("(d) start-up floor: interpreter + imports + model, s", f(startup, 2)),
        (f"(d) all {cores} cores decoding + measuring at once, no IPC", f(all_cores)),
        (f"(d) cold-start bound for N={args.n}: N / (start-up + N / all-cores)", f(bound)),
        ("b / a", f(result["b_over_a"], 2)),
        ("b / ideal (JPEG Baseline)", f(result["b_over_ideal"], 2)),
        ("b / ideal (J2K 12-bit)", f(result["b_j2k_over_ideal"], 2)),
        ("cold-start bound / ideal", f(result["cold_start_bound_over_ideal"], 2)),
        ("b / cold-start bound", f(result["b_over_cold_start_bound"], 2)),
        ("peak RSS of (b), MB", f(result["peak_rss_mb_b"], 0)),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"N={args.n}, {args.repeats} repeats, medians, images/s, {cores} cores")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>8}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
