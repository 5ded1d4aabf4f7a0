"""Shared fixtures: real data paths, real DICOMs and tiny contract models.

Missing data fails loudly instead of skipping: a suite that silently skips its
real-data tests would pass on a machine that tests nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

import onnx_models as M
from dicom_factory import mixed_folder, shared_png_paths

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("HEARTBATCH_DATA", REPO.parent / "shared" / "data")).resolve()
    if not (path / "cxr-ctr").is_dir():
        pytest.fail(f"shared data not found at {path}: set HEARTBATCH_DATA to the folder "
                    "holding cxr-ctr/ and dicom/ (see ../shared/data/README.md)")
    return path


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
