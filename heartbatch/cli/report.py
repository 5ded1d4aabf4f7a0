"""`heartbatch report`: the HTML QA report of an existing report CSV."""

from __future__ import annotations

from pathlib import Path

from ..argtypes import ratio
from ..errors import ExitCode, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="render the HTML QA report of an existing report CSV",
        description="Render one self-contained HTML file (images embedded, works offline) from a report CSV: "
                    "batch summary, CTR histogram with the threshold, thumbnails with the heart (red) and "
                    "thorax (blue) boxes (and the outlines of a model's masks, kept in the report's ledger) for "
                    "every flagged study and a sample of the others, and a sortable table of studies. The DICOM "
                    "files are read again from the paths in the report.")
    p.add_argument("report", type=Path, metavar="REPORT", help="report CSV written by `heartbatch run`")
    p.add_argument("--html", type=Path, metavar="FILE", help="HTML file to write (default: <report>.html)")
    p.add_argument("--ctr-threshold", type=ratio,
                   help="CTR above this is flagged (default: the run's, from <report>.summary.json, else 0.50)")
    p.add_argument("--state", type=Path, help="the report's state folder, if the run was given --state")
    p.add_argument("--sample", type=int, default=12,
                   help="thumbnails of studies that are not flagged, spread over the CTR range (12)")
    p.set_defaults(func=cmd_report)


def cmd_report(args) -> int:
    from ..report.html import write_html
    from ..report.schema import COLUMNS

    if not args.report.is_file():
        raise UsageError(f"no such report: {args.report}")
    with open(args.report, encoding="utf-8", errors="replace") as fh:
        header = fh.readline().strip().split(",")
    first = COLUMNS[:COLUMNS.index("model_id") + 1]  # reports of earlier versions end there
    if header[:len(first)] != first:
        raise UsageError(f"{args.report} is not a heartbatch report (its columns differ)")
    out = args.html or args.report.with_suffix(".html")
    write_html(args.report, out, args.ctr_threshold, sample=max(0, args.sample), state_dir=args.state)
    print(out)
    return ExitCode.OK

