"""No patient data and no file bytes in any output.

A DICOM element whose declared length is wrong swallows the elements after
it (names, IDs, dates, pixels): pydicom then returns kilobytes of the file as
that one value.  These tests plant distinctive identifiers in real files,
corrupt a length, run the real CLI and read every file it wrote, byte by byte;
the rules of :mod:`heartbatch.sanitize` are tested on their own below.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from dicom_factory import make_nonsquare, shared_png, write_dicom
from heartbatch import cli, sanitize
from heartbatch.records import Record
from heartbatch.workers import prepare

REPO = Path(__file__).resolve().parents[1]

#: Distinctive values planted in the files: none may appear in any output.
PLANTED = {
    "PatientName": "Vrillnak^Ozzimandra",
    "PatientID": "PID-ZQ9-71X3",
    "AccessionNumber": "ACC-QK7-5521",
    "PatientBirthDate": "18990417",
    "ImageComments": "Comment-Xylofrond",   # after BodyPartExamined: what a swallowed CS would carry
}
#: Searched for in the outputs: each planted value and the parts of the name.
NEEDLES = [*PLANTED.values(), "Vrillnak", "Ozzimandra", "ZQ9-71X3", "QK7-5521", "Xylofrond"]
#: (element, its VR and the element the "aligned" corruption swallows up to).
CORRUPTED = {
    "SOPClassUID": ((0x0008, 0x0016), "UI"),
    "SeriesDescription": ((0x0008, 0x103E), "LO"),
    "BodyPartExamined": ((0x0018, 0x0015), "CS"),
}
PATIENT_SEX = (0x0010, 0x0040)  # the element after PatientBirthDate
AFTER_COMMENTS = (0x0028, 0x0002)  # SamplesPerPixel: the first element after ImageComments


def _element_at(data: bytes, tag: tuple[int, int], vr: str) -> int:
    """Offset of an explicit VR little endian element in the dataset (after the file meta)."""
    return data.index(struct.pack("<HH", *tag) + vr.encode(), 132 + 12)


def _with_length(data: bytes, tag: tuple[int, int], vr: str, length: int) -> bytes:
    """``data`` with the element's 2-byte value length field set to ``length``."""
    at = _element_at(data, tag, vr)
    return data[:at + 6] + struct.pack("<H", length) + data[at + 8:]


@pytest.fixture(scope="module")
def planted(tmp_path_factory, data_dir) -> bytes:
    """A small 8-bit frontal chest CR with every identifier planted (no ViewPosition, so
    the descriptions are searched for "LAT": a swallowed name starting "LAT" would match)."""
    path = write_dicom(
        tmp_path_factory.mktemp("planted") / "planted.dcm", make_nonsquare(shared_png(data_dir, 1), 160, 128),
        view_position=None, patient_name="LAT " + PLANTED["PatientName"], patient_id=PLANTED["PatientID"],
        accession=PLANTED["AccessionNumber"], PatientBirthDate=PLANTED["PatientBirthDate"],
        SeriesDescription="PA CHEST", ImageComments=PLANTED["ImageComments"])
    data = path.read_bytes()
    assert all(value.encode() in data for value in PLANTED.values())
    return data


def corrupted_files(root: Path, data: bytes) -> dict[str, Path]:
    """One file per corruption: each element's length set to run past the end of the
    file (the reported case), and to end exactly where a later element starts."""
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for keyword, (tag, vr) in CORRUPTED.items():
        value_at = _element_at(data, tag, vr) + 8
        until = PATIENT_SEX if tag < PATIENT_SEX else AFTER_COMMENTS
        aligned = _element_at(data, until, "CS" if until == PATIENT_SEX else "US") - value_at
        for kind, length in (("huge", 0xFFFE), ("aligned", aligned)):
            path = root / f"{keyword}-{kind}.dcm"
            path.write_bytes(_with_length(data, tag, vr, length))
            files[path.name] = path
    return files


def assert_clean(text: str, where: str) -> None:
    for needle in NEEDLES:
        assert needle not in text, f"{needle!r} in {where}"


def check_outputs(out_dir: Path, names: list[str], *texts: str, patient_columns: bool = False) -> list[dict]:
    """Every file written under ``out_dir`` (report, summaries, debug log, HTML, ledger),
    and the captured terminal ``texts``, byte by byte; the CSV cell by cell."""
    written = [p for p in out_dir.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"report.csv", "report.summary.json", "report.summary.md",
                                         "report.debug.log", "report.html"}
    report = out_dir / "report.csv"
    # the opt-in columns hold the patient ID and accession number (in the report and the
    # ledger's copy of its rows); the report is checked cell by cell below
    allowed = {PLANTED["PatientID"], PLANTED["AccessionNumber"], "ZQ9-71X3", "QK7-5521"} if patient_columns else set()
    for path in written:
        data = path.read_bytes()
        for needle in set(NEEDLES) - allowed:
            for encoded in {needle.encode(), needle.encode("utf-16-le")}:
                assert encoded not in data, f"{needle!r} in {path.name}"
    for i, text in enumerate(texts):
        assert_clean(text, f"terminal output {i}")
    with open(report, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(Path(row["path"]).name for row in rows) == sorted(names), "one row per file"
    for row in rows:
        for column, cell in row.items():
            assert cell.isprintable(), (row["path"], column, cell)
            if column in ("patient_id", "accession_number"):
                assert len(cell) <= 64 and cell in ("", PLANTED["PatientID"], PLANTED["AccessionNumber"])
            else:
                assert_clean(cell, f"{Path(row['path']).name}: {column}")
        assert row["reason"] or row["status"] == "ok"
    return rows


def test_a_swallowing_length_leaks_nothing_through_the_cli(tmp_path, planted, box8_model, capfd):
    files = corrupted_files(tmp_path / "in", planted)
    out = tmp_path / "out"
    code = cli.main(["run", str(tmp_path / "in"), "--out", str(out / "report.csv"), "--model", str(box8_model),
                     "--workers", "0", "--threads", "1", "--debug", "--html", str(out / "report.html")])
    captured = capfd.readouterr()
    assert code == 0, captured.err
    rows = check_outputs(out, list(files), captured.out, captured.err)
    reasons = {Path(row["path"]).name: row["reason"] for row in rows}
    assert reasons["SOPClassUID-huge.dcm"] == "no pixel data (an invalid SOP Class UID)"
    assert reasons["SeriesDescription-aligned.dcm"].startswith("lateral view (an invalid Series Description)")


def test_a_swallowing_length_leaks_nothing_with_the_shipped_model_and_workers(tmp_path, planted):
    """The installed command, its worker processes (whose warnings would go to
    stderr) and the default model; --include-patient-id puts the patient ID only
    in its own column."""
    files = corrupted_files(tmp_path / "in", planted)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "heartbatch", "run", str(tmp_path / "in"), "--out", str(out / "report.csv"),
         "--debug", "--html", str(out / "report.html"), "--workers", "2", "--include-patient-id"],
        cwd=REPO, env={**os.environ, "COLUMNS": "200"}, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    check_outputs(out, list(files), proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"),
                  patient_columns=True)
    for stream in (proc.stdout, proc.stderr):
        assert all(needle.encode() not in stream for needle in NEEDLES)


@pytest.mark.parametrize("keyword", list(CORRUPTED))
def test_every_wrong_length_gives_a_clean_record(planted, tmp_path, keyword):
    """Many lengths, each one more way for the parser to go wrong: whatever the
    record says (reason, debug detail, header cells), it holds no planted value."""
    tag, vr = CORRUPTED[keyword]
    path = tmp_path / "bad.dcm"
    for length in [*range(2, 400, 6), *range(400, len(planted), 211), 0xFFFE]:
        path.write_bytes(_with_length(planted, tag, vr, length))
        result = prepare(str(path), 224)
        header = result.header
        where = f"{keyword} length {length}"
        if isinstance(result, Record):
            assert result.reason.isprintable() and result.code, (where, result.reason)
            assert_clean(result.reason + result.detail, where)
        if header is not None:
            cells = dataclasses.asdict(header)
            for patient in ("patient_id", "accession_number"):
                assert cells.pop(patient) in ("", PLANTED["PatientID"], PLANTED["AccessionNumber"]), where
            assert_clean(repr(cells), where)
            assert all(len(v) <= 64 and v.isprintable() for v in cells.values() if isinstance(v, str)), where


# --- the sanitizer's rules ----------------------------------------------------

SWALLOWED_UID = ("1.2.840.10008.5.1.4.1.1.1\x00\x08\x00\x18\x00UI@\x001.2.3\x10\x00\x10\x00PN\x10\x00"
                 "Vrillnak^Ozzimandra \x10\x00 \x00LO\n\x00PID-ZQ9-71X3")


@pytest.mark.parametrize("keyword, text, expected", [
    ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1"),
    ("SOPInstanceUID", "1." + "2" * 62, "1." + "2" * 62),
    ("SOPInstanceUID", "1." + "2" * 63, None),                  # 65 characters
    ("SOPClassUID", SWALLOWED_UID, None),
    ("StudyInstanceUID", "1.2.3a", None),
    ("StudyInstanceUID", "", ""),
    ("Modality", "cr", "CR"),                                    # lower case CS: upper-cased
    ("BodyPartExamined", "CHEST", "CHEST"),
    ("BodyPartExamined", "CHEST/ABDOMEN", None),                 # not a CS character
    ("BodyPartExamined", "CHEST_AND_ABDOMEN", None),             # 17 characters
    ("BodyPartExamined", "CHEST \x18\x00\x01QCS\x02\x00PA", None),
    ("ImageType", "ORIGINAL\\PRIMARY", "ORIGINAL\\PRIMARY"),    # multi-valued CS
    ("PhotometricInterpretation", "MONOCHROME2", "MONOCHROME2"),
    ("StudyDate", "20240115", "20240115"),
    ("StudyDate", "2024-01-15", None),
    ("StudyDate", "2024011", None),
    ("SeriesDescription", "PA chest, erect", "PA chest, erect"),
    ("SeriesDescription", "x" * 64, "x" * 64),
    ("SeriesDescription", "x" * 64 + "Vrillnak", None),         # too long: described, never cut and echoed
    ("SeriesDescription", "PA\x08CHEST", None),
    ("StationName", "S" * 17, None),                             # SH: 16 at most
    ("PatientName", "Vrillnak^Ozzimandra", None),
    ("PatientID", "PID-ZQ9-71X3", None),
    ("PatientBirthDate", "18990417", None),
    ("AccessionNumber", "ACC-QK7-5521", None),
    ("ReferringPhysicianName", "Doe^John", None),                # any PN
])
def test_value_rules(keyword, text, expected):
    assert sanitize.value(keyword, text) == expected
    assert sanitize.cell(keyword, text) == ("" if expected is None else expected)


def test_invalid_values_are_described_never_echoed():
    assert sanitize.shown("SOPClassUID", SWALLOWED_UID) == "an invalid SOP Class UID"
    assert sanitize.shown("BodyPartExamined", "KNEE") == "KNEE"
    assert sanitize.shown("PatientName", "Vrillnak^Ozzimandra") == "a Patient's Name (not shown)"


def test_patient_cells_are_printable_and_within_their_vr():
    assert sanitize.patient_cell("PatientID", " PID-ZQ9-71X3 ") == "PID-ZQ9-71X3"
    assert sanitize.patient_cell("PatientID", "P" * 65) == ""
    assert sanitize.patient_cell("PatientID", "PID\x00\x10\x00PN") == ""
    assert sanitize.patient_cell("AccessionNumber", "A" * 16) == "A" * 16
    assert sanitize.patient_cell("AccessionNumber", "A" * 17) == ""


@pytest.mark.parametrize("text, expected", [
    ("Invalid value for VR UI: '1.2.840\x00\x08Vrillnak'", "Invalid value for VR UI: '...'"),
    # a quote inside the value ends the quoted part early: everything after it is cut too
    ("bad value 'ab'cd Vrillnak' here", "bad value '...'"),
    ("invalid literal for int() with base 10: b'PID-ZQ9'", "invalid literal for int() with base 10: '...'"),
    ("Missing required element: (0028,0002) 'Samples per Pixel'",
     "Missing required element: (0028,0002) 'Samples per Pixel'"),      # DICOM vocabulary stays
    ("can't read it", "can't read it"),                                   # an apostrophe is no quote
    ("value 1.2.3\x08\x00Vrillnak", "value 1.2.3"),                       # cut at the first control byte
    ("first line\nsecond 'Vrillnak'", "first line"),
    ("", "ValueError"),
])
def test_exception_messages(text, expected):
    assert sanitize.message(ValueError(text)) == expected


def test_exception_messages_are_capped():
    assert len(sanitize.message(ValueError("x " * 500))) <= sanitize.MESSAGE_CHARS
    assert sanitize.exception(KeyError()) == "KeyError"
    assert sanitize.exception(KeyError("Vrillnak")) == "KeyError: '...'"


def test_tracebacks_keep_the_frames_and_lose_the_values():
    def inner():
        raise ValueError(f"bad value {PLANTED['PatientName']!r}\n{PLANTED['PatientID']}")

    try:
        try:
            inner()
        except ValueError as exc:
            raise RuntimeError(f"wrapped: {exc}") from exc
    except RuntimeError as exc:
        text = sanitize.traceback_text(exc)
    assert "Traceback (most recent call last)" in text and "in inner" in text
    assert "ValueError: bad value '...'" in text and "RuntimeError: wrapped: bad value '...'" in text
    assert_clean(text, "traceback")
    assert all(line.isprintable() for line in text.splitlines())


def test_printable_is_ascii_and_capped():
    assert sanitize.printable("a\x00\x01b\tc\u00e9d") == "a?b c?d"
    assert sanitize.printable("y" * 100) == "y" * 61 + "..."
    assert all(len(sanitize.printable("z" * n)) <= sanitize.MAX_CHARS for n in range(0, 130, 7))
