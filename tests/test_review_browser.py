"""`heartbatch review` in a real browser: Debian's chromium, headless, driven by Playwright (its own
browser is never downloaded: ``executable_path`` is the system chromium).

A real `heartbatch run` on real DICOMs, a real server subprocess, and a person's path through the
page: the queue first, accept with the keyboard, next, correct by dragging a box edge (the CTR
follows the drag), reject another row with a reason.  Then the ledger, the report, the summaries
and the exported labels must all say the same.  A row of a model with masks shows their outlines,
hidden and shown again with O and the checkbox.  Chromium is required: without it this fails.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from playwright import sync_api as playwright  # the dev extra; Debian's chromium is the browser

from helpers import check_report, review_studies, start_review
from heartbatch import cli
from heartbatch.geometry import ctr as runtime_ctr
from heartbatch.labels import from_box_csv
from heartbatch.report.paths import ReportFiles


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("headless Chromium not found: install the Debian package `chromium` (.ci/run does)")


@pytest.fixture
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-dev-shm-usage"])
        yield b
        b.close()


def shown_id(page) -> int:
    return int(page.get_attribute("body", "data-item"))




def press_heart_edge(page) -> tuple[float, float]:
    """Press the mouse on the heart box's right-edge handle; where it was pressed."""
    edge = page.locator("line.handle.x1[data-box='heart']").bounding_box()
    x, y = edge["x"] + edge["width"] / 2, edge["y"] + edge["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    return x, y

def open_page(browser, url: str):
    """A page on ``url`` and the list its script errors and console errors are collected in."""
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    return page, errors

def test_accept_correct_and_reject_in_the_browser(tmp_path, data_dir, intensity_model, procs, browser):
    studies = tmp_path / "studies"
    review_studies(studies, data_dir)
    report = tmp_path / "out" / "report.csv"
    assert cli.main(["run", str(studies), "--out", str(report), "--model", str(intensity_model),
                     "--workers", "0", "--threads", "1", "--quiet"]) == 0
    _, url = start_review(procs, report, "--reviewer", "dr browser")
    page, errors = open_page(browser, url)

    # the queue first: the two flagged films, the first of them open, its film decoded
    page.wait_for_selector("body[data-ready='1'][data-item]")
    page.wait_for_selector(f"body[data-film='{shown_id(page)}']")
    assert page.get_attribute("#left", "data-left") == "2"
    queue = page.locator("#queue li").all_inner_texts()
    assert [t.split()[0] for t in queue] == ["dark0.dcm", "dark1.dcm"]
    assert "dark0.dcm" in page.inner_text("#path")
    assert "CTR outside" in page.inner_text("#reason")
    assert "HB-PATIENT" not in page.content()

    # accept with the keyboard, then next
    page.keyboard.press("a")
    page.wait_for_selector("#state[data-status='accepted']")
    page.wait_for_selector("#left[data-left='1']")
    first = shown_id(page)
    page.keyboard.press("n")
    page.wait_for_selector(f"body:not([data-item='{first}'])")
    assert "dark1.dcm" in page.inner_text("#path")

    # reject it with a reason
    page.select_option("#reject-reason", "lateral")
    page.click("#reject")
    page.wait_for_selector("#state[data-status='rejected']")
    page.wait_for_selector("#left[data-left='0']")

    # a row outside the queue, on request: correct it by dragging the heart's right edge
    page.click("#others-box summary")
    page.click("#others li:has-text('chest1.dcm')")
    page.wait_for_selector("#path:has-text('chest1.dcm')")
    page.wait_for_selector(f"body[data-film='{shown_id(page)}']")
    model_ctr = float(page.get_attribute("#ctr-now", "data-value"))
    x, y = press_heart_edge(page)
    page.mouse.move(x - 30, y, steps=5)
    during = float(page.get_attribute("#ctr-now", "data-value"))
    assert during < model_ctr - 0.01, "the CTR follows the drag"
    page.mouse.move(x - 60, y, steps=5)
    page.mouse.up()
    shown = float(page.get_attribute("#ctr-now", "data-value"))
    assert shown < during
    assert page.inner_text("#accept").startswith("Save correction")
    page.keyboard.press("a")
    page.wait_for_selector("#state[data-status='corrected']")
    page.screenshot(path=str(tmp_path / "review.png"))
    assert not errors, errors

    # the ledger, the report, the summaries and the export agree
    db = sqlite3.connect(ReportFiles.of(report).state_dir / "ledger.sqlite")
    saved = {Path(p).name: (json.loads(c), json.loads(d)) for p, c, d in
             db.execute("SELECT path, cells, decision FROM reviews ORDER BY seq")}
    db.close()
    assert {n: c["review_status"] for n, (c, _) in saved.items()} == \
        {"dark0.dcm": "accepted", "dark1.dcm": "rejected", "chest1.dcm": "corrected"}
    corrected = saved["chest1.dcm"][1]
    assert corrected["ctr"] == pytest.approx(runtime_ctr(corrected["heart"], corrected["thorax"]))
    assert corrected["ctr"] == pytest.approx(shown, abs=1e-3), "the page's live CTR is the one saved"

    rows = {Path(r["path"]).name: r for r in check_report(report)}
    assert rows["chest1.dcm"]["review_status"] == "corrected"
    assert float(rows["chest1.dcm"]["ctr_reviewed"]) == pytest.approx(corrected["ctr"], abs=1e-4)
    assert float(rows["chest1.dcm"]["heart_x1"]) - corrected["heart"][2] > 10, "the model's boxes stay in the row"
    assert (rows["dark1.dcm"]["review_status"], rows["dark1.dcm"]["review_note"]) == ("rejected", "lateral")
    assert rows["dark0.dcm"]["review_status"] == "accepted" and rows["dark0.dcm"]["reviewer"] == "dr browser"

    summary = json.loads(ReportFiles.of(report).summary_json.read_text())
    assert summary["review"]["decided"] == {"accepted": 1, "corrected": 1, "rejected": 1}
    assert summary["review"]["n"] == 0
    assert summary["ctr"]["n"] == 4, "3 chest films and the accepted dark film; the rejected one left out"
    chest1 = [s for s in summary["studies"]["items"] if s["path"].endswith("chest1.dcm")]
    assert chest1[0]["ctr"] == pytest.approx(corrected["ctr"], abs=1e-4), "studies use the reviewed CTR"

    labels = tmp_path / "labels.csv"
    assert cli.main(["review", str(report), "--export", str(labels)]) == 2, "the running server holds the report"
    procs.cleanup()
    assert cli.main(["review", str(report), "--export", str(labels)]) == 0
    exported = {item.image_path.name: item for item in from_box_csv(labels)}
    assert sorted(exported) == ["chest1.dcm", "dark0.dcm"]
    rows_px, cols_px = int(rows["chest1.dcm"]["rows"]), int(rows["chest1.dcm"]["columns"])
    assert exported["chest1.dcm"].heart[2] == pytest.approx(corrected["heart"][2] / cols_px, abs=1e-5)
    assert exported["chest1.dcm"].thorax[3] == pytest.approx(corrected["thorax"][3] / rows_px, abs=1e-5)


def pink_pixels(page) -> int:
    """Pixels of the heart outline's colour in the film area's screenshot (the film is grey, the
    heart box red)."""
    import io

    import numpy as np
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(page.locator("#stage").screenshot())).convert("RGB"), dtype=np.int32)
    r, g, b = shot[..., 0], shot[..., 1], shot[..., 2]
    return int(((r > 200) & (g > 40) & (g < 130) & (b > 120) & (b < 220)).sum())


def test_mask_outlines_over_the_film_toggle_with_o_and_the_boxes_stay_draggable(tmp_path, data_dir, intensity_model,
                                                                               procs, browser):
    """A row of a model with masks shows their outlines over the film; O and the checkbox hide and
    show them; a box edge is still dragged through them. A row without masks shows none, no toggle."""
    import onnx_models as om

    studies = tmp_path / "studies"
    review_studies(studies, data_dir, chests=2, dark=0)
    report = tmp_path / "out" / "report.csv"
    for film, model in (("chest1.dcm", intensity_model), ("chest0.dcm", om.masks_model(tmp_path / "m.onnx"))):
        assert cli.main(["run", str(studies / film), "--out", str(report), "--model", str(model),
                         "--workers", "0", "--threads", "1", "--quiet"]) == 0
    _, url = start_review(procs, report)
    page, errors = open_page(browser, url)
    page.wait_for_selector("body[data-ready='1'][data-item]")
    page.click("#others-box summary")

    page.click("#others li:has-text('chest0.dcm')")
    page.wait_for_selector("#path:has-text('chest0.dcm')")
    row = shown_id(page)
    page.wait_for_selector(f"body[data-film='{row}'][data-outlines-film='{row}'][data-outlines='shown']")
    assert page.is_visible("#outlines") and page.is_visible("#outlines-control")
    assert page.is_checked("#outlines-toggle")
    shown = pink_pixels(page)
    assert shown > 300, "the heart's outline is drawn over the film"

    page.keyboard.press("o")
    page.wait_for_selector("body[data-outlines='hidden']")
    assert not page.is_visible("#outlines") and not page.is_checked("#outlines-toggle")
    assert pink_pixels(page) < shown / 20
    page.click("#outlines-toggle")
    page.wait_for_selector("body[data-outlines='shown']")
    assert page.is_visible("#outlines")

    # the heart box's right edge, dragged with the outlines shown: the CTR follows
    before = float(page.get_attribute("#ctr-now", "data-value"))
    x, y = press_heart_edge(page)
    page.mouse.move(x - 40, y, steps=5)
    page.mouse.up()
    assert float(page.get_attribute("#ctr-now", "data-value")) < before - 0.01

    page.click("#others li:has-text('chest1.dcm')")
    page.wait_for_selector("#path:has-text('chest1.dcm')")
    page.wait_for_selector("body[data-outlines='none']")
    assert not page.is_visible("#outlines") and not page.is_visible("#outlines-control")
    assert not errors, errors
