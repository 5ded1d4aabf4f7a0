"""heartbatch.dicom on real files: header fields, spacing, display orientation
and which files are measured, skipped or errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from pydicom.uid import MPEG2MPML, ExplicitVRLittleEndian, JPEGBaseline8Bit

from dicom_factory import make_nonsquare, shared_png, to_bits, truncate, write_dicom, write_text_sr
from heartbatch.dicom import ReadError, Skipped, read_dicom, read_header
from heartbatch.dicom.decode import DECODER_PREFERENCE, decoder_for, plugin_order
from heartbatch.pixels import preprocess


@pytest.fixture(scope="module")
def small8(data_dir) -> np.ndarray:
    return make_nonsquare(shared_png(data_dir, 1), 160, 128)


@pytest.fixture(scope="module")
def rg1_images(rg1, rg1_j2k):
    """Both RG1 files decoded once (they are 1955 x 1841, 15 bits)."""
    return read_dicom(rg1), read_dicom(rg1_j2k)


# --- real files -------------------------------------------------------------

def test_siim_header_fields(siim_dicom):
    """A real PACS export: secondary capture of a CR, JPEG baseline, PA, 0.168 mm."""
    dicom = read_dicom(siim_dicom)
    h = dicom.header
    assert (h.rows, h.columns) == (1024, 1024)
    assert h.modality == "CR"
    assert h.view_position == "PA"
    assert h.pixel_spacing_mm == pytest.approx((0.168, 0.168))
    assert h.study_instance_uid == "1.2.276.0.7230010.3.1.2.8323329.6904.1517875201.850818"
    assert h.series_instance_uid == "1.2.276.0.7230010.3.1.3.8323329.6904.1517875201.850817"
    assert h.sop_instance_uid == "1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819"
    assert h.study_date == "19010101"
    assert dicom.image.shape == (1024, 1024) and dicom.image.dtype == np.float32
    assert np.ptp(dicom.image) > 100  # 8-bit content, not a blank frame


def test_siim_is_display_oriented(siim_dicom):
    """MONOCHROME2 chest: mediastinum brighter than the lung fields."""
    _assert_display_oriented(read_dicom(siim_dicom).image)


def test_rg1_uncompressed_and_j2k_decode_to_the_same_image(rg1_images):
    """Same image, two transfer syntaxes (UNCI came from a 10:1 lossy original,
    so they agree to about 1% of the display range, not bit for bit)."""
    a, b = rg1_images
    assert a.image.shape == b.image.shape == (1955, 1841)
    span = float(np.ptp(a.image))
    np.testing.assert_allclose(a.image, b.image, atol=0.03 * span)
    assert np.abs(a.image - b.image).mean() < 0.005 * span
    np.testing.assert_allclose(preprocess(a.image, 224), preprocess(b.image, 224), atol=0.01)


def _assert_display_oriented(image: np.ndarray) -> None:
    rows, cols = image.shape
    band = image[rows // 4: 3 * rows // 4]
    center = band[:, int(cols * 0.45): int(cols * 0.55)].mean()
    left = band[:, int(cols * 0.15): int(cols * 0.30)].mean()
    right = band[:, int(cols * 0.70): int(cols * 0.85)].mean()
    assert center > left and center > right, (center, left, right)


@pytest.mark.parametrize("which", [0, 1], ids=["RG1_UNCI", "RG1_J2KR"])
def test_rg1_monochrome1_is_display_oriented(rg1_images, which):
    """MONOCHROME1 (15-bit) is inverted: lungs dark, mediastinum bright."""
    _assert_display_oriented(rg1_images[which].image)
    _assert_display_oriented(preprocess(rg1_images[which].image, 224))


def test_rg1_header(rg1_images):
    h = rg1_images[0].header
    assert (h.rows, h.columns, h.modality, h.view_position) == (1955, 1841, "CR", "PA")


def test_rg1_zero_pixel_spacing_means_no_millimetres(rg1_images):
    """RG1 has PixelSpacing 0\\0: that is "unknown", never a zero-width millimetre."""
    for dicom in rg1_images:
        assert dicom.header.pixel_spacing_mm is None


# --- pixel spacing ------------------------------------------------------------

def test_pixel_spacing_is_row_then_column(tmp_path, small8):
    path = write_dicom(tmp_path / "a.dcm", small8, pixel_spacing=(0.2, 0.15))
    assert read_header(path)[1].pixel_spacing_mm == pytest.approx((0.2, 0.15))


def test_imager_pixel_spacing_used_when_pixel_spacing_absent(tmp_path, small8):
    path = write_dicom(tmp_path / "a.dcm", small8, pixel_spacing=None, imager_pixel_spacing=(0.139, 0.143))
    assert read_header(path)[1].pixel_spacing_mm == pytest.approx((0.139, 0.143))


def test_pixel_spacing_preferred_over_imager_pixel_spacing(tmp_path, small8):
    path = write_dicom(tmp_path / "a.dcm", small8, pixel_spacing=(0.1, 0.1), imager_pixel_spacing=(0.2, 0.2))
    assert read_header(path)[1].pixel_spacing_mm == pytest.approx((0.1, 0.1))


def test_no_spacing_at_all(tmp_path, small8):
    path = write_dicom(tmp_path / "a.dcm", small8, pixel_spacing=None)
    assert read_dicom(path).header.pixel_spacing_mm is None


@pytest.mark.parametrize("raw", ["0\\0", "abc\\def", "0.1\\x", "-0.1\\-0.1", "nan\\nan", "\\", "0.14\\0"])
def test_malformed_or_zero_spacing_is_none(tmp_path, small8, raw):
    """Real exports carry junk here; it must mean "no millimetres", not a crash."""
    path = write_dicom(tmp_path / "a.dcm", small8, pixel_spacing=raw)
    dicom = read_dicom(path)
    assert dicom.header.pixel_spacing_mm is None
    assert dicom.image.shape == small8.shape


# --- which files are measured ---------------------------------------------------

def _skip_reason(path) -> str:
    with pytest.raises(Skipped) as info:
        read_dicom(path)
    reason = info.value.reason
    assert reason and reason.strip() == reason
    return reason


@pytest.mark.parametrize("view", ["LL", "RL", "LATERAL"])
def test_lateral_view_position_is_skipped(tmp_path, small8, view):
    reason = _skip_reason(write_dicom(tmp_path / "lat.dcm", small8, view_position=view))
    assert "lateral" in reason.lower()


def test_lateral_in_series_description_is_skipped(tmp_path, small8):
    """No ViewPosition, but the series says so."""
    path = write_dicom(tmp_path / "lat.dcm", small8, view_position=None, SeriesDescription="CHEST LAT")
    assert "lateral" in _skip_reason(path).lower()


@pytest.mark.parametrize("modality", ["CT", "MR", "US"])
def test_other_modalities_are_skipped(tmp_path, small8, modality):
    reason = _skip_reason(write_dicom(tmp_path / "x.dcm", small8, modality=modality, view_position=None))
    assert "modality" in reason.lower() and modality in reason


def test_real_ct_file_is_skipped():
    from pydicom.data import get_testdata_file

    assert "modality" in _skip_reason(get_testdata_file("CT_small.dcm")).lower()


def test_structured_report_without_pixels_is_skipped(tmp_path):
    assert "no pixel data" in _skip_reason(write_text_sr(tmp_path / "sr.dcm")).lower()


def test_multi_frame_is_skipped(tmp_path, small8):
    frames = np.stack([small8, small8, small8])
    reason = _skip_reason(write_dicom(tmp_path / "mf.dcm", frames))
    assert "multi-frame" in reason.lower()


def test_rgb_is_skipped(tmp_path, small8):
    rgb = np.stack([small8] * 3, axis=-1)
    reason = _skip_reason(write_dicom(tmp_path / "rgb.dcm", rgb, photometric="RGB"))
    assert "colour" in reason.lower() or "color" in reason.lower()


def test_other_body_part_is_skipped(tmp_path, small8):
    reason = _skip_reason(write_dicom(tmp_path / "hand.dcm", small8, body_part="HAND"))
    assert "HAND" in reason and "body part" in reason.lower()


def test_secondary_capture_without_body_part_is_accepted(tmp_path, small8):
    """A screenshot-style export of a chest film: nothing says it is not a chest X-ray."""
    path = write_dicom(tmp_path / "sc.dcm", small8, modality="OT", sop_class="SC", body_part=None,
                       view_position=None)
    dicom = read_dicom(path)
    assert dicom.header.modality == "OT"
    assert dicom.image.shape == small8.shape


def test_dx_for_processing_is_accepted(tmp_path, small8):
    path = write_dicom(tmp_path / "dx.dcm", to_bits(small8, 14), bits_stored=14, modality="DX",
                       sop_class="DX_PROCESSING")
    dicom = read_dicom(path)
    assert dicom.header.modality == "DX"
    np.testing.assert_array_equal(dicom.image, to_bits(small8, 14).astype(np.float32))


def test_dx_for_presentation_is_accepted(tmp_path, small8):
    dicom = read_dicom(write_dicom(tmp_path / "dx.dcm", small8, modality="DX", sop_class="DX"))
    assert dicom.header.view_position == "PA"


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")
@pytest.mark.parametrize("body_part", ["CHEST", "THORAX", "chest"])
def test_chest_body_parts_are_accepted(tmp_path, small8, body_part):
    path = write_dicom(tmp_path / "c.dcm", small8, body_part=body_part)
    assert pydicom.dcmread(path, stop_before_pixels=True).BodyPartExamined == body_part  # the case is in the file
    dicom = read_dicom(path)  # a file that is not the chest raises Skipped (test_other_body_part_is_skipped)
    assert (dicom.header.modality, dicom.header.view_position) == ("CR", "PA")
    np.testing.assert_array_equal(dicom.image, small8.astype(np.float32))


def test_text_file_is_not_a_dicom_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("patient notes, not an image\n" * 20)
    assert _skip_reason(path) == "not a DICOM file"


def test_truncated_file_is_a_read_error(tmp_path, small8):
    """A cut-short copy should have been measurable: error, not skipped."""
    path = truncate(write_dicom(tmp_path / "t.dcm", to_bits(small8, 16), bits_stored=16), 0.6)
    with pytest.raises(ReadError) as info:
        read_dicom(path)
    assert info.value.reason


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_truncated_jpeg_is_a_read_error(tmp_path, small8):
    """Most exports are compressed: a cut-short JPEG file is an error to re-copy,
    not a file with "no pixel data" (pydicom returns an empty dataset for it)."""
    path = truncate(write_dicom(tmp_path / "t.dcm", small8, transfer_syntax=JPEGBaseline8Bit), 0.7)
    with pytest.raises(ReadError) as info:
        read_dicom(path)
    assert info.value.reason


def test_problems_carry_a_code_the_watcher_decides_by(tmp_path, small8):
    """A copy in progress looks like these skips; the watcher matches their codes, not
    their reason texts, so rewording a reason cannot change what it waits for."""
    import os
    import time

    from heartbatch.watch import _looks_incomplete
    from heartbatch.workers import prepare

    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image\n" * 20)
    write_text_sr(tmp_path / "sr.dcm")
    write_dicom(tmp_path / "lat.dcm", small8, view_position="LL")
    truncate(write_dicom(tmp_path / "cut.dcm", to_bits(small8, 16), bits_stored=16), 0.6)
    records = {name: prepare(str(tmp_path / name), 224)
               for name in ("empty.dcm", "notes.txt", "sr.dcm", "lat.dcm", "cut.dcm")}
    assert {name: (r.status, r.code) for name, r in records.items()} == {
        "empty.dcm": ("skipped", "empty"), "notes.txt": ("skipped", "not_dicom"),
        "sr.dcm": ("skipped", "no_pixels"), "lat.dcm": ("skipped", "lateral"), "cut.dcm": ("error", "truncated")}
    now = time.time()
    assert [name for name, r in records.items() if _looks_incomplete(r, now, 30.0)] == [
        "empty.dcm", "notes.txt", "sr.dcm", "cut.dcm"]
    records["sr.dcm"].reason = "reworded"
    assert _looks_incomplete(records["sr.dcm"], now, 30.0)
    os.utime(tmp_path / "sr.dcm", (now - 60, now - 60))
    assert not _looks_incomplete(records["sr.dcm"], now, 30.0)


def test_skipped_files_keep_their_header(tmp_path, small8):
    """The report row of a skipped file still names its study and series."""
    path = write_dicom(tmp_path / "lat.dcm", small8, view_position="LL", study_uid="1.2.3.4.5")
    with pytest.raises(Skipped) as info:
        read_dicom(path)
    assert info.value.header is not None
    assert info.value.header.study_instance_uid == "1.2.3.4.5"
    assert info.value.header.view_position == "LL"


# --- reduced-scale JPEG decoding (what the runner asks for) -----------------

def test_siim_decodes_at_a_quarter_when_224_is_enough(siim_dicom):
    """1024 x 1024 JPEG Baseline, min side 224: decoded at 1/4 (256 x 256) by DCT
    scaling; the model input differs from the full decode only by resampling noise."""
    full = read_dicom(siim_dicom)
    reduced = read_dicom(siim_dicom, min_side=224)
    assert reduced.image.shape == (256, 256)
    assert reduced.header == full.header  # geometry maps back to the stored 1024 x 1024
    a, b = preprocess(full.image, 224), preprocess(reduced.image, 224)
    assert np.abs(a - b).mean() < 0.005 and np.abs(a - b).max() < 0.2
    assert read_dicom(siim_dicom, min_side=300).image.shape == (512, 512)
    assert read_dicom(siim_dicom, min_side=600).image.shape == (1024, 1024)


@pytest.mark.parametrize("shape, expected", [
    ((1000, 1016), (250, 254)),    # 1/8 would go below 224: 1/4
    ((1001, 1000), (1001, 1000)),  # an odd side: no exact reduction, full decode
    ((700, 702), (350, 351)),      # only 2 divides both
])
def test_reduced_decode_only_by_exact_factors(data_dir, tmp_path, shape, expected):
    """The reduced image must cover exactly the stored extent, so only factors
    that divide both sides are used, and never below the asked-for side."""
    image = make_nonsquare(shared_png(data_dir, 11), *shape)  # bright, full range
    path = write_dicom(tmp_path / "j.dcm", image, transfer_syntax=JPEGBaseline8Bit)
    reduced = read_dicom(path, min_side=224)
    assert reduced.image.shape == expected
    assert (reduced.header.rows, reduced.header.columns) == shape
    full = read_dicom(path)
    np.testing.assert_allclose(preprocess(reduced.image, 224), preprocess(full.image, 224), atol=0.25)
    assert np.abs(preprocess(reduced.image, 224) - preprocess(full.image, 224)).mean() < 0.01


def test_reduced_decode_keeps_monochrome1_and_window(data_dir, tmp_path):
    """The inversion and the VOI window still apply after a reduced decode."""
    image = make_nonsquare(shared_png(data_dir, 12), 1024, 1024)  # bright: the window clips it
    plain = write_dicom(tmp_path / "m2.dcm", image, transfer_syntax=JPEGBaseline8Bit)
    inverted = write_dicom(tmp_path / "m1.dcm", 255 - image, photometric="MONOCHROME1",
                           transfer_syntax=JPEGBaseline8Bit)
    windowed = write_dicom(tmp_path / "w.dcm", 255 - image, photometric="MONOCHROME1",
                           transfer_syntax=JPEGBaseline8Bit, window=(100, 120))
    a, b, w = (read_dicom(p, min_side=224) for p in (plain, inverted, windowed))
    assert a.image.shape == b.image.shape == w.image.shape == (256, 256)
    np.testing.assert_allclose(preprocess(a.image, 224), preprocess(b.image, 224), atol=0.05)
    assert w.image.max() <= 0 and w.image.min() >= -1  # window to [0, 1], then inverted
    np.testing.assert_allclose(preprocess(w.image, 224), preprocess(read_dicom(windowed).image, 224), atol=0.25)


# --- decoder choice (asked of pydicom's decoder, not read from exception texts) ------

def test_plugin_order_is_the_preference_among_installed_plugins():
    """Preferred plugins that are installed, fastest first, then pydicom's own order ("")."""
    jpeg = decoder_for(JPEGBaseline8Bit)
    assert plugin_order(JPEGBaseline8Bit, jpeg) == tuple(
        p for p in DECODER_PREFERENCE[JPEGBaseline8Bit] if p in jpeg.available_plugins) + ("",)
    without_pillow = SimpleNamespace(available_plugins=("pylibjpeg",))
    assert plugin_order(JPEGBaseline8Bit, without_pillow) == ("pylibjpeg", "")
    assert plugin_order(ExplicitVRLittleEndian, decoder_for(ExplicitVRLittleEndian)) == ("",)


def test_a_syntax_pydicom_cannot_decode_has_no_decoder():
    """None, so decoding leaves it to pydicom to say the syntax is not supported."""
    assert decoder_for(MPEG2MPML) is None
    assert decoder_for("") is None
    assert plugin_order(MPEG2MPML, None) == ("",)
