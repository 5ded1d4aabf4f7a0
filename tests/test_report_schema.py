"""The review columns of the report, and a report of the previous version (25 columns)
resumed by this one: upgraded in place, its rows kept and re-measured, never refused."""

from __future__ import annotations

import csv
import io
import json
import sqlite3
from pathlib import Path

import pytest

from dicom_factory import brightness_image, write_dicom
from heartbatch import cli
from heartbatch.dicom import DicomHeader
from heartbatch.records import OK, SKIPPED, Record
from heartbatch.report.schema import COLUMNS, PATIENT_COLUMNS, columns
from heartbatch.report.table import format_rows
from heartbatch.report.paths import ReportFiles

NEW = ["chest_score", "uncertainty", "review", "review_reason",
       "review_status", "ctr_reviewed", "reviewed_at", "reviewer", "review_note"]
#: The report columns before the content check and the review flag.
PREVIOUS = COLUMNS[:COLUMNS.index("model_id") + 1]


def cells(record: Record, include_patient_id: bool = False) -> dict[str, str]:
    line = format_rows([record], include_patient_id)
    return dict(zip(columns(include_patient_id), next(csv.reader(io.StringIO(line)))))


def test_review_columns_follow_model_id_and_patient_columns_stay_last():
    assert COLUMNS[len(PREVIOUS):] == NEW and len(PREVIOUS) == 25
    assert columns(True) == COLUMNS + PATIENT_COLUMNS


def test_review_cells():
    header = DicomHeader(patient_id="PID-1")
    ok = Record("a.dcm", OK, header=header, ctr=0.5, model_id="abc", chest_score=0.98765, uncertainty=0.012345,
                review=True, review_reason="=mirrored film")
    row = cells(ok, include_patient_id=True)
    assert (row["chest_score"], row["uncertainty"], row["review"]) == ("0.988", "0.0123", "true")
    assert row["review_reason"] == "'=mirrored film", "formula injection neutralized"
    assert row["patient_id"] == "PID-1"
    plain = cells(Record("b.dcm", OK, ctr=0.5, model_id="abc"))  # a model without the optional outputs
    assert [plain[c] for c in NEW] == ["", "", "false", ""] + [""] * 5, "review columns empty until a person looks"
    refused = cells(Record("c.dcm", SKIPPED, "not a frontal chest radiograph by its content (score 0.04)",
                           chest_score=0.04))
    assert [refused[c] for c in NEW] == ["0.040", "", "", ""] + [""] * 5, "review is for ok rows only"


def _downgrade(report: Path, previous: list[str] = PREVIOUS) -> None:
    """Make ``report`` and its ledger what an earlier heartbatch wrote: 25 columns (or ``previous``)."""
    def old(row: str) -> str:
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerow(next(csv.reader(io.StringIO(row)))[:len(previous)])
        return out.getvalue()

    db = sqlite3.connect(ReportFiles.of(report).state_dir / "ledger.sqlite", isolation_level=None)
    try:
        db.execute("UPDATE meta SET value=? WHERE key='columns'", (json.dumps(previous),))
        for path, row in db.execute("SELECT path, row FROM files").fetchall():
            db.execute("UPDATE files SET row=? WHERE path=?", (old(row), path))
        rows = [row for (row,) in db.execute("SELECT row FROM files ORDER BY seq")]
    finally:
        db.close()
    report.write_text(",".join(previous) + "\n" + "".join(rows), encoding="utf-8")


def test_report_without_review_columns_gains_them_without_re_measuring(folders, intensity_model, tmp_path, capsys):
    """The review columns are a person's, not a measurement's: a report written before them
    (29 columns) is upgraded in place and no file is measured again."""
    out = tmp_path / "out" / "report.csv"
    assert _run(capsys, folders, out, intensity_model)[0] == 0
    current = out.read_bytes()
    _downgrade(out, COLUMNS[:COLUMNS.index("review_reason") + 1])
    code, result, _ = _run(capsys, folders, out, intensity_model)
    assert (code, result["processed"]) == (0, 0)
    assert out.read_bytes() == current


def _run(capsys, folder: Path, out: Path, model: Path, *extra: str) -> tuple[int, dict, str]:
    code = cli.main(["run", str(folder), "--out", str(out), "--model", str(model), "--workers", "0",
                     "--threads", "1", "--quiet", *extra])
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    return code, (json.loads(lines[-1]) if lines else {}), captured.err


def _rows(report: Path) -> dict[str, dict[str, str]]:
    with open(report, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return {Path(r["path"]).name: r for r in reader}


@pytest.fixture
def folders(tmp_path):
    for name, fraction in (("a/one.dcm", 0.4), ("a/two.dcm", 0.6), ("b/three.dcm", 0.5)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write_dicom(tmp_path / name, brightness_image(fraction, 1))
    (tmp_path / "a" / "notes.txt").write_text("not an image\n")
    return tmp_path


def test_previous_report_is_upgraded_and_its_files_re_measured(folders, intensity_model, tmp_path, capsys):
    """Every row is rewritten in the new columns at once (new cells empty, nothing lost) and marked
    stale; a run re-measures each file it reaches; rows of files it does not reach stay."""
    out = tmp_path / "out" / "report.csv"
    assert _run(capsys, folders, out, intensity_model)[0] == 0
    current = _rows(out)
    _downgrade(out)

    code, result, _ = _run(capsys, folders / "a", out, intensity_model)
    assert code == 0
    assert (result["processed"], result["unchanged"]) == (3, 0), "the old rows are re-measured"
    rows = _rows(out)
    assert set(rows) == set(current), "no row lost, none doubled"
    for name in ("one.dcm", "two.dcm", "notes.txt"):
        assert rows[name] == current[name], name
    assert {k: v for k, v in rows["three.dcm"].items() if k not in NEW} == \
        {k: v for k, v in current["three.dcm"].items() if k not in NEW}
    lines = out.read_text(encoding="utf-8").splitlines()
    assert lines[0] == ",".join(COLUMNS) and all(len(next(csv.reader([ln]))) == len(COLUMNS) for ln in lines)

    code, result, _ = _run(capsys, folders, out, intensity_model)  # b/three.dcm is still stale, a/ is current
    assert (code, result["processed"], result["unchanged"]) == (0, 1, 3)
    assert _rows(out) == current
    before = out.read_bytes()
    assert _run(capsys, folders, out, intensity_model)[1]["processed"] == 0
    assert out.read_bytes() == before


def test_not_reached_row_keeps_its_cells_with_empty_new_ones(folders, intensity_model, tmp_path, capsys):
    out = tmp_path / "out" / "report.csv"
    assert _run(capsys, folders, out, intensity_model)[0] == 0
    _downgrade(out)
    assert _run(capsys, folders / "a", out, intensity_model)[0] == 0
    three = _rows(out)["three.dcm"]
    assert three["status"] == "ok" and three["ctr"] != ""
    assert [three[c] for c in NEW] == [""] * len(NEW), "not measured by this version: unknown, not 'false'"


def test_patient_columns_changed_is_still_refused(folders, intensity_model, tmp_path, capsys):
    out = tmp_path / "out" / "report.csv"
    assert _run(capsys, folders, out, intensity_model)[0] == 0
    _downgrade(out)
    code, _, err = _run(capsys, folders, out, intensity_model, "--include-patient-id")
    assert code == 2
    assert "different column set" in err
    assert out.read_text(encoding="utf-8").startswith(",".join(PREVIOUS) + "\n"), "refused: left untouched"
