"""The optional `masks` output (issue: measuring from masks): boxes from masks (exact on area-sampled
masks, the same as the trainer's function), the contract's refusals, rows measured from the masks,
the mask review reasons, `run --dicom-out` writing a DICOM Segmentation per ok row that highdicom,
dcmtk and Orthanc read and the SR references, and each ok row's masks kept, packed, in the report's
ledger (for the outlines of the HTML report and the review page)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from onnx import TensorProto

import highdicom as hd

import onnx_models as om
from heartbatch import cli
from heartbatch import results as dr
from heartbatch.confidence import Policy, Prediction, review_reasons
from heartbatch.errors import ContractError
from heartbatch.masks import boxes_from_masks, mask_problems, outline, pieces, solid_on_grid
from heartbatch.model import BoxModel
from heartbatch.workers import measure_one
from helpers import check_report, quiet_json, write_chests

SUPER = 16  # supersampling of the synthetic masks: edges on multiples of 1/16 cell are exact


def rect_masks(boxes: list[tuple[float, float, float, float]], h: int, w: int) -> np.ndarray:
    """Area-sampled ``[len(boxes), h, w]`` rectangles, ``(x0, y0, x1, y1)`` in cells."""
    out = []
    for x0, y0, x1, y1 in boxes:
        xs = (np.arange(w * SUPER) + 0.5) / SUPER
        ys = (np.arange(h * SUPER) + 0.5) / SUPER
        inside = ((ys[:, None] > y0) & (ys[:, None] < y1)) & ((xs[None] > x0) & (xs[None] < x1))
        out.append(inside.reshape(h, SUPER, w, SUPER).mean(axis=(1, 3)))
    return np.stack(out)


# --- boxes from masks -----------------------------------------------------------------------------

@pytest.mark.parametrize("peak", [1.0, 0.97])
def test_boxes_from_area_sampled_masks_are_exact(peak):
    h, w = 48, 64
    heart = (20.3125, 18.5, 41.75, 33.0625)
    right, left = (6.125, 5.25, 30.0, 40.9375), (34.5, 7.0, 57.8125, 42.4375)
    masks = rect_masks([heart, right, left], h, w)[None] * peak
    boxes = boxes_from_masks(masks)[0]
    scale = np.array([w, h, w, h] * 2)
    expected = np.array([*heart, right[0], min(right[1], left[1]), left[2], max(right[3], left[3])]) / scale
    np.testing.assert_allclose(boxes, expected, atol=1e-9)


def test_a_faint_speck_away_from_the_organ_does_not_move_the_edge():
    h, w = 56, 56
    masks = rect_masks([(20.5, 20.25, 35.0, 40.0), (5.5, 5.0, 25.0, 50.0), (30.0, 5.0, 50.25, 50.0)], h, w)
    clean = boxes_from_masks(masks[None])[0]
    noisy = masks.copy()
    noisy[0, 45, 2] = 0.3   # a faint speck far left of the heart and below it
    noisy[:, :, :] += 0.01  # haze everywhere
    # the haze counts only in the few cells of the edge ramp (0.01 x 4 cells), the speck not at all
    np.testing.assert_allclose(boxes_from_masks(np.clip(noisy, 0, 1)[None])[0], clean, atol=0.05 / w)


def test_a_missing_structure_gives_nan():
    masks = np.zeros((1, 3, 32, 32), np.float32)
    masks[0, 1:, 4:28, 4:28] = 1.0
    boxes = boxes_from_masks(masks)[0]
    assert np.isnan(boxes[:4]).all() and np.isfinite(boxes[4:]).all()


def test_the_trainer_takes_its_targets_from_this_function():
    """One implementation: the boxes training learns (moved soft masks, bilinearly warped) are
    :func:`boxes_from_masks` of those masks, and on them it finds the warped ellipses' extents."""
    torch = pytest.importorskip("torch")
    from exporter.augment import AugmentConfig, augment_batch

    masks = np.stack([om.ellipse_masks(64, heart=(0.55 + 0.02 * i, 0.6, 0.15, 0.11)) for i in range(6)])
    images = torch.zeros(len(masks), 1, 64, 64)
    cfg = AugmentConfig(noise=0.0)
    _, moved, boxes = augment_batch(images, torch.from_numpy(masks), cfg, torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(boxes.numpy(), boxes_from_masks(moved.numpy()).astype(np.float32))
    # each box holds its warped mask's half-coverage region, to within the blur of one cell
    for box, warped in zip(boxes.numpy(), moved.numpy()):
        ys, xs = np.nonzero(warped[0] >= 0.5)
        inner = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / 64
        assert np.all(np.abs(box[:4] - inner) <= 1.5 / 64)


# --- regions and review reasons -----------------------------------------------------------------

def test_pieces_are_8_connected_runs():
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = True
    mask[4, 4] = True          # diagonal neighbour: same piece
    mask[7:9, 6:9] = True
    assert pieces(mask) == [10, 6]


def test_plausible_masks_raise_no_problem_and_broken_ones_say_why():
    good = om.ellipse_masks(56)
    assert mask_problems(good) == []
    split = good.copy()
    split[1, 26:30, :] = 0.0                         # the right lung cut in two
    assert "right lung in 2 pieces" in mask_problems(split)
    moved = good.copy()
    moved[0] = om.ellipse_masks(56, heart=(0.5, 0.93, 0.05, 0.04))[0]  # the heart below the lungs, tiny
    problems = mask_problems(moved)
    assert "heart centre outside the span of the lungs" in problems
    assert any(p.startswith("heart area") for p in problems)
    swapped = good[[0, 2, 1]]
    assert any("mirrored film or swapped lungs" in p for p in mask_problems(swapped))
    # through the review rules, as a row gets them
    boxes = boxes_from_masks(split[None])[0]
    reasons = review_reasons(Prediction(boxes, masks=split), Policy(), None)
    assert "right lung in 2 pieces" in reasons
    assert review_reasons(Prediction(boxes_from_masks(good[None])[0], masks=good), Policy(), None) == []


def test_outline_is_the_boundary():
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    edge = outline(mask)
    assert edge.sum() == 12 and not edge[3:5, 3:5].any()


# --- contract -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, message", [
    ("two_channels", "[N, 3, H, W]"),
    ("too_fine", "at most the input's 224 x 224"),
    ("double", "float32"),
    ("heart_only", "must be [N, 8]"),
])
def test_a_wrong_masks_output_is_refused_at_load(tmp_path, kind, message):
    masks, boxes, dtype = om.ellipse_masks(56), om.DEFAULT_BOXES, TensorProto.FLOAT
    if kind == "two_channels":
        masks = masks[:2]
    elif kind == "too_fine":
        masks = np.zeros((3, 256, 256), np.float32)
    elif kind == "double":
        dtype = TensorProto.DOUBLE
    else:
        boxes = om.DEFAULT_BOXES[:4]
    path = om.masks_model(tmp_path / "m.onnx", masks, boxes, masks_type=dtype)
    with pytest.raises(ContractError) as err:
        BoxModel(path, threads=1)
    assert message in str(err.value) and "'masks'" in str(err.value)


def test_a_row_is_measured_from_the_masks(tmp_path, siim_dicom):
    masks = om.ellipse_masks(56)
    model = BoxModel(om.masks_model(tmp_path / "m.onnx", masks), threads=1)
    assert model.info.has_masks
    record, _ = measure_one(str(siim_dicom), model, Policy())
    assert record.ok and not record.review, record.review_reason
    expected = boxes_from_masks(masks[None])[0] * np.array([record.header.columns, record.header.rows] * 4)
    np.testing.assert_allclose(record.heart + record.thorax, expected)   # not the `boxes` output's
    assert record.masks.shape == (3, 56, 56)
    assert record.ctr == pytest.approx((expected[2] - expected[0]) / (expected[6] - expected[4]))


def test_no_heart_in_the_masks_is_an_error_row(tmp_path, siim_dicom):
    masks = om.ellipse_masks(56)
    masks[0] = 0.0
    model = BoxModel(om.masks_model(tmp_path / "m.onnx", masks), threads=1)
    record, _ = measure_one(str(siim_dicom), model, Policy())
    assert record.status == "error" and record.reason == "the model's masks show no heart on this image"


# --- DICOM Segmentation ---------------------------------------------------------------------------

def run(capsys, *args) -> tuple[int, dict]:
    capsys.readouterr()
    code = cli.main(["run", *map(str, args), "--workers", "0", "--threads", "1", "--quiet"])
    return code, quiet_json(capsys.readouterr().out)


def seg_path(out_dir: Path, row: dict) -> Path:
    return out_dir / f"{dr.result_uid(row['sop_instance_uid'], row['model_id'], 'seg')}.seg.dcm"


def check_segmentation(path: Path, row: dict, masks: np.ndarray) -> None:
    """Three segments with their SNOMED CT codes, on the source image's grid, referencing it, each
    the model's mask resampled to the film."""
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    codes = [(d.segment_label, d.segmented_property_category.value, d.segmented_property_type.value,
              d.segmented_property_type.scheme_designator) for d in seg.SegmentSequence]
    assert codes == [("Heart", "91723000", "80891009", "SCT"), ("Right lung", "91723000", "3341006", "SCT"),
                     ("Left lung", "91723000", "44029006", "SCT")]
    source = pydicom.dcmread(row["path"], stop_before_pixels=True)
    assert [uids[2] for uids in seg.get_source_image_uids()] == [row["sop_instance_uid"]]
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
    pixels = seg.get_pixels_by_source_instance([row["sop_instance_uid"]], segment_numbers=[1, 2, 3])[0]
    expected = np.moveaxis(solid_on_grid(masks, source.Rows, source.Columns), 0, -1)
    assert np.array_equal(pixels.astype(bool), expected)
    assert "SegmentationStorage" in pytest.importorskip("pacs").dcmdump(path)


def test_run_dicom_out_writes_a_segmentation_per_ok_row_that_the_sr_references(tmp_path, capsys, siim_dicom,
                                                                               chest_pngs):
    from pacs import dsrdump, skip_or_fail_without

    masks = om.ellipse_masks(56)
    model = om.masks_model(tmp_path / "masks.onnx", masks)
    folder = tmp_path / "studies"
    write_chests(folder, chest_pngs, 2)
    (folder / "siim.dcm").write_bytes(siim_dicom.read_bytes())
    (folder / "notes.txt").write_text("not a DICOM\n")
    results, out = tmp_path / "results", tmp_path / "report.csv"
    code, info = run(capsys, folder, "--out", out, "--model", model, "--dicom-out", results)
    assert code == 0
    rows = check_report(out)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 3 and info["dicom_results"] == 3 * len(ok)
    for row in ok:
        path = seg_path(results, row)
        check_segmentation(path, row, masks)
        sr_file = results / f"{dr.result_uid(row['sop_instance_uid'], row['model_id'], 'sr')}.sr.dcm"
        sr = hd.sr.srread(sr_file)
        referenced = {g.tracking_identifier: g for g in sr.content.get_planar_roi_measurement_groups()}
        assert {"heart mask", "right lung mask", "left lung mask"} <= set(referenced)
        evidence = {s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence}
        assert evidence == {row["sop_instance_uid"], pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID}
        if skip_or_fail_without("dsrdump"):
            text = dsrdump(sr_file)
            assert "Referenced Segmentation Frame" in text
    written = sorted(p.name for p in results.iterdir())
    assert len(written) == 3 * len(ok)

    # a re-run that measures again (another threshold) replaces, never adds
    code, info = run(capsys, folder, "--out", out, "--model", model, "--dicom-out", results, "--ctr-threshold", "0.6")
    assert code == 0 and info["dicom_results"] == 3 * len(ok)
    assert sorted(p.name for p in results.iterdir()) == written

    # another model (a new model id): its results replace these, the obsolete files removed
    other = om.masks_model(tmp_path / "masks2.onnx", masks, boxes=(0.3, 0.4, 0.7, 0.8, 0.1, 0.2, 0.9, 0.95))
    code, info = run(capsys, folder, "--out", out, "--model", other, "--dicom-out", results)
    assert code == 0
    rows = check_report(out)
    assert sorted(p.name for p in results.iterdir()) == sorted(
        n for r in rows if r["status"] == "ok"
        for n in (seg_path(results, r).name,
                  f"{dr.result_uid(r['sop_instance_uid'], r['model_id'], 'sr')}.sr.dcm",
                  f"{dr.result_uid(r['sop_instance_uid'], r['model_id'], 'pr')}.pr.dcm"))


def test_a_model_without_masks_writes_no_segmentation(tmp_path, capsys, siim_dicom):
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "siim.dcm").write_bytes(siim_dicom.read_bytes())
    model = om.constant_box_model(tmp_path / "boxes.onnx")
    code, info = run(capsys, folder, "--out", tmp_path / "r.csv", "--model", model, "--dicom-out", tmp_path / "res")
    assert code == 0 and info["dicom_results"] == 2
    assert not list((tmp_path / "res").glob("*.seg.dcm"))


def test_orthanc_accepts_the_segmentation_and_the_sr(tmp_path, capsys, siim_dicom):
    from pacs import Orthanc, skip_or_fail_without

    skip_or_fail_without("Orthanc")
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "siim.dcm").write_bytes(siim_dicom.read_bytes())
    model = om.masks_model(tmp_path / "masks.onnx")
    results = tmp_path / "results"
    code, _ = run(capsys, folder, "--out", tmp_path / "r.csv", "--model", model, "--dicom-out", results)
    assert code == 0
    with Orthanc(tmp_path / "orthanc", graceful_stop=False) as server:
        for path in sorted(results.iterdir()):
            server.upload(path)
        row = check_report(tmp_path / "r.csv")[0]
        seg_uid = dr.result_uid(row["sop_instance_uid"], row["model_id"], "seg")
        tags = server.tags(seg_uid)
        assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.66.4"
        assert server.count() == 3


# --- outlines -------------------------------------------------------------------------------------

def test_show_draws_the_mask_outlines_where_the_masks_are(tmp_path, capsys, siim_dicom):
    """`heartbatch show` with a masks model: the outline colours sit on the masks' boundaries, mapped
    to the display like the boxes; without masks (same record otherwise) those pixels are not drawn."""
    from PIL import Image

    from heartbatch.dicom import read_dicom
    from heartbatch.overlay import OUTLINES, Marks, draw_marks, to_rgb
    from heartbatch.pixels import display

    masks = om.ellipse_masks(56)
    model = om.masks_model(tmp_path / "m.onnx", masks)
    png = tmp_path / "show.png"
    assert cli.main(["show", str(siim_dicom), "--out", str(png), "--model", str(model), "--size", "512",
                     "--threads", "1"]) == 0
    drawn = np.asarray(Image.open(png).convert("RGB"))
    h, w = drawn.shape[:2]
    for channel, colour in enumerate(OUTLINES):
        edge = outline(solid_on_grid(masks, h, w)[channel])
        on_edge = (drawn[edge] == np.array(colour)).all(axis=1).mean()
        assert on_edge > 0.6, f"channel {channel}: {on_edge:.2f} of its outline drawn"
    # the same marks without masks: the outline pixels are the plain overlay's
    dicom = read_dicom(siim_dicom)
    record, _ = measure_one(str(siim_dicom), BoxModel(model, threads=1), Policy())
    plain = to_rgb(display(dicom.image, 512))
    draw_marks(plain, *dicom.image.shape, Marks.from_record(record).__class__(
        **{**Marks.from_record(record).__dict__, "masks": None}))
    plain = np.asarray(plain)
    edge = outline(solid_on_grid(masks, h, w)[1])
    assert (plain[edge] != drawn[edge]).any(axis=1).mean() > 0.5
    assert not any((plain == np.array(c)).all(axis=2).any() for c in OUTLINES)


# --- masks kept with the row (ledger) -------------------------------------------------------------

def test_encoded_masks_round_trip_within_one_step_and_stay_small():
    from heartbatch.masks import decode_masks, encode_masks

    rng = np.random.default_rng(5)
    for masks in (om.ellipse_masks(56), rng.random((3, 40, 30)).astype(np.float32)):
        back = decode_masks(encode_masks(masks))
        assert back.dtype == np.float32 and back.shape == masks.shape
        assert np.abs(back - masks).max() <= 1 / 255
    assert len(encode_masks(om.ellipse_masks(56))) < 2048, "a 56 x 56 model grid in under 2 KB"
    # a grid finer than the one kept is averaged down over the same film: the same boxes, to a fraction of a cell
    fine = om.ellipse_masks(224)
    kept = decode_masks(encode_masks(fine))
    assert kept.shape == (3, 128, 128) and len(encode_masks(fine)) < 4096
    np.testing.assert_allclose(boxes_from_masks(kept[None]), boxes_from_masks(fine[None]), atol=0.25 / 128)
    for damaged in (b"", b"HBM1", encode_masks(fine)[:40], b"XXXX" + encode_masks(fine)[4:]):
        with pytest.raises(ValueError, match="stored masks are damaged|not masks stored by heartbatch"):
            decode_masks(damaged)


def ledger_masks(report: Path) -> dict[str, bytes | None]:
    """File name -> the packed masks its ledger row keeps (None: none), read with plain sqlite3."""
    import sqlite3

    from heartbatch.report.paths import ReportFiles

    db = sqlite3.connect(ReportFiles.of(report).state_dir / "ledger.sqlite")
    try:
        return {Path(path).name: masks for path, masks in db.execute("SELECT path, masks FROM files")}
    finally:
        db.close()


def test_a_run_keeps_the_masks_of_ok_rows_and_a_re_measure_replaces_them(tmp_path, capsys, siim_dicom, chest_pngs):
    """ok rows keep their masks in the ledger, skipped and error rows none; an unchanged file keeps
    them, a file measured again gets the new model's (none, from a model without masks)."""
    from heartbatch.masks import decode_masks

    masks = om.ellipse_masks(56)
    folder = tmp_path / "studies"
    write_chests(folder, chest_pngs, 2)
    (folder / "siim.dcm").write_bytes(siim_dicom.read_bytes())
    (folder / "broken.dcm").write_bytes(siim_dicom.read_bytes()[:3000])   # truncated: an error row
    (folder / "notes.txt").write_text("not a DICOM\n")                     # skipped
    out = tmp_path / "report.csv"
    code, _ = run(capsys, folder, "--out", out, "--model", om.masks_model(tmp_path / "a.onnx", masks))
    assert code == 0
    status = {Path(r["path"]).name: r["status"] for r in check_report(out)}
    assert sorted(status.values()) == ["error", "ok", "ok", "ok", "skipped"]
    kept = ledger_masks(out)
    for name, packed in kept.items():
        if status[name] == "ok":
            assert np.abs(decode_masks(packed) - masks).max() <= 1 / 255, name
        else:
            assert packed is None, f"a {status[name]} row keeps no masks"

    code, info = run(capsys, folder, "--out", out, "--model", tmp_path / "a.onnx")
    assert code == 0 and info["processed"] == 0 and ledger_masks(out) == kept, "unchanged files keep theirs"

    moved = om.ellipse_masks(56, heart=(0.52, 0.6, 0.15, 0.11))
    code, _ = run(capsys, folder, "--out", out, "--model", om.masks_model(tmp_path / "b.onnx", moved))
    assert code == 0
    for name, packed in ledger_masks(out).items():
        if status[name] == "ok":
            assert np.abs(decode_masks(packed) - moved).max() <= 1 / 255, "measured again: the new masks"

    code, _ = run(capsys, folder, "--out", out, "--model", om.constant_box_model(tmp_path / "boxes.onnx"))
    assert code == 0
    assert set(ledger_masks(out).values()) == {None}, "a model without masks leaves none behind"


def test_a_ledger_of_the_previous_version_opens_and_gains_the_masks(tmp_path, capsys, siim_dicom):
    """A ledger written before masks were kept (no `masks` column): the HTML report reads it (no
    outlines), a run opens it, adds the column, and measures nothing again."""
    import sqlite3

    from heartbatch.report.ledger import read_masks
    from heartbatch.report.paths import ReportFiles

    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "siim.dcm").write_bytes(siim_dicom.read_bytes())
    out = tmp_path / "report.csv"
    model = om.masks_model(tmp_path / "m.onnx")
    assert run(capsys, folder, "--out", out, "--model", model)[0] == 0
    state = ReportFiles.of(out).state_dir
    db = sqlite3.connect(state / "ledger.sqlite")
    db.execute("ALTER TABLE files DROP COLUMN masks")   # as the previous version wrote it
    db.commit()
    db.close()
    before = out.read_bytes()
    assert read_masks(state, [r["path"] for r in check_report(out)]) == {}
    code, info = run(capsys, folder, "--out", out, "--model", model)
    assert code == 0 and info["processed"] == 0 and out.read_bytes() == before
    assert ledger_masks(out) == {"siim.dcm": None}, "the column is there; an unchanged row has none until measured"


def test_the_dask_task_returns_the_masks_packed(tmp_path, siim_dicom, chest_pngs):
    """`run --scheduler`'s task (called directly, as a Dask worker runs it) sends the masks packed,
    never the arrays, so the client's session stores them as a local run does."""
    from heartbatch.distributed import process_chunk
    from heartbatch.masks import decode_masks
    from heartbatch.model import ModelRef
    from heartbatch.pipeline import RunOptions

    masks = om.ellipse_masks(56)
    model = BoxModel(om.masks_model(tmp_path / "m.onnx", masks), threads=1)
    folder = tmp_path / "studies"
    paths = write_chests(folder, chest_pngs, 1) + [folder / "notes.txt"]
    paths[-1].write_text("not a DICOM\n")
    records = process_chunk([(str(p), str(p)) for p in paths], ModelRef.of(model), RunOptions(threads=1))
    ok, skipped = records if records[0].ok else records[::-1]
    assert ok.ok and ok.masks is None and np.abs(decode_masks(ok.packed_masks) - masks).max() <= 1 / 255
    assert skipped.status == "skipped" and skipped.packed_masks is None


def test_the_probe_compares_masks_by_the_boxes_they_give():
    """Fast int8 kernels round an edge cell's probability a few hundredths away from the exact
    arithmetic (harmless: the boxes move by thousandths of a cell); saturation moves whole edges."""
    from heartbatch.arithmetic import Probe, compare_outputs

    exact = om.ellipse_masks(56)[None].astype(np.float32)
    probe = Probe(np.zeros((1, 224, 224), np.uint8), {"masks": exact}, {})
    edges = (exact > 0.02) & (exact < 0.98)
    rounded = np.where(edges, np.clip(exact + 0.045, 0, 1), exact).astype(np.float32)
    near = compare_outputs({"masks": rounded}, probe, "fused")
    assert near.passed and near.output == "masks (their boxes)" and near.difference < 0.004
    shifted = np.roll(exact, 2, axis=3)  # every edge two cells to the right
    far = compare_outputs({"masks": shifted}, probe, "fused")
    assert not far.passed and abs(far.difference - 2 / 56) < 1e-6
    gone = exact.copy()
    gone[:, 0] = 0.0  # the heart lost
    assert compare_outputs({"masks": gone}, probe, "fused").difference == float("inf")
