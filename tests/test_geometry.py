"""Boxes from the model's normalized frame back to the original pixel grid, and CTR.

Constant-output models make the expected report exact: a normalized box ``u``
must be ``u * columns`` (x) and ``u * rows`` (y) pixels in every row, for any
image shape and any model input size.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import onnx_models as M
from dicom_factory import write_dicom
from heartbatch import cli
from heartbatch.geometry import box_from_mask, box_iou, ctr, to_pixels, width

#: Asymmetric in x and y, heart and thorax differ: a swapped axis shows.
BOX = (0.31, 0.17, 0.62, 0.83, 0.05, 0.11, 0.97, 0.93)
SHAPES = [(1024, 1024), (700, 1100), (1100, 700), (333, 517)]
SPACING = (0.2, 0.15)  # (row, column) mm: different, so using the wrong one shows
TOL_PX = 0.05


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> dict[str, dict]:
    """One DICOM per shape with spacing, plus one without: file name -> facts."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    facts = {}
    for rows, cols in SHAPES + [(700, 1100)]:
        spaced = f"{rows}x{cols}.dcm" not in facts
        name = f"{rows}x{cols}{'' if spaced else '_nospacing'}.dcm"
        pixels = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16)
        write_dicom(root / name, pixels, bits_stored=12, pixel_spacing=SPACING if spaced else None)
        facts[name] = {"rows": rows, "columns": cols, "spacing": SPACING if spaced else None}
    return {"root": root, "files": facts}


@pytest.fixture(scope="module")
def box_models(tmp_path_factory) -> dict[int, object]:
    folder = tmp_path_factory.mktemp("geometry_models")
    return {size: M.constant_box_model(folder / f"box_{size}.onnx", BOX, size=size) for size in (224, 256, 320)}


def _run(inputs, out, model, *extra) -> int:
    return cli.main(["run", str(inputs), "--out", str(out), "--model", str(model), "--workers", "0",
                     "--threads", "1", "--quiet", *extra])


@pytest.fixture(scope="module", params=[224, 256, 320], ids=lambda s: f"S{s}")
def report(request, shapes_dir, box_models, tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp(f"geom{request.param}") / "report.csv"
    assert _run(shapes_dir["root"], out, box_models[request.param]) == 0
    frame = pd.read_csv(out, dtype=str, keep_default_na=False)
    frame["name"] = frame["path"].map(lambda p: p.rsplit("/", 1)[-1])
    return frame.set_index("name")


def test_every_shape_is_measured(report, shapes_dir):
    assert sorted(report.index) == sorted(shapes_dir["files"])
    assert (report["status"] == "ok").all(), report[["status", "reason"]]


@pytest.mark.parametrize("part, offset", [("heart", 0), ("thorax", 4)])
def test_boxes_are_normalized_box_times_columns_and_rows(report, shapes_dir, part, offset):
    """x scales with columns, y with rows: exactly, for square, wide, tall and odd shapes."""
    for name, facts in shapes_dir["files"].items():
        row = report.loc[name]
        assert (int(row["rows"]), int(row["columns"])) == (facts["rows"], facts["columns"])
        x0, y0, x1, y1 = BOX[offset: offset + 4]
        expected = {f"{part}_x0": x0 * facts["columns"], f"{part}_y0": y0 * facts["rows"],
                    f"{part}_x1": x1 * facts["columns"], f"{part}_y1": y1 * facts["rows"]}
        for column, value in expected.items():
            assert float(row[column]) == pytest.approx(value, abs=TOL_PX), (name, column)


def test_ctr_is_heart_width_over_thorax_width(report):
    expected = (BOX[2] - BOX[0]) / (BOX[6] - BOX[4])
    for name, row in report.iterrows():
        from_boxes = ((float(row["heart_x1"]) - float(row["heart_x0"]))
                      / (float(row["thorax_x1"]) - float(row["thorax_x0"])))
        assert float(row["ctr"]) == pytest.approx(expected, abs=1e-4), name
        assert float(row["ctr"]) == pytest.approx(from_boxes, abs=1e-4), name


def test_widths_in_mm_use_the_column_spacing(report, shapes_dir):
    """Width is along x, so it is columns x column spacing (PixelSpacing's second value)."""
    for name, facts in shapes_dir["files"].items():
        row = report.loc[name]
        if facts["spacing"] is None:
            assert row["pixel_spacing_mm"] == ""
            assert row["heart_width_mm"] == "" and row["thoracic_width_mm"] == ""
            continue
        col_spacing = facts["spacing"][1]
        assert float(row["pixel_spacing_mm"]) == pytest.approx(col_spacing)
        heart_px = (BOX[2] - BOX[0]) * facts["columns"]
        thorax_px = (BOX[6] - BOX[4]) * facts["columns"]
        assert float(row["heart_width_mm"]) == pytest.approx(heart_px * col_spacing, abs=0.01), name
        assert float(row["thoracic_width_mm"]) == pytest.approx(thorax_px * col_spacing, abs=0.01), name


def test_boxes_do_not_depend_on_model_input_size(report):
    """Box values are the same whichever S the model uses (each S gives this same table)."""
    expected_x0 = {name: BOX[0] * int(row["columns"]) for name, row in report.iterrows()}
    for name, row in report.iterrows():
        assert float(row["heart_x0"]) == pytest.approx(expected_x0[name], abs=TOL_PX)


# --- heartbatch.geometry units ------------------------------------------------

def test_box_from_mask_has_exclusive_edges():
    """Columns 10..19 and rows 5..7 -> x0=10, x1=20, y0=5, y1=8: width 10, height 3."""
    mask = np.zeros((30, 40), bool)
    mask[5:8, 10:20] = True
    box = box_from_mask(mask)
    assert box == (10.0, 5.0, 20.0, 8.0)
    assert width(box) == 10.0


def test_box_from_mask_single_pixel_and_full_mask():
    mask = np.zeros((7, 9), bool)
    mask[3, 4] = True
    assert box_from_mask(mask) == (4.0, 3.0, 5.0, 4.0)
    assert box_from_mask(np.ones((7, 9), bool)) == (0.0, 0.0, 9.0, 7.0)


def test_box_from_mask_irregular_shape():
    mask = np.zeros((50, 60), bool)
    mask[10, 30] = mask[40, 5] = mask[22, 55] = True
    assert box_from_mask(mask) == (5.0, 10.0, 56.0, 41.0)


def test_box_from_empty_mask_is_none():
    assert box_from_mask(np.zeros((10, 10), bool)) is None


def test_mask_box_round_trips_through_normalized_coordinates():
    """mask box -> normalized (/columns, /rows) -> to_pixels gives the same pixels."""
    mask = np.zeros((333, 517), bool)
    mask[41:290, 17:488] = True
    box = np.array(box_from_mask(mask))
    normalized = box / np.array([517, 333, 517, 333])
    np.testing.assert_allclose(to_pixels(normalized, 333, 517), box, atol=1e-9)


def test_to_pixels_scales_x_by_columns_and_y_by_rows():
    pixels = to_pixels(np.array([0.1, 0.2, 0.5, 1.0, 0.0, 0.0, 1.0, 1.0]), rows=700, columns=1100)
    np.testing.assert_allclose(pixels, [110, 140, 550, 700, 0, 0, 1100, 700])


def test_to_pixels_batched():
    normalized = np.array([[0.5, 0.5, 1.0, 1.0], [0.0, 0.25, 0.5, 0.75]])
    np.testing.assert_allclose(to_pixels(normalized, rows=400, columns=200),
                               [[100, 200, 200, 400], [0, 100, 100, 300]])


def test_ctr_hand_cases():
    assert ctr((30, 0, 80, 10), (0, 0, 100, 10)) == pytest.approx(0.5)
    assert ctr((0, 0, 45, 1), (10, 5, 110, 9)) == pytest.approx(0.45)
    assert math.isnan(ctr((0, 0, 10, 10), (5, 0, 5, 10)))     # zero-width thorax
    assert math.isnan(ctr((0, 0, 10, 10), (5, 0, 4, 10)))     # inverted thorax


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),          # identical
    ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),        # disjoint
    ((0, 0, 10, 10), (10, 0, 20, 10), 0.0),         # touching edges: exclusive, no overlap
    ((0, 0, 2, 2), (1, 0, 3, 2), 1 / 3),            # half overlap: 2 / (4 + 4 - 2)
    ((0, 0, 4, 4), (1, 1, 3, 3), 0.25),             # contained: 4 / 16
    ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175),     # corner overlap
    ((0, 0, 10, 2), (0, 0, 2, 10), 4 / 36),         # cross
    ((3, 3, 3, 3), (3, 3, 3, 3), 0.0),              # degenerate: no area, no NaN
])
def test_box_iou_hand_cases(a, b, expected):
    result = box_iou(np.array([a]), np.array([b]))
    assert result.shape == (1,)
    assert result[0] == pytest.approx(expected)
    assert box_iou(np.array([b]), np.array([a]))[0] == pytest.approx(expected)  # symmetric


def test_box_iou_is_row_by_row():
    a = np.array([(0, 0, 10, 10), (0, 0, 2, 2), (0, 0, 4, 4)], float)
    b = np.array([(0, 0, 10, 10), (1, 0, 3, 2), (10, 10, 12, 12)], float)
    np.testing.assert_allclose(box_iou(a, b), [1.0, 1 / 3, 0.0])
