"""The HTML QA report: one self-contained file (images embedded) to look at a run.

Built from the report CSV alone, through :func:`heartbatch.report.summary.summarize`
(the same numbers as ``report.summary.json``): first the review queue (every
measurement flagged for review and every film the content check refused, with
a thumbnail: what a person has to look at), then the batch summary, the CTR
histogram with the threshold (matplotlib, extra ``[report]``; without it the
page says so and shows the counts as a table), thumbnails with the boxes for
every enlarged study and a sample of the others (each DICOM is read again from
the path in the report; a missing file gets a placeholder), and a sortable
table of studies, those to review and the enlarged first.  A row measured by a model with masks
also has the masks' outlines drawn, from the masks the report's ledger keeps (the only thing read
beside the CSV).  Works offline from a ``file://`` URL: no external scripts, styles, fonts or images.
"""

from __future__ import annotations

import base64
import datetime
import html
import math
from pathlib import Path

import numpy as np

from .. import __version__
from ..confidence import is_content_reason
from ..errors import Status
from ..files import write_atomic
from .ledger import read_masks
from .paths import ReportFiles
from .summary import ctr_value, flagged as review_flagged, read_report, rejected, saved_settings, summarize

SAMPLE = 12        # thumbnails of studies below the threshold
THUMB_SIDE = 320   # longer side of a thumbnail, pixels
QUEUE = 50         # thumbnails in the review queue; the rest are counted

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px;color:#1d2430;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
.muted{color:#667}.top{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
.cards{display:grid;grid-template-columns:repeat(2,minmax(150px,1fr));gap:8px;min-width:340px}
.card{background:#f4f6fa;border-radius:6px;padding:8px 12px}.card b{display:block;font-size:20px}
.flag{color:#c01818}.note{background:#fff6d6;border:1px solid #e8d27a;padding:8px 12px;border-radius:6px}
table{border-collapse:collapse;font-size:13px}th,td{padding:4px 8px;border-bottom:1px solid #e6e8ee;text-align:left}
th{background:#f4f6fa;position:sticky;top:0}table.sortable th{cursor:pointer;user-select:none}
table.sortable th:after{content:" \\2195";color:#99a}tr.enlarged td{background:#fff0f0}
tr.review td{background:#fff8e0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.thumbs{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;width:%(side)dpx;background:#111;border:3px solid #ccd;border-radius:4px}
figure.enlarged{border-color:#d01c1c}figure.review{border-color:#e0a000}
figure img{display:block;max-width:100%%;margin:auto}
figcaption{background:#fff;font-size:12px;padding:4px 6px;word-break:break-all}
.missing{height:%(side)dpx;display:flex;align-items:center;justify-content:center;color:#eee;padding:12px;
text-align:center;font-size:13px}
.legend span{display:inline-block;width:12px;height:12px;vertical-align:middle;margin:0 4px 0 12px}
""" % {"side": THUMB_SIDE}

SCRIPT = """
(function () {
  function key(cell) {
    var v = cell.getAttribute('data-v'); if (v === null) v = cell.textContent.trim();
    var n = parseFloat(v); return (v !== '' && isFinite(v)) ? n : v.toLowerCase();
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('th').forEach(function (th, col) {
      th.addEventListener('click', function () {
        var asc = th.getAttribute('data-order') !== 'asc';
        table.querySelectorAll('th').forEach(function (o) { o.removeAttribute('data-order'); });
        th.setAttribute('data-order', asc ? 'asc' : 'desc');
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = key(a.cells[col]), y = key(b.cells[col]);
          if (typeof x !== typeof y) { x = String(x); y = String(y); }
          return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
  window.addEventListener('load', function () {  // how many embedded images the browser decoded
    var imgs = document.querySelectorAll('img'), ok = 0;
    imgs.forEach(function (i) { if (i.complete && i.naturalWidth > 0) ok++; });
    document.body.setAttribute('data-images-decoded', ok + '/' + imgs.length);
  });
})();
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def saved_threshold(report: Path) -> float | None:
    """The threshold the run used, from ``<report>.summary.json`` when it is there."""
    return saved_settings(report)[0]


def histogram_bins(values: np.ndarray, threshold: float, max_bins: int = 60) -> np.ndarray:
    """Bin edges 0.01 wide (wider for a broad range) aligned on the threshold, so no bar
    straddles it; bins are closed on the right, so a CTR equal to the threshold (not
    enlarged) falls left of the line."""
    lo, hi = float(values.min()), float(values.max())
    width = max(0.01, (hi - lo) / max_bins)
    first = math.floor((lo - threshold) / width) - 1
    last = math.ceil((hi - threshold) / width) + 1
    return threshold + width * np.arange(first, last + 1) + 1e-9


def histogram_png(ctr: np.ndarray, threshold: float) -> bytes | None:
    """Histogram of the measured CTRs with the threshold marked; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    import io

    ctr = ctr[np.isfinite(ctr)]
    fig = Figure(figsize=(6.4, 3.2), dpi=100, layout="tight")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if ctr.size:
        edges = histogram_bins(ctr, threshold)
        counts, _ = np.histogram(ctr, bins=edges)
        colors = ["#d6452f" if left >= threshold else "#4a78b5" for left in edges[:-1]]
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colors, edgecolor="white",
               linewidth=0.5)
        ax.set_xlim(edges[0], edges[-1])
        ax.set_ylim(0, counts.max() * 1.3 + 0.5)  # headroom for the legend
    else:
        ax.text(0.5, 0.5, "no CTR measured", ha="center", va="center", transform=ax.transAxes)
    ax.axvline(threshold, color="#c01818", linestyle="--", linewidth=2,
               label=f"threshold {threshold:.2f} ({int((ctr > threshold).sum())} above)")
    ax.set_xlabel("cardiothoracic ratio (CTR), measured images not flagged for review")
    ax.set_ylabel("images")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper right", frameon=True, framealpha=0.9, edgecolor="none")
    ax.spines[["top", "right"]].set_visible(False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _locate(path: str, report: Path) -> Path | None:
    """The file a report row names: as written (relative to the working folder), else
    relative to the report's folder."""
    for candidate in (Path(path), report.parent / path):
        if candidate.is_file():
            return candidate
    return None


def _thumbnail(row: dict, report: Path, threshold: float, masks: bytes | None = None) -> tuple[str | None, str]:
    """(data URI, '') or (None, why there is no picture); ``masks``: the row's packed masks, whose
    outlines are drawn with the boxes."""
    from dataclasses import replace

    from ..dicom import ReadError, Skipped
    from ..masks import decode_masks
    from ..overlay import Marks, encode, render

    path = _locate(row["path"], report)
    if path is None:
        return None, "file not found (moved or deleted since the run)"
    try:
        marks = Marks.from_row(row, threshold)
        if masks is not None:
            marks = replace(marks, masks=decode_masks(masks))
        image = render(path, marks, THUMB_SIDE)
    except (Skipped, ReadError) as exc:
        return None, f"cannot read it now: {exc.reason}"
    except Exception as exc:  # noqa: BLE001 - one unreadable file must not sink the report
        return None, f"cannot draw it: {type(exc).__name__}: {exc}"
    return _data_uri(encode(image, "JPEG"), "image/jpeg"), ""


def _sample(items: list[dict], n: int) -> list[dict]:
    """``n`` items spread evenly over the CTR range (deterministic)."""
    if len(items) <= n:
        return list(items)
    ordered = sorted(items, key=lambda s: (s["ctr"] is None, s["ctr"] or 0, s["path"]))
    step = (len(ordered) - 1) / (n - 1) if n > 1 else 0
    return [ordered[round(i * step)] for i in range(n)]


def _figure(item: dict, row: dict, uri: str | None, why: str, anchor: str) -> str:
    enlarged = item.get("enlarged")
    caption = (f"<b class='{'flag' if enlarged else ''}'>CTR {_fmt(item.get('ctr'))}"
               f"{' enlarged' if enlarged else ''}</b>{_reviewed_note(row)} · {_e(row.get('view_position') or '–')}"
               f" · {_e(row.get('study_date') or '')}<br><span class='muted'>{_e(row['path'])}</span>")
    picture = (f"<img src='{uri}' alt='{_e(row['path'])}'>" if uri else
               f"<div class='missing'>no picture: {_e(why)}</div>")
    return (f"<figure id='{anchor}' class='{'enlarged' if enlarged else ''}'>{picture}"
            f"<figcaption>{caption}</figcaption></figure>")


def _reviewed_note(row: dict) -> str:
    """Whose CTR the caption shows: a person's, once reviewed (the boxes drawn stay the model's)."""
    status = row.get("review_status")
    if status == "corrected":
        return (f" <span class='muted'>(corrected by {_e(row.get('reviewer') or 'a reviewer')}; "
                "boxes drawn: the model's)</span>")
    if status == "accepted":
        return f" <span class='muted'>(accepted by {_e(row.get('reviewer') or 'a reviewer')})</span>"
    return ""


def refused_by_content(row: dict) -> bool:
    """A file the content check skipped: its header passed, so its picture shows why."""
    return row["status"] == Status.SKIPPED and bool(row.get("chest_score") or is_content_reason(row["reason"]))


def _review_queue(queue: list[dict], report: Path, threshold: float, anchors: dict, limit: int,
                  masks: dict[str, bytes]) -> str:
    """Every flagged measurement, then every content-check refusal: the first thing to look at."""
    n_review = sum(r["status"] == Status.OK for r in queue)
    head = (f"<h2 id='review'>Review queue: {n_review} measurements flagged for review, "
            f"{len(queue) - n_review} films refused by the content check</h2>")
    if not queue:
        return head + "<p class='muted'>Nothing to review.</p>"
    figures = []
    for row in queue[:limit]:
        uri, why = _thumbnail(row, report, threshold, masks.get(row["path"]))
        figures.append(_review_figure(row, uri, why, anchors[row["path"]]))
    rest = len(queue) - limit
    more = (f"<p>… and {rest} more: the rows with <code>review</code> = true, and the skipped rows, "
            f"in the report CSV.</p>" if rest > 0 else "")
    return (head + "<p class='muted'>Flagged measurements are not in the CTR statistics below; refused films "
            f"were not measured.</p><div class='thumbs'>{''.join(figures)}</div>{more}")


def _number(cell: str | None) -> float | None:
    try:
        return float(cell) if cell else None
    except ValueError:
        return None


def _review_figure(row: dict, uri: str | None, why: str, anchor: str) -> str:
    ctr, sd = _number(row.get("ctr")), _number(row.get("uncertainty"))
    if row["status"] == Status.OK:
        head = f"CTR {_fmt(ctr)}" + (f" ± {sd:.3f}" if sd is not None else "")
        reason = row.get("review_reason") or "flagged for review"
    else:
        head, reason = "not measured", row["reason"]
    caption = (f"<b class='flag'>{head}</b> · chest score {_fmt(_number(row.get('chest_score')))}"
               f" · {_e(row.get('view_position') or '–')}<br>{_e(reason)}"
               f"<br><span class='muted'>{_e(row['path'])}</span>")
    picture = (f"<img src='{uri}' alt='{_e(row['path'])}'>" if uri else
               f"<div class='missing'>no picture: {_e(why)}</div>")
    return f"<figure class='review' id='{anchor}'>{picture}<figcaption>{caption}</figcaption></figure>"


def build(report: Path, threshold: float | None = None, sample: int = SAMPLE, queue_limit: int = QUEUE,
          state_dir: Path | None = None) -> str:
    """The HTML text for ``report`` (a heartbatch report CSV); ``state_dir``: where its ledger is,
    when the run was given ``--state``."""
    report = Path(report)
    threshold = threshold if threshold is not None else (saved_threshold(report) or 0.5)
    summary = summarize(report, threshold)
    table = read_report(report)
    rows = {r["path"]: r for r in table}
    queue = ([r for r in table if r["status"] == Status.OK and review_flagged(r)]
             + [r for r in table if refused_by_content(r)])
    queue_anchors = {r["path"]: f"rq{i}" for i, r in enumerate(queue[:queue_limit])}
    studies = summary["studies"]["items"]
    if not studies and not summary["studies"]["review_only"]:  # heart-only model (no CTR): still show some
        studies = [{"path": p, "ctr": None, "enlarged": None, "study_instance_uid": r["study_instance_uid"],
                    "study_date": r["study_date"], "view_position": r["view_position"], "images": 1, "review": 0}
                   for p, r in rows.items() if r["status"] == Status.OK and not review_flagged(r) and not rejected(r)]
    ordered = sorted(studies, key=lambda s: (not s["enlarged"], -(s["ctr"] or 0), s["path"]))
    flagged = [s for s in ordered if s["enlarged"]]
    shown = flagged + _sample([s for s in ordered if not s["enlarged"]], sample)
    anchors = {s["path"]: f"img{i}" for i, s in enumerate(shown)}
    masks, masks_note = _kept_masks(report, state_dir, [*queue_anchors, *anchors])

    figures = []
    for item in shown:
        row = rows[item["path"]]
        uri, why = _thumbnail(row, report, threshold, masks.get(item["path"]))
        figures.append(_figure(item, row, uri, why, anchors[item["path"]]))

    hist = histogram_png(np.array([ctr_value(r) for r in rows.values()
                                   if r["status"] == Status.OK and not review_flagged(r) and not rejected(r)],
                                  dtype=np.float64), threshold)
    parts = [_header(summary, report), _review_queue(queue, report, threshold, queue_anchors, queue_limit, masks),
             "<div class='top'>", _cards(summary)]
    if hist is not None:
        parts.append(f"<div><img src='{_data_uri(hist, 'image/png')}' alt='CTR histogram' width='640'></div>")
    else:
        parts.append(_histogram_table(summary))
    parts.append("</div>")
    parts.append(_views(summary))
    others = len(studies) - len(flagged)
    if summary["ctr"]["n"]:
        parts.append(f"<h2>Images: {len(flagged)} enlarged (CTR &gt; {threshold:.2f}), "
                     f"{len(shown) - len(flagged)} of {others} others</h2>")
    else:
        parts.append(f"<h2>Images: {len(shown)} of {others} measured (no CTR: heart-only model or none "
                     f"measured)</h2>")
    parts.append(_legend(bool(masks)) + masks_note)
    parts.append(f"<div class='thumbs'>{''.join(figures) or '<p>No measured images.</p>'}</div>")
    parts.append(_studies_table(summary["studies"]["review_only"] + ordered, rows, {**queue_anchors, **anchors}))
    parts.append(_not_measured(summary))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>heartbatch report: {_e(report.name)}</title><style>{STYLE}</style></head>"
            f"<body>\n{body}\n<script>{SCRIPT}</script></body></html>\n")


def _kept_masks(report: Path, state_dir: Path | None, paths: list[str]) -> tuple[dict[str, bytes], str]:
    """The packed masks the ledger keeps for the rows with a thumbnail, and a note for the page when
    the ledger cannot be read (the thumbnails are drawn without outlines: they are an addition)."""
    import sqlite3

    state = ReportFiles.of(report, state_dir).state_dir
    try:
        return read_masks(state, paths), ""
    except sqlite3.Error as exc:
        return {}, (f"<p class='note'>Mask outlines not drawn: the report's ledger "
                    f"{_e(state / 'ledger.sqlite')} cannot be read ({_e(exc)}).</p>")


def _legend(outlines: bool) -> str:
    """What the colours of the thumbnails mean; the outlines' only when a thumbnail has them."""
    from ..masks import CHANNELS
    from ..overlay import HEART, OUTLINES, THORAX

    def swatch(colour) -> str:
        return "<span style='background:#%02x%02x%02x'></span>" % tuple(colour)

    text = f"Boxes:{swatch(HEART)}heart{swatch(THORAX)}thorax"
    if outlines:
        text += "; outlines of the model's masks:" + "".join(swatch(c) + name for c, name in zip(OUTLINES, CHANNELS))
    return (f"<p class='muted legend'>{text}; lines: heart and thoracic widths; "
            "CTR = heart width / thoracic width. Enlarged studies have a red frame.</p>")


def _header(summary: dict, report: Path) -> str:
    models = ", ".join(summary["model_ids"]) or "–"
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"<h1>heartbatch report: {_e(report.name)}</h1>"
            f"<p class='muted'>{_e(report.resolve())} · model {_e(models)} · "
            f"rendered {_e(when)} by heartbatch {_e(__version__)}</p>")


def _cards(summary: dict) -> str:
    files, c, studies = summary["files"], summary["ctr"], summary["studies"]
    t = summary["threshold"]
    status = files["by_status"]
    share = f" ({100 * c['enlarged_fraction']:.0f}%)" if c["n"] else ""
    cards = [
        ("files", f"{files['total']}", f"ok {status['ok']} · skipped {status['skipped']} · error {status['error']}"),
        ("studies measured", f"{studies['n']}", f"{studies['ctr']['enlarged']} with CTR &gt; {t:.2f}"
         + (f"; {len(studies['review_only'])} more only by images flagged for review"
            if studies["review_only"] else "")),
        ("CTR median (IQR)", _fmt(c.get("median")), f"{_fmt(c.get('q1'))}–{_fmt(c.get('q3'))}; "
                                                    f"mean {_fmt(c.get('mean'))}"),
        (f"images CTR &gt; {t:.2f}", f"{c['enlarged']}", f"of {c['n']} measured" + share
         + (f"; {summary['review']['n']} flagged for review, not counted" if summary["review"]["n"] else "")
         + _decided(summary["review"].get("decided") or {})),
    ]
    return "<div class='cards'>" + "".join(
        f"<div class='card'><span class='muted'>{label}</span><b>{value}</b><span class='muted'>{sub}</span></div>"
        for label, value, sub in cards) + "</div>"


def _decided(decided: dict) -> str:
    """What people decided in `heartbatch review`, for the cards."""
    if not any(decided.values()):
        return ""
    return (f"; reviewed: {decided['accepted']} accepted, {decided['corrected']} corrected (their CTR counted), "
            f"{decided['rejected']} rejected (left out)")


def _histogram_table(summary: dict) -> str:
    hist = summary["ctr"].get("histogram")
    rows = "".join(f"<tr><td>{lo:.2f}–{hi:.2f}</td><td class='num'>{n}</td></tr>"
                   for lo, hi, n in zip(hist["edges"], hist["edges"][1:], hist["counts"]) if n) if hist else ""
    return ("<div><p class='note'>CTR histogram not drawn: matplotlib is not installed "
            "(<code>pip install 'heartbatch[report]'</code>).</p>"
            + (f"<table><tr><th>CTR</th><th>images</th></tr>{rows}</table>" if rows else "") + "</div>")


def _views(summary: dict) -> str:
    rows = "".join(f"<tr><td>{_e(view)}</td><td class='num'>{d['n']}</td><td class='num'>{_fmt(d.get('median'))}</td>"
                   f"<td class='num'>{d['enlarged']}</td><td class='num'>{d.get('review', 0)}</td></tr>"
                   for view, d in summary["by_view"].items())
    if not rows:
        return ""
    return ("<h2>By view position</h2><p class='muted'>AP views magnify the heart: read their CTR against that.</p>"
            f"<table><tr><th>view</th><th>images</th><th>median CTR</th>"
            f"<th>CTR &gt; {summary['threshold']:.2f}</th><th>flagged for review</th></tr>{rows}</table>")


def _studies_table(ordered: list[dict], rows: dict, anchors: dict) -> str:
    """Studies measured only by flagged images come first (row class 'review'); the review
    column counts each study's flagged images."""
    body = []
    for s in ordered:
        row = rows[s["path"]]
        ctr = s.get("ctr")
        link = f"<a href='#{anchors[s['path']]}'>image</a>" if s["path"] in anchors else ""
        only = "review_reason" in s  # an entry of review_only: no unflagged measurement
        n = s.get("review", 0)
        review = (f"<b class=flag>to check</b>: {_e(s['review_reason'] or 'flagged')}" if only
                  else f"{n} flagged" if n else "–")
        score = _number(row.get("chest_score"))
        body.append(
            f"<tr class='{'review' if only else 'enlarged' if s['enlarged'] else ''}'>"
            f"<td data-v='{2 if only else 1 if n else 0}'>{review}</td>"
            f"<td class='num' data-v='{'' if score is None else score}'>{_fmt(score)}</td>"
            f"<td data-v='{0 if s['enlarged'] else 1}'>{'<b class=flag>yes</b>' if s['enlarged'] else 'no'}</td>"
            f"<td class='num' data-v='{'' if ctr is None else ctr}'>{_fmt(ctr)}</td>"
            f"<td>{_e(s.get('view_position') or '–')}</td><td>{_e(s.get('study_date') or '')}</td>"
            f"<td class='num'>{_e(row.get('heart_width_mm') or '–')}</td>"
            f"<td class='num'>{_e(row.get('thoracic_width_mm') or '–')}</td>"
            f"<td class='num'>{s.get('images', 1)}</td>"
            f"<td>{_e(s.get('study_instance_uid') or '')}</td><td>{_e(s['path'])}</td><td>{link}</td></tr>")
    return (f"<h2>Studies ({len(ordered)}) — click a column to sort</h2>"
            "<table class='sortable' id='studies'><thead><tr><th>review</th><th>chest score</th>"
            "<th>enlarged</th><th>CTR</th><th>view</th>"
            "<th>date</th><th>heart mm</th><th>thorax mm</th><th>images</th><th>study UID</th><th>file</th>"
            f"<th></th></tr></thead><tbody>{''.join(body)}</tbody></table>")


def _not_measured(summary: dict) -> str:
    reasons = summary["files"]["by_reason"]
    if not reasons:
        return ""
    rows = "".join(f"<tr><td>{_e(r['status'])}</td><td>{_e(r['reason'])}</td><td class='num'>{r['count']}</td></tr>"
                   for r in reasons)
    return ("<h2>Not measured</h2><table class='sortable'><thead><tr><th>status</th><th>reason</th>"
            f"<th>files</th></tr></thead><tbody>{rows}</tbody></table>")


def write_html(report: Path, out: Path, threshold: float | None = None, sample: int = SAMPLE,
               queue_limit: int = QUEUE, state_dir: Path | None = None) -> Path:
    """Render ``report`` to ``out`` (written atomically) and return ``out``."""
    text = build(report, threshold, sample, queue_limit, state_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, text)
