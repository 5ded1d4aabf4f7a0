"""`heartbatch run` end to end: real files, real onnxruntime sessions, the CLI
called in-process, and the Python API on the same pipeline."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import heartbatch
import onnx_models as M
from dicom_factory import brightness_image, make_nonsquare, shared_png, to_bits, truncate, write_dicom
from heartbatch import cli
from heartbatch.dicom import read_dicom
from heartbatch.pixels import preprocess

#: The report schema, copied from SPEC.md ("Its columns, in this order").
SPEC_COLUMNS = [
    "path", "status", "reason", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
    "study_date", "modality", "view_position", "rows", "columns", "pixel_spacing_mm",
    "heart_x0", "heart_y0", "heart_x1", "heart_y1", "thorax_x0", "thorax_y0", "thorax_x1", "thorax_y1",
    "ctr", "heart_width_mm", "thoracic_width_mm", "enlarged", "model_id",
    "chest_score", "uncertainty", "review", "review_reason",
    "review_status", "ctr_reviewed", "reviewed_at", "reviewer", "review_note",  # empty until `heartbatch review`
]
#: Empty on an ok row of a model without the optional outputs, and when nothing needs review or was reviewed.
OPTIONAL_COLUMNS = {"reason", "chest_score", "uncertainty", "review_reason",
                    "review_status", "ctr_reviewed", "reviewed_at", "reviewer", "review_note"}
THORAX_COLUMNS = ["thorax_x0", "thorax_y0", "thorax_x1", "thorax_y1"]

#: Distinctive identifiers: none of these may appear in any output by default.
PHI = {"patient_name": "Qzxhyl^Wombatine", "patient_id": "PID-8c41f2e9", "accession": "ACC-5d77a013",
       "birth_date": "19371122"}
#: What dicom_factory and pydicom's CT_small.dcm put in the mixed folder.
MIXED_PHI = ["Test^Patient", "HB-0001", "ACC0001", "19600101", "CompressedSamples^CT1", "1CT1"]


def run_cli(*args: str | Path) -> int:
    return cli.main(["run", *(str(a) for a in args)])


def quiet(inputs, out: Path, model: Path, *extra: str | Path) -> int:
    """A fast in-process run: no worker processes, one inference thread."""
    return run_cli(*([inputs] if isinstance(inputs, (str, Path)) else inputs), "--out", out, "--model", model,
                   "--workers", "0", "--threads", "1", "--quiet", *extra)


def read_rows(report: Path) -> list[dict[str, str]]:
    with open(report, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_header(report: Path) -> list[str]:
    with open(report, newline="", encoding="utf-8") as fh:
        return next(csv.reader(fh))


def by_name(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    names = [Path(r["path"]).name for r in rows]
    assert len(names) == len(set(names)), f"a file has two rows: {names}"
    return {Path(r["path"]).name: r for r in rows}



@pytest.fixture(scope="module")
def chest(data_dir) -> np.ndarray:
    return make_nonsquare(shared_png(data_dir, 2), 200, 168)


@pytest.fixture
def mixed_run(mixed_dir, box8_model, tmp_path):
    root, expected = mixed_dir
    out = tmp_path / "out" / "report.csv"
    code = quiet(root, out, box8_model)
    return code, out, expected


# --- the mixed folder ---------------------------------------------------------

def test_mixed_folder_one_row_per_file_with_expected_status(mixed_run):
    code, out, expected = mixed_run
    assert code == 0
    rows = by_name(read_rows(out))
    assert set(rows) == set(expected)
    assert {name: r["status"] for name, r in rows.items()} == expected


def test_reasons_are_plain_and_empty_for_ok(mixed_run):
    """A user reads the reason: one short line, no traceback, and none for ok rows."""
    _, out, _ = mixed_run
    for row in read_rows(out):
        if row["status"] == "ok":
            assert row["reason"] == "", row
        else:
            reason = row["reason"]
            assert reason.strip(), row
            assert "\n" not in reason and "Traceback" not in reason and len(reason) < 300, reason


def test_mixed_folder_specific_reasons(mixed_run):
    _, out, _ = mixed_run
    rows = by_name(read_rows(out))
    assert "lateral" in rows["lateral.dcm"]["reason"].lower()
    assert "modality" in rows["ct_small.dcm"]["reason"].lower()
    assert rows["README"]["reason"] == "not a DICOM file"
    assert "no pixel data" in rows["report_sr.dcm"]["reason"].lower()


def test_ok_rows_are_complete(mixed_run):
    _, out, _ = mixed_run
    rows = by_name(read_rows(out))
    for name in ("frontal_pa_jpeg.dcm", "frontal_ap_12bit.dcm"):
        row = rows[name]
        for column in SPEC_COLUMNS:
            if column not in OPTIONAL_COLUMNS:
                assert row[column] != "", (name, column)
        assert row["review"] == "false" and row["chest_score"] == row["uncertainty"] == ""  # constant model
        assert float(row["ctr"]) == pytest.approx(0.5, abs=1e-4)
        assert row["enlarged"] == "false"  # 0.5 is not above the 0.50 threshold
    assert rows["frontal_ap_12bit.dcm"]["view_position"] == "AP"
    assert rows["frontal_pa_jpeg.dcm"]["view_position"] == "PA"


def test_model_id_is_the_model_file_hash(mixed_run, box8_model):
    _, out, _ = mixed_run
    digest = hashlib.sha256(Path(box8_model).read_bytes()).hexdigest()
    ids = {r["model_id"] for r in read_rows(out) if r["status"] == "ok"}
    assert len(ids) == 1
    (model_id,) = ids
    assert model_id and digest.startswith(model_id)


def test_report_header_is_the_spec_schema(mixed_run):
    _, out, _ = mixed_run
    assert read_header(out) == SPEC_COLUMNS


def test_summaries_are_written_next_to_the_report(mixed_run):
    _, out, _ = mixed_run
    summary = json.loads((out.parent / "report.summary.json").read_text())
    assert summary["files"]["total"] == 7
    assert (out.parent / "report.summary.md").read_text().strip()


# --- patient identifiers -----------------------------------------------------------

@pytest.fixture
def phi_dir(mixed_dir, chest) -> Path:
    """The mixed folder plus measured, skipped and failing files with distinctive identifiers."""
    root, _ = mixed_dir
    ids = dict(patient_name=PHI["patient_name"], patient_id=PHI["patient_id"], accession=PHI["accession"],
               PatientBirthDate=PHI["birth_date"])
    write_dicom(root / "phi_ok.dcm", chest, **ids)
    write_dicom(root / "phi_lateral.dcm", chest, view_position="LL", **ids)
    truncate(write_dicom(root / "phi_truncated.dcm", to_bits(chest, 16), bits_stored=16, **ids), 0.6)
    return root


def _output_bytes(folder: Path, stdout: str) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    files["<stdout>"] = stdout.encode()
    return files


def test_no_patient_identifiers_in_any_output_by_default(phi_dir, box8_model, tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert quiet(phi_dir, out_dir / "report.csv", box8_model) == 0
    outputs = _output_bytes(out_dir, capsys.readouterr().out)
    assert {"report.csv", "report.summary.json", "report.summary.md"} <= set(outputs)
    needles = [PHI["patient_name"], "Qzxhyl", "Wombatine", PHI["patient_id"], PHI["accession"],
               PHI["birth_date"], *MIXED_PHI]
    for name, data in outputs.items():
        for needle in needles:
            assert needle.encode() not in data, f"{needle!r} found in {name}"


def test_include_patient_id_appends_two_columns(phi_dir, box8_model, tmp_path, capsys):
    out = tmp_path / "out" / "report.csv"
    assert quiet(phi_dir, out, box8_model, "--include-patient-id") == 0
    assert read_header(out) == SPEC_COLUMNS + ["patient_id", "accession_number"]
    rows = by_name(read_rows(out))
    assert (rows["phi_ok.dcm"]["patient_id"], rows["phi_ok.dcm"]["accession_number"]) == (
        PHI["patient_id"], PHI["accession"])
    assert rows["frontal_pa_jpeg.dcm"]["patient_id"] == "HB-0001"
    # names and birth dates never, even on request
    outputs = _output_bytes(out.parent, capsys.readouterr().out)
    for name, data in outputs.items():
        for needle in (PHI["patient_name"], "Wombatine", PHI["birth_date"], "Test^Patient", "19600101"):
            assert needle.encode() not in data, f"{needle!r} found in {name}"


# --- spreadsheet formula injection ----------------------------------------------

@pytest.mark.filterwarnings("ignore:Invalid value for VR")
def test_formula_cells_are_neutralized(tmp_path, chest, box8_model, monkeypatch):
    """A cell that starts with = + - @ would run as a formula in Excel: prefix it with '."""
    monkeypatch.chdir(tmp_path)
    write_dicom(Path("=cmd.dcm"), chest)
    write_dicom(Path("+sum.dcm"), chest)
    write_dicom(Path("@at.dcm"), chest)
    write_dicom(Path("fields.dcm"), chest, view_position="-2+3", StudyDate="=NOW()")
    write_dicom(Path("modality.dcm"), chest, modality="=1+2", view_position=None)
    out = Path("out") / "report.csv"
    assert quiet(["=cmd.dcm", "+sum.dcm", "@at.dcm", "fields.dcm", "modality.dcm"], out, box8_model) == 0
    rows = {r["path"].lstrip("'"): r for r in read_rows(out)}
    assert rows["=cmd.dcm"]["path"] == "'=cmd.dcm"
    assert rows["+sum.dcm"]["path"] == "'+sum.dcm"
    assert rows["@at.dcm"]["path"] == "'@at.dcm"
    # not valid for their VR (CS, DA): empty cells, never echoed (heartbatch.sanitize)
    assert rows["fields.dcm"]["view_position"] == rows["fields.dcm"]["study_date"] == ""
    assert rows["modality.dcm"]["modality"] == ""
    assert rows["modality.dcm"]["status"] == "skipped"
    for row in rows.values():
        for column, cell in row.items():
            assert not cell.startswith(("=", "+", "@")), (column, cell)
            if cell.startswith("-"):  # only numbers may start with a minus sign
                float(cell)


# --- command line behaviour -----------------------------------------------------

def test_quiet_prints_exactly_one_json_line(mixed_dir, box8_model, tmp_path, capsys):
    root, expected = mixed_dir
    out = tmp_path / "report.csv"
    assert quiet(root, out, box8_model) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert len(lines) == 1 and stdout.endswith("\n"), stdout
    result = json.loads(lines[0])
    statuses = list(expected.values())
    assert result["files"] == len(expected)
    for status in ("ok", "skipped", "error"):
        assert result[status] == statuses.count(status)
    assert Path(result["report"]) == out
    assert Path(result["summary_json"]).is_file() and Path(result["summary_md"]).is_file()


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert heartbatch.__version__ in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [(["--help"], ["usage", "run"]),
                                         (["run", "--help"], ["usage", "--out", "--model", "--ctr-threshold"])])
def test_help(capsys, argv, words):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 0
    text = capsys.readouterr().out
    for word in words:
        assert word in text


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2


def test_nonexistent_input_is_a_usage_error(tmp_path, box8_model):
    out = tmp_path / "out" / "report.csv"
    assert quiet(tmp_path / "no-such-folder", out, box8_model) == 2
    assert not out.exists()


def test_only_non_dicom_files_are_all_skipped(tmp_path, box8_model):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "README").write_text("hello\n")
    (folder / "notes.txt").write_text("x" * 1000)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    out = tmp_path / "report.csv"
    assert quiet(folder, out, box8_model) == 0
    rows = by_name(read_rows(out))
    assert set(rows) == {"README", "notes.txt", "empty.dcm", "image.png"}
    assert all(r["status"] == "skipped" and r["reason"] for r in rows.values())


def test_only_failing_files_exits_4(tmp_path, chest, box8_model):
    """Every file an error: nothing could be read, which a script must notice."""
    folder = tmp_path / "bad"
    for i in range(2):
        truncate(write_dicom(folder / f"t{i}.dcm", to_bits(chest, 16), bits_stored=16), 0.6)
    out = tmp_path / "report.csv"
    assert quiet(folder, out, box8_model) == 4
    assert [r["status"] for r in read_rows(out)] == ["error", "error"]


def test_report_inside_the_input_folder_is_not_an_input(mixed_dir, box8_model):
    """Writing the report into the scanned folder must not add rows for the outputs."""
    root, expected = mixed_dir
    out = root / "report.csv"
    assert quiet(root, out, box8_model) == 0
    assert set(by_name(read_rows(out))) == set(expected)


def test_empty_folder_exits_4(tmp_path, box8_model):
    folder = tmp_path / "empty"
    folder.mkdir()
    assert quiet(folder, tmp_path / "report.csv", box8_model) == 4


# --- models that break the contract ------------------------------------------------

@pytest.fixture
def not_onnx(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"this is not an ONNX model\n" * 10)
    return path


@pytest.mark.parametrize("model_fixture", ["wrong_rank_model", "wrong_width_model", "not_onnx"])
def test_contract_breaking_model_is_refused_before_any_file(request, mixed_dir, tmp_path, model_fixture):
    """Exit 3, and nothing written: not even the report's folder was created."""
    model = request.getfixturevalue(model_fixture)
    root, _ = mixed_dir
    out_dir = tmp_path / "never"
    assert quiet(root, out_dir / "report.csv", model) == 3
    assert not out_dir.exists()


@pytest.mark.parametrize("version, refused", [("1", False), ("2", False), ("0", True), ("3", True)])
def test_model_of_another_pixel_pipeline_is_refused(tmp_path, version, refused):
    """A model records the pixel pipeline it was trained with; v1 models still run under v2 (they
    differ only in how non-JPEG DICOM pixels are reduced), any other version is refused, naming both."""
    from heartbatch import contract as C
    from heartbatch.errors import ContractError
    from heartbatch.model import BoxModel

    path = M.constant_box_model(tmp_path / f"v{version}.onnx", metadata_overrides={C.META_PIXELS_VERSION: version})
    if not refused:
        assert BoxModel(path).info.input_size == 224
        return
    with pytest.raises(ContractError, match=f"trained with pixel pipeline v{version}, this heartbatch has v2"):
        BoxModel(path)


def test_missing_model_file_is_refused(mixed_dir, tmp_path):
    root, _ = mixed_dir
    out_dir = tmp_path / "never"
    assert quiet(root, out_dir / "report.csv", tmp_path / "missing.onnx") == 3
    assert not out_dir.exists()


# --- model outputs -------------------------------------------------------------------

def test_nan_model_gives_error_rows_only_for_its_images(tmp_path, nan_model):
    """nan_model returns NaN for bright images; dark ones in the same batch stay ok."""
    folder = tmp_path / "in"
    bright = {f"bright{i}.dcm" for i in range(2)}
    dark = {f"dark{i}.dcm" for i in range(3)}
    for i, name in enumerate(sorted(bright)):
        write_dicom(folder / name, brightness_image(0.85, seed=i))
    for i, name in enumerate(sorted(dark)):
        write_dicom(folder / name, brightness_image(0.15, seed=10 + i))
    out = tmp_path / "report.csv"
    assert quiet(folder, out, nan_model) == 0
    rows = by_name(read_rows(out))
    assert set(rows) == bright | dark
    for name in bright:
        row = rows[name]
        assert row["status"] == "error" and row["reason"], row
        assert row["ctr"] == "" and row["heart_x0"] == "" and row["enlarged"] == ""
    for name in dark:
        assert rows[name]["status"] == "ok" and float(rows[name]["ctr"]) == pytest.approx(0.5, abs=1e-4)


def test_heart_only_model_gives_ok_rows_without_ctr(mixed_dir, box4_model, tmp_path):
    root, expected = mixed_dir
    out = tmp_path / "report.csv"
    assert quiet(root, out, box4_model) == 0
    rows = by_name(read_rows(out))
    assert {n: r["status"] for n, r in rows.items()} == expected
    for name, row in rows.items():
        if row["status"] != "ok":
            continue
        cols, rows_px = int(row["columns"]), int(row["rows"])
        assert float(row["heart_x0"]) == pytest.approx(M.DEFAULT_BOXES[0] * cols, abs=0.01)
        assert float(row["heart_y1"]) == pytest.approx(M.DEFAULT_BOXES[3] * rows_px, abs=0.01)
        for column in THORAX_COLUMNS + ["ctr", "thoracic_width_mm", "enlarged"]:
            assert row[column] == "", (name, column)
        assert row["heart_width_mm"] != ""  # the mixed folder's frontals have spacing
    summary = json.loads((tmp_path / "report.summary.json").read_text())
    assert summary["ctr"]["n"] == 0 and summary["files"]["by_status"]["ok"] == 2


# --- batching and workers ------------------------------------------------------------

FRACTIONS = [0.12, 0.3, 0.45, 0.58, 0.7, 0.83, 0.95]


@pytest.fixture(scope="module")
def brightness_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("brightness")
    for i, fraction in enumerate(FRACTIONS):
        write_dicom(folder / f"img{i}.dcm", brightness_image(fraction, seed=i))
    return folder


def test_batched_rows_get_their_own_images_ctr(brightness_dir, intensity_model, tmp_path):
    """Batch size 3 over 7 images (3 + 3 + 1): each row's CTR comes from its own
    image, equal to a batch-size-1 run and to the model applied to that image alone."""
    ctrs = {}
    for batch in (3, 1):
        out = tmp_path / f"b{batch}" / "report.csv"
        assert quiet(brightness_dir, out, intensity_model, "--batch-size", str(batch)) == 0
        rows = by_name(read_rows(out))
        assert all(r["status"] == "ok" for r in rows.values())
        ctrs[batch] = {name: float(r["ctr"]) for name, r in rows.items()}
    assert ctrs[3].keys() == ctrs[1].keys() == {f"img{i}.dcm" for i in range(len(FRACTIONS))}
    for name in ctrs[1]:
        assert ctrs[3][name] == pytest.approx(ctrs[1][name], abs=1.5e-4), name
        image = preprocess(read_dicom(brightness_dir / name).image, 224)
        expected = M.intensity_expected(image[None, None])[0]
        expected_ctr = (expected[2] - expected[0]) / (expected[6] - expected[4])
        assert ctrs[3][name] == pytest.approx(expected_ctr, abs=2e-4), name
    assert len({round(v, 3) for v in ctrs[3].values()}) == len(FRACTIONS)  # all different


def test_workers_do_not_change_the_report(mixed_dir, intensity_model, tmp_path, brightness_dir):
    """Measuring in 2 worker processes (each with its own model) gives exactly the rows of running inline."""
    root, _ = mixed_dir
    reports = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}.csv"
        code = run_cli(root, brightness_dir, "--out", out, "--model", intensity_model, "--workers", str(workers),
                       "--threads", "1", "--batch-size", "4", "--quiet")
        assert code == 0
        with open(out, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader)
            reports[workers] = (header, sorted(reader))
    assert reports[0] == reports[2]
    assert len(reports[0][1]) == 7 + len(FRACTIONS)


# --- Python API --------------------------------------------------------------------

def test_predict_returns_a_complete_record(siim_dicom, box8_model):
    record = heartbatch.predict(siim_dicom, model=box8_model)
    assert isinstance(record, heartbatch.Record)
    assert record.status == "ok" and record.ok and record.reason == ""
    expected = np.array(M.DEFAULT_BOXES) * 1024
    np.testing.assert_allclose(record.heart, expected[:4], atol=0.01)
    np.testing.assert_allclose(record.thorax, expected[4:], atol=0.01)
    assert record.ctr == pytest.approx(0.5, abs=1e-6)
    assert record.header.view_position == "PA" and record.header.rows == 1024
    assert record.heart_width_mm == pytest.approx(0.4 * 1024 * 0.168, abs=1e-3)
    assert record.model_id


def test_predict_on_a_skipped_file_returns_a_record(mixed_dir, box8_model):
    root, _ = mixed_dir
    record = heartbatch.predict(root / "lateral.dcm", model=box8_model)
    assert record.status == "skipped" and "lateral" in record.reason.lower()
    assert record.ctr is None and record.heart is None


def test_predict_folder_yields_one_record_per_file(mixed_dir, box8_model):
    root, expected = mixed_dir
    records = list(heartbatch.predict_folder(root, model=box8_model, workers=0, batch_size=1))
    names = [Path(r.path).name for r in records]
    assert sorted(names) == sorted(expected)
    assert {Path(r.path).name: r.status for r in records} == expected


def test_workers_start_early_only_when_they_will_be_used(tmp_path, monkeypatch, siim_dicom):
    """A folder starts the worker forkserver before the model loads; a single file, a few
    files, or --workers 0 run in the main process and start nothing."""
    import heartbatch.worker_context as wc
    from heartbatch.cli.common import start_workers_early

    calls = []
    monkeypatch.setattr(wc, "start_early", lambda: calls.append(True))
    start_workers_early([str(siim_dicom)], None)
    start_workers_early([str(siim_dicom)] * wc.INLINE_MAX_FILES, None)
    start_workers_early([str(tmp_path)], 0)
    assert calls == []
    start_workers_early([str(tmp_path)], None)
    start_workers_early([str(siim_dicom)] * (wc.INLINE_MAX_FILES + 1), 2)
    assert calls == [True, True]
