"""CTR summaries computed from the report CSV, per study and for the whole batch.

Everything is derived from the CSV alone, so the summaries always agree with
the report (also after a resumed or crashed run) and can be regenerated.

CTR statistics count only ``ok`` rows not flagged for review (``review`` is
``true``): a measurement a person should check first must not move the
numbers; the flagged rows are counted beside them, never silently dropped.
Once a person has reviewed a row (`heartbatch review`), the row counts with
the CTR they accepted or corrected (``ctr_reviewed``), flagged or not, and a
row they rejected is left out of every CTR number (counted as rejected).
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import Status
from ..files import write_atomic
from .paths import ReportFiles

VIEW_ORDER = {"PA": 0, "AP": 1}  # PA preferred: AP magnifies the heart
HISTOGRAM_EDGES = [round(0.05 * i, 2) for i in range(21)]


def read_report(report: Path) -> list[dict[str, str]]:
    """The report's rows as dicts of strings ("" where empty).

    The csv module, not pandas: importing pandas costs more than summarizing
    thousands of rows, and every run ends here.
    """
    with open(report, newline="", encoding="utf-8") as fh:
        return [{k: v or "" for k, v in row.items() if k is not None} for row in csv.DictReader(fh)]


def _float(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), 6)


def distribution(values: np.ndarray, threshold: float) -> dict:
    values = values[np.isfinite(values)]
    if values.size == 0:
        return {"n": 0, "enlarged": 0}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    counts, _ = np.histogram(np.clip(values, 0.0, 0.999999), bins=HISTOGRAM_EDGES)
    return {
        "n": int(values.size),
        "mean": _float(values.mean()),
        "median": _float(median),
        "q1": _float(q1),
        "q3": _float(q3),
        "iqr": _float(q3 - q1),
        "min": _float(values.min()),
        "max": _float(values.max()),
        "enlarged": int((values > threshold).sum()),
        "enlarged_fraction": _float((values > threshold).mean()),
        "histogram": {"edges": HISTOGRAM_EDGES, "counts": [int(c) for c in counts],
                      "note": "values outside [0, 1] are counted in the end bins"},
    }


REVIEWED = ("accepted", "corrected")  # review_status values whose ctr_reviewed counts
REJECTED = "rejected"


def reviewed(row: dict[str, str]) -> bool:
    """A person accepted or corrected the row's measurement."""
    return row.get("review_status") in REVIEWED


def rejected(row: dict[str, str]) -> bool:
    """A person rejected the row: no CTR of it counts anywhere."""
    return row.get("review_status") == REJECTED


def ctr_value(row: dict[str, str]) -> float:
    """The row's CTR: the reviewed one where a person gave it, else the measured one (NaN if none)."""
    cell = row.get("ctr_reviewed") if reviewed(row) and row.get("ctr_reviewed") else row["ctr"]
    try:
        return float(cell) if cell else math.nan
    except ValueError:
        return math.nan


def flagged(row: dict[str, str]) -> bool:
    """An ok row a person should still check: flagged and not reviewed yet (a report from before
    the column has none)."""
    return row.get("review") == "true" and not row.get("review_status")


def review_reasons(rows: list[dict[str, str]]) -> dict[str, int]:
    """Count of each review reason, most frequent first.  A cell may join several reasons
    with "; " (each counted) and give per-row numbers in parentheses, which are dropped so
    that like reasons add up instead of listing one line per image."""
    counts: Counter = Counter()
    for row in rows:
        for part in (row.get("review_reason") or "unspecified").split(";"):
            counts[re.sub(r"\s*\([^()]*\d[^()]*\)", "", part).strip() or "unspecified"] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def per_study(ok: list[dict[str, str]], threshold: float) -> tuple[list[dict], list[dict]]:
    """``(studies, review_only)``: one entry per study with a measured CTR.

    The frontal image (PA preferred over AP) is chosen among the images not flagged for
    review; ``review`` counts the study's flagged images.  A study measured only by
    flagged images goes to ``review_only`` instead (its image chosen the same way among
    them, with its reason), so it is listed for a person but not in the CTR statistics.
    """
    groups: dict[str, list[dict[str, str]]] = {}
    for row in ok:
        if math.isfinite(ctr_value(row)):
            groups.setdefault(row["study_instance_uid"] or "path:" + row["path"], []).append(row)
    studies, review_only = [], []
    for key in sorted(groups):
        group = sorted(groups[key], key=lambda r: (VIEW_ORDER.get(r["view_position"], 2), r["path"]))
        unflagged = [r for r in group if not flagged(r)]
        best = (unflagged or group)[0]
        item = {
            "study_instance_uid": best["study_instance_uid"],
            "study_date": best["study_date"],
            "path": best["path"],
            "view_position": best["view_position"],
            "ctr": _float(ctr_value(best)),
            "enlarged": bool(ctr_value(best) > threshold),
            "images": len(group),
            "review": len(group) - len(unflagged),
        }
        if unflagged:
            studies.append(item)
        else:
            review_only.append({**item, "review_reason": best.get("review_reason", "")})
    return studies, review_only


def summarize(report: Path, threshold: float = 0.5) -> dict:
    rows = read_report(report)
    ok = [r for r in rows if r["status"] == Status.OK and not rejected(r)]
    decided = Counter(r.get("review_status") for r in rows if r["status"] == Status.OK and r.get("review_status"))
    rejections = [r for r in rows if r["status"] == Status.OK and rejected(r)]
    measured = [r for r in ok if not flagged(r)]
    review = [r for r in ok if flagged(r)]
    reasons = Counter((r["status"], r["reason"]) for r in rows if r["status"] != Status.OK)
    ctr = np.array([ctr_value(r) for r in measured], dtype=np.float64)
    views = np.array([r["view_position"] or "unknown" for r in measured], dtype=object)
    review_views = Counter(r["view_position"] or "unknown" for r in review)
    studies, review_only = per_study(ok, threshold)
    study_ctr = np.array([s["ctr"] for s in studies], dtype=np.float64)
    statuses = Counter(r["status"] for r in rows)
    return {
        "report": report.name,
        "threshold": threshold,
        "files": {
            "total": len(rows),
            "by_status": {str(s): statuses[s] for s in Status},
            "by_reason": [{"status": status, "reason": reason, "count": count}
                          for (status, reason), count in sorted(reasons.items(),
                                                                key=lambda kv: (-kv[1], *kv[0]))],
        },
        "model_ids": sorted({r["model_id"] for r in rows if r["model_id"]}),
        "ctr": distribution(ctr, threshold),
        "review": {"n": len(review), "reasons": review_reasons(review),
                   "decided": {status: decided[status] for status in (*REVIEWED, REJECTED)},
                   "rejected_reasons": dict(Counter(r.get("review_note") or "unspecified"
                                                    for r in rejections).most_common())},
        "by_view": {view: {**distribution(ctr[views == view], threshold), "review": review_views[view]}
                    for view in sorted(set(views) | set(review_views), key=lambda v: (VIEW_ORDER.get(v, 2), v))},
        "studies": {"n": len(studies), "ctr": distribution(study_ctr, threshold), "items": studies,
                    "review_only": review_only},
    }


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def to_markdown(summary: dict) -> str:
    c, files = summary["ctr"], summary["files"]
    t = summary["threshold"]
    lines = [
        f"# heartbatch summary: {summary['report']}", "",
        f"Files: {files['total']} — ok {files['by_status']['ok']}, skipped {files['by_status']['skipped']}, "
        f"error {files['by_status']['error']}. Model: {', '.join(summary['model_ids']) or '–'}.", "",
        "## Cardiothoracic ratio (measured images not flagged for review)", "",
        "| n | mean | median | IQR (q1–q3) | min | max | CTR > %.2f |" % t,
        "|---|---|---|---|---|---|---|",
        f"| {c['n']} | {_fmt(c.get('mean'))} | {_fmt(c.get('median'))} | {_fmt(c.get('iqr'))} "
        f"({_fmt(c.get('q1'))}–{_fmt(c.get('q3'))}) | {_fmt(c.get('min'))} | {_fmt(c.get('max'))} "
        f"| {c['enlarged']} |", "",
    ]
    review = summary["review"]
    lines += [f"{review['n']} measurements flagged for review (not in the CTR statistics).", ""]
    decided = review.get("decided") or {}
    if any(decided.values()):
        lines += [f"Reviewed by a person: {decided['accepted']} accepted, {decided['corrected']} corrected "
                  f"(their reviewed CTR is the one counted), {decided['rejected']} rejected (left out).", ""]
    if review["reasons"]:
        lines += ["| review reason | images |", "|---|---|"]
        lines += [f"| {reason.replace('|', '/')} | {n} |" for reason, n in review["reasons"].items()] + [""]
    lines += _arithmetic_lines(summary.get("arithmetic"))
    lines += [
        "## By view position", "",
        "AP views magnify the heart: read their CTR against that.", "",
        "| view | n | median | CTR > %.2f | flagged for review |" % t, "|---|---|---|---|---|",
    ]
    for view, d in summary["by_view"].items():
        lines.append(f"| {view} | {d['n']} | {_fmt(d.get('median'))} | {d['enlarged']} | {d['review']} |")
    hist = c.get("histogram")
    if hist:
        lines += ["", "## CTR histogram", "", "| CTR | count |", "|---|---|"]
        for lo, hi, count in zip(hist["edges"], hist["edges"][1:], hist["counts"]):
            if count:
                lines.append(f"| {lo:.2f}–{hi:.2f} | {count} |")
    if files["by_reason"]:
        lines += ["", "## Not measured", "", "| status | reason | files |", "|---|---|---|"]
        lines += [f"| {r['status']} | {r['reason'].replace('|', '/')} | {r['count']} |" for r in files["by_reason"]]
    studies = summary["studies"]
    lines += ["", f"## Studies ({studies['n']}; {studies['ctr']['enlarged']} with CTR > {t:.2f})", "",
              "| study | date | view | CTR | enlarged | images | flagged for review |",
              "|---|---|---|---|---|---|---|"]
    for s in sorted(studies["items"], key=lambda s: (not s["enlarged"], -(s["ctr"] or 0))):
        name = s["study_instance_uid"] or s["path"]
        lines.append(f"| {name} | {s['study_date']} | {s['view_position'] or '–'} | {_fmt(s['ctr'])} "
                     f"| {'yes' if s['enlarged'] else 'no'} | {s['images']} | {s['review']} |")
    if studies["review_only"]:
        lines += ["", f"## Studies measured only by images flagged for review ({len(studies['review_only'])}; "
                  "not in the statistics above)", "",
                  "| study | date | view | CTR (to check) | images | review reason |", "|---|---|---|---|---|---|"]
        for s in studies["review_only"]:
            lines.append(f"| {s['study_instance_uid'] or s['path']} | {s['study_date']} | "
                         f"{s['view_position'] or '–'} | {_fmt(s['ctr'])} | {s['images']} "
                         f"| {s['review_reason'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _arithmetic_lines(arithmetic: dict | None) -> list[str]:
    """One sentence on how the last run computed: the CPU, onnxruntime, and the probe's verdict."""
    if not arithmetic:
        return []
    checks = arithmetic.get("checks") or []
    if not arithmetic.get("probe"):
        verdict = "the model carries no arithmetic probe, so its int8 results on this CPU were not checked"
    elif arithmetic["mode"] == "fused":
        verdict = "the model's probe gave its recorded exact outputs with the fast kernels"
    else:
        first = checks[0] if checks else {}
        verdict = (f"**the fast kernels disagreed with the model's recorded exact outputs** (worst difference "
                   f"{first.get('difference')} in {first.get('output')}), so the run measured with the "
                   f"{arithmetic['mode']} arithmetic instead")
    return [f"Arithmetic (last run): {arithmetic.get('cpu')}, onnxruntime {arithmetic.get('onnxruntime')}; "
            f"{verdict}.", ""]


def saved_settings(report: Path) -> tuple[float | None, dict | None]:
    """``(threshold, arithmetic)`` recorded in ``<report>.summary.json`` by the last run (None where
    absent), so that summaries written again after a review keep the run's threshold."""
    try:
        saved = json.loads(ReportFiles.of(report).summary_json.read_text(encoding="utf-8"))
        return float(saved["threshold"]), saved.get("arithmetic")
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def write_summaries(report: Path, threshold: float = 0.5, arithmetic: dict | None = None) -> tuple[Path, Path, dict]:
    """The summaries; ``arithmetic``: how this run's model computed on this CPU (its probe check)."""
    summary = summarize(report, threshold)
    if arithmetic is not None:
        summary["arithmetic"] = arithmetic
    files = ReportFiles.of(report)
    json_path, md_path = files.summary_json, files.summary_md
    for path, text in ((json_path, json.dumps(summary, indent=2) + "\n"), (md_path, to_markdown(summary))):
        write_atomic(path, text)
    return json_path, md_path, summary
