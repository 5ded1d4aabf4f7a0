"""The content check and the review flag, end to end with the shipped model.

Every file here claims CR / PA / CHEST in its header, as archives often do
whatever the film is: the header checks accept them all, so only the pixels
can tell.  Negatives are built in the test from the fixture chest films (made
wrong) and from real non-chest images that pydicom and pydicom-data ship;
real chest films (the fixture films as DICOM, pydicom-data's chest CR in two
encodings, the SIIM DICOM) must be measured and not flagged.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

import onnx_models as M
from dicom_factory import shared_png, shared_png_paths, write_dicom
from heartbatch import cli
from heartbatch import contract as C
from heartbatch.confidence import (CONTENT_REASON, HIDDEN_BORDER_REASON, Policy, Prediction, box_problems,
                                   ctr_uncertainty, heart_border_contrast, review_reasons)
from heartbatch.model import BoxModel
from heartbatch.pixels import preprocess
from heartbatch.report.summary import read_report


def _stored(name: str) -> np.ndarray:
    """A package file's pixels as 16-bit MONOCHROME2 stored values (first frame, grey)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(get_testdata_file(name))
        pixels = np.asarray(ds.pixel_array, dtype=np.float64)
    if pixels.ndim == 3 and int(ds.get("SamplesPerPixel", 1)) > 1:
        pixels = pixels.mean(-1)
    while pixels.ndim > 2:
        pixels = pixels[len(pixels) // 2]
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels
    pixels = (pixels - pixels.min()) / max(np.ptp(pixels), 1e-9)
    return (pixels * 4095).astype(np.uint16)


def _write(path, pixels: np.ndarray, **kwargs) -> None:
    if pixels.dtype == np.uint16:
        kwargs.setdefault("bits_stored", 12)
    write_dicom(path, pixels, modality="CR", view_position="PA", body_part="CHEST", **kwargs)


#: not a frontal chest film: must be skipped (or at least flagged for review)
NON_CHEST_PACKAGE_FILES = {
    "extremity.dcm": "RG3_UNCI.dcm",         # a real extremity CR
    "ct.dcm": "693_UNCI.dcm",                # a CT slice treated as a radiograph
    "mr.dcm": "MR2_UNCI.dcm",
    "nm_whole_body.dcm": "JPEG2000_UNC.dcm",
    "us.dcm": "JPGLosslessP14SV1_1s_1f_8b.dcm",
    "abdomen_mr.dcm": "MR-SIEMENS-DICOM-WithOverlays.dcm",
}


@pytest.fixture(scope="module")
def archive(tmp_path_factory, data_dir):
    """(report rows by file name, expectations): one run of the shipped model over all cases."""
    root = tmp_path_factory.mktemp("archive")
    real = root / "real"
    for i, path in enumerate(shared_png_paths(data_dir)):
        _write(real / f"film{i:02d}.dcm", shared_png(data_dir, i))
    shutil.copyfile(data_dir / "dicom" / "siim-cxr-pa-jpeg-baseline.dcm", real / "siim.dcm")
    for name in ("RG1_UNCI.dcm", "RG1_J2KR.dcm"):
        shutil.copyfile(get_testdata_file(name), real / name)

    wrong = root / "wrong"
    film = shared_png(data_dir, 3)
    # a MONOCHROME1 tag over MONOCHROME2 pixels: displayed as a negative
    _write(wrong / "negative.dcm", film, photometric="MONOCHROME1")
    _write(wrong / "turned_90.dcm", np.ascontiguousarray(np.rot90(shared_png(data_dir, 4))))
    _write(wrong / "turned_270.dcm", np.ascontiguousarray(np.rot90(shared_png(data_dir, 10), 3)))
    _write(wrong / "upside_down.dcm", np.ascontiguousarray(shared_png(data_dir, 11)[::-1]))
    _write(wrong / "quarter.dcm", np.ascontiguousarray(shared_png(data_dir, 5)[:256, 256:]))
    rng = np.random.default_rng(0)
    _write(wrong / "noise.dcm", rng.integers(0, 255, (512, 512)).astype(np.uint8))
    _write(wrong / "flat.dcm", np.full((512, 512), 120, np.uint8) + rng.integers(0, 2, (512, 512)).astype(np.uint8))
    for out, name in NON_CHEST_PACKAGE_FILES.items():
        _write(wrong / out, _stored(name))
    shutil.copyfile(get_testdata_file("mlut_18.dcm"), wrong / "smpte_pattern.dcm")  # OT secondary capture

    mirrored = root / "mirrored"
    _write(mirrored / "mirrored.dcm", np.ascontiguousarray(shared_png(data_dir, 6)[:, ::-1]))

    out = root / "report.csv"
    assert cli.main(["run", str(root), "--out", str(out), "--quiet", "--workers", "0"]) == 0
    return {r["path"].replace(str(root) + "/", ""): r for r in read_report(out)}, out


def test_the_shipped_model_has_the_trust_outputs():
    info = BoxModel().info
    assert info.has_trust and "content" in info.optional
    policy = Policy.for_model(info.metadata)
    assert "mirrored" in policy.classes and 0 < policy.min_chest_score < policy.review_chest_score < 1
    assert 0 < policy.review_uncertainty < 0.1


def test_real_chest_films_are_measured_and_not_flagged(archive):
    rows, _ = archive
    real = {k: r for k, r in rows.items() if k.startswith("real/")}
    assert len(real) == 16 + 3
    for name, row in real.items():
        assert row["status"] == "ok", (name, row["reason"])
        assert float(row["chest_score"]) >= 0.8, name
        assert row["review"] == "false", (name, row["review_reason"])
        assert 0 < float(row["uncertainty"]) < 0.05, name


@pytest.mark.parametrize("name", ["negative.dcm", "turned_90.dcm", "turned_270.dcm", "upside_down.dcm",
                                  "quarter.dcm", "noise.dcm", "flat.dcm", "smpte_pattern.dcm",
                                  *NON_CHEST_PACKAGE_FILES])
def test_wrong_films_are_refused_or_flagged(archive, name):
    row = archive[0][f"wrong/{name}"]
    assert row["status"] == "skipped" or row["review"] == "true", (name, row)
    if row["status"] == "skipped":
        assert row["reason"].startswith(CONTENT_REASON) and row["ctr"] == ""
        assert float(row["chest_score"]) < 0.5


@pytest.mark.parametrize("name, words", [("negative.dcm", "negative"), ("turned_90.dcm", "turned"),
                                         ("turned_270.dcm", "turned"), ("upside_down.dcm", "upside down"),
                                         ("quarter.dcm", "cropped")])
def test_refusals_say_what_is_wrong(archive, name, words):
    row = archive[0][f"wrong/{name}"]
    assert row["status"] == "skipped" and words in row["reason"], row["reason"]


def test_a_mirrored_film_is_measured_and_flagged(archive):
    row = archive[0]["mirrored/mirrored.dcm"]
    assert row["status"] == "ok" and row["ctr"] != ""
    assert row["review"] == "true" and "mirrored" in row["review_reason"]


def test_summaries_count_flagged_rows_beside_the_statistics(archive):
    rows, out = archive
    summary = json.loads(out.with_name("report.summary.json").read_text())
    ok = [r for r in rows.values() if r["status"] == "ok"]
    flagged = [r for r in ok if r["review"] == "true"]
    assert flagged and summary["review"]["n"] == len(flagged)
    assert summary["ctr"]["n"] == len(ok) - len(flagged)


def test_no_content_check_measures_everything_and_still_flags(tmp_path, data_dir):
    _write(tmp_path / "in" / "turned.dcm", np.ascontiguousarray(np.rot90(shared_png(data_dir, 4))))
    out = tmp_path / "report.csv"
    assert cli.main(["run", str(tmp_path / "in"), "--out", str(out), "--quiet", "--workers", "0",
                     "--no-content-check"]) == 0
    row = read_report(out)[0]
    assert row["status"] == "ok" and float(row["chest_score"]) < 0.5 and row["review"] == "true"
    assert "unsure it is a frontal chest film" in row["review_reason"]


def test_min_chest_score_overrides_the_model_default(tmp_path, data_dir):
    _write(tmp_path / "in" / "film.dcm", shared_png(data_dir, 0))
    out = tmp_path / "report.csv"
    assert cli.main(["run", str(tmp_path / "in"), "--out", str(out), "--quiet", "--workers", "0",
                     "--min-chest-score", "1"]) == 0
    row = read_report(out)[0]
    assert row["status"] == "skipped" and row["reason"].startswith(CONTENT_REASON)


def test_a_model_without_the_outputs_still_runs(tmp_path, data_dir, box8_model, capsys):
    _write(tmp_path / "in" / "turned.dcm", np.ascontiguousarray(np.rot90(shared_png(data_dir, 4))))
    out = tmp_path / "report.csv"
    assert cli.main(["run", str(tmp_path / "in"), "--out", str(out), "--model", str(box8_model),
                     "--workers", "0", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("no content check or uncertainty outputs") == 1
    row = read_report(out)[0]
    assert row["status"] == "ok" and row["chest_score"] == "" and row["uncertainty"] == ""
    assert row["review"] in ("true", "false")


# --- the rules, by hand ----------------------------------------------------------------

TYPICAL = np.array([0.45, 0.45, 0.75, 0.8, 0.1, 0.15, 0.9, 0.9])  # CTR 0.375, heart right of midline


def test_box_rules():
    assert box_problems(TYPICAL) == []
    collapsed = np.array([0.4, 0.4, 0.55, 0.6, 0.3, 0.3, 0.7, 0.7])
    assert any("collapsed" in p for p in box_problems(collapsed))
    left = TYPICAL.copy()
    left[[0, 2]] = 1 - TYPICAL[[2, 0]]  # the heart box mirrored about the film's middle
    assert any("image left" in p for p in box_problems(left))
    outside = TYPICAL.copy()
    outside[2] = 0.97
    assert any("outside the thorax" in p for p in box_problems(outside))
    tall = TYPICAL.copy()
    assert box_problems(tall, aspect=1.0) == [] and any("shape" in p for p in box_problems(tall, aspect=2.2))
    assert box_problems(TYPICAL[:4]) == []  # heart-only models: no thorax to judge against


def test_ctr_uncertainty_is_first_order_error_propagation():
    sd = np.array([0.01, 0, 0.02, 0, 0.005, 0, 0.005, 0])
    width = 0.8
    ratio = 0.3 / width
    expected = np.sqrt(0.01 ** 2 + 0.02 ** 2 + ratio ** 2 * 2 * 0.005 ** 2) / width
    assert ctr_uncertainty(TYPICAL, sd) == pytest.approx(expected)
    assert ctr_uncertainty(TYPICAL[:4], sd[:4]) is None


def test_review_reasons_from_the_outputs():
    from heartbatch.confidence import refusal

    classes = ("chest", "mirrored", "negative", "turned", "upside_down", "cropped", "other")
    policy = Policy(classes=classes, min_chest_score=0.5, review_chest_score=0.8, review_uncertainty=0.02)
    content = np.array([0.05, 0.0, 0.9, 0.05, 0, 0, 0])
    assert "negative" in refusal(Prediction(TYPICAL, 0.05, None, content), policy)
    assert refusal(Prediction(TYPICAL, 0.05, None, content), Policy(content_check=False)) is None
    assert refusal(Prediction(TYPICAL, None), policy) is None  # a model without a score: never refused
    sure = Prediction(TYPICAL, 0.99, np.full(8, 0.001), np.array([0.99, 0.01, 0, 0, 0, 0, 0]))
    assert review_reasons(sure, policy, 0.01) == []
    unsure = Prediction(TYPICAL, 0.6, None, np.array([0.3, 0.7, 0, 0, 0, 0, 0]))
    assert review_reasons(unsure, policy, 0.05) == ["unsure it is a frontal chest film", "mirrored film or dextrocardia?",
                                                  "uncertain heart or thorax borders"]
    # measured, though the classifier leans to a wrong kind: the reason says which, for the reader to check
    cropped = Prediction(TYPICAL, 0.45, None, np.array([0.45, 0.0, 0, 0, 0, 0.55, 0]))
    assert refusal(cropped, Policy(classes=classes, min_chest_score=0.25)) is None
    assert review_reasons(cropped, policy, 0.01) == ["unsure it is a frontal chest film: only part of a chest film "
                                                     "(cropped?)"]


def test_a_film_unlike_the_training_films_is_flagged_never_refused_for_it():
    """Distance from the training films alone never refuses a chest film; it flags it, with a reason."""
    from heartbatch.confidence import UNLIKE_REASON, refusal

    classes = ("chest", "mirrored", "negative", "turned", "upside_down", "cropped", "other")
    policy = Policy(classes=classes, review_distance=1.6)
    chest = np.array([0.99, 0.01, 0, 0, 0, 0, 0])
    far = Prediction(TYPICAL, 0.99, None, chest, distance=9.0)
    assert refusal(far, policy) is None
    assert review_reasons(far, policy, 0.01) == [UNLIKE_REASON]
    assert review_reasons(Prediction(TYPICAL, 0.99, None, chest, distance=1.0), policy, 0.01) == []
    assert review_reasons(far, Policy(classes=classes), 0.01) == []  # a model that states no cut
    assert Policy(review_distance=1.6).key() != Policy().key()  # a new cut re-measures the rows


def test_policy_comes_from_the_model_metadata_with_user_overrides(model_dir):
    path = M.constant_box_model(model_dir / "policy.onnx", M.DEFAULT_BOXES, metadata_overrides={
        C.META_TRUST: json.dumps({"min_chest_score": 0.3, "review_uncertainty": 0.04, "classes": ["chest"],
                                  "review_distance": 2.5})})
    meta = BoxModel(path).info.metadata
    assert Policy.for_model(meta).min_chest_score == 0.3
    assert Policy.for_model(meta).review_distance == 2.5
    assert Policy.for_model(meta, min_chest_score=0.7).min_chest_score == 0.7
    assert Policy.for_model(meta).review_uncertainty == 0.04
    assert Policy.for_model(meta).key() != Policy.for_model(meta, content_check=False).key()


def test_the_run_summary_shows_the_flagged_count(tmp_path, data_dir, capsys):
    _write(tmp_path / "in" / "mirrored.dcm", np.ascontiguousarray(shared_png(data_dir, 6)[:, ::-1]))
    _write(tmp_path / "in" / "film.dcm", shared_png(data_dir, 0))
    assert cli.main(["run", str(tmp_path / "in"), "--out", str(tmp_path / "report.csv"), "--workers", "0"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "flagged for review" in err and "1 measurements, not in the CTR statistics" in err


def test_min_chest_score_must_be_a_probability(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--min-chest-score", "1.5"])
    assert exc.value.code == 2 and "between 0 and 1" in capsys.readouterr().err


def _drawn_chest(size: int = 224) -> np.ndarray:
    """A bright heart between two dark lungs inside a grey body, as the model's input."""
    image = np.full((size, size), 0.6, np.float32)
    image[int(0.15 * size):int(0.9 * size), int(0.1 * size):int(0.45 * size)] = 0.15   # image-left lung
    image[int(0.15 * size):int(0.9 * size), int(0.55 * size):int(0.9 * size)] = 0.15   # image-right lung
    image[int(0.45 * size):int(0.8 * size), int(0.45 * size):int(0.75 * size)] = 0.85  # heart
    return image


def test_heart_border_contrast_sees_a_lung_as_white_as_the_heart():
    image = _drawn_chest()
    assert heart_border_contrast(image, TYPICAL) > 0.5
    white = image.copy()
    white[int(0.15 * 224):int(0.9 * 224), int(0.75 * 224):int(0.9 * 224)] = 0.9  # the lung beside the heart, white
    assert heart_border_contrast(white, TYPICAL) < 0
    touching = TYPICAL.copy()
    touching[2] = touching[6] - 0.005  # the heart box reaches the thorax edge: no lung strip to compare
    assert heart_border_contrast(image, touching) is None
    assert heart_border_contrast(image, TYPICAL[:4]) is None


def test_a_hidden_heart_border_is_flagged_with_the_models_cut_only():
    sure = np.array([0.99, 0.01, 0, 0, 0, 0, 0])
    hidden = Prediction(TYPICAL, 0.99, None, sure, border_contrast=-0.2)
    assert review_reasons(hidden, Policy(), 0.01) == []  # a model without a fitted cut: no such flag
    fitted = Policy(min_border_contrast=-0.08)
    assert review_reasons(hidden, fitted, 0.01) == [HIDDEN_BORDER_REASON]
    assert review_reasons(Prediction(TYPICAL, 0.99, None, sure, border_contrast=-0.05), fitted, 0.01) == []
    assert Policy.for_model({C.META_TRUST: json.dumps({"min_border_contrast": -0.08})}).min_border_contrast == -0.08
    assert fitted.key() != Policy().key()  # a new cut re-measures the ledger's rows


def test_the_model_reports_each_films_heart_border_contrast(data_dir):
    films = np.stack([preprocess(shared_png(data_dir, i).astype(np.float32), 224) for i in range(2)])

    model = BoxModel()
    for film, prediction in zip(films, model.infer(films)):
        assert prediction.border_contrast == heart_border_contrast(film, prediction.boxes)


def test_trust_onnx_counts_the_runtimes_review_rules_on_left_out_images():
    """trust-onnx's leave-out check counts a row as flagged by the rules the runtime applies (CTR SD, the
    hidden border, the box rules), so its table is what `heartbatch run` would do with such images."""
    from exporter.trust import _flagged_by_boxes

    image = _drawn_chest()
    white = image.copy()
    white[int(0.15 * 224):int(0.9 * 224), int(0.75 * 224):int(0.9 * 224)] = 1.0  # whiter than the heart
    collapsed = np.array([0.45, 0.45, 0.5, 0.5, 0.4, 0.4, 0.55, 0.55])
    boxes = np.stack([TYPICAL, TYPICAL, TYPICAL, collapsed])
    sd = np.zeros((4, 8))
    sd[1, [0, 2, 4, 6]] = 0.05  # wide heatmaps on the x coordinates: a large CTR SD
    policy = {"review_uncertainty": 0.03, "uncertainty_factor": 1.0, "min_border_contrast": -0.08}
    flagged = _flagged_by_boxes({C.OUTPUT_NAME: boxes, "uncertainty": sd}, [image, image, white, image], policy)
    assert flagged.tolist() == [False, True, True, True]
    assert [bool(review_reasons(Prediction(b, uncertainty=s), Policy(review_uncertainty=0.03),
                                ctr_uncertainty(b, s))) for b, s in zip(boxes[:2], sd[:2])] == [False, True]
