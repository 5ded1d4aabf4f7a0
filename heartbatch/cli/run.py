"""`heartbatch run`: measure every chest film under the given paths into a report."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ExitCode, Status
from .common import add_common, check_inputs, fail, run_options, start


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run", help="measure every chest X-ray DICOM under PATH(s), write a CSV report and summaries",
        description="Scan PATH(s) recursively (any file name), measure heart and thorax boxes and the "
                    "cardiothoracic ratio (CTR) on every frontal chest radiograph, and write one CSV row "
                    "per file plus <report>.summary.json and <report>.summary.md next to it.",
        epilog="Exit status: 0 every file got a row; 2 usage error; 3 model refused; 4 nothing readable.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    add_common(p)
    p.add_argument("--quiet", action="store_true",
                   help="no progress or tables; print one JSON line with counts and output paths")
    p.add_argument("--force", action="store_true",
                   help="forget what was processed and measure every file again")
    p.add_argument("--html", type=Path, metavar="FILE",
                   help="also write the HTML QA report (summary, CTR histogram, thumbnails with boxes and, for a "
                        "model with masks, their outlines) to FILE")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run on a Dask cluster: a scheduler address (tcp://host:8786), a scheduler file (JSON), "
                        "or local:N (N worker processes started here); workers read files and model by path; "
                        "needs heartbatch[dask]")
    p.set_defaults(func=cmd_run)


def cmd_run(args) -> int:
    from rich.console import Console

    from ..pipeline import run

    console = Console(stderr=True)
    check_inputs(args.paths, args.out)
    if args.scheduler:
        from functools import partial

        from ..distributed import check_scheduler, run as run_on_dask

        check_scheduler(args.scheduler)
        run = partial(run_on_dask, scheduler=args.scheduler)
    model = start(args, console, args.paths)
    result = run_with_progress(args, model, run_options(args), console, run)
    html = None
    if args.html is not None:
        from ..report.html import write_html

        html = write_html(args.out, args.html, args.ctr_threshold, state_dir=args.state)
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


def run_with_progress(args, model, options, console, run):
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
        fail(console, f"{path}: DICOM results not written ({why}); the next run tries again", "warning")
    if len(result.dicom_failed) > 10:
        fail(console, f"DICOM results not written for {len(result.dicom_failed) - 10} more files", "warning")

