"""The HTML QA report of a real run, rendered by headless Chromium.

A real run (real DICOMs: the SIIM chest CR and chest X-rays of the shared data
set written as DICOM, one of them non-square, plus files that are skipped)
with ``--html``; the page is then opened from a file:// URL in headless
Chromium, which must decode every embedded image, and its screenshot must not
be blank.  Chromium is required: without it these tests fail, they do not skip.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.uid import JPEGBaseline8Bit

from dicom_factory import make_nonsquare, shared_png, write_dicom
from heartbatch import cli
from heartbatch.report.summary import read_report

THUMB = re.compile(r"<img src='data:image/jpeg;base64,([^']+)' alt='([^']*)'>")
IMG = re.compile(r"<img\b[^>]*\bsrc=['\"]([^'\"]*)['\"]")


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium not found: install the Debian package `chromium` "
                "(apt-get install -y chromium; .ci/run does this before the tests)")


def browse(page: Path, tmp: Path, *action: str) -> subprocess.CompletedProcess:
    """Open ``page`` from a file:// URL in headless Chromium with ``action`` (--screenshot, --dump-dom)."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp / 'chromium-profile'}", "--window-size=1280,2000",
           "--virtual-time-budget=5000", *action, page.resolve().as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result


@pytest.fixture(scope="module")
def ran(tmp_path_factory, data_dir, siim_dicom, intensity_model):
    """`heartbatch run ... --html` over real chest DICOMs (and two files that are skipped)."""
    root = tmp_path_factory.mktemp("html")
    studies = root / "studies"
    studies.mkdir()
    shutil.copyfile(siim_dicom, studies / "siim.dcm")
    write_dicom(studies / "pa_jpeg.dcm", shared_png(data_dir, 5), transfer_syntax=JPEGBaseline8Bit)
    write_dicom(studies / "ap.dcm", shared_png(data_dir, 12), view_position="AP")  # a Wingspan image
    write_dicom(studies / "nonsquare.dcm", make_nonsquare(shared_png(data_dir, 6), 600, 460))
    write_dicom(studies / "lateral.dcm", shared_png(data_dir, 7), view_position="LL")
    (studies / "notes.txt").write_text("not a DICOM file\n")
    report, page = root / "out" / "report.csv", root / "out" / "report.html"
    code = cli.main(["run", str(studies), "--out", str(report), "--model", str(intensity_model),
                     "--workers", "0", "--threads", "1", "--quiet", "--html", str(page)])
    assert code == 0
    return root, report, page


def _thumbnails(text: str) -> dict[str, Image.Image]:
    return {html.unescape(alt): Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")
            for data, alt in THUMB.findall(text)}


def test_run_html_is_one_self_contained_file(ran):
    root, report, page = ran
    text = page.read_text(encoding="utf-8")
    sources = IMG.findall(text)
    assert sources and all(s.startswith("data:image/") for s in sources)
    assert not re.search(r"""(src|href)=['"](https?:|//)""", text), "the page must work offline"
    assert "<link" not in text and "@import" not in text
    ok = [r["path"] for r in read_report(report) if r["status"] == "ok"]
    assert set(_thumbnails(text)) == set(ok), "every measured study (4 < sample) has a thumbnail"
    assert "data:image/png;base64," in text, "the matplotlib histogram is embedded"
    for path in ok:
        assert html.escape(path, quote=True) in text
    assert "lateral view" in text and "not a DICOM file" in text  # the not-measured table


@pytest.mark.slow  # starts Chromium
def test_html_renders_in_headless_chromium(ran, tmp_path):
    root, report, page = ran
    text = page.read_text(encoding="utf-8")
    dom = browse(page, tmp_path, "--dump-dom").stdout
    images = IMG.findall(dom)
    assert len(images) == len(IMG.findall(text)) >= 5
    assert all(src.startswith("data:image/") for src in images)
    decoded = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom)
    assert decoded, "the page's load handler did not run"
    assert decoded.group(1) == decoded.group(2) == str(len(images)), "Chromium could not decode every image"

    shot = tmp_path / "report.png"
    browse(page, tmp_path, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int32)
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels.std() > 30, "the screenshot is blank"
    grey = np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2]) < 12
    dark = pixels.mean(axis=2) < 200
    assert (grey & dark).sum() > 50_000, "no radiograph thumbnails visible in the screenshot"
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    blue = (pixels[..., 2] > 180) & (pixels[..., 0] < 90)
    assert red.sum() > 1000 and blue.sum() > 1000, "heart (red) and thorax (blue) boxes not visible"


def _edge_fraction(img: np.ndarray, box, sx: float, sy: float, colour) -> float:
    """Share of the pixels on the 4 edges of ``box`` (original pixels) that look like ``colour``."""
    x0, y0, x1, y1 = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx) - 1, round(box[3] * sy) - 1)
    edges = np.concatenate([img[y0 + 3:y1 - 2, x0], img[y0 + 3:y1 - 2, x1],
                            img[y0, x0 + 3:x1 - 2], img[y1, x0 + 3:x1 - 2]])
    if colour == "red":
        hit = (edges[:, 0] > 180) & (edges[:, 1] < 90) & (edges[:, 2] < 90)
    else:
        hit = (edges[:, 2] > 180) & (edges[:, 0] < 90)
    return float(hit.mean())


def test_thumbnails_draw_the_boxes_where_the_report_says(ran):
    root, report, page = ran
    thumbs = _thumbnails(page.read_text(encoding="utf-8"))
    rows = {r["path"]: r for r in read_report(report)}
    for name in ("siim.dcm", "nonsquare.dcm"):
        path = next(p for p in thumbs if p.endswith(name))
        row, img = rows[path], np.asarray(thumbs[path], dtype=np.int32)
        sx, sy = img.shape[1] / int(row["columns"]), img.shape[0] / int(row["rows"])
        assert abs(sx - sy) < 0.01, "aspect ratio kept"
        heart = [float(row[f"heart_{k}"]) for k in ("x0", "y0", "x1", "y1")]
        thorax = [float(row[f"thorax_{k}"]) for k in ("x0", "y0", "x1", "y1")]
        assert _edge_fraction(img, heart, sx, sy, "red") > 0.9, name
        assert _edge_fraction(img, thorax, sx, sy, "blue") > 0.9, name
        shifted = [heart[0] + 12 / sx, heart[1] + 12 / sy, heart[2] + 12 / sx, heart[3] + 12 / sy]
        assert _edge_fraction(img, shifted, sx, sy, "red") < 0.5, "red only where the box is"


def test_report_command_renders_again_with_flagged_first(ran, tmp_path, capsys):
    root, report, page = ran
    ctr = sorted(float(r["ctr"]) for r in read_report(report) if r["ctr"])
    threshold = (ctr[1] + ctr[2]) / 2  # two studies below, two above
    out = tmp_path / "again.html"
    assert cli.main(["report", str(report), "--html", str(out), "--ctr-threshold", f"{threshold:.6f}"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    text = out.read_text(encoding="utf-8")
    figures = re.findall(r"<figure id='[^']*' class='([^']*)'", text)
    assert figures == ["enlarged", "enlarged", "", ""], "flagged studies first"
    table = text[text.index("id='studies'"):]
    flags = re.findall(r"<tr class='(enlarged|)'>", table)
    assert flags == ["enlarged", "enlarged", "", ""]
    assert f"CTR &gt; {threshold:.2f}" in text


def test_default_output_and_threshold_come_from_the_run(ran, tmp_path):
    root, report, page = ran
    copy = tmp_path / "copy.csv"
    shutil.copyfile(report, copy)
    assert cli.main(["report", str(copy)]) == 0
    text = (tmp_path / "copy.html").read_text(encoding="utf-8")
    assert "CTR &gt; 0.50" in text


def test_a_report_of_an_earlier_version_renders(ran, tmp_path):
    """A report written before the trust columns (it ends at model_id) still renders."""
    import csv

    root, report, page = ran
    with open(report, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    end = rows[0].index("model_id") + 1
    old = tmp_path / "old.csv"
    with open(old, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows(row[:end] for row in rows)
    assert cli.main(["report", str(old), "--html", str(tmp_path / "old.html")]) == 0
    text = (tmp_path / "old.html").read_text(encoding="utf-8")
    assert len(_thumbnails(text)) == len(_thumbnails(page.read_text(encoding="utf-8")))


def test_missing_dicom_gets_a_placeholder(ran, tmp_path):
    root, report, page = ran
    ok = [r["path"] for r in read_report(report) if r["status"] == "ok"]
    gone = root / ok[0]
    moved = gone.with_name(gone.name + ".moved")
    gone.rename(moved)
    try:
        out = tmp_path / "placeholder.html"
        assert cli.main(["report", str(report), "--html", str(out)]) == 0
        text = out.read_text(encoding="utf-8")
    finally:
        moved.rename(gone)
    assert "no picture: file not found" in text
    assert len(_thumbnails(text)) == len(ok) - 1


def test_without_matplotlib_the_page_says_so(ran, tmp_path, monkeypatch):
    root, report, page = ran
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    out = tmp_path / "nompl.html"
    assert cli.main(["report", str(report), "--html", str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert "matplotlib is not installed" in text and "heartbatch[report]" in text
    assert "data:image/png;base64," not in text and len(_thumbnails(text)) == 4


def test_thumbnails_draw_the_outlines_of_a_models_masks(tmp_path, siim_dicom, data_dir):
    """A model with masks: the thumbnails draw the masks' outlines (kept in the ledger, here in a
    --state folder) in their colours where the masks' boundaries fall, and the legend names them.
    Rendered without the ledger (`report` not told the --state), the same thumbnails have none."""
    import onnx_models as om
    from heartbatch.masks import outline, solid_on_grid
    from heartbatch.overlay import OUTLINES

    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copyfile(siim_dicom, studies / "siim.dcm")
    write_dicom(studies / "nonsquare.dcm", make_nonsquare(shared_png(data_dir, 6), 600, 460))
    masks = om.ellipse_masks(56)
    report, page, state = tmp_path / "report.csv", tmp_path / "report.html", tmp_path / "state"
    model = om.masks_model(tmp_path / "m.onnx", masks)
    assert cli.main(["run", str(studies), "--out", str(report), "--model", str(model), "--workers", "0",
                     "--threads", "1", "--quiet", "--html", str(page), "--state", str(state)]) == 0
    plain, again = tmp_path / "plain.html", tmp_path / "again.html"
    assert cli.main(["report", str(report), "--html", str(plain)]) == 0
    assert cli.main(["report", str(report), "--html", str(again), "--state", str(state)]) == 0
    text, plain_text = page.read_text(encoding="utf-8"), plain.read_text(encoding="utf-8")
    legend = re.search(r"<p class='muted legend'>(.*?)</p>", text).group(1)
    assert re.sub("<[^>]+>", " ", legend).split(";")[1].split() == [
        "outlines", "of", "the", "model's", "masks:", "heart", "right", "lung", "left", "lung"]
    assert all("background:#%02x%02x%02x" % c in legend for c in OUTLINES), "each colour is in the legend"
    assert "outlines of the model" not in plain_text
    drawn, bare, redrawn = _thumbnails(text), _thumbnails(plain_text), _thumbnails(again.read_text(encoding="utf-8"))
    assert sorted(drawn) == sorted(bare) == sorted(redrawn) and len(drawn) == 2
    for path in drawn:
        img, base = (np.asarray(t[path], dtype=np.int32) for t in (drawn, bare))
        assert np.array_equal(img, np.asarray(redrawn[path], dtype=np.int32)), "`report --state` draws the same"
        h, w = img.shape[:2]
        edges = [outline(solid) for solid in solid_on_grid(masks, h, w)]
        boxes = (base.max(axis=2) - base.min(axis=2)) > 60   # the boxes and lines, drawn over the outlines
        for i, (edge, colour) in enumerate(zip(edges, OUTLINES)):
            alone = edge & ~boxes & ~np.logical_or.reduce([e for j, e in enumerate(edges) if j != i])
            near = np.abs(img[alone] - colour).max(axis=1) < 70
            assert alone.sum() > 100 and near.mean() > 0.95, f"{path}: {near.mean():.2f} of the {colour} outline"
            assert (np.abs(base[edge] - colour).max(axis=1) < 70).mean() < 0.05, "no outline without the masks"
        anywhere = np.logical_or.reduce(edges)
        padded = np.pad(anywhere, 3)
        near_any = np.logical_or.reduce([padded[3 + dy:3 + dy + h, 3 + dx:3 + dx + w]
                                         for dy in range(-3, 4) for dx in range(-3, 4)])
        away = ~near_any   # JPEG blurs an outline over a few pixels
        assert np.abs(img - base).max(axis=2)[anywhere].mean() > 60, "the thumbnails differ on the outlines"
        assert np.abs(img - base).max(axis=2)[away].mean() < 8, "and hardly elsewhere"


def test_report_usage_errors(tmp_path):
    assert cli.main(["report", str(tmp_path / "nope.csv")]) == 2
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    assert cli.main(["report", str(other)]) == 2


def test_quiet_run_names_the_html_file(intensity_model, tmp_path, capsys, siim_dicom):
    out = tmp_path / "r.csv"
    assert cli.main(["run", str(siim_dicom), "--out", str(out), "--model", str(intensity_model), "--workers", "0",
                     "--quiet", "--html", str(tmp_path / "r.html")]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["html"] == str(tmp_path / "r.html") and (tmp_path / "r.html").is_file()


CONTENT_SKIP = "not a frontal chest radiograph by its content (score 0.04)"


@pytest.fixture(scope="module")
def reviewed(ran, data_dir):
    """The run's report with one measurement flagged for review and one film the content check
    refused (a real chest film turned on its side), as the content check and review rules write them."""
    from heartbatch.report.schema import COLUMNS

    root, report, page = ran
    rows = read_report(report)
    ok = [r for r in rows if r["status"] == "ok"]
    for row in ok:
        row.update(chest_score="0.970", uncertainty="0.0080", review="false", review_reason="")
    flagged = next(r for r in ok if r["path"].endswith("ap.dcm"))
    flagged.update(chest_score="0.610", uncertainty="0.0410", review="true",
                   review_reason="low confidence (CTR ± 0.041)")
    out = root / "reviewed" / "report.csv"
    out.parent.mkdir()
    turned = write_dicom(out.parent / "turned.dcm", np.rot90(shared_png(data_dir, 9)).copy())
    rows.append({**{c: "" for c in COLUMNS}, "path": str(turned), "status": "skipped", "reason": CONTENT_SKIP,
                 "chest_score": "0.040"})
    with open(out, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out, flagged["path"], str(turned)


def test_review_queue_comes_first_flagged_rows_then_content_refusals(reviewed, tmp_path):
    report, flagged, turned = reviewed
    page = tmp_path / "review.html"
    assert cli.main(["report", str(report), "--html", str(page)]) == 0
    text = page.read_text(encoding="utf-8")
    queue = text.index("id='review'")
    assert queue < text.index("class='cards'") < text.index("id='studies'"), "the review queue is the first section"
    assert "1 measurements flagged for review, 1 films refused by the content check" in text
    section = text[queue:text.index("class='top'")]
    figures = re.findall(r"<figure class='review' id='rq\d+'>(.*?)</figure>", section)
    assert len(figures) == 2
    first, second = figures
    assert f"alt='{html.escape(flagged, quote=True)}'" in first, "the flagged measurement first, with its picture"
    assert "CTR " in first and "± 0.041" in first and "chest score 0.610" in first
    assert "low confidence (CTR ± 0.041)" in first
    assert f"alt='{html.escape(turned, quote=True)}'" in second and CONTENT_SKIP in second
    assert "chest score 0.040" in second and "not measured" in second
    thumbs = _thumbnails(section)
    assert np.asarray(thumbs[turned]).std() > 20, "the refused film is shown"
    # the studies table: its review and chest score columns; the study measured only by the flagged image first
    table = text[text.index("id='studies'"):]
    assert "<th>review</th><th>chest score</th>" in table
    first_row = re.search(r"<tr class='([^']*)'>(.*?)</tr>", table)
    assert first_row.group(1) == "review" and html.escape(flagged, quote=True) in first_row.group(2)
    assert "to check" in first_row.group(2) and "0.610" in first_row.group(2)
    assert len(re.findall(r"<tr class='(enlarged|)'>", table)) == 3, "the other studies follow"


def test_review_queue_is_limited_with_a_count_of_the_rest(reviewed, tmp_path):
    from heartbatch.report.html import write_html

    report, flagged, turned = reviewed
    text = write_html(report, tmp_path / "short.html", queue_limit=1).read_text(encoding="utf-8")
    assert len(re.findall(r"<figure class='review'", text)) == 1
    assert "… and 1 more" in text


@pytest.mark.slow  # starts Chromium
def test_review_queue_renders_first_in_headless_chromium(reviewed, tmp_path):
    report, flagged, turned = reviewed
    page = tmp_path / "review.html"
    assert cli.main(["report", str(report), "--html", str(page)]) == 0
    dom = browse(page, tmp_path, "--dump-dom").stdout
    decoded = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom)
    assert decoded and decoded.group(1) == decoded.group(2), "Chromium could not decode every image"
    first = re.search(r"<figure\b[^>]*>.*?<img\b[^>]*\balt=\"([^\"]*)\"", dom, re.S)
    assert first and html.unescape(first.group(1)) == flagged, "the page opens on the flagged measurement"
    assert dom.index('id="review"') < dom.index('class="cards"')
