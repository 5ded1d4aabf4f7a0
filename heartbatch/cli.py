"""The `heartbatch` command line.  Heavy imports happen inside commands, so
`--help` and `--version` answer instantly."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import __version__
from .argtypes import positive_int, probability, ratio
from .errors import ExitCode, HeartbatchError, Status, UsageError



def _fail(console, message: str, label: str = "error") -> None:
    """One red-labelled line; the message is escaped, so paths or hints in [brackets] print as they are."""
    from rich.markup import escape

    console.print(f"[red]{label}:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="measure every chest X-ray DICOM under PATH(s), write a CSV report and summaries",
        description="Scan PATH(s) recursively (any file name), measure heart and thorax boxes and the "
                    "cardiothoracic ratio (CTR) on every frontal chest radiograph, and write one CSV row "
                    "per file plus <report>.summary.json and <report>.summary.md next to it.",
        epilog="Exit status: 0 every file got a row; 2 usage error; 3 model refused; 4 nothing readable.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    _add_common(p)
    p.add_argument("--quiet", action="store_true",
                   help="no progress or tables; print one JSON line with counts and output paths")
    p.add_argument("--force", action="store_true",
                   help="forget what was processed and measure every file again")
    p.add_argument("--html", type=Path, metavar="FILE",
                   help="also write the HTML QA report (summary, CTR histogram, thumbnails with boxes) to FILE")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on a Dask cluster: a scheduler address (tcp://host:8786), a scheduler file (JSON), "
                        "or local:N (N worker processes started here); workers read files and model by path; "
                        "needs heartbatch[dask]")
    p.set_defaults(func=cmd_run)


def _add_common(p) -> None:
    p.add_argument("--out", required=True, type=Path, help="report CSV to write (e.g. report.csv)")
    p.add_argument("--model", type=Path, help="ONNX model (default: the model shipped with heartbatch)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="rows written to the report together, and files per Dask task (16)")
    p.add_argument("--workers", type=int,
                   help="worker processes, each reading and measuring files (default: one per CPU core; "
                        "0: all in this process)")
    p.add_argument("--threads", type=positive_int,
                   help="onnxruntime threads per model (default: CPU cores / worker processes)")
    p.add_argument("--ctr-threshold", type=ratio, default=0.5, help="CTR above this is 'enlarged' (0.50)")
    _add_content_check(p)
    p.add_argument("--include-patient-id", action="store_true",
                   help="add patient_id and accession_number columns (off by default: no identifiers)")
    p.add_argument("--state", type=Path,
                   help="state folder with the ledger of processed files (default: <report>.state/)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds allowed to read one file before it gets an error row (60)")
    p.add_argument("--debug", action="store_true",
                   help="write every skipped/error file, with full tracebacks, to <report>.debug.log")
    _add_dicom_out(p)


def _add_dicom_out(p) -> None:
    p.add_argument("--dicom-out", type=Path, metavar="DIR",
                   help="for every ok row, also write DICOM results to DIR: a TID 1500 measurement report (SR) "
                        "and a presentation state drawing the boxes, referencing the image and filed in its "
                        "study (needs heartbatch[dicom])")
    p.add_argument("--dicom-out-capture", action="store_true",
                   help="with --dicom-out: a secondary capture with the boxes burned in instead of the "
                        "presentation state, for viewers without presentation-state support")


def _check_dicom_out(args) -> None:
    if args.dicom_out_capture and not args.dicom_out:
        raise UsageError("--dicom-out-capture needs --dicom-out DIR")
    if not args.dicom_out:
        return
    if args.dicom_out.exists() and not args.dicom_out.is_dir():
        raise UsageError(f"--dicom-out {args.dicom_out} is a file; give a folder")
    _require("highdicom", "--dicom-out")


def _require(module: str, what: str) -> None:
    """An optional dependency of the [dicom] extra, or a usage error that says how to install it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs {module}: pip install 'heartbatch[dicom]'")


#: Attribute that marks the --debug log handler; its value is the logger level to restore.
_DEBUG_LOG_MARK = "_heartbatch_debug_log_level"


def _setup_debug_log(args) -> None:
    """With --debug, log to <report>.debug.log: one handler at a time, however often main() runs in a
    process (the previous call's is removed and closed first)."""
    _close_debug_log()
    if not getattr(args, "debug", False):
        return
    import logging

    from .session import ReportFiles

    class _DebugLog(logging.FileHandler):
        def _open(self):  # the report's folder may not exist yet: `run` creates it later
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            return super()._open()

    handler = _DebugLog(ReportFiles.of(args.out).debug_log, encoding="utf-8", errors="backslashreplace", delay=True)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("heartbatch")
    setattr(handler, _DEBUG_LOG_MARK, logger.level)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


def _close_debug_log() -> None:
    """Remove and close the --debug handler(s) of earlier main() calls; put the logger level back."""
    import logging

    logger = logging.getLogger("heartbatch")
    for handler in [h for h in logger.handlers if hasattr(h, _DEBUG_LOG_MARK)]:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(getattr(handler, _DEBUG_LOG_MARK))


def _add_watch(sub) -> None:
    p = sub.add_parser(
        "watch", help="run the pipeline on files as they arrive in DIR(s)",
        description="Process files already in DIR(s), then each new or changed file once it is complete "
                    "(size and mtime stable). Rows go to the same report and ledger as `heartbatch run`; "
                    "summaries are refreshed after each batch. Stop with Ctrl-C or SIGTERM: the batch in "
                    "flight is finished and flushed; a restart continues where it stopped.")
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="folders to watch (recursively)")
    _add_common(p)
    p.add_argument("--polling", action="store_true",
                   help="poll the folders instead of inotify (network shares, some container mounts)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds a file must stay unchanged before it is read (1.0)")
    p.add_argument("--incomplete-grace", type=float, default=30.0,
                   help="a file modified this recently that fails to parse is re-checked, not reported (30)")
    _add_send_to(p)
    p.add_argument("--quiet", action="store_true", help="no per-batch lines")
    p.set_defaults(func=cmd_watch)


def _add_listen(sub) -> None:
    p = sub.add_parser(
        "listen", help="receive chest films by DICOM C-STORE and measure each one (a Storage SCP)",
        description="A DICOM Storage SCP (C-STORE of CR, DX and secondary-capture images; C-ECHO). Each "
                    "instance is stored under <state>/received/ before it is acknowledged, then measured by "
                    "the `watch` pipeline into the same report and ledger: one row per instance, exactly once, "
                    "resumed after a restart. With --send-to, the DICOM results go back by C-STORE, retried "
                    "until the destination has them. Stop with Ctrl-C or SIGTERM.",
        epilog="Point the PACS at this machine's address, --port and --ae-title (a DICOM node or modality). "
               "Needs heartbatch[dicom].")
    p.add_argument("--port", type=int, default=11112, help="TCP port to listen on (11112; 0: any free port)")
    p.add_argument("--ae-title", default="HEARTBATCH", type=_ae_title,
                   help="this node's AE title: callers must address it (HEARTBATCH)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (0.0.0.0: all; 127.0.0.1: this machine only)")
    p.add_argument("--allow", action="append", default=[], type=_ae_title, metavar="AET",
                   help="accept associations only from this calling AE title (repeat for several; default: any)")
    p.add_argument("--max-associations", type=positive_int, default=8, help="associations served at once (8)")
    p.add_argument("--max-instance-mb", type=positive_int, default=1024,
                   help="refuse an instance larger than this many MiB (1024)")
    p.add_argument("--network-timeout", type=float, default=60.0,
                   help="seconds of silence before an association is dropped (60)")
    _add_common(p)
    _add_send_to(p)
    p.add_argument("--quiet", action="store_true", help="no per-instance lines")
    p.set_defaults(func=cmd_listen)


def _add_send_to(p) -> None:
    p.add_argument("--send-to", metavar="AET@HOST:PORT",
                   help="send the DICOM results (SR and presentation state or capture) by C-STORE to this node, "
                        "e.g. PACS@10.0.0.5:104; queued in the ledger and retried until stored (default "
                        "results folder without --dicom-out: <state>/results)")


def _ae_title(text: str) -> str:
    text = text.strip()
    if not 0 < len(text) <= 16 or "\\" in text or not text.isprintable():
        raise argparse.ArgumentTypeError("an AE title is 1 to 16 printable characters, no backslash")
    return text


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="render the HTML QA report of an existing report CSV",
        description="Render one self-contained HTML file (images embedded, works offline) from a report CSV: "
                    "batch summary, CTR histogram with the threshold, thumbnails with the heart (red) and "
                    "thorax (blue) boxes for every flagged study and a sample of the others, and a sortable "
                    "table of studies. The DICOM files are read again from the paths in the report.")
    p.add_argument("report", type=Path, metavar="REPORT", help="report CSV written by `heartbatch run`")
    p.add_argument("--html", type=Path, metavar="FILE", help="HTML file to write (default: <report>.html)")
    p.add_argument("--ctr-threshold", type=ratio,
                   help="CTR above this is flagged (default: the run's, from <report>.summary.json, else 0.50)")
    p.add_argument("--sample", type=int, default=12,
                   help="thumbnails of studies that are not flagged, spread over the CTR range (12)")
    p.set_defaults(func=cmd_report)


def _add_content_check(p) -> None:
    p.add_argument("--min-chest-score", type=probability,
                   help="films whose content check scores below this are skipped, not measured "
                        "(default: the model's recommended threshold, see MODEL_CARD.md)")
    p.add_argument("--no-content-check", dest="content_check", action="store_false",
                   help="measure every film the header checks accept, whatever its pixels look like "
                        "(the chest score is still written; rows are still flagged for review)")


def _add_show(sub) -> None:
    p = sub.add_parser(
        "show", help="draw the boxes, widths and CTR on one image (optionally with an occlusion map)",
        description="Measure one DICOM file and write a PNG with the heart box (red), the thorax box (blue), "
                    "the heart and thoracic widths and the CTR drawn on the image (with its uncertainty, the "
                    "content check's chest score and the review flag when the model gives them; printed "
                    "too). --explain blends an "
                    "occlusion-sensitivity map on top: how far the predicted heart box moves when each "
                    "region of the image is covered.")
    p.add_argument("file", type=Path, metavar="FILE", help="a DICOM file")
    p.add_argument("--out", required=True, type=Path, help="PNG to write (e.g. overlay.png)")
    p.add_argument("--model", type=Path, help="ONNX model (default: the model shipped with heartbatch)")
    p.add_argument("--explain", action="store_true",
                   help="blend an occlusion-sensitivity map (runs the model about 200 more times)")
    p.add_argument("--size", type=positive_int, default=1024,
                   help="longer side of the PNG in pixels, never above the original (1024)")
    p.add_argument("--ctr-threshold", type=ratio, default=0.5, help="CTR above this is 'enlarged' (0.50)")
    _add_content_check(p)
    p.add_argument("--threads", type=positive_int, help="onnxruntime threads (default: one per core)")
    p.set_defaults(func=cmd_show)


def _add_info(sub) -> None:
    p = sub.add_parser(
        "info", help="this installation, the CPU's int8 features, the model and its arithmetic probe",
        description="What decides the numbers heartbatch writes on this machine: heartbatch, Python and "
                    "onnxruntime versions, the CPU and its int8-relevant features (AVX2, AVX-512, VNNI, AMX), "
                    "the model (path, id, quantization, validation metrics) and the result of its arithmetic "
                    "probe: whether this CPU's fast int8 kernels give the model's recorded exact outputs, and "
                    "the arithmetic runs use.")
    p.add_argument("--model", type=Path, help="ONNX model (default: the model shipped with heartbatch)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heartbatch",
        description="Heart and thorax boxes and cardiothoracic ratio on every frontal chest X-ray "
                    "in a DICOM archive.")
    parser.add_argument("--version", action="version", version=f"heartbatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    _add_watch(sub)
    _add_listen(sub)
    _add_report(sub)
    _add_show(sub)
    _add_info(sub)
    from .evaluate import add_parser as add_evaluate

    add_evaluate(sub)
    return parser


def _load_model(path: Path | None, threads: int | None, console):
    """The model, or ContractError (exit 3); says so when it cannot check content or uncertainty."""
    from .model import BoxModel

    model = BoxModel(path, threads=threads)
    check = model.arithmetic
    if check.fallback:
        console.print(f"[yellow]warning[/]: {arithmetic_warning(model)}", highlight=False)
    elif not check.has_probe and model.info.quantized:
        console.print(f"[yellow]notice[/]: model {model.info.model_id} carries no arithmetic probe: whether this "
                      f"CPU computes its int8 layers as the model's author did is not checked (write the model "
                      f"again with quantize-onnx to add one)", highlight=False)
    if not model.info.has_trust:
        console.print(f"[yellow]notice[/]: model {model.info.model_id} has no content check or uncertainty "
                      f"outputs: every film the header checks accept is measured, and the chest_score and "
                      f"uncertainty cells stay empty", highlight=False)
    return model


def arithmetic_warning(model) -> str:
    from .arithmetic import cpu, onnxruntime_version

    first = model.arithmetic.comparisons[0]
    return (f"on this CPU ({cpu().describe()}) onnxruntime {onnxruntime_version()}'s fast int8 kernels do not give "
            f"model {model.info.model_id}'s recorded outputs ({first.describe()}); measuring with the "
            f"{model.arithmetic.mode} arithmetic instead, which does (slower). `heartbatch info` shows the details")


def _check_inputs(paths: list, out: Path | None = None) -> None:
    missing = [str(p) for p in paths if not Path(p).exists() and not Path(p).is_symlink()]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    if out is not None and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as report.csv")


def _start_workers_early(paths: list, workers: int | None) -> None:
    """Folders (or many files) will go to worker processes: start their forkserver now, so its
    imports overlap with loading the model here."""
    from .worker_context import INLINE_MAX_FILES, start_early

    few_files = len(paths) <= INLINE_MAX_FILES and all(Path(p).is_file() for p in paths)
    if workers != 0 and not few_files:
        start_early()


def cmd_run(args) -> int:
    from rich.console import Console

    from .pipeline import RunOptions, run

    console = Console(stderr=True)
    _check_inputs(args.paths, args.out)
    _check_dicom_out(args)
    if args.scheduler:
        from functools import partial

        from .distributed import check_scheduler, run as run_on_dask

        check_scheduler(args.scheduler)
        run = partial(run_on_dask, scheduler=args.scheduler)
    else:
        _start_workers_early(args.paths, args.workers)
    model = _load_model(args.model, args.threads, console)
    result = _run_with_progress(args, model, RunOptions.from_args(args), console, run)
    html = None
    if args.html is not None:
        from .html_report import write_html

        html = write_html(args.out, args.html, args.ctr_threshold)
    total = result.processed + result.unchanged
    if args.quiet:
        print(json.dumps({"report": str(result.report), "summary_json": str(result.summary_json),
                          "summary_md": str(result.summary_md), **({"html": str(html)} if html else {}),
                          "model_id": model.info.model_id, "arithmetic": model.arithmetic.mode,
                          "files": total, "processed": result.processed, "unchanged": result.unchanged,
                          **result.counts, "seconds": round(result.seconds, 3),
                          **({"dicom_out": str(args.dicom_out), "dicom_results": result.dicom_results,
                              "dicom_failed": len(result.dicom_failed)} if args.dicom_out else {})}))
    else:
        print_summary(console, result, model.info)
        if html is not None:
            console.print(f"HTML report: {html}", highlight=False)
    if total == 0 or result.counts[Status.ERROR] == total:
        if not args.quiet:
            console.print("[red]nothing could be read[/red]: no files found, or every file failed")
        return ExitCode.NOTHING
    return ExitCode.OK


def _run_with_progress(args, model, options, console, run):
    """run() with a rich progress bar (rate, ETA), or silently with --quiet."""
    kwargs = {"state_dir": args.state, "force": args.force}
    if args.quiet:
        return run(args.paths, args.out, model, options, **kwargs)
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    info = model.info
    console.print(f"model {info.path.name} [dim]({info.model_id}, input {info.input_size}px, "
                  f"{'heart + thorax' if info.has_thorax else 'heart only: no CTR'})[/dim]")
    columns = [TextColumn("[bold]measuring"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("run", total=None, rate="")

        def advance(records):
            progress.advance(task, len(records))
            speed = progress.tasks[0].speed
            progress.update(task, rate=f"{speed:.1f} files/s" if speed else "")

        return run(args.paths, args.out, model, options, on_records=advance,
                   on_unchanged=lambda: progress.advance(task),
                   on_total=lambda n: progress.update(task, total=n), **kwargs)


def cmd_watch(args) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        raise UsageError(f"not a folder: {', '.join(missing)}")
    _check_dicom_out(args)
    _start_workers_early(args.dirs, args.workers)
    model = _load_model(args.model, args.threads, console)
    from .pipeline import RunOptions
    from .watch import WatchOptions, Watcher

    options = RunOptions.from_args(args)
    wopts = WatchOptions(settle=args.settle, incomplete_grace=args.incomplete_grace, polling=args.polling)

    def report(records):
        if not args.quiet:
            counts = {s: sum(r.status == s for r in records) for s in Status}
            console.print(f"{time.strftime('%H:%M:%S')} wrote {len(records)} rows ("
                          + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + ")", highlight=False)

    def caught_up(present: int) -> None:
        if not args.quiet:
            console.print(f"{time.strftime('%H:%M:%S')} caught up ({present} files present at start); "
                          "waiting for new files", highlight=False)

    destination = _destination(args)
    if destination is not None and options.dicom_out is None:
        raise UsageError("watch --send-to needs --dicom-out DIR (where the results are written before they are sent)")
    watcher = Watcher(args.dirs, args.out, model, options, wopts, args.state, on_records=report,
                      on_caught_up=caught_up, send_to=str(destination) if destination else None)
    sender = None
    if destination is not None:
        from .send import Sender

        sender = Sender(watcher.session.files.state_dir, destination).start()
        watcher.on_records = lambda records: (report(records), sender.wake())
    if not args.quiet:
        console.print(f"watching {', '.join(map(str, args.dirs))} -> {args.out} "
                      f"(model {model.info.model_id}; Ctrl-C to stop)", highlight=False)
    try:
        code = watcher.run()
    finally:
        if sender is not None:
            sender.stop()
    if not args.quiet:
        console.print(f"stopped; {watcher.processed} rows written this session")
    return code


def _destination(args):
    if not getattr(args, "send_to", None):
        return None
    from .send import Destination

    destination = Destination.parse(args.send_to)
    _require("pynetdicom", "--send-to")
    _require("highdicom", "--send-to")
    return destination


def cmd_listen(args) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    _require("pynetdicom", "listen")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port}: not a TCP port")
    _check_dicom_out(args)
    destination = _destination(args)
    _start_workers_early(["."], args.workers)
    model = _load_model(args.model, args.threads, console)
    from .listen import ListenOptions, Listener
    from .pipeline import RunOptions

    listen = ListenOptions(port=args.port, ae_title=args.ae_title, host=args.host, allow=tuple(args.allow),
                           max_associations=args.max_associations,
                           max_instance_bytes=args.max_instance_mb << 20, timeout=args.network_timeout)

    def stored(path: Path, calling: str, duplicate: bool) -> None:
        if not args.quiet:
            console.print(f"{time.strftime('%H:%M:%S')} received {path.stem} from {calling}"
                          + (" (again: already stored)" if duplicate else ""), highlight=False)

    def measured(records) -> None:
        if not args.quiet:
            for r in records:
                what = f"CTR {r.ctr:.3f}" if r.ok and r.ctr is not None else f"{r.status}: {r.reason}"
                console.print(f"{time.strftime('%H:%M:%S')} {Path(r.path).stem}: {what}", highlight=False)

    listener = Listener(args.out, model, RunOptions.from_args(args), listen, args.state, destination,
                        on_records=measured, on_stored=stored)
    listener.start_server()
    if not args.quiet:
        console.print(f"listening as {args.ae_title} on {args.host}:{listener.port} -> {args.out} "
                      f"(model {model.info.model_id}"
                      + (f"; results to {destination}" if destination else "") + "; Ctrl-C to stop)", highlight=False)
    if args.quiet:
        print(json.dumps({"listening": {"ae_title": args.ae_title, "host": args.host, "port": listener.port},
                          "report": str(args.out)}), flush=True)
    code = listener.run()
    if not args.quiet:
        console.print(f"stopped; {listener.stored} instances stored ({listener.duplicates} sent again), "
                      f"{listener.watcher.processed} rows written this session"
                      + (f", {listener.sender.sent} results sent" if listener.sender else ""), highlight=False)
    return code


def cmd_report(args) -> int:
    from .html_report import write_html
    from .report import COLUMNS

    if not args.report.is_file():
        raise UsageError(f"no such report: {args.report}")
    with open(args.report, encoding="utf-8", errors="replace") as fh:
        header = fh.readline().strip().split(",")
    first = COLUMNS[:COLUMNS.index("model_id") + 1]  # reports of earlier versions end there
    if header[:len(first)] != first:
        raise UsageError(f"{args.report} is not a heartbatch report (its columns differ)")
    out = args.html or args.report.with_suffix(".html")
    write_html(args.report, out, args.ctr_threshold, sample=max(0, args.sample))
    print(out)
    return ExitCode.OK


def cmd_show(args) -> int:
    from rich.console import Console

    from .confidence import Policy
    from .dicom import read_dicom
    from .errors import FileProblem
    from .overlay import Marks, draw_marks, to_rgb
    from .pixels import display, preprocess
    from .records import measure

    console = Console(stderr=True)
    if not args.file.is_file():
        raise UsageError(f"no such file: {args.file}")
    model = _load_model(args.model, args.threads, console)
    info = model.info
    try:
        dicom = read_dicom(args.file)
    except FileProblem as exc:
        _fail(console, f"{args.file}: {exc.reason}", str(exc.status))
        return ExitCode.NOTHING
    model_input = preprocess(dicom.image, info.input_size)
    policy = Policy.for_model(info.metadata, args.ctr_threshold, args.content_check, args.min_chest_score)
    record = measure(str(args.file), dicom.header, model.infer(model_input[None])[0], info.model_id, policy)
    if not record.ok:
        _fail(console, f"{args.file}: {record.reason}")
        return ExitCode.NOTHING
    rows, columns = dicom.image.shape
    image = to_rgb(display(dicom.image, args.size))
    note = ""
    if args.explain:
        from .explain import blend, occlusion_map

        heat = occlusion_map(model, model_input, rows, columns)
        image = blend(image, heat)
        note = (f"occlusion map: covering a region moves the heart box by "
                f"{heat.min():.0f}-{heat.max():.0f} px (red: most)")
    draw_marks(image, rows, columns, Marks.from_record(record), note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out, format="PNG")
    print(json.dumps({"file": str(args.file), "out": str(args.out), "model_id": info.model_id,
                      "heart": [round(v, 3) for v in record.heart],
                      "thorax": [round(v, 3) for v in record.thorax] if record.thorax else None,
                      "ctr": None if record.ctr is None else round(record.ctr, 4), "enlarged": record.enlarged,
                      "chest_score": None if record.chest_score is None else round(record.chest_score, 3),
                      "uncertainty": None if record.uncertainty is None else round(record.uncertainty, 4),
                      "review": bool(record.review), "review_reason": record.review_reason,
                      **({"explain_max_shift_px": round(float(heat.max()), 3)} if args.explain else {})}))
    if record.review:  # the JSON line is for scripts; a person reading the terminal must see this too
        from rich.markup import escape

        console.print(f"[bold yellow]review:[/] {escape(record.review_reason or 'check this measurement')}",
                      highlight=False)
    return ExitCode.OK


def cmd_info(args) -> int:
    import platform

    from .arithmetic import cpu, onnxruntime_version
    from .model import BoxModel

    model = BoxModel(args.model)
    info, check = model.info, model.arithmetic
    facts = {
        "heartbatch": __version__, "python": platform.python_version(), "onnxruntime": onnxruntime_version(),
        "cpu": cpu().as_dict(),
        "model": {"path": str(info.path), "model_id": info.model_id, "bytes": info.path.stat().st_size,
                  "input_size": info.input_size, "outputs": ["boxes", *info.optional],
                  "quantization": info.metadata.get("heartbatch.quantization", "none (float)"),
                  "validation": info.validation_metrics},
        "arithmetic": {**check.as_dict(), "verdict": check.describe()},
    }
    if args.json:
        print(json.dumps(facts, indent=1, sort_keys=True))
        return ExitCode.OK
    c = cpu()
    lines = [
        ("heartbatch", f"{__version__} (Python {facts['python']}, onnxruntime {facts['onnxruntime']})"),
        ("CPU", c.describe()),
        ("int8 kernels", "exact on this CPU (VNNI, AMX or not x86)" if c.int8_exact else
         "without VNNI: u8 x s8 pairs are added in 16 bits with saturation"),
        ("model", f"{info.path} ({info.model_id}, {facts['model']['bytes'] / 1e6:.1f} MB, input {info.input_size} px)"),
        ("quantization", facts["model"]["quantization"]),
        ("arithmetic probe", check.describe()),
        ("measures with", f"{check.mode} arithmetic" + (" (slower than the fast kernels)" if check.fallback else "")),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key:<{width}}  {value}")
    return ExitCode.OK


def print_summary(console, result, info) -> None:
    from rich.table import Table

    s = result.summary
    ctr = s["ctr"]
    table = Table(title="heartbatch run", show_header=False, title_justify="left")
    processed = result.processed
    rate = processed / result.seconds if result.seconds else 0
    table.add_row("files", f"{processed} measured in {result.seconds:.1f} s ({rate:.1f}/s)"
                  + (f"; {result.unchanged} unchanged, already in the report" if result.unchanged else ""))
    table.add_row("status (report)", "  ".join(f"{k} {v}" for k, v in s["files"]["by_status"].items()))
    for reason in s["files"]["by_reason"][:5]:
        table.add_row(f"  {reason['status']}", f"{reason['count']} × {reason['reason']}")
    if ctr["n"]:
        table.add_row("CTR median (IQR)", f"{ctr['median']:.3f} ({ctr['q1']:.3f}–{ctr['q3']:.3f})")
        views = ", ".join(f"{v} {d['enlarged']}/{d['n']}" for v, d in s["by_view"].items())
        table.add_row(f"CTR > {s['threshold']:.2f}", f"{ctr['enlarged']} of {ctr['n']} images ({views}); "
                      f"{s['studies']['ctr']['enlarged']} of {s['studies']['n']} studies")
    review = s.get("review", {})
    if review.get("n"):
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(review["reasons"].items(), key=lambda r: -r[1])[:3])
        table.add_row("flagged for review", f"{review['n']} measurements, not in the CTR statistics ({reasons})")
    elif not info.has_thorax:
        table.add_row("CTR", "not measured: the model is heart-only")
    table.add_row("model", f"{info.path.name} ({info.model_id})")
    arithmetic = s.get("arithmetic") or {}
    if arithmetic.get("mode", "fused") != "fused":
        table.add_row("arithmetic", f"{arithmetic['mode']}: this CPU's fast int8 kernels disagreed with the model")
    table.add_row("report", str(result.report))
    table.add_row("summaries", f"{result.summary_json}\n{result.summary_md}")
    if result.dicom_out is not None:
        table.add_row("DICOM results", f"{result.dicom_results} files written to {result.dicom_out}")
    console.print(table)
    for path, why in result.dicom_failed[:10]:
        _fail(console, f"{path}: DICOM results not written ({why}); the next run tries again", "warning")
    if len(result.dicom_failed) > 10:
        _fail(console, f"DICOM results not written for {len(result.dicom_failed) - 10} more files", "warning")


def _explain(exc: HeartbatchError) -> None:
    """A stopping error as one labelled line on stderr; its class says which label and exit code."""
    from rich.console import Console

    from .errors import ContractError, WorkerModelError

    message = str(exc)
    if isinstance(exc, WorkerModelError):  # the model changed under a run that had checked it
        message += "; the rows written so far are kept"
    _fail(Console(stderr=True), message, "model refused" if isinstance(exc, ContractError) else "error")


def main(argv: list[str] | None = None) -> int:
    """Parse, run the command, and map what it raised to an exit status (ExitCode), here only."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.USAGE
    _setup_debug_log(args)
    try:
        return args.func(args)
    except HeartbatchError as exc:
        _explain(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug must not dump a traceback on a user
        import logging

        logging.getLogger("heartbatch").debug("internal error", exc_info=True)
        print(f"heartbatch: internal error: {type(exc).__name__}: {exc}"
              + ("" if getattr(args, "debug", False) else " (run with --debug for the full trace)"),
              file=sys.stderr)
        return ExitCode.INTERNAL
    finally:
        _close_debug_log()


if __name__ == "__main__":
    sys.exit(main())
