"""`heartbatch show`: the boxes drawn where the report puts them; `--explain`'s occlusion map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import onnx_models as M
from heartbatch import cli
from heartbatch.dicom import read_dicom
from heartbatch.explain import blend, occlusion_map
from heartbatch.model import BoxModel
from heartbatch.overlay import HEART, THORAX
from heartbatch.pixels import preprocess
from heartbatch.report.summary import read_report


def _bbox(img: np.ndarray, colour) -> tuple[int, int, int, int]:
    """Exclusive bounding box of the pixels that have exactly ``colour``."""
    ys, xs = np.nonzero((img == np.array(colour)).all(axis=2))
    assert xs.size, f"no pixel of colour {colour}"
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def _report_boxes(report):
    row = read_report(report)[0]
    heart = [float(row[f"heart_{k}"]) for k in ("x0", "y0", "x1", "y1")]
    thorax = [float(row[f"thorax_{k}"]) for k in ("x0", "y0", "x1", "y1")]
    return row, heart, thorax


def _assert_box_at(img: np.ndarray, colour, box, sx: float, sy: float) -> None:
    expected = np.array([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
    np.testing.assert_allclose(_bbox(img, colour), expected, atol=1.0)


@pytest.fixture(scope="module")
def rg1_run(tmp_path_factory, rg1, intensity_model):
    """The report row of a real non-square MONOCHROME1 chest CR (1955 x 1841)."""
    out = tmp_path_factory.mktemp("show") / "report.csv"
    assert cli.main(["run", str(rg1), "--out", str(out), "--model", str(intensity_model), "--workers", "0",
                     "--quiet"]) == 0
    return out


def test_show_draws_the_boxes_where_the_report_says(rg1, rg1_run, intensity_model, tmp_path, capsys):
    capsys.readouterr()
    png = tmp_path / "overlay.png"
    assert cli.main(["show", str(rg1), "--out", str(png), "--model", str(intensity_model), "--size", "600"]) == 0
    printed = json.loads(capsys.readouterr().out)
    row, heart, thorax = _report_boxes(rg1_run)
    assert printed["heart"] == pytest.approx(heart, abs=1e-3) and printed["ctr"] == pytest.approx(float(row["ctr"]))
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (600, round(1841 * 600 / 1955)), "longer side --size, aspect kept"
    sx, sy = img.shape[1] / int(row["columns"]), img.shape[0] / int(row["rows"])
    _assert_box_at(img, HEART, heart, sx, sy)
    _assert_box_at(img, THORAX, thorax, sx, sy)
    assert img.std() > 20, "the radiograph is visible"


def test_explain_map_follows_what_the_model_reads(siim_dicom, intensity_model, box8_model):
    dicom = read_dicom(siim_dicom)
    model = BoxModel(intensity_model, threads=1)
    size = model.info.input_size
    image = preprocess(dicom.image, size)
    rows, columns = dicom.image.shape
    heat = occlusion_map(model, image, rows, columns)
    assert heat.shape == (size, size) and np.isfinite(heat).all()
    assert heat.std() > 0.1 and heat.max() > 1.0, "not uniform: covering bright or dark regions moves the box"
    # the corner pixel is covered by one patch only: its value is that patch's heart-box shift, exactly
    patch = size // 8
    covered = image.copy()
    covered[:patch, :patch] = image.mean()
    base, moved = M.intensity_expected(np.stack([image, covered])[:, None]).astype(np.float64)
    expected = np.abs(moved[:4] - base[:4]) @ np.array([columns, rows, columns, rows])
    assert heat[0, 0] == pytest.approx(expected, rel=1e-3, abs=1e-3)
    # a model that ignores the image: nothing moves
    constant = occlusion_map(BoxModel(box8_model, threads=1), image, rows, columns)
    assert np.all(constant == 0)


def test_show_explain_blends_a_non_uniform_map_under_the_boxes(siim_dicom, intensity_model, tmp_path, capsys):
    plain, explained = tmp_path / "plain.png", tmp_path / "explain.png"
    common = ["--model", str(intensity_model), "--size", "512"]
    assert cli.main(["show", str(siim_dicom), "--out", str(plain), *common]) == 0
    assert cli.main(["show", str(siim_dicom), "--out", str(explained), "--explain", *common]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[1]["explain_max_shift_px"] > 1.0
    a = np.asarray(Image.open(plain).convert("RGB"), dtype=np.int32)
    b = np.asarray(Image.open(explained).convert("RGB"), dtype=np.int32)
    assert a.shape == b.shape == (512, 512, 3)
    change = np.abs(b - a).sum(axis=2)
    assert change.std() > 5, "more colour where the heart box depends more on the image: not a uniform tint"
    colour = np.abs(b[..., 0] - b[..., 2])
    assert colour.max() > 100, "a colour map, not a grey tint"
    assert _bbox(b, HEART) == _bbox(a, HEART) and _bbox(b, THORAX) == _bbox(a, THORAX), "boxes drawn on top"


def test_blend_without_matplotlib_is_a_red_overlay(monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)
    grey = Image.new("RGB", (64, 64), (100, 100, 100))
    heat = np.zeros((16, 16))
    heat[:8, :8] = 5.0
    out = np.asarray(blend(grey, heat), dtype=np.int32)
    assert out[4, 4, 0] > 150 and out[4, 4, 1] < 100, "hot region is red"
    assert tuple(out[60, 60]) == (100, 100, 100), "cold region untouched"
    flat = np.asarray(blend(grey, np.full((16, 16), 3.0)))
    assert (flat == 100).all(), "a uniform map adds no colour"


def test_show_on_a_file_that_is_not_measured(tmp_path, box8_model, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a DICOM file\n")
    assert cli.main(["show", str(text), "--out", str(tmp_path / "o.png"), "--model", str(box8_model)]) == 4
    assert "not a DICOM file" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()
    assert cli.main(["show", str(tmp_path / "missing.dcm"), "--out", str(tmp_path / "o.png")]) == 2


@pytest.mark.slow  # starts Python in a subprocess
def test_report_and_explain_run_without_torch(siim_dicom, intensity_model, tmp_path):
    """The runtime install has no torch: both commands must work with torch unimportable."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from heartbatch import cli\n"
        f"args = ['--model', {str(intensity_model)!r}, '--workers', '0', '--quiet']\n"
        f"assert cli.main(['run', {str(siim_dicom)!r}, '--out', {str(tmp_path / 'r.csv')!r},"
        f" '--html', {str(tmp_path / 'r.html')!r}, *args]) == 0\n"
        f"assert cli.main(['show', {str(siim_dicom)!r}, '--out', {str(tmp_path / 'e.png')!r}, '--explain',"
        f" '--size', '256', '--model', {str(intensity_model)!r}]) == 0\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "r.html").stat().st_size > 10_000 and (tmp_path / "e.png").is_file()


# --- chest score, uncertainty and the review flag --------------------------------------

def _orange(img: np.ndarray) -> np.ndarray:
    """Pixels of the flag colour (anti-aliased text included)."""
    img = img.astype(np.int32)
    return (img[..., 0] > 200) & (img[..., 1] > 110) & (img[..., 1] < 220) & (img[..., 2] < 80)


def _labels(marks, side: int = 600) -> np.ndarray:
    """``marks`` drawn on a plain grey image: the black pixels are the label backgrounds."""
    from heartbatch.overlay import draw_marks

    image = Image.new("RGB", (side, side), (128, 128, 128))
    return np.asarray(draw_marks(image, 1000, 1000, marks))


def test_draw_marks_adds_uncertainty_chest_score_and_review():
    from dataclasses import replace

    from heartbatch.overlay import Marks

    base = Marks((400, 400, 600, 700), (100, 150, 900, 850), ctr=0.25)
    black = lambda img: (img == 0).all(axis=2)  # noqa: E731
    plain = _labels(base)
    xs = np.nonzero(black(plain)[:40].any(axis=0))[0]
    wider = np.nonzero(black(_labels(replace(base, uncertainty=0.0312)))[:40].any(axis=0))[0]
    assert wider.max() > xs.max() + 20, "the CTR label grows by ' ± 0.031'"
    corner = lambda img: np.nonzero(black(img)[:150, :60].any(axis=1))[0].max()  # noqa: E731 - lowest label row
    assert corner(_labels(replace(base, chest_score=0.97))) > corner(plain) + 10, "a chest score line under the CTR"
    assert not _orange(plain).any()
    flagged = _labels(replace(base, review=True, review_reason="mirrored film"))
    assert _orange(flagged)[:120].sum() > 30, "the review flag, in the flag colour, near the CTR"
    assert not _orange(_labels(replace(base, review=False, review_reason=""))).any()


def test_marks_from_a_report_row_read_the_review_columns():
    from heartbatch.overlay import Marks

    row = {"ctr": "0.5100", "chest_score": "0.420", "uncertainty": "0.0312", "review": "true",
           "review_reason": "low confidence"}
    marks = Marks.from_row(row)
    assert (marks.chest_score, marks.uncertainty, marks.review, marks.review_reason) == \
        (0.42, 0.0312, True, "low confidence")
    empty = Marks.from_row({"ctr": "0.5"})  # a report from before the columns
    assert (empty.chest_score, empty.uncertainty, empty.review, empty.review_reason) == (None, None, None, "")


def test_show_prints_and_draws_the_review(siim_dicom, intensity_model, tmp_path, capsys, monkeypatch):
    """What the content check and review rules put on the record is printed and drawn."""
    import heartbatch.workers as workers  # show measures through the pipeline's own step

    measure = workers.measure

    def reviewed(*args, **kwargs):
        record = measure(*args, **kwargs)
        record.chest_score, record.uncertainty = 0.4217, 0.03124
        record.review, record.review_reason = True, "low confidence [CTR ± 0.031]"
        return record

    common = ["--model", str(intensity_model), "--size", "600"]
    assert cli.main(["show", str(siim_dicom), "--out", str(tmp_path / "plain.png"), *common]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert (plain["chest_score"], plain["uncertainty"]) == (None, None), "a model without the optional outputs"
    assert plain["review"] == bool(plain["review_reason"]), "only the box rules can flag it"
    monkeypatch.setattr(workers, "measure", reviewed)
    assert cli.main(["show", str(siim_dicom), "--out", str(tmp_path / "review.png"), *common]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert (printed["chest_score"], printed["uncertainty"], printed["review"]) == (0.422, 0.0312, True)
    assert printed["review_reason"] == "low confidence [CTR ± 0.031]"
    assert "review: low confidence [CTR ± 0.031]" in captured.err, "told to the person at the terminal"
    a = np.asarray(Image.open(tmp_path / "plain.png").convert("RGB"))
    b = np.asarray(Image.open(tmp_path / "review.png").convert("RGB"))
    assert _orange(b).sum() > _orange(a).sum() + 30, "the review flag is drawn"
    assert _bbox(b, HEART) == _bbox(a, HEART), "the boxes are unchanged"
