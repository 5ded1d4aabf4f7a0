"""`heartbatch review` without a browser: durable decisions (a real server subprocess killed with
SIGKILL), the review cells of a re-run, the export that heartbatch-train reads, the outlines of a
row's masks, and the server's safety rules.  The page itself is driven in Chromium in
``test_review_browser.py``.

Every report here is written by a real `heartbatch run` on real DICOMs (real chest films, and
nearly black films the review rules flag)."""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import re
import sqlite3
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from pydicom import dcmread

from dicom_factory import shared_png, write_dicom
from helpers import check_report, review_studies, start_review
from heartbatch import cli
from heartbatch.geometry import ctr as runtime_ctr
from heartbatch.images import image_size, is_dicom, load_image
from heartbatch.labels import from_box_csv
from heartbatch.report.paths import ReportFiles
from heartbatch.report.summary import read_report
from heartbatch.review.app import Access, build_app, make_server
from heartbatch.review.decisions import Decision, ReviewError, ReviewStore


def run(studies: Path, report: Path, model: Path, *extra: str) -> None:
    code = cli.main(["run", str(studies), "--out", str(report), "--model", str(model), "--workers", "0",
                     "--threads", "1", "--quiet", *extra])
    assert code == 0


@pytest.fixture
def measured(tmp_path, data_dir, intensity_model):
    """A fresh report of 3 chest films and 2 flagged dark films."""
    studies = tmp_path / "studies"
    review_studies(studies, data_dir)
    report = tmp_path / "out" / "report.csv"
    run(studies, report, intensity_model)
    return studies, report


def rows_by_name(report: Path) -> dict[str, dict[str, str]]:
    return {Path(r["path"]).name: r for r in check_report(report)}


def ledger_reviews(report: Path) -> list[tuple[str, dict, dict]]:
    """(path, cells, decision) of every review in the ledger, read with plain sqlite3."""
    db = sqlite3.connect(ReportFiles.of(report).state_dir / "ledger.sqlite")
    try:
        return [(path, json.loads(cells), json.loads(decision))
                for path, cells, decision in db.execute("SELECT path, cells, decision FROM reviews ORDER BY seq")]
    finally:
        db.close()


def request(url: str, method: str = "GET", path: str = "/", body: dict | None = None,
            headers: dict | None = None) -> tuple[int, dict, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        data = None if body is None else json.dumps(body).encode()
        all_headers = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=data, headers={**all_headers, **(headers or {})})
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def csrf_of(url: str, headers: dict | None = None) -> str:
    status, _, page = request(url, path="/" + (("?" + urlsplit(url).query) if urlsplit(url).query else ""),
                              headers=headers)
    assert status == 200
    return re.search(rb'name="csrf-token" content="([^"]+)"', page).group(1).decode()


def ids(url: str) -> dict[str, int]:
    status, _, body = request(url, path="/api/state")
    assert status == 200
    return {item["name"]: item["id"] for item in json.loads(body)["items"]}


def test_decisions_survive_kill_9_and_reach_the_report_after_restart(measured, procs):
    """Decisions made through HTTP are in the ledger the moment the server answers: after SIGKILL
    (and the CSV put back as it was before, as if the kill came before it was written) every one is
    in the ledger, and a restarted server writes them into the report and its summaries."""
    studies, report = measured
    before = report.read_bytes()
    proc, url = start_review(procs, report, "--reviewer", "dr test")
    token, rows = csrf_of(url), ids(url)
    post = {"X-CSRF-Token": token}
    model = rows_by_name(report)
    heart = [float(model["chest1.dcm"][f"heart_{k}"]) for k in ("x0", "y0", "x1", "y1")]
    thorax = [float(model["chest1.dcm"][f"thorax_{k}"]) for k in ("x0", "y0", "x1", "y1")]
    heart[2] -= 40  # the heart's left border (image right) drawn 40 px further in
    answers = [request(url, "POST", f"/api/items/{rows[name]}/decision", body, post) for name, body in (
        ("dark0.dcm", {"status": "accepted"}),
        ("chest1.dcm", {"status": "corrected", "heart": heart, "thorax": thorax}),
        ("dark1.dcm", {"status": "rejected", "note": "not measurable"}))]
    assert [a[0] for a in answers] == [200, 200, 200], [a[2] for a in answers]
    procs.kill_group(proc)
    assert proc.returncode == -9

    saved = {Path(path).name: (cells, decision) for path, cells, decision in ledger_reviews(report)}
    assert {name: cells["review_status"] for name, (cells, _) in saved.items()} == {
        "dark0.dcm": "accepted", "chest1.dcm": "corrected", "dark1.dcm": "rejected"}
    assert saved["chest1.dcm"][1]["heart"] == heart
    assert all(cells["reviewer"] == "dr test" and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", cells["reviewed_at"])
               for cells, _ in saved.values())

    report.write_bytes(before)  # as if the kill came between the ledger's commit and the CSV
    proc, url = start_review(procs, report, name="review-again")
    after = rows_by_name(report)
    assert after["dark0.dcm"]["review_status"] == "accepted"
    assert after["dark0.dcm"]["ctr_reviewed"] == after["dark0.dcm"]["ctr"]
    assert after["chest1.dcm"]["review_status"] == "corrected"
    assert float(after["chest1.dcm"]["ctr_reviewed"]) == pytest.approx(runtime_ctr(heart, thorax), abs=1e-4)
    assert after["chest1.dcm"]["ctr"] == model["chest1.dcm"]["ctr"], "the model's CTR stays beside the reviewed one"
    assert (after["dark1.dcm"]["review_status"], after["dark1.dcm"]["review_note"]) == ("rejected", "not measurable")
    assert all(after[n]["review_status"] == "" for n in ("chest0.dcm", "chest2.dcm"))
    summary = json.loads(ReportFiles.of(report).summary_json.read_text())
    assert summary["review"]["decided"] == {"accepted": 1, "corrected": 1, "rejected": 1}
    assert summary["review"]["n"] == 0 and summary["review"]["rejected_reasons"] == {"not measurable": 1}
    counted = sorted(summary_ctr for summary_ctr in (float(after[n]["ctr_reviewed"] or after[n]["ctr"])
                                                     for n in ("chest0.dcm", "chest1.dcm", "chest2.dcm", "dark0.dcm")))
    assert summary["ctr"]["n"] == 4, "the rejected row is left out, the accepted flagged row counts"
    assert summary["ctr"]["min"] == pytest.approx(counted[0], abs=1e-6)
    assert summary["ctr"]["median"] == pytest.approx(float(np.median(counted)), abs=1e-6)
    status, _, body = request(url, path="/api/state")
    assert json.loads(body)["counts"]["left"] == 0


def test_rerun_keeps_the_review_of_unchanged_files_and_sets_aside_a_changed_one(measured, data_dir,
                                                                                intensity_model):
    studies, report = measured
    with ReviewStore(report) as store:
        by_name = {Path(i.key).name: i.index for i in store.items}
        store.decide(by_name["dark0.dcm"], Decision("accepted"), "a")
        store.decide(by_name["chest0.dcm"], Decision("rejected", note="lateral"), "a")
        chest1 = store.item(by_name["chest1.dcm"])
        store.decide(chest1.index, Decision("corrected", chest1.heart, (10.0, 20.0, 500.0, 480.0)), "a")
    write_dicom(studies / "chest1.dcm", shared_png(data_dir, 7))  # another film under the same name

    run(studies, report, intensity_model)
    rows = rows_by_name(report)
    assert rows["dark0.dcm"]["review_status"] == "accepted"
    assert (rows["chest0.dcm"]["review_status"], rows["chest0.dcm"]["review_note"]) == ("rejected", "lateral")
    assert rows["chest1.dcm"]["review_status"] == "" and rows["chest1.dcm"]["ctr_reviewed"] == "", \
        "a changed file's review is set aside and its row measured again"
    assert [Path(p).name for p, _, _ in ledger_reviews(report)].count("chest1.dcm") == 1, "set aside, not deleted"

    run(studies, report, intensity_model, "--ctr-threshold", "0.6")  # every row measured again, files unchanged
    rows = rows_by_name(report)
    assert [rows[n]["review_status"] for n in ("dark0.dcm", "chest0.dcm", "chest1.dcm")] == \
        ["accepted", "rejected", ""]
    assert json.loads(ReportFiles.of(report).summary_json.read_text())["review"]["decided"]["rejected"] == 1


def test_html_report_uses_the_reviewed_ctr_and_leaves_out_rejected_rows(measured):
    from heartbatch.report.html import build

    _, report = measured
    with ReviewStore(report) as store:
        by_name = {Path(i.key).name: i for i in store.items}
        store.decide(by_name["dark0.dcm"].index, Decision("accepted"), "a")
        store.decide(by_name["dark1.dcm"].index, Decision("rejected", note="lateral"), "a")
        chest = by_name["chest0.dcm"]
        x0, y0, x1, y1 = chest.heart
        heart = (x0, y0, x0 + 0.8 * (x1 - x0), y1)
        store.decide(chest.index, Decision("corrected", heart, chest.thorax), "dr html")
        corrected = runtime_ctr(heart, chest.thorax)
    text = build(report)
    assert "Review queue: 0 measurements flagged for review" in text, "decided rows leave the queue"
    table = text[text.index("id='studies'"):]
    assert "dark1.dcm" not in table, "a rejected row is left out"
    assert "dark0.dcm" in table and f"{corrected:.3f}" in table
    assert "corrected by dr html" in text
    assert "1 accepted, 1 corrected (their CTR counted), 1 rejected (left out)" in text


def test_export_writes_reviewed_films_as_labels_that_training_reads(measured, tmp_path, capsys, intensity_model):
    studies, report = measured
    raw = studies / "IM0001"  # a dataset without preamble or .dcm suffix: `run` reads it, so must training
    ds = dcmread(studies / "chest2.dcm")
    ds.preamble = None
    ds.file_meta = type(ds.file_meta)()
    ds.save_as(raw, enforce_file_format=False, implicit_vr=True, little_endian=True)
    run(studies, report, intensity_model)
    with ReviewStore(report) as store:
        by_name = {Path(i.key).name: i for i in store.items}
        assert "IM0001" in by_name, "the raw dataset was measured"
        store.decide(by_name["dark0.dcm"].index, Decision("accepted"), "a")
        store.decide(by_name["IM0001"].index, Decision("accepted"), "a")
        corrected = ((100.0, 150.0, 300.0, 350.0), (20.0, 40.0, 480.0, 500.0))
        store.decide(by_name["chest1.dcm"].index, Decision("corrected", *corrected), "a")
        store.decide(by_name["dark1.dcm"].index, Decision("rejected", note="lateral"), "a")
        model_boxes = {n: (by_name[n].heart, by_name[n].thorax) for n in ("dark0.dcm", "IM0001")}
    labels = tmp_path / "labels" / "labels.csv"
    assert cli.main(["review", str(report), "--export", str(labels)]) == 0
    assert "3 reviewed films" in capsys.readouterr().out

    items = {item.image_path.name: item for item in from_box_csv(labels)}
    assert sorted(items) == ["IM0001", "chest1.dcm", "dark0.dcm"], "rejected and unreviewed rows are not exported"
    for name, (heart, thorax) in {**model_boxes, "chest1.dcm": corrected}.items():
        rows, columns = image_size(items[name].image_path)
        expected = [heart[0] / columns, heart[1] / rows, heart[2] / columns, heart[3] / rows,
                    thorax[0] / columns, thorax[1] / rows, thorax[2] / columns, thorax[3] / rows]
        assert items[name].boxes == pytest.approx(expected, abs=1e-5)
        assert load_image(items[name].image_path).shape == (rows, columns)
    assert is_dicom(items["IM0001"].image_path)


# --- safety ---------------------------------------------------------------------------------

@pytest.fixture
def served(measured):
    """The app on a loopback port, in a thread of this process."""
    _, report = measured
    with serving(report) as url:
        yield url, report


@contextlib.contextmanager
def serving(report: Path):
    """The review app over ``report`` on a loopback port, in a thread of this process: its URL."""
    store = ReviewStore(report, shared=True)
    server = make_server("127.0.0.1", 0, None)
    server.set_app(build_app(store, Access.for_address("127.0.0.1", server.server_address[1]), "tester"))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        store.close()


def test_state_changes_need_the_pages_csrf_token_and_the_same_site(served):
    url, report = served
    token, rows = csrf_of(url), ids(url)
    path = f"/api/items/{rows['dark0.dcm']}/decision"
    accept = {"status": "accepted"}
    assert request(url, "POST", path, accept)[0] == 403, "no CSRF token"
    assert request(url, "POST", path, accept, {"X-CSRF-Token": "guess"})[0] == 403
    assert request(url, "POST", path, accept, {"X-CSRF-Token": token, "Origin": "http://evil.example"})[0] == 403
    assert request(url, "POST", path, accept, {"X-CSRF-Token": token, "Sec-Fetch-Site": "cross-site"})[0] == 403
    assert request(url, "GET", path)[0] == 405, "a decision is never a GET"
    assert request(url, "POST", path, None, {"X-CSRF-Token": token, "Content-Type": "text/plain"})[0] == 415
    assert request(url, "GET", "/api/state", headers={"Host": "attacker.example:80"})[0] == 421, "DNS rebinding"
    assert all(r["review_status"] == "" for r in read_report(report)), "nothing refused was saved"
    status, _, body = request(url, "POST", path, {"status": "rejected"}, {"X-CSRF-Token": token})
    assert status == 400 and b"needs a reason" in body
    origin = url.rstrip("/")
    status, headers, _ = request(url, "POST", path, accept, {"X-CSRF-Token": token, "Origin": origin,
                                                              "Sec-Fetch-Site": "same-origin"})
    assert status == 200 and "frame-ancestors 'none'" in headers["content-security-policy"]
    assert rows_by_name(report)["dark0.dcm"]["review_status"] == "accepted"


def test_only_rows_of_the_report_are_served_and_no_patient_identifiers(served, tmp_path):
    url, report = served
    secret = tmp_path.parent / "secret.txt"
    for path in ("/film/99.png", "/film/-1.png", "/film/..%2F..%2Fetc%2Fpasswd", "/static/..%2Fdecisions.py",
                 "/static/app.py", "/api/items/99", f"/film/{secret}"):
        assert request(url, path=path)[0] == 404, path
    status, headers, png = request(url, path=f"/film/{ids(url)['chest0.dcm']}.png")
    assert status == 200 and headers["content-type"] == "image/png" and png[:8] == b"\x89PNG\r\n\x1a\n"
    pages = [request(url, path=p)[2] for p in ("/", "/api/state", *(f"/api/items/{i}" for i in ids(url).values()))]
    assert not any(b"HB-PATIENT" in page or b"ACC0001" in page for page in pages)


@pytest.fixture
def outlined(tmp_path, data_dir, intensity_model):
    """The app over one report with a row measured by a model with masks (chest0) and one by a model
    without (chest1): two runs on one file each."""
    import onnx_models as om

    studies = tmp_path / "studies"
    review_studies(studies, data_dir, chests=2, dark=0)
    report = tmp_path / "out" / "report.csv"
    masks = om.ellipse_masks(56)
    run(studies / "chest1.dcm", report, intensity_model)
    run(studies / "chest0.dcm", report, om.masks_model(tmp_path / "masks.onnx", masks))
    with serving(report) as url:
        yield url, masks


def test_the_outlines_of_a_rows_masks_are_served_as_a_layer_over_its_film(outlined):
    """A transparent PNG of the film's size with each mask's outline in its colour where the
    mask's boundary falls on the film (the masks the ledger keeps); 404 for a row without masks."""
    from PIL import Image

    from heartbatch.masks import outline, solid_on_grid
    from heartbatch.overlay import OUTLINES

    url, masks = outlined
    rows = ids(url)
    details = {name: json.loads(request(url, path=f"/api/items/{i}")[2]) for name, i in rows.items()}
    assert details["chest0.dcm"]["outlines"] == f"/outlines/{rows['chest0.dcm']}.png"
    assert details["chest1.dcm"]["outlines"] is None, "a model without masks: no outlines"

    status, headers, png = request(url, path=details["chest0.dcm"]["outlines"])
    assert status == 200 and headers["content-type"] == "image/png"
    layer = Image.open(io.BytesIO(png))
    film = Image.open(io.BytesIO(request(url, path=details["chest0.dcm"]["film"])[2]))
    assert layer.mode == "RGBA" and layer.size == film.size, "laid over the film, pixel for pixel"
    pixels = np.asarray(layer)
    opaque = pixels[..., 3] > 0
    assert 0 < opaque.mean() < 0.05, "outlines only, the film shows through"
    colours = {tuple(c) for c in pixels[opaque][:, :3]}
    assert colours == set(OUTLINES)
    h, w = opaque.shape
    for edge, colour in zip((outline(s) for s in solid_on_grid(masks, h, w)), OUTLINES):
        # the masks as kept (within 1/255) may move a cell that sits at one half; another outline may cross
        assert (pixels[edge][:, 3] == 255).mean() > 0.98
        assert (pixels[edge][:, :3] == colour).all(axis=1).mean() > 0.6, f"the {colour} outline on its mask's boundary"

    status, _, body = request(url, path=f"/outlines/{rows['chest1.dcm']}.png")
    assert status == 404 and b"has no masks" in body
    assert request(url, path="/outlines/99.png")[0] == 404
    assert request(url, path="/outlines/-1.png")[0] == 404
    assert request(url, path=details["chest0.dcm"]["outlines"], headers={"Host": "attacker.example:80"})[0] == 421


def test_another_address_needs_the_printed_token(measured, procs):
    _, report = measured
    proc, url = start_review(procs, report, "--host", "0.0.0.0")
    token = re.search(r"\?token=(\S+)", url).group(1)
    assert "needs this token" in open(proc.log).read()  # type: ignore[attr-defined]
    base = url.split("?")[0]
    assert request(base, path="/")[0] == 403
    assert request(base, path="/api/state")[0] == 403
    assert request(base, path="/api/state?token=wrong")[0] == 403
    status, headers, _ = request(base, path=f"/?token={token}")
    cookie_attributes = headers["set-cookie"].lower()
    assert status == 200 and "httponly" in cookie_attributes and "samesite=strict" in cookie_attributes
    cookie = headers["set-cookie"].split(";")[0]
    assert request(base, path="/api/state", headers={"Cookie": cookie})[0] == 200


def test_patient_identifiers_are_shown_only_when_the_report_has_them(tmp_path, data_dir, intensity_model):
    studies = tmp_path / "studies"
    review_studies(studies, data_dir, chests=1, dark=0)
    report = tmp_path / "report.csv"
    run(studies, report, intensity_model, "--include-patient-id")
    from heartbatch.review.app import item_detail

    with ReviewStore(report) as store:
        assert item_detail(store.items[0], store.include_patient_id)["patient"]["patient_id"] == "HB-PATIENT-0"


def test_usable_errors(tmp_path, measured, capsys):
    _, report = measured
    assert cli.main(["review", str(tmp_path / "none.csv")]) == 2
    assert "run `heartbatch run FOLDER --out" in capsys.readouterr().err
    with ReviewStore(report) as store:
        with pytest.raises(ReviewError, match="no reviewable row 99"):
            store.decide(99, Decision("accepted"), "a")
        with pytest.raises(ReviewError, match="unknown decision"):
            store.decide(0, Decision("maybe"), "a")
        with pytest.raises(ReviewError, match="no width"):
            store.decide(0, Decision("corrected", (5, 5, 5, 9), (0, 0, 100, 100)), "a")
        assert cli.main(["review", str(report)]) == 2, "one writer at a time"
        assert "another heartbatch process is writing this report" in capsys.readouterr().err
