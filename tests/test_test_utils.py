"""The test utilities themselves: files decode to what was written, models
give the outputs tests will rely on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import JPEG2000, JPEGBaseline8Bit, RLELossless

import onnx_models as M
from dicom_factory import (LOSSLESS, SOP_CLASSES, make_nonsquare, monochrome1_twin,
                           shared_png, to_bits, truncate, write_dicom)
from heartbatch import contract as C


@pytest.fixture(scope="module")
def small8(data_dir):
    """A real chest image, small and non-square so each case costs milliseconds."""
    return make_nonsquare(shared_png(data_dir, 0), 160, 128)


@pytest.mark.parametrize("bits", [8, 12, 16])
@pytest.mark.parametrize("ts", LOSSLESS, ids=lambda ts: ts.keyword)
def test_lossless_roundtrip(tmp_path, small8, ts, bits):
    pixels = to_bits(small8, bits)
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", pixels, bits_stored=bits,
                                     transfer_syntax=ts))
    assert ds.file_meta.TransferSyntaxUID == ts
    assert (ds.Rows, ds.Columns, ds.BitsStored, ds.HighBit) == (160, 128, bits, bits - 1)
    assert ds.BitsAllocated == (8 if bits == 8 else 16)
    np.testing.assert_array_equal(ds.pixel_array, pixels)


@pytest.mark.parametrize("ts, bits, mean_tol", [(JPEGBaseline8Bit, 8, 2.0), (JPEG2000, 8, 3.0),
                                                 (JPEG2000, 12, 50.0)])
def test_lossy_close(tmp_path, small8, ts, bits, mean_tol):
    pixels = to_bits(small8, bits)
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", pixels, bits_stored=bits,
                                     transfer_syntax=ts))
    assert ds.file_meta.TransferSyntaxUID == ts and ds.LossyImageCompression == "01"
    diff = np.abs(ds.pixel_array.astype(np.int64) - pixels)
    assert diff.mean() < mean_tol and diff.max() > 0


def test_jpeg_baseline_rejects_12_bit(tmp_path, small8):
    with pytest.raises(ValueError, match="8-bit"):
        write_dicom(tmp_path / "a.dcm", to_bits(small8, 12), bits_stored=12,
                    transfer_syntax=JPEGBaseline8Bit)


def test_header_is_a_real_cr(tmp_path, small8):
    path = write_dicom(tmp_path / "a.dcm", small8, view_position="AP", window=(128, 256),
                       study_uid="1.2.3.4", extra={"SeriesDescription": "CHEST AP"})
    assert path.read_bytes()[128:132] == b"DICM"
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SOP_CLASSES["CR"] and ds.Modality == "CR" and ds.ViewPosition == "AP"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.StudyInstanceUID == "1.2.3.4" and ds.SeriesInstanceUID and ds.StudyDate
    assert ds.BodyPartExamined == "CHEST" and ds.SamplesPerPixel == 1
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.PixelRepresentation == 0
    assert [float(v) for v in ds.PixelSpacing] == [0.168, 0.168]
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (128, 256)
    assert ds.SeriesDescription == "CHEST AP" and ds.PatientID and ds.AccessionNumber


def test_dx_none_deletes_and_raw_spacing(tmp_path, small8):
    path = write_dicom(tmp_path / "a.dcm", small8, modality="DX", view_position=None,
                       pixel_spacing="abc", imager_pixel_spacing=(0.1, 0.1),
                       BodyPartExamined=None)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID.name.startswith("Digital X-Ray") and ds.PresentationIntentType
    assert "ViewPosition" not in ds and "BodyPartExamined" not in ds
    assert ds["PixelSpacing"].value == "abc"
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.1, 0.1]


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_signed_with_rescale(tmp_path, small8, bits):
    stored = (to_bits(small8, bits).astype(np.int32) - (1 << (bits - 1))).astype(
        np.int8 if bits == 8 else np.int16)
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", stored, bits_stored=bits, signed=True,
                                     rescale=(2.0, -100.0), transfer_syntax=RLELossless))
    assert ds.PixelRepresentation == 1
    np.testing.assert_array_equal(ds.pixel_array, stored)
    np.testing.assert_allclose(apply_modality_lut(ds.pixel_array, ds), stored * 2.0 - 100.0)


def test_signed_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fit"):
        write_dicom(tmp_path / "a.dcm", np.full((4, 4), 3000, np.int16), bits_stored=12,
                    signed=True)


def test_monochrome1_twin(tmp_path, small8):
    pixels = to_bits(small8, 12)
    twin = monochrome1_twin(pixels, 12)
    ds = pydicom.dcmread(write_dicom(tmp_path / "a.dcm", twin, bits_stored=12,
                                     photometric="MONOCHROME1"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_array_equal(4095 - ds.pixel_array.astype(np.int64), pixels)


def test_nonsquare_multiframe_and_rgb(tmp_path, small8):
    assert make_nonsquare(small8, 50, 70).shape == (50, 70)
    frames = np.stack([small8, small8[::-1]])
    ds = pydicom.dcmread(write_dicom(tmp_path / "mf.dcm", frames, transfer_syntax=RLELossless))
    assert ds.NumberOfFrames == 2
    np.testing.assert_array_equal(ds.pixel_array, frames)
    rgb = np.stack([small8] * 3, axis=-1)
    ds = pydicom.dcmread(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert ds.SamplesPerPixel == 3
    np.testing.assert_array_equal(ds.pixel_array, rgb)


def test_truncated_fails_to_decode(tmp_path, small8):
    path = truncate(write_dicom(tmp_path / "a.dcm", to_bits(small8, 16)), 0.6)
    with pytest.raises(Exception):
        pydicom.dcmread(path).pixel_array


def test_mixed_folder(mixed_dir):
    root, expected = mixed_dir
    assert sorted(p.name for p in root.iterdir()) == sorted(expected)
    assert sorted(set(expected.values())) == ["error", "ok", "skipped"]
    for name, status in expected.items():
        if status == "ok":
            ds = pydicom.dcmread(root / name)
            assert ds.Modality == "CR" and ds.ViewPosition in ("PA", "AP")
            assert ds.pixel_array.shape == (512, 512)
    assert pydicom.dcmread(root / "lateral.dcm").ViewPosition == "LL"
    assert pydicom.dcmread(root / "ct_small.dcm").Modality == "CT"
    assert "PixelData" not in pydicom.dcmread(root / "report_sr.dcm")
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(root / "README")


def test_real_dicom_fixtures(siim_dicom, rg1, rg1_j2k, chest_pngs):
    # Wingspan films only (MIT): JSRT images and SCR masks may not be redistributed (tests/fixtures/README.md)
    assert len(chest_pngs) >= 16 and {p.parts[-3] for p in chest_pngs} == {"wingspan"}
    siim = pydicom.dcmread(siim_dicom, stop_before_pixels=True)
    assert siim.file_meta.TransferSyntaxUID == JPEGBaseline8Bit and siim.ViewPosition == "PA"
    for path in (rg1, rg1_j2k):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.PhotometricInterpretation == "MONOCHROME1"


def _repository_files(repo: Path) -> list[Path]:
    """Every file the repository holds or would commit (tracked, and untracked but not ignored)."""
    import subprocess

    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [repo / name for name in listed if name and (repo / name).is_file()]


def test_fixtures_are_the_make_fixtures_selection_and_hold_no_jsrt_file(data_dir, full_data_dir):
    """tests/fixtures/data is exactly what make_fixtures.py copies from the shared data set, byte for
    byte, and no file of the repository has the content or the name of a JSRT image or SCR mask."""
    import hashlib
    import sys

    sys.path.insert(0, str(data_dir.parent))
    try:
        import make_fixtures
    finally:
        sys.path.remove(str(data_dir.parent))
    cxr = full_data_dir / "cxr-ctr"
    chosen = make_fixtures.select(cxr)
    assert set(chosen) == {"wingspan"}
    here = sorted(p.relative_to(data_dir / "cxr-ctr") for p in (data_dir / "cxr-ctr").rglob("*.png"))
    subs = ("png", *(f"mask/{m}" for m in make_fixtures.MASKS))
    assert here == sorted(Path(s, sub, n) for s, names in chosen.items() for n in names for sub in subs)
    for rel in here:
        assert (data_dir / "cxr-ctr" / rel).read_bytes() == (cxr / rel).read_bytes(), rel

    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    jsrt = [p for p in (cxr / "jsrt").rglob("*") if p.is_file()]
    assert len(jsrt) >= 247
    jsrt_names, jsrt_digests = {p.name for p in jsrt}, {digest(p) for p in jsrt}
    files = _repository_files(data_dir.parents[2])
    assert [str(p) for p in files if p.name in jsrt_names] == [], "the names of JSRT files"
    assert [str(p) for p in files if digest(p) in jsrt_digests] == [], "the content of JSRT files"


# --- ONNX models ------------------------------------------------------------

def _run(path, images):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([C.OUTPUT_NAME], {C.INPUT_NAME: images})[0]


def _batch(means, size=224):
    """Images whose means are ``means``: a gradient, not flat, like real input."""
    ramp = np.broadcast_to(np.linspace(-0.1, 0.1, size, dtype=np.float32), (size, size))
    return np.stack([np.clip(m + ramp, 0, 1)[None] for m in means]).astype(np.float32)


MODEL_FIXTURES = ["box8_model", "box4_model", "box8_model_256", "intensity_model",
                  "wrong_rank_model", "wrong_width_model", "nan_model"]


@pytest.mark.parametrize("name", MODEL_FIXTURES)
def test_models_are_valid_onnx_with_metadata(request, name):
    model = onnx.load(str(request.getfixturevalue(name)))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert set(C.REQUIRED_METADATA) <= set(meta)
    inp = model.graph.input[0].type.tensor_type.shape.dim
    assert inp[0].dim_param == "N" and str(inp[-1].dim_value) == meta[C.META_INPUT_SIZE]


@pytest.mark.parametrize("n", [1, 3])
def test_constant_models(box8_model, box4_model, box8_model_256, n):
    np.testing.assert_allclose(_run(box8_model, _batch([0.3] * n)),
                               np.tile(M.DEFAULT_BOXES, (n, 1)), atol=1e-6)
    assert _run(box4_model, _batch([0.3] * n)).shape == (n, 4)
    assert _run(box8_model_256, _batch([0.3] * n, 256)).shape == (n, 8)


@pytest.mark.parametrize("means", [[0.3], [0.2, 0.8, 0.5]])
def test_intensity_model(intensity_model, means):
    images = _batch(means)
    out = _run(intensity_model, images)
    np.testing.assert_allclose(out, M.intensity_expected(images), atol=1e-5)
    assert len(set(np.round(out[:, 0], 4))) == len(means)  # rows are distinguishable


def test_broken_models(wrong_rank_model, wrong_width_model, nan_model):
    assert _run(wrong_rank_model, _batch([0.3, 0.4])[:, 0]).shape == (2, 8)
    assert _run(wrong_width_model, _batch([0.3, 0.4])).shape == (2, 5)
    out = _run(nan_model, _batch([0.2, 0.8, 0.4]))
    assert np.isnan(out).all(axis=1).tolist() == [False, True, False]
    np.testing.assert_allclose(out[[0, 2]], np.tile(M.DEFAULT_BOXES, (2, 1)), atol=1e-6)
