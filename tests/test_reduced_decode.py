"""Decoding at a reduced scale: JPEG 2000 resolution levels, block means for the other encodings,
libjpeg-turbo for lossless JPEG.

The reduced image must cover exactly the extent of the full one (so boxes map back exactly),
never fall below the model's input size, hold the same stored values a full decode would give
(shifts and offsets undone), and give the boxes of a full decode with the shipped model.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_factory import shared_png, to_bits, write_dicom
from heartbatch.dicom import read_dicom
from heartbatch.dicom.decode import block_mean, codestream, reduced_j2k, reduction, stored_pixels
from heartbatch.model import BoxModel
from heartbatch.pixels import display_image, preprocess

imagecodecs = pytest.importorskip("imagecodecs", reason="a core dependency of heartbatch (pyproject.toml)")

S = 224
SIDE = 1024  # 1/4 of it (256) is the coarsest that stays at least S
#: Largest difference in any box coordinate (normalized) between a reduced and a full decode: 2 px at 224.
#: Measured on three films: JPEG 2000 0.5-1.3 px, block means 0.1-0.8 px, and JPEG Baseline's DCT scaling
#: (the reduction heartbatch had before) 0.45-0.52 px; the validation split measures accuracy
#: (benchmarks/reduced_decode.py).
BOX_TOLERANCE = 2 / S


@pytest.fixture(scope="module")
def film(data_dir) -> np.ndarray:
    """A chest film at SIDE x SIDE, 8-bit."""
    return np.asarray(Image.fromarray(shared_png(data_dir, 0)).resize((SIDE, SIDE), Image.Resampling.BILINEAR))


@pytest.fixture(scope="module")
def model() -> BoxModel:
    return BoxModel(None, threads=1)


def stored(film: np.ndarray, bits: int, signed: bool, monochrome1: bool = False) -> np.ndarray:
    values = to_bits(film, bits).astype(np.int64)
    if monochrome1:
        values = (1 << bits) - 1 - values
    return values - (1 << (bits - 1)) if signed else values


def j2k_dicom(path, values: np.ndarray, bits: int, signed: bool, *, resolutions: int, reversible: bool = True,
              photometric: str = "MONOCHROME2"):
    """A JPEG 2000 file from a stream with a chosen number of resolution levels (OpenJPEG via imagecodecs);
    lossy ones as pydicom writes them (OpenJPEG's default 6 resolutions, the factory's compression ratio)."""
    if not reversible:
        assert resolutions == 6
        return write_dicom(path, values, bits_stored=bits, signed=signed, photometric=photometric,
                           transfer_syntax=JPEG2000)
    path = write_dicom(path, values, bits_stored=bits, signed=signed, photometric=photometric)
    ds = pydicom.dcmread(path)
    dtype = (np.int8 if bits <= 8 else np.int16) if signed else (np.uint8 if bits <= 8 else np.uint16)
    stream = imagecodecs.jpeg2k_encode(values.astype(dtype), level=0, codecformat="J2K", bitspersample=bits,
                                       resolutions=resolutions, reversible=True)
    ds.PixelData = encapsulate([stream])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(path, enforce_file_format=True)
    return path


def boxes(model: BoxModel, image: np.ndarray) -> np.ndarray:
    return model.predict(preprocess(image, S)[None])[0]


# --- JPEG 2000 ---------------------------------------------------------------------

@pytest.mark.parametrize("reversible", [True, False], ids=["lossless", "lossy"])
@pytest.mark.parametrize("bits, signed, photometric", [
    (8, False, "MONOCHROME2"), (12, False, "MONOCHROME2"), (12, True, "MONOCHROME2"),
    (16, False, "MONOCHROME2"), (16, True, "MONOCHROME2"), (12, False, "MONOCHROME1"),
])
def test_j2k_reduced_decode_gives_the_boxes_of_a_full_decode(tmp_path, film, model, bits, signed, photometric,
                                                              reversible):
    values = stored(film, bits, signed, monochrome1=photometric == "MONOCHROME1")
    path = j2k_dicom(tmp_path / "f.dcm", values, bits, signed, resolutions=6, reversible=reversible,
                     photometric=photometric)
    full, reduced = read_dicom(path), read_dicom(path, min_side=S)
    assert full.image.shape == (SIDE, SIDE) and reduced.image.shape == (SIDE // 4, SIDE // 4)
    assert reduced.header == full.header  # rows/columns stay the stored ones: boxes map back to them
    # the reduced stored values are in the full decode's units (Pillow's shift and signed offset undone)
    low = reduced_j2k(pydicom.dcmread(path), S).astype(np.float64)
    mean = block_mean(stored_pixels(pydicom.dcmread(path)), 4).astype(np.float64)
    assert np.median(np.abs(low - mean)) < 0.01 * (1 << bits)
    np.testing.assert_allclose(boxes(model, reduced.image), boxes(model, full.image), atol=BOX_TOLERANCE)


@pytest.mark.parametrize("resolutions, factor", [(6, 4), (2, 2)])
def test_j2k_reduced_samples_are_moved_to_their_block_centres(tmp_path, resolutions, factor):
    """Level r's samples sit on the first pixel of each 2^r block; left there, a bright square moves
    by (2^r - 1) / 2^(r+1) reduced pixels (0.375 at 1/4) and every box with it."""
    ys, xs = np.indices((SIDE, SIDE))
    # soft edges, as a heart's are (a sharp step makes the wavelet ring, and any centroid with it)
    inside = (1 / (1 + np.exp(-(np.minimum(ys - 300, 700 - ys)) / 6))) * (1 / (1 + np.exp(-(np.minimum(xs - 200, 612 - xs)) / 6)))
    values = np.round(400 + 2600 * inside).astype(np.int64)
    path = j2k_dicom(tmp_path / "square.dcm", values, 12, False, resolutions=resolutions)
    full, reduced = read_dicom(path).image, read_dicom(path, min_side=S).image
    assert reduced.shape == (SIDE // factor, SIDE // factor)

    def centroid(image):
        weight = image - 400
        ys, xs = np.indices(image.shape)
        return np.array([(weight * ys).sum(), (weight * xs).sum()]) / weight.sum()

    expected = (centroid(full) + 0.5) / factor - 0.5  # pixel centres, full -> reduced grid
    np.testing.assert_allclose(centroid(reduced), expected, atol=0.02)


def test_j2k_with_fewer_levels_than_wanted_decodes_at_its_coarsest(tmp_path, film, model):
    """One decomposition level: 1/2 is as far as the stream goes (1/4 would fit S)."""
    values = stored(film, 12, False)
    path = j2k_dicom(tmp_path / "one_level.dcm", values, 12, False, resolutions=2)
    assert codestream(_frame(path)).levels == 1
    reduced = read_dicom(path, min_side=S).image
    assert reduced.shape == (SIDE // 2, SIDE // 2)
    np.testing.assert_allclose(boxes(model, reduced), boxes(model, read_dicom(path).image), atol=BOX_TOLERANCE)


def test_j2k_without_levels_is_decoded_whole_then_block_averaged(tmp_path, film):
    values = stored(film, 12, False)
    path = j2k_dicom(tmp_path / "no_levels.dcm", values, 12, False, resolutions=1)
    assert codestream(_frame(path)).levels == 0
    ds = pydicom.dcmread(path)
    assert reduced_j2k(ds, S) is None
    np.testing.assert_array_equal(read_dicom(path, min_side=S).image, display_image(block_mean(values, 4), ds))


def test_j2k_codestream_header(tmp_path, film):
    path = j2k_dicom(tmp_path / "s.dcm", stored(film, 12, True)[:512, :384], 12, True, resolutions=4)
    header = codestream(_frame(path))
    assert (header.rows, header.columns, header.offset, header.components) == (512, 384, (0, 0), 1)
    assert (header.precision, header.signed, header.levels) == (12, True, 3)
    assert codestream(b"\xff\xd8\xff\xe0 not a J2K stream") is None
    assert codestream(_frame(path)[:40]) is None  # cut off inside the SIZ marker


def test_j2k_whose_signedness_disagrees_with_the_dataset_takes_pydicom_path(tmp_path, film):
    """pydicom reconciles such streams with the dataset; the reduced path does not guess."""
    path = j2k_dicom(tmp_path / "mismatch.dcm", stored(film, 12, False), 12, False, resolutions=6)
    ds = pydicom.dcmread(path)
    ds.PixelRepresentation = 1
    assert reduced_j2k(ds, S) is None


def _frame(path) -> bytes:
    from pydicom.encaps import generate_frames

    return next(generate_frames(pydicom.dcmread(path).PixelData, number_of_frames=1))


# --- the reduction factor ----------------------------------------------------------------

@pytest.mark.parametrize("rows, columns, expected", [
    (1024, 1024, 4), (2048, 2500, 4), (3000, 3000, 8), (4096, 4096, 16), (448, 448, 2), (440, 440, None),
    (2022, 2022, 2), (1023, 1024, None),
])
def test_reduction_divides_both_sides_and_keeps_min_side(rows, columns, expected):
    assert reduction(rows, columns, S, (16, 8, 4, 2)) == expected


# --- the other encodings: block means of the decoded values ------------------------------

@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
@pytest.mark.parametrize("bits, signed", [(8, False), (12, False), (16, True)])
def test_other_encodings_are_reduced_by_an_exact_block_mean(tmp_path, film, model, syntax, bits, signed):
    path = write_dicom(tmp_path / "f.dcm", stored(film, bits, signed), bits_stored=bits, signed=signed,
                       transfer_syntax=syntax)
    ds = pydicom.dcmread(path)
    reduced = read_dicom(path, min_side=S).image
    np.testing.assert_array_equal(reduced, display_image(block_mean(stored_pixels(ds), 4), ds))
    np.testing.assert_allclose(boxes(model, reduced), boxes(model, read_dicom(path).image), atol=BOX_TOLERANCE)


def test_block_mean_rounds_exactly_in_the_stored_type():
    values = np.array([[1, 2, 7, 7], [3, 5, 7, 8]], np.uint16)
    np.testing.assert_array_equal(block_mean(values, 2), np.array([[3, 7]], np.uint16))  # 2.75 -> 3, 7.25 -> 7
    signed = np.array([[-1, -2], [-3, -5]], np.int16)
    assert block_mean(signed, 2).tolist() == [[-3]] and block_mean(signed, 2).dtype == np.int16  # -2.75 -> -3
    extreme = np.full((16, 16), 65535, np.uint16)
    assert block_mean(extreme, 16).tolist() == [[65535]]  # no overflow in the sum
    floats = np.array([[0.5, 1.0], [1.5, 2.25]], np.float32)  # Float Pixel Data: a mean, not rounded
    assert block_mean(floats, 2).tolist() == [[1.3125]] and block_mean(floats, 2).dtype == np.float32


# --- lossless JPEG by libjpeg-turbo, JPEG-LS by CharLS -------------------------------------

@pytest.mark.parametrize("bits", [8, 12, 16])
def test_libjpeg_turbo_decodes_lossless_jpeg_as_pylibjpeg_does(tmp_path, film, bits):
    values = stored(film, bits, False)
    path = write_dicom(tmp_path / "f.dcm", values, bits_stored=bits)
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([imagecodecs.jpeg8_encode(values.astype(np.uint8 if bits == 8 else np.uint16),
                                                         lossless=True, predictor=1, bitspersample=bits)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(path, enforce_file_format=True)
    for plugin in ("libjpeg-turbo", "pylibjpeg"):
        ds = pydicom.dcmread(path)
        ds.pixel_array_options(decoding_plugin=plugin)
        np.testing.assert_array_equal(ds.pixel_array, values, err_msg=plugin)
    assert read_dicom(path, min_side=S).image.shape == (SIDE // 4, SIDE // 4)


def test_jpeg_ls_is_decoded_by_charls(tmp_path, film):
    values = stored(film, 12, False)
    path = write_dicom(tmp_path / "f.dcm", values, bits_stored=12, transfer_syntax=JPEGLSLossless)
    ds = pydicom.dcmread(path)
    ds.pixel_array_options(decoding_plugin="pyjpegls")
    np.testing.assert_array_equal(ds.pixel_array, values)
    np.testing.assert_array_equal(stored_pixels(pydicom.dcmread(path)), values)


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_libjpeg_turbo_matches_pylibjpeg_on_pydicoms_lossless_jpeg_files(name):
    """pydicom's own files: a signed 16-bit process 14 film and an 8-bit SV1 one."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    decoded = {}
    for plugin in ("libjpeg-turbo", "pylibjpeg"):
        ds = pydicom.dcmread(path)
        ds.pixel_array_options(decoding_plugin=plugin)
        decoded[plugin] = ds.pixel_array
    np.testing.assert_array_equal(decoded["libjpeg-turbo"], decoded["pylibjpeg"])


def test_colour_lossless_jpeg_falls_back_to_pylibjpeg():
    """libjpeg-turbo's plugin takes greyscale only; pydicom's next plugin decodes the rest."""
    from pydicom.data import get_testdata_file

    assert stored_pixels(pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_gdcm.dcm"))).ndim == 3


def test_mutated_j2k_streams_on_the_reduced_path_never_escape(tmp_path, film):
    """Bit flips and cuts inside a JPEG 2000 codestream that the reduced path takes (512 px, 1/2 at S):
    each file gives a model input or a typed row, never an exception (as tests/test_fuzz.py, whose
    64-pixel seeds are never reduced)."""
    from heartbatch.workers import Prepared, prepare

    values = stored(film, 12, False)[::2, ::2]
    source = j2k_dicom(tmp_path / "seed.dcm", values, 12, False, resolutions=6).read_bytes()
    start = source.index(b"\xff\x4f\xff\x51")  # SOC SIZ: the codestream
    assert isinstance(prepare(str(tmp_path / "seed.dcm"), S), Prepared)
    rng = np.random.default_rng(0)
    mutant = tmp_path / "mutant.dcm"
    outcomes = set()
    for i in range(60):
        data = bytearray(source)
        if i % 3 == 2:
            data = data[:int(rng.integers(start + 4, len(data)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                at = int(rng.integers(start, min(len(data), start + 400 if i % 3 == 0 else len(data))))
                data[at] ^= 1 << int(rng.integers(0, 8))
        mutant.write_bytes(bytes(data))
        result = prepare(str(mutant), S, timeout=10)
        if isinstance(result, Prepared):
            assert result.image.shape == (S, S) and np.isfinite(result.image).all()
            outcomes.add("ok")
        else:
            assert result.status in ("skipped", "error") and result.reason
            assert not result.reason.startswith("unexpected"), result.detail
            outcomes.add(result.status)
    assert {"ok", "error"} <= outcomes  # both paths were exercised
