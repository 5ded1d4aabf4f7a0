"""heartbatch.pixels and the DICOM pixel pipeline that feeds it.

Whatever the encoding, bit depth, photometric interpretation, rescale or
window, the same anatomy must reach the model as the same array: these tests
write the same image in different ways and compare what preprocessing gives.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, RLELossless

from dicom_factory import make_nonsquare, monochrome1_twin, shared_png, to_bits, write_dicom
from heartbatch.dicom import read_dicom
from heartbatch.pixels import PIPELINE_VERSION, preprocess, resize, scale_to_unit

S = 224
#: The fixture film these tests read: a bright film using the full 8-bit range (Wingspan, UID root
#: 1.2.392). Films 0-9 and 15 are dark (99 % of their pixels below 130), most with a burned-in 255
#: "R" marker: on them the windows below clip little and the marker is already the outlier these
#: tests add.
FILM = 10


@pytest.fixture(scope="module")
def chest8(data_dir) -> np.ndarray:
    """A real chest X-ray, small and non-square so each file costs milliseconds."""
    return make_nonsquare(shared_png(data_dir, FILM), 240, 200)


@pytest.fixture(scope="module")
def chest_full(data_dir) -> np.ndarray:
    """The full-size shared PNG (uint8), for the encoding comparison."""
    return shared_png(data_dir, FILM)


def _pre(path, size: int = S) -> np.ndarray:
    return preprocess(read_dicom(path).image, size)


# --- preprocess() on arrays -------------------------------------------------

@pytest.mark.parametrize("size", [224, 256, 320])
@pytest.mark.parametrize("shape", [(240, 200), (512, 512), (100, 333), (224, 224)])
def test_output_shape_dtype_and_range(chest8, size, shape):
    """The model contract: float32 [S, S] in [0, 1], whatever the input shape."""
    image = make_nonsquare(chest8, *shape).astype(np.float64) * 16.0
    out = preprocess(image, size)
    assert out.shape == (size, size)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    # the robust range is really used: near-black and near-white both occur
    assert out.min() == 0.0 and out.max() == 1.0


@pytest.mark.parametrize("value", [0.0, 7.0, -1234.5, 65535.0])
def test_flat_image_gives_zeros(value):
    """A blank image has no intensity range: zeros, not a division by zero."""
    with np.errstate(all="raise"):
        out = preprocess(np.full((300, 250), value, dtype=np.float32), S)
    assert out.shape == (S, S) and out.dtype == np.float32
    assert not out.any()


@pytest.mark.parametrize("scale, shift", [(1.0, 1000.0), (37.5, -512.0), (257.0, 0.0), (0.001, 3.0)])
def test_percentile_scaling_is_shift_and_scale_invariant(chest8, scale, shift):
    """8-bit, 12-bit, 16-bit or Hounsfield-like units of the same image look the same."""
    base = chest8.astype(np.float32)
    np.testing.assert_allclose(preprocess(base * scale + shift, S), preprocess(base, S), atol=1e-5)


def test_scale_to_unit_maps_percentiles_to_0_and_1():
    """p0.5 -> 0 and p99.5 -> 1, clipped outside: outliers don't compress the range."""
    values = np.linspace(0.0, 1000.0, 100_001, dtype=np.float32).reshape(-1, 1)
    out = scale_to_unit(values)
    lo, hi = np.percentile(values, [0.5, 99.5])
    expected = np.clip((values - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_burned_in_outliers_barely_change_the_input(chest8):
    """A few saturated marker pixels must not squash the anatomy into a narrow range."""
    base = chest8.astype(np.float32)
    marked = base.copy()
    marked[100:104, 60:85] = 50_000.0  # burned-in text at 200x the image maximum, over anatomy
    diff = np.abs(preprocess(marked, S) - preprocess(base, S))
    assert diff.mean() < 0.01


def test_resize_keeps_orientation_of_non_square_images():
    """Rows stay rows and columns stay columns (a transposed resize would move boxes)."""
    image = np.zeros((120, 300), np.float32)
    image[:, :100] = 1.0          # bright left third
    image[:30, :] += 2.0          # brighter top quarter
    out = resize(image, S)
    assert out.shape == (S, S)
    assert out[S // 2:, : S // 3 - 3].mean() == pytest.approx(1.0, abs=1e-5)
    assert out[S // 2:, S // 3 + 3:].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[: S // 4 - 3, S // 2].mean() == pytest.approx(2.0, abs=1e-5)


def test_resize_does_not_modify_its_input(chest8):
    image = chest8.astype(np.float32)
    copy = image.copy()
    preprocess(image, S)
    np.testing.assert_array_equal(image, copy)


# --- MONOCHROME1 ------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 12, 16])
def test_monochrome1_twin_preprocesses_identically(tmp_path, chest8, bits):
    """An inverted detector (MONOCHROME1) must show the model the same image."""
    pixels = to_bits(chest8, bits)
    m2 = write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=bits)
    m1 = write_dicom(tmp_path / "m1.dcm", monochrome1_twin(pixels, bits), bits_stored=bits,
                     photometric="MONOCHROME1")
    np.testing.assert_allclose(_pre(m1), _pre(m2), atol=1e-5)


def _window_for(bits: int) -> tuple[float, float]:
    """A window narrower than the data, so it really clips at both ends."""
    full = (1 << bits) - 1
    return round(full * 0.6), round(full * 0.5)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_monochrome1_twin_with_linear_window(tmp_path, chest8, bits):
    """LINEAR window (PS3.3 C.11.2.1.2.1) is symmetric about ``center - 0.5``.

    Mirroring stored values ``x -> M - x`` (M = 2**bits - 1) therefore maps
    the center ``c`` to ``M - c + 1 = 2**bits - c``: the exact twin.
    """
    pixels = to_bits(chest8, bits)
    center, width = _window_for(bits)
    m2 = write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=bits, window=(center, width))
    m1 = write_dicom(tmp_path / "m1.dcm", monochrome1_twin(pixels, bits), bits_stored=bits,
                     photometric="MONOCHROME1", window=((1 << bits) - center, width))
    display = read_dicom(m2).image
    assert (display == 0).mean() > 0.01 and (display == 1).mean() > 0.01, "window should clip"
    np.testing.assert_allclose(_pre(m1), _pre(m2), atol=1e-5)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_monochrome1_twin_with_exact_and_sigmoid_window(tmp_path, chest8, bits, function):
    """LINEAR_EXACT and SIGMOID are symmetric about ``center``: twin center = M - center."""
    pixels = to_bits(chest8, bits)
    center, width = _window_for(bits)
    full = (1 << bits) - 1
    m2 = write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=bits, window=(center, width),
                     VOILUTFunction=function)
    m1 = write_dicom(tmp_path / "m1.dcm", monochrome1_twin(pixels, bits), bits_stored=bits,
                     photometric="MONOCHROME1", window=(full - center, width), VOILUTFunction=function)
    np.testing.assert_allclose(_pre(m1), _pre(m2), atol=1e-5)


def test_window_is_applied(tmp_path, chest8):
    """A narrow window changes what the model sees (it is not silently ignored)."""
    pixels = to_bits(chest8, 12)
    plain = write_dicom(tmp_path / "plain.dcm", pixels, bits_stored=12)
    windowed = write_dicom(tmp_path / "win.dcm", pixels, bits_stored=12, window=_window_for(12))
    assert np.abs(_pre(plain) - _pre(windowed)).mean() > 0.02


# --- modality LUT (rescale) -------------------------------------------------

def _rescale_cases(chest8):
    s12 = to_bits(chest8, 12).astype(np.int64)
    return {
        # stored unsigned 12-bit, v = 3 s + 7 stored directly as unsigned 16-bit
        "unsigned": dict(stored=s12, bits=12, signed=False, slope=3.0, intercept=7.0, v_signed=False),
        # stored signed 16-bit around zero, v = 2 s + 5000 (all positive)
        "signed16": dict(stored=s12 - 2048, bits=16, signed=True, slope=2.0, intercept=5000.0,
                         v_signed=False),
        # fractional slope, negative intercept: v = 0.5 s - 100 is signed
        "fractional": dict(stored=(s12 // 2) * 2, bits=12, signed=False, slope=0.5, intercept=-100.0,
                           v_signed=True),
    }


@pytest.mark.parametrize("case", ["unsigned", "signed16", "fractional"])
@pytest.mark.parametrize("windowed", [False, True], ids=["no-window", "window"])
def test_rescale_matches_file_storing_modality_values(tmp_path, chest8, case, windowed):
    """Stored ``(v - intercept) / slope`` with rescale == storing ``v``.

    The window is in modality units, so with a window this also checks the
    order: modality LUT first, VOI second.
    """
    c = _rescale_cases(chest8)[case]
    stored, slope, intercept = c["stored"], c["slope"], c["intercept"]
    values = np.round(stored * slope + intercept).astype(np.int64)
    assert np.array_equal(values, stored * slope + intercept)  # v is exactly representable
    window = None
    if windowed:
        lo, hi = np.percentile(values, [20, 90])
        window = (float(round((lo + hi) / 2)), float(round(hi - lo)))
    a = write_dicom(tmp_path / "rescaled.dcm", stored, bits_stored=c["bits"], signed=c["signed"],
                    rescale=(slope, intercept), window=window)
    b = write_dicom(tmp_path / "direct.dcm", values, bits_stored=16, signed=c["v_signed"], window=window)
    image_a, image_b = read_dicom(a).image, read_dicom(b).image
    np.testing.assert_allclose(image_a, image_b, atol=1e-5)
    if windowed:
        assert (image_a == 0).mean() > 0.05, "the window should clip: the order of LUTs matters"
    np.testing.assert_allclose(_pre(a), _pre(b), atol=1e-5)


@pytest.mark.parametrize("bits", [12, 16])
def test_signed_pixels_keep_their_sign(tmp_path, chest8, bits):
    """Negative stored values are negative, not wrapped to 65535 or 4095 (which would
    scramble the image); 12-bit signed needs sign extension inside 16 allocated bits."""
    stored = to_bits(chest8, 12).astype(np.int64) - 2048
    path = write_dicom(tmp_path / "signed.dcm", stored, bits_stored=bits, signed=True)
    image = read_dicom(path).image
    np.testing.assert_array_equal(image, stored.astype(np.float32))
    reference = write_dicom(tmp_path / "unsigned.dcm", stored + 2048, bits_stored=12)
    np.testing.assert_allclose(_pre(path), _pre(reference), atol=1e-5)


# --- encodings --------------------------------------------------------------

@pytest.fixture(scope="module")
def encoded(tmp_path_factory, chest_full):
    """The same 8-bit shared PNG in each encoding, preprocessed."""
    folder = tmp_path_factory.mktemp("encodings")
    out = {}
    for name, ts in (("uncompressed", ExplicitVRLittleEndian), ("rle", RLELossless),
                     ("j2k_lossless", JPEG2000Lossless), ("jpeg_baseline", JPEGBaseline8Bit)):
        out[name] = _pre(write_dicom(folder / f"{name}.dcm", chest_full, transfer_syntax=ts))
    return out


@pytest.mark.parametrize("name", ["rle", "j2k_lossless"])
def test_lossless_encodings_give_the_same_input(encoded, name):
    np.testing.assert_allclose(encoded[name], encoded["uncompressed"], atol=1e-6)


def test_jpeg_baseline_gives_nearly_the_same_input(encoded):
    """Lossy JPEG (quality 95) moves pixels a little, never the whole image."""
    diff = np.abs(encoded["jpeg_baseline"] - encoded["uncompressed"])
    assert diff.mean() < 0.01
    assert diff.max() < 0.1


@pytest.mark.parametrize("bits", [12, 16])
@pytest.mark.parametrize("ts", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k_lossless"])
def test_lossless_encodings_at_high_bit_depth(tmp_path, chest8, bits, ts):
    pixels = to_bits(chest8, bits)
    plain = write_dicom(tmp_path / "plain.dcm", pixels, bits_stored=bits)
    packed = write_dicom(tmp_path / "packed.dcm", pixels, bits_stored=bits, transfer_syntax=ts)
    np.testing.assert_array_equal(read_dicom(packed).image, read_dicom(plain).image)


# --- non-square DICOMs --------------------------------------------------------

@pytest.mark.parametrize("shape", [(300, 180), (180, 300), (333, 517)])
def test_non_square_dicom_is_read_rows_by_columns(tmp_path, chest8, shape):
    """The display image has the file's rows x columns (not transposed) and its values."""
    pixels = make_nonsquare(chest8, *shape)
    path = write_dicom(tmp_path / "ns.dcm", pixels)
    dicom = read_dicom(path)
    assert (dicom.header.rows, dicom.header.columns) == shape
    np.testing.assert_array_equal(dicom.image, pixels.astype(np.float32))
    out = _pre(path)
    assert out.shape == (S, S)
    np.testing.assert_allclose(out, preprocess(pixels.astype(np.float32), S), atol=1e-6)


def test_flat_dicom_gives_zeros_without_error(tmp_path):
    """A blank exposure decodes; preprocessing gives zeros rather than NaN."""
    path = write_dicom(tmp_path / "flat.dcm", np.full((128, 96), 300, np.uint16), bits_stored=12,
                       window=(300, 100))
    out = _pre(path)
    assert out.shape == (S, S) and not out.any()


# --- the pipeline's output is tied to PIPELINE_VERSION -------------------------------

#: SHA-256 of what :func:`_pipeline_checksum` preprocesses, for each PIPELINE_VERSION.
#: Exact float32 bytes, not rounded: every step is integer (JPEG IDCT, LUT lookups) or
#: IEEE-exact elementwise float arithmetic, and Pillow's resize accumulates in double before
#: storing float32, so the bytes are the same whatever numpy/CPU (checked with numpy's SIMD
#: turned off).  Rounding would not make a hash tolerant anyway (of 50,000 values some sit next
#: to any rounding boundary); it would only let small changes through.  The SIGMOID window is
#: left out for that reason: np.exp differs in the last bit between SIMD levels.
#: Version 1 was first recorded on a JSRT film (47f4a0dd...ba130f); the fixtures now hold Wingspan
#: films only, so it is recorded again on fixture film FILM (the same pipeline gives both).
#: Version 2 added the reduced JPEG 2000 and block-mean inputs (v1 decoded both at full size).
PIPELINE_CHECKSUMS = {
    "1": "a528a3c84c14c0a5c4648b799f1e803e045e56f323a49d1f7ecc5ee15dfe4103",
    "2": "2c2a63995596ca5e394c6744ace180ec26e8e5387ae85c071fe027f4d70328b5",
}


def _lut_item(descriptor: list[int], data: list[int], **elements) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item.add_new("LUTData", "US", data)  # LUTData's VR is ambiguous (US or OW) until set
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _pipeline_inputs(siim_dicom, data_dir, folder) -> dict[str, np.ndarray]:
    """Display images that together pass through every step of heartbatch.pixels: the SIIM film
    as training reads it and as `heartbatch run` reads it (reduced-scale JPEG decode), and
    files built to exercise rescale, LINEAR and LINEAR_EXACT windows, MONOCHROME1 and both LUT
    sequences.  Inputs use integer arithmetic only, so they are the same on every machine."""
    s12 = (shared_png(data_dir, FILM)[::2, ::2].astype(np.int64) * 4095) // 255  # 256 x 256, 12 bits
    gamma = [int(65535 * (i / 4095) ** 0.5) for i in range(4096)]
    inverted = [8 * (4095 - i) for i in range(4096)]
    common = dict(bits_stored=12, transfer_syntax=ExplicitVRLittleEndian)
    files = {
        "monochrome1 rescale LINEAR window": write_dicom(
            folder / "m1.dcm", 4095 - s12, photometric="MONOCHROME1", rescale=(2.0, -1000.0),
            window=(1700.0, 4600.0), **common),
        "VOI LUT sequence": write_dicom(
            folder / "voi_lut.dcm", s12, VOILUTSequence=[_lut_item([4096, 0, 16], gamma)], **common),
        "modality LUT sequence LINEAR_EXACT window": write_dicom(
            folder / "modality_lut.dcm", s12, window=(8750.0, 14500.0), VOILUTFunction="LINEAR_EXACT",
            ModalityLUTSequence=[_lut_item([4096, 0, 16], inverted, ModalityLUTType="US")], **common),
    }
    full12 = (shared_png(data_dir, FILM).astype(np.int64) * 4095) // 255  # 512 x 512: reduced by 2 at S
    reduced = {  # v2: JPEG 2000 decoded at a coarser level (integer 5/3 wavelet), the others block-averaged
        f"JPEG 2000 lossless min_side={S}": write_dicom(folder / "j2k.dcm", full12, bits_stored=12,
                                                        transfer_syntax=JPEG2000Lossless),
        f"uncompressed min_side={S}": write_dicom(folder / "native.dcm", full12, **common),
    }
    return {"SIIM": read_dicom(siim_dicom).image,
            f"SIIM min_side={S}": read_dicom(siim_dicom, min_side=S).image,
            **{name: read_dicom(path).image for name, path in files.items()},
            **{name: read_dicom(path, min_side=S).image for name, path in reduced.items()}}


def test_pipeline_output_is_tied_to_pipeline_version(siim_dicom, data_dir, tmp_path):
    """A change in what the model sees must come with a new PIPELINE_VERSION.

    Models record the pipeline version they were trained with, and heartbatch refuses a
    model whose version differs from its own; a change without a bump would feed every
    existing model inputs it was never trained on, silently.
    """
    digests = {name: hashlib.sha256(np.ascontiguousarray(preprocess(image, S), "<f4").tobytes()).hexdigest()
               for name, image in _pipeline_inputs(siim_dicom, data_dir, tmp_path).items()}
    checksum = hashlib.sha256("".join(f"{n}={d}\n" for n, d in digests.items()).encode()).hexdigest()
    per_input = "".join(f"\n  {name}: {digest}" for name, digest in digests.items())
    assert PIPELINE_VERSION in PIPELINE_CHECKSUMS, (
        f"PIPELINE_VERSION {PIPELINE_VERSION!r} has no recorded checksum: add "
        f"{PIPELINE_VERSION!r}: {checksum!r} to PIPELINE_CHECKSUMS in tests/test_pixels.py")
    assert checksum == PIPELINE_CHECKSUMS[PIPELINE_VERSION], (
        f"the preprocessed pixels changed but PIPELINE_VERSION is still {PIPELINE_VERSION!r}. If the "
        f"change is meant, bump PIPELINE_VERSION in heartbatch/pixels.py and add its checksum "
        f"{checksum!r} to PIPELINE_CHECKSUMS here: models record the pipeline version they were "
        f"trained with, so heartbatch will then refuse models trained before the change (retrain or "
        f"re-export them) instead of feeding them inputs they never saw. If it is not meant, it is a "
        f"bug in heartbatch/pixels.py (or heartbatch/dicom decoding). Only if the test inputs "
        f"themselves changed (tests/dicom_factory.py) record the new checksum without a bump. "
        f"Per input:{per_input}")
