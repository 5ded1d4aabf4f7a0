"""`heartbatch evaluate` and the shared metrics, on cases whose answers are worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from heartbatch.cli import main
from heartbatch.metrics import agreement, box_metrics

import onnx_models as M
from split_cases import assert_refused, bad_splits, write_split


def test_box_metrics_hand_case():
    # heart: exact, and shifted right by 0.1 (IoU of two 0.4-wide boxes overlapping 0.3 = 0.3/0.5)
    true = np.array([[0.3, 0.3, 0.7, 0.7, 0.1, 0.1, 0.9, 0.9],
                     [0.3, 0.3, 0.7, 0.7, 0.1, 0.1, 0.9, 0.9]])
    pred = np.array([[0.3, 0.3, 0.7, 0.7, 0.1, 0.1, 0.9, 0.9],
                     [0.4, 0.3, 0.8, 0.7, 0.1, 0.1, 0.9, 0.9]])
    m = box_metrics(pred, true)
    assert m["heart_iou_mean"] == pytest.approx((1 + 0.6) / 2)
    assert m["heart_iou_median"] == pytest.approx(0.8)
    # second row: x0 and x1 off by 0.1 -> mean |error| over 4 coords = 0.05 -> 11.2 px at 224
    assert m["heart_mae_px224"] == pytest.approx((0 + 0.05 * 224) / 2)
    assert m["thorax_iou_mean"] == pytest.approx(1.0)
    assert m["ctr_mae"] == pytest.approx(0.0)  # same widths, only shifted


def test_ctr_error_and_agreement_hand_case():
    thorax = [0.1, 0.1, 0.9, 0.9]  # width 0.8
    true = np.array([[0.3, 0.3, 0.3 + w, 0.7] + thorax for w in (0.36, 0.44, 0.48)])  # CTR .45 .55 .60
    pred = np.array([[0.3, 0.3, 0.3 + w, 0.7] + thorax for w in (0.44, 0.44, 0.36)])  # CTR .55 .55 .45
    m = box_metrics(pred, true, threshold=0.5, expert_ctr=np.array([0.45, math.nan, 0.62]))
    assert m["ctr_mae"] == pytest.approx((0.10 + 0 + 0.15) / 3)
    a = m["ctr_agreement"]
    assert (a["accuracy"], a["sensitivity"], a["specificity"]) == pytest.approx((1 / 3, 1 / 2, 0.0))
    assert m["expert_n"] == 2
    assert m["expert_ctr_mae"] == pytest.approx((0.10 + 0.17) / 2)


def test_agreement_ignores_missing_values():
    a = agreement(np.array([0.6, math.nan, 0.4]), np.array([0.6, 0.7, math.nan]), 0.5)
    assert a["n"] == 1 and a["accuracy"] == 1.0 and math.isnan(a["specificity"])


def test_heart_only_predictions_report_no_thorax_metrics():
    m = box_metrics(np.array([[0.3, 0.3, 0.7, 0.7]]), np.array([[0.3, 0.3, 0.7, 0.7]]))
    assert m["heart_iou_mean"] == 1.0 and "ctr_mae" not in m


@pytest.fixture
def tiny_cxr(tmp_path):
    """A cxr-ctr style folder: 2 images, rectangles as masks, one expert CTR."""
    root = tmp_path / "cxr"
    for sub in ("png", "mask/heart", "mask/left_lung", "mask/right_lung"):
        (root / "set" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, heart in (("a.png", (30, 40, 70, 80)), ("b.png", (20, 40, 80, 80))):
        Image.fromarray(rng.integers(0, 255, (100, 100), dtype=np.uint8)).save(root / "set" / "png" / name)
        masks = {k: np.zeros((100, 100), np.uint8) for k in ("heart", "left_lung", "right_lung")}
        x0, y0, x1, y1 = heart
        masks["heart"][y0:y1, x0:x1] = 255
        masks["right_lung"][20:90, 10:45] = 255
        masks["left_lung"][20:90, 55:90] = 255
        for k, m in masks.items():
            Image.fromarray(m).save(root / "set" / "mask" / k / name)
    (root / "ctr_ground_truth.csv").write_text("id,ctr\na.png,0.52\n")
    return root


def test_evaluate_cli_on_a_constructed_case(tiny_cxr, tmp_path, capsys):
    # constant prediction: heart (0.3,0.4,0.7,0.8), thorax (0.1,0.2,0.9,0.9) -> CTR 0.5
    model = M.constant_box_model(tmp_path / "const.onnx", (0.3, 0.4, 0.7, 0.8, 0.1, 0.2, 0.9, 0.9))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--data", str(tiny_cxr), "--model", str(model), "--json", str(out)]) == 0
    text = capsys.readouterr().out
    m = json.loads(out.read_text())["metrics"]
    # a.png: true heart (0.3,0.4,0.7,0.8) exact; b.png: true (0.2,0.4,0.8,0.8), pred inside it: IoU 0.4/0.6
    assert m["n"] == 2
    assert m["heart_iou_mean"] == pytest.approx((1 + 0.16 / 0.24) / 2)
    assert m["heart_mae_px224"] == pytest.approx((0 + (0.1 + 0.1) / 4 * 224) / 2)
    # true thorax (0.1,0.2,0.9,0.9) for both: exact
    assert m["thorax_iou_mean"] == pytest.approx(1.0)
    # true CTR 0.5 and 0.75 -> errors 0 and 0.25
    assert m["ctr_mae"] == pytest.approx(0.125)
    assert m["expert_n"] == 1 and m["expert_ctr_mae"] == pytest.approx(0.02)
    assert "heart IoU mean / median" in text and "CTR MAE vs expert" in text


def test_evaluate_split_restricts_to_validation_images(tiny_cxr, tmp_path, capsys):
    model = M.constant_box_model(tmp_path / "const.onnx", (0.3, 0.4, 0.7, 0.8, 0.1, 0.2, 0.9, 0.9))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": ["set/b.png"], "val": ["set/a.png"]}))
    out = tmp_path / "m.json"
    assert main(["evaluate", "--data", str(tiny_cxr), "--model", str(model), "--split", str(split),
                 "--json", str(out)]) == 0
    m = json.loads(out.read_text())["metrics"]
    assert m["n"] == 1 and m["heart_iou_mean"] == pytest.approx(1.0)


def test_evaluate_with_a_box_csv_over_dicoms(tmp_path, capsys):
    from dicom_factory import write_dicom

    folder = tmp_path / "dicoms"
    folder.mkdir()
    write_dicom(folder / "x.dcm", np.random.default_rng(1).integers(0, 255, (200, 100), dtype=np.uint8))
    # pixels: heart (30, 80)-(70, 160) on a 100-wide, 200-tall image = normalized (0.3,0.4,0.7,0.8)
    (tmp_path / "boxes.csv").write_text("path,heart_x0,heart_y0,heart_x1,heart_y1\nx.dcm,30,80,70,160\n")
    model = M.constant_box_model(tmp_path / "const.onnx", (0.3, 0.4, 0.7, 0.8, 0.1, 0.2, 0.9, 0.9))
    assert main(["evaluate", "--data", str(folder), "--labels", str(tmp_path / "boxes.csv"),
                 "--model", str(model)]) == 0
    assert "heart IoU mean / median     1.000 / 1.000" in capsys.readouterr().out


# --- errors: exit status and message on stderr, never an internal error ------------------------

@pytest.mark.parametrize("content, says", bad_splits("set/a.png"))
def test_evaluate_refuses_a_bad_split_file(tiny_cxr, tmp_path, capsys, content, says):
    model = M.constant_box_model(tmp_path / "const.onnx")
    split = write_split(tmp_path / "split.json", content)
    out = tmp_path / "m.json"
    code = main(["evaluate", "--data", str(tiny_cxr), "--model", str(model), "--split", str(split),
                 "--json", str(out)])
    captured = assert_refused(code, capsys, split, says)
    assert captured.out == "" and not out.exists()


def test_evaluate_errors_go_to_stderr(tiny_cxr, tmp_path, capsys):
    model = M.constant_box_model(tmp_path / "const.onnx")
    assert main(["evaluate", "--data", str(tmp_path / "absent"), "--model", str(model)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "cannot read labels" in captured.err

    empty = tmp_path / "empty.json"
    empty.write_text('{"train": ["set/a.png", "set/b.png"], "val": []}')
    assert main(["evaluate", "--data", str(tiny_cxr), "--model", str(model), "--split", str(empty)]) == 4
    captured = capsys.readouterr()
    assert captured.out == "" and "no labeled images" in captured.err and str(empty) in captured.err

    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    code = main(["evaluate", "--data", str(tiny_cxr), "--model", str(broken)])
    captured = capsys.readouterr()
    assert code == 3 and captured.out == "" and "model refused" in captured.err, captured
