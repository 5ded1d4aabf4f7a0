"""The `heartbatch` command line.  Heavy imports happen inside commands, so
`--help` and `--version` answer instantly."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__

EXIT_OK, EXIT_USAGE, EXIT_MODEL, EXIT_NOTHING = 0, 2, 3, 4


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 < value < 2:
        raise argparse.ArgumentTypeError("must be between 0 and 2 (e.g. 0.5)")
    return value


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="measure every chest X-ray DICOM under PATH(s), write a CSV report and summaries",
        description="Scan PATH(s) recursively (any file name), measure heart and thorax boxes and the "
                    "cardiothoracic ratio (CTR) on every frontal chest radiograph, and write one CSV row "
                    "per file plus <report>.summary.json and <report>.summary.md next to it.",
        epilog="Exit status: 0 every file got a row; 2 usage error; 3 model refused; 4 nothing readable.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="report CSV to write (e.g. report.csv)")
    p.add_argument("--model", type=Path, help="ONNX model (default: the model shipped with heartbatch)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per inference batch (16)")
    p.add_argument("--workers", type=int, help="decoding processes (default: one per CPU core; 0: none)")
    p.add_argument("--threads", type=_positive_int, help="onnxruntime threads (default: one per core)")
    p.add_argument("--ctr-threshold", type=_ratio, default=0.5, help="CTR above this is 'enlarged' (0.50)")
    p.add_argument("--include-patient-id", action="store_true",
                   help="add patient_id and accession_number columns (off by default: no identifiers)")
    p.add_argument("--quiet", action="store_true",
                   help="no progress or tables; print one JSON line with counts and output paths")
    p.set_defaults(func=cmd_run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heartbatch",
        description="Heart and thorax boxes and cardiothoracic ratio on every frontal chest X-ray "
                    "in a DICOM archive.")
    parser.add_argument("--version", action="version", version=f"heartbatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run(sub)
    from .evaluate import add_parser as add_evaluate

    add_evaluate(sub)
    return parser


def _load_model(path: Path | None, threads: int | None, console):
    from .model import BoxModel, ContractError

    try:
        return BoxModel(path, threads=threads)
    except ContractError as exc:
        console.print(f"[red]model refused:[/red] {exc}", highlight=False)
        return None


def _missing_inputs(paths: list[str]) -> list[str]:
    return [p for p in paths if not Path(p).exists() and not Path(p).is_symlink()]


def cmd_run(args) -> int:
    from rich.console import Console

    console = Console(stderr=True, quiet=False)
    missing = _missing_inputs(args.paths)
    if missing:
        console.print(f"[red]error:[/red] no such file or folder: {', '.join(missing)}", highlight=False)
        return EXIT_USAGE
    if args.out.exists() and args.out.is_dir():
        console.print(f"[red]error:[/red] --out {args.out} is a folder; give a file name such as report.csv")
        return EXIT_USAGE
    model = _load_model(args.model, args.threads, console)
    if model is None:
        return EXIT_MODEL

    from .pipeline import RunOptions, run
    from .scan import scan
    from .summary import summary_paths

    options = RunOptions(batch_size=args.batch_size, workers=args.workers, threshold=args.ctr_threshold,
                         include_patient_id=args.include_patient_id, threads=args.threads)
    info = model.info
    if args.quiet:
        result = run(args.paths, args.out, model, options)
    else:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        console.print(f"model {info.path.name} [dim]({info.model_id}, input {info.input_size}px, "
                      f"{'heart + thorax' if info.has_thorax else 'heart only: no CTR'})[/dim]")
        total = sum(1 for _ in scan(args.paths, exclude=[args.out, *summary_paths(args.out)]))
        columns = [TextColumn("[bold]measuring"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("run", total=total, rate="")

            def advance(records):
                progress.advance(task, len(records))
                speed = progress.tasks[0].speed
                progress.update(task, rate=f"{speed:.1f} files/s" if speed else "")

            result = run(args.paths, args.out, model, options, on_records=advance)
    total = sum(result.counts.values())
    if args.quiet:
        print(json.dumps({"report": str(result.report), "summary_json": str(result.summary_json),
                          "summary_md": str(result.summary_md), "model_id": info.model_id,
                          "files": total, **result.counts, "seconds": round(result.seconds, 3)}))
    else:
        print_summary(console, result, info)
    if total == 0 or result.counts["error"] == total:
        if not args.quiet:
            console.print("[red]nothing could be read[/red]: no files found, or every file failed")
        return EXIT_NOTHING
    return EXIT_OK


def print_summary(console, result, info) -> None:
    from rich.table import Table

    s = result.summary
    ctr = s["ctr"]
    table = Table(title="heartbatch run", show_header=False, title_justify="left")
    total = sum(result.counts.values())
    rate = total / result.seconds if result.seconds else 0
    table.add_row("files", f"{total} in {result.seconds:.1f} s ({rate:.1f}/s)")
    table.add_row("status", "  ".join(f"{k} {v}" for k, v in result.counts.items()))
    for reason in s["files"]["by_reason"][:5]:
        table.add_row(f"  {reason['status']}", f"{reason['count']} × {reason['reason']}")
    if ctr["n"]:
        table.add_row("CTR median (IQR)", f"{ctr['median']:.3f} ({ctr['q1']:.3f}–{ctr['q3']:.3f})")
        views = ", ".join(f"{v} {d['enlarged']}/{d['n']}" for v, d in s["by_view"].items())
        table.add_row(f"CTR > {s['threshold']:.2f}", f"{ctr['enlarged']} of {ctr['n']} images ({views}); "
                      f"{s['studies']['ctr']['enlarged']} of {s['studies']['n']} studies")
    elif not info.has_thorax:
        table.add_row("CTR", "not measured: the model is heart-only")
    table.add_row("model", f"{info.path.name} ({info.model_id})")
    table.add_row("report", str(result.report))
    table.add_row("summaries", f"{result.summary_json}\n{result.summary_md}")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
