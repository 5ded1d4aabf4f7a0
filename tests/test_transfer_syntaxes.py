"""Every uncompressed transfer syntax pydicom reads gives the same image and the
same boxes, deflated included: its element offsets count in the inflated
stream, so the truncation check must not compare them with the file size."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_factory import shared_png, to_bits, truncate, write_dicom
from heartbatch import cli
from heartbatch.dicom import ReadError, read_dicom
from heartbatch.workers import prepare

BOX_COLUMNS = ["heart_x0", "heart_y0", "heart_x1", "heart_y1", "thorax_x0", "thorax_y0", "thorax_x1", "thorax_y1"]


def _resave(source: Path, path: Path, syntax: str) -> Path:
    """The same dataset re-encoded by pydicom in another transfer syntax."""
    ds = pydicom.dcmread(source)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def chest_copies(tmp_path_factory, data_dir) -> dict[str, Path]:
    """A 12-bit chest CR (16 bits allocated, so byte order matters) in four encodings."""
    root = tmp_path_factory.mktemp("syntaxes")
    pixels = to_bits(shared_png(data_dir, 0), 12)
    explicit = write_dicom(root / "explicit.dcm", pixels, bits_stored=12)
    return {
        "explicit": explicit,
        "deflated": _resave(explicit, root / "deflated.dcm", DeflatedExplicitVRLittleEndian),
        "implicit": _resave(explicit, root / "implicit.dcm", ImplicitVRLittleEndian),
        # pydicom will not re-save little endian data as big endian: the factory swaps the pixels
        "big_endian": write_dicom(root / "big_endian.dcm", pixels, bits_stored=12,
                                  transfer_syntax=ExplicitVRBigEndian),
    }


def test_pydicom_deflated_file_is_read():
    """pydicom's own deflated file was reported as 'truncated file' before."""
    image = read_dicom(get_testdata_file("image_dfl.dcm"))
    assert image.image.shape == (512, 512)


def test_every_encoding_decodes_to_the_same_image(chest_copies):
    assert pydicom.dcmread(chest_copies["deflated"]).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    reference = read_dicom(chest_copies["explicit"])
    for name, path in chest_copies.items():
        image = read_dicom(path)
        same = ("rows", "columns", "pixel_spacing_mm", "modality", "view_position", "study_date")
        assert [getattr(image.header, k) for k in same] == [getattr(reference.header, k) for k in same], name
        np.testing.assert_array_equal(image.image, reference.image, err_msg=name)


def test_every_encoding_gives_the_same_boxes_with_the_shipped_model(chest_copies, tmp_path):
    out = tmp_path / "report.csv"
    assert cli.main(["run", *map(str, chest_copies.values()), "--out", str(out),
                     "--workers", "0", "--threads", "1", "--quiet"]) == 0
    with open(out, newline="", encoding="utf-8") as fh:
        rows = {Path(row["path"]).stem: row for row in csv.DictReader(fh)}
    assert sorted(rows) == sorted(chest_copies)
    assert all(row["status"] == "ok" for row in rows.values()), {k: r["reason"] for k, r in rows.items()}
    boxes = {name: [row[c] for c in BOX_COLUMNS] + [row["ctr"]] for name, row in rows.items()}
    assert all(boxes[name] == boxes["explicit"] for name in boxes), boxes


def test_truncated_deflated_file_is_a_truncated_file(chest_copies, tmp_path):
    path = tmp_path / "cut.dcm"
    path.write_bytes(chest_copies["deflated"].read_bytes())
    truncate(path, 0.6)
    with pytest.raises(ReadError) as info:
        read_dicom(path)
    assert info.value.code == "truncated" and "truncated" in info.value.reason


def test_truncated_uncompressed_file_still_is(chest_copies, tmp_path):
    """The check that misfired on deflated data still catches a cut copy."""
    for name in ("explicit", "implicit", "big_endian"):
        path = tmp_path / f"{name}.dcm"
        path.write_bytes(chest_copies[name].read_bytes())
        record = prepare(str(truncate(path, 0.6)), 224)
        assert (record.status, record.code) == ("error", "truncated"), (name, record.reason)
