"""Shared fixtures: real data paths, real DICOMs and tiny contract models.

``data_dir`` is always the small real-data subset in ``tests/fixtures/data``
(see its README): the suite reads the same files on every machine, a fresh
clone included. The few tests that need the whole shared data set ask for
``full_data_dir`` ($HEARTBATCH_DATA, else ../shared/data) and skip, with a
one-line reason, where it is absent. In CI (``CI=true``) any skip fails the
run: a suite that silently skips its real-data tests would pass on a machine
that tests nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

import onnx_models as M
from dicom_factory import mixed_folder, shared_png_paths
from helpers import Processes

REPO = Path(__file__).resolve().parents[1]
#: The in-repository subset of the shared data (same layout), see tests/fixtures/README.md.
FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The fixture subset: 16 chest PNGs with masks, their expert CTR rows, the SIIM DICOM."""
    if not (FIXTURE_DATA / "cxr-ctr").is_dir():
        pytest.fail(f"test fixtures missing at {FIXTURE_DATA} (see tests/fixtures/README.md)")
    return FIXTURE_DATA


@pytest.fixture(scope="session")
def full_data_dir() -> Path:
    """The whole shared data set, for the few tests that need every image."""
    path = Path(os.environ.get("HEARTBATCH_DATA", REPO.parent / "shared" / "data")).resolve()
    if not (path / "cxr-ctr").is_dir():
        pytest.skip(f"needs the full shared data set: none at {path} (set HEARTBATCH_DATA)")
    return path


# --- in CI nothing may skip ------------------------------------------------------

_SKIPPED: list[str] = []


def _note_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _SKIPPED.append(report.nodeid)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    _note_skip(report)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _note_skip(report)


def _ci() -> bool:
    return os.environ.get("CI") == "true"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _ci() and _SKIPPED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if _ci() and _SKIPPED:
        terminalreporter.write_line(
            f"FAILED: {len(_SKIPPED)} skipped with CI=true, and in CI nothing may skip (reasons in the "
            f"SKIPPED lines below): {', '.join(_SKIPPED[:5])}{' ...' if len(_SKIPPED) > 5 else ''}", red=True, bold=True)


@pytest.fixture(scope="session")
def chest_pngs(data_dir: Path) -> list[Path]:
    paths = shared_png_paths(data_dir)
    if not paths:
        pytest.fail(f"no cxr-ctr/*/png/*.png under {data_dir}")
    return paths


@pytest.fixture(scope="session")
def siim_dicom(data_dir: Path) -> Path:
    """Real 1024x1024 JPEG-baseline PA chest CR."""
    path = data_dir / "dicom" / "siim-cxr-pa-jpeg-baseline.dcm"
    if not path.is_file():
        pytest.fail(f"missing {path}")
    return path


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.fail(f"pydicom test file {name} not found: install pydicom-data")
    return Path(path)


@pytest.fixture(scope="session")
def rg1() -> Path:
    """Real 1955x1841 MONOCHROME1 chest CR, uncompressed."""
    return _testdata("RG1_UNCI.dcm")


@pytest.fixture(scope="session")
def rg1_j2k() -> Path:
    """The same image as JPEG 2000 lossless."""
    return _testdata("RG1_J2KR.dcm")


@pytest.fixture
def mixed_dir(tmp_path: Path, data_dir: Path) -> tuple[Path, dict[str, str]]:
    """A folder of mixed files and the status each should get."""
    root = tmp_path / "mixed"
    return root, mixed_folder(root, data_dir)


@pytest.fixture
def procs(tmp_path: Path):
    """Start real subprocesses (``procs.start(hb(...), name)``); each one's whole session is killed
    in teardown."""
    p = Processes(tmp_path)
    yield p
    p.cleanup()


# --- ONNX models (written once per session) ---------------------------------

@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def box8_model(model_dir: Path) -> Path:
    """Heart + thorax, constant :data:`onnx_models.DEFAULT_BOXES` (CTR 0.5), S=224."""
    return M.constant_box_model(model_dir / "box8.onnx", M.DEFAULT_BOXES)


@pytest.fixture(scope="session")
def box4_model(model_dir: Path) -> Path:
    """Heart only (no CTR), S=224."""
    return M.constant_box_model(model_dir / "box4.onnx", M.DEFAULT_BOXES[:4])


@pytest.fixture(scope="session")
def box8_model_256(model_dir: Path) -> Path:
    """A non-default input size, read from metadata."""
    return M.constant_box_model(model_dir / "box8_256.onnx", M.DEFAULT_BOXES, size=256)


@pytest.fixture(scope="session")
def intensity_model(model_dir: Path) -> Path:
    """Boxes follow each image's mean: see :func:`onnx_models.intensity_expected`."""
    return M.intensity_model(model_dir / "intensity.onnx")


@pytest.fixture(scope="session")
def wrong_rank_model(model_dir: Path) -> Path:
    return M.wrong_rank_model(model_dir / "wrong_rank.onnx")


@pytest.fixture(scope="session")
def wrong_width_model(model_dir: Path) -> Path:
    return M.wrong_width_model(model_dir / "wrong_width.onnx")


@pytest.fixture(scope="session")
def nan_model(model_dir: Path) -> Path:
    """NaN rows where the image mean is above 0.5."""
    return M.nan_model(model_dir / "nan.onnx")
