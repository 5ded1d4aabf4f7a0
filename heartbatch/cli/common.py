"""What the commands share: their common options, the model and worker start-up, the run options
from the command line, the --debug log, and errors printed as one labelled line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..argtypes import positive_int, probability, ratio
from ..errors import HeartbatchError, UsageError


def fail(console, message: str, label: str = "error") -> None:
    """One red-labelled line; the message is escaped, so paths or hints in [brackets] print as they are."""
    from rich.markup import escape

    console.print(f"[red]{label}:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def add_common(p) -> None:
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
    add_content_check(p)
    p.add_argument("--include-patient-id", action="store_true",
                   help="add patient_id and accession_number columns (off by default: no identifiers)")
    p.add_argument("--state", type=Path,
                   help="state folder with the ledger of processed files (default: <report>.state/)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds allowed to read one file before it gets an error row (60)")
    p.add_argument("--debug", action="store_true",
                   help="write every skipped/error file, with full tracebacks, to <report>.debug.log")
    add_dicom_out(p)


def add_dicom_out(p) -> None:
    p.add_argument("--dicom-out", type=Path, metavar="DIR",
                   help="for every ok row, also write DICOM results to DIR: a TID 1500 measurement report (SR) "
                        "and a presentation state drawing the boxes, referencing the image and filed in its "
                        "study (needs heartbatch[dicom])")
    p.add_argument("--dicom-out-capture", action="store_true",
                   help="with --dicom-out: a secondary capture with the boxes burned in instead of the "
                        "presentation state, for viewers without presentation-state support")


def check_dicom_out(args) -> None:
    if args.dicom_out_capture and not args.dicom_out:
        raise UsageError("--dicom-out-capture needs --dicom-out DIR")
    if not args.dicom_out:
        return
    if args.dicom_out.exists() and not args.dicom_out.is_dir():
        raise UsageError(f"--dicom-out {args.dicom_out} is a file; give a folder")
    require("highdicom", "--dicom-out")


def require(module: str, what: str) -> None:
    """An optional dependency of the [dicom] extra, or a usage error that says how to install it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{what} needs {module}: pip install 'heartbatch[dicom]'")


#: Attribute that marks the --debug log handler; its value is the logger level to restore.
_DEBUG_LOG_MARK = "_heartbatch_debug_log_level"


def setup_debug_log(args) -> None:
    """With --debug, log to <report>.debug.log: one handler at a time, however often main() runs in a
    process (the previous call's is removed and closed first)."""
    close_debug_log()
    if not getattr(args, "debug", False):
        return
    import logging

    from ..report.paths import ReportFiles

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


def close_debug_log() -> None:
    """Remove and close the --debug handler(s) of earlier main() calls; put the logger level back."""
    import logging

    logger = logging.getLogger("heartbatch")
    for handler in [h for h in logger.handlers if hasattr(h, _DEBUG_LOG_MARK)]:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(getattr(handler, _DEBUG_LOG_MARK))


def add_send_to(p) -> None:
    p.add_argument("--send-to", metavar="AET@HOST:PORT",
                   help="send the DICOM results (SR and presentation state or capture) by C-STORE to this node, "
                        "e.g. PACS@10.0.0.5:104; queued in the ledger and retried until stored (default "
                        "results folder without --dicom-out: <state>/results)")


def ae_title(text: str) -> str:
    text = text.strip()
    if not 0 < len(text) <= 16 or "\\" in text or not text.isprintable():
        raise argparse.ArgumentTypeError("an AE title is 1 to 16 printable characters, no backslash")
    return text


def add_content_check(p) -> None:
    p.add_argument("--min-chest-score", type=probability,
                   help="films whose content check scores below this are skipped, not measured "
                        "(default: the model's recommended threshold, see MODEL_CARD.md)")
    p.add_argument("--no-content-check", dest="content_check", action="store_false",
                   help="measure every film the header checks accept, whatever its pixels look like "
                        "(the chest score is still written; rows are still flagged for review)")


def load_model(path: Path | None, threads: int | None, console):
    """The model, or ContractError (exit 3); says so when it cannot check content or uncertainty."""
    from ..model import BoxModel

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
    from ..arithmetic import cpu, onnxruntime_version

    first = model.arithmetic.comparisons[0]
    return (f"on this CPU ({cpu().describe()}) onnxruntime {onnxruntime_version()}'s fast int8 kernels do not give "
            f"model {model.info.model_id}'s recorded outputs ({first.describe()}); measuring with the "
            f"{model.arithmetic.mode} arithmetic instead, which does (slower). `heartbatch info` shows the details")


def check_inputs(paths: list, out: Path | None = None) -> None:
    missing = [str(p) for p in paths if not Path(p).exists() and not Path(p).is_symlink()]
    if missing:
        raise UsageError(f"no such file or folder: {', '.join(missing)}")
    if out is not None and out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as report.csv")


def start_workers_early(paths: list, workers: int | None) -> None:
    """Folders (or many files) will go to worker processes: start their forkserver now, so its
    imports overlap with loading the model here."""
    from ..worker_context import INLINE_MAX_FILES, start_early

    few_files = len(paths) <= INLINE_MAX_FILES and all(Path(p).is_file() for p in paths)
    if workers != 0 and not few_files:
        start_early()


def send_destination(args):
    """--send-to parsed, with the extras it needs; None without it."""
    if not getattr(args, "send_to", None):
        return None
    from ..network.send import Destination

    destination = Destination.parse(args.send_to)
    require("pynetdicom", "--send-to")
    require("highdicom", "--send-to")
    return destination


def explain(exc: HeartbatchError) -> None:
    """A stopping error as one labelled line on stderr; its class says which label and exit code."""
    from rich.console import Console

    from ..errors import ContractError, WorkerModelError

    message = str(exc)
    if isinstance(exc, WorkerModelError):  # the model changed under a run that had checked it
        message += "; the rows written so far are kept"
    fail(Console(stderr=True), message, "model refused" if isinstance(exc, ContractError) else "error")



def run_options(args):
    """The options of `run`, `watch` and `listen` from their parsed command line."""
    from ..pipeline import RunOptions
    from ..results import ResultOptions

    return RunOptions(batch_size=args.batch_size, workers=args.workers, threshold=args.ctr_threshold,
                      include_patient_id=args.include_patient_id, threads=args.threads, timeout=args.timeout,
                      content_check=args.content_check, min_chest_score=args.min_chest_score,
                      dicom_out=ResultOptions(args.dicom_out.absolute(), args.dicom_out_capture)
                      if args.dicom_out else None)


def start(args, console, paths: list):
    """The set-up `run`, `watch` and `listen` share: check --dicom-out, start the workers' forkserver
    (its imports overlap with the model check), then load and check the model."""
    check_dicom_out(args)
    if not getattr(args, "scheduler", None):
        start_workers_early(paths, args.workers)
    return load_model(args.model, args.threads, console)
