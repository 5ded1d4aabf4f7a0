"""Real DICOM files for tests, written with pydicom and its encoder plugins.

The runtime must cope with what scanners and PACS exports contain, so the files
carry full CR/DX headers, file meta and a preamble, and every encoding goes
through the same encoders real tools use (pydicom RLE, OpenJPEG via
pylibjpeg, libjpeg via Pillow for JPEG baseline).
"""

from __future__ import annotations

import io
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    generate_uid,
)

#: Short names for the SOP classes tests need; any UID string is accepted too.
SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray, for presentation
    "DX_PROCESSING": "1.2.840.10008.5.1.4.1.1.1.1.1",
    "SC": "1.2.840.10008.5.1.4.1.1.7",
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "SR": "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR: no pixel data
}
_DEFAULT_SOP = {"CR": "CR", "DX": "DX", "CT": "CT", "MR": "MR", "US": "US", "SR": "SR",
                "OT": "SC"}
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian)
#: Encodings that round-trip exactly (tests compare with ==).
LOSSLESS = UNCOMPRESSED + (RLELossless, JPEG2000Lossless)
LOSSY = (JPEGBaseline8Bit, JPEG2000)


def write_dicom(
    path: str | Path,
    pixels: np.ndarray | None,
    *,
    modality: str = "CR",
    view_position: str | None = "PA",
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    signed: bool = False,
    rescale: tuple[float, float] | None = None,
    window: tuple[float, float] | None = None,
    pixel_spacing: tuple[float, float] | str | None = (0.168, 0.168),
    imager_pixel_spacing: tuple[float, float] | str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    body_part: str | None = "CHEST",
    sop_class: str | None = None,
    study_uid: str | None = None,
    patient_name: str = "Test^Patient",
    patient_id: str = "HB-0001",
    accession: str = "ACC0001",
    quality: int = 95,
    j2k_cr: Sequence[float] = (20,),
    extra: dict[str, Any] | None = None,
    **kw: Any,
) -> Path:
    """Write ``pixels`` (stored values) as a DICOM file and return its path.

    ``pixels`` is 2-D (rows, cols), 3-D (frames, rows, cols), or (rows, cols, 3)
    for RGB/YBR photometrics; ``None`` writes a header-only file.  Integer
    dtype is converted to (u)int8/16 from ``bits_stored``/``signed``.
    ``pixel_spacing``/``imager_pixel_spacing`` may be a raw string written
    verbatim (malformed values are a real-world case).  ``extra`` and ``**kw``
    set any DICOM keyword last; a value of ``None`` deletes the element, so
    tests can remove whatever the defaults put in.
    """
    path = Path(path)
    transfer_syntax = UID(transfer_syntax)
    sop_class = sop_class or _DEFAULT_SOP.get(modality, "SC")
    sop_uid = SOP_CLASSES.get(sop_class, sop_class)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20240115"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "heartbatch-tests"
    ds.ReferringPhysicianName = ""
    ds.PatientName, ds.PatientID = patient_name, patient_id
    ds.PatientBirthDate, ds.PatientSex = "19600101", "O"
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view_position is not None:
        ds.ViewPosition = view_position
    if modality in ("CR", "DX"):
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PatientOrientation = ["L", "F"] if view_position in ("LL", "RL") else ["R", "F"]
    if sop_class == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    elif sop_class == "DX_PROCESSING":
        ds.PresentationIntentType = "FOR PROCESSING"
    elif sop_class == "SC":
        ds.ConversionType = "WSD"

    if pixels is not None:
        _set_pixels(ds, np.asarray(pixels), photometric, bits_stored, signed)
        for keyword, value in (("PixelSpacing", pixel_spacing),
                               ("ImagerPixelSpacing", imager_pixel_spacing)):
            if value is not None:
                _set_ds_value(ds, keyword, value)
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = (_ds(v) for v in rescale)
            ds.RescaleType = "US"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = (_ds(v) for v in window)
    for keyword, value in {**(extra or {}), **kw}.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)

    if pixels is not None:
        _encode(ds, transfer_syntax, quality, list(j2k_cr))
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "HEARTBATCH_TEST"
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # raw/malformed values are deliberate
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def _ds(value: float) -> str:
    """DS strings are limited to 16 characters; repr of a float can exceed it."""
    return f"{value:.10g}"[:16]


def _set_ds_value(ds: Dataset, keyword: str, value: tuple[float, float] | str) -> None:
    if isinstance(value, str):  # raw bytes: pydicom would refuse to hold malformed DS
        tag = Tag(keyword)
        raw = value.encode("latin-1")
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(tag, "DS", len(raw), raw, 0, False, True)
    else:
        setattr(ds, keyword, [_ds(v) for v in value])


def _set_pixels(ds: Dataset, arr: np.ndarray, photometric: str, bits_stored: int | None,
                signed: bool) -> None:
    if bits_stored is None:
        bits_stored = 8 if arr.dtype.itemsize == 1 else 16
    if bits_stored > 16:
        raise ValueError("tests only cover 8 to 16 bits stored")
    dtype = np.dtype(("i" if signed else "u") + ("1" if bits_stored <= 8 else "2"))
    lo, hi = (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (
        0, (1 << bits_stored) - 1)
    if arr.min() < lo or arr.max() > hi:
        raise ValueError(f"values {arr.min()}..{arr.max()} do not fit {bits_stored} bits")
    ds.set_pixel_data(np.ascontiguousarray(arr.astype(dtype)), photometric, bits_stored,
                      generate_instance_uid=False)


def _encode(ds: Dataset, ts: UID, quality: int, j2k_cr: list[float]) -> None:
    """Re-encode the native pixel data into ``ts`` (keeping the SOP Instance UID)."""
    if ts in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        return
    if ts == ExplicitVRBigEndian:
        if ds.BitsAllocated == 16:  # pydicom writes Pixel Data bytes as they are
            arr = np.frombuffer(ds.PixelData, dtype="<u2")
            ds.PixelData = arr.astype(">u2").tobytes()
        return
    if ts == JPEGBaseline8Bit:
        _encode_jpeg_baseline(ds, quality)
        return
    opts: dict[str, Any] = {"generate_instance_uid": False}
    if ts == JPEG2000:
        opts["j2k_cr"] = j2k_cr
    ds.compress(ts, **opts)  # raises with the missing plugin named when none is installed
    if ts == JPEG2000:
        _mark_lossy(ds, "ISO_15444_1")


def _encode_jpeg_baseline(ds: Dataset, quality: int) -> None:
    """pydicom has no JPEG baseline encoder; Pillow (libjpeg) is what real tools use."""
    if ds.BitsAllocated != 8 or ds.PixelRepresentation != 0 or ds.SamplesPerPixel != 1:
        raise ValueError("JPEG baseline needs unsigned 8-bit greyscale pixels")
    arr = ds.pixel_array
    frames = arr[None] if arr.ndim == 2 else arr
    encoded = []
    for frame in frames:
        buf = io.BytesIO()
        Image.fromarray(frame, mode="L").save(buf, format="JPEG", quality=quality)
        encoded.append(buf.getvalue())
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    _mark_lossy(ds, "ISO_10918_1", native=arr.nbytes, compressed=sum(map(len, encoded)))


def _mark_lossy(ds: Dataset, method: str, native: int | None = None,
                compressed: int | None = None) -> None:
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionMethod = method
    if native and compressed:
        ds.LossyImageCompressionRatio = _ds(round(native / compressed, 2))


# --- pixel helpers ---------------------------------------------------------

def shared_png_paths(data_dir: str | Path) -> list[Path]:
    """Sorted so that ``index`` picks the same image on every machine.

    Under the ``data_dir`` fixture (tests/fixtures/data) there are 16 images, all
    Wingspan (JSRT films may not be redistributed): 0-9 from one site (UID root
    1.2.156), 10-15 from two others (1.2.392, 1.2.410). The indices name other
    images in the full shared data set, which also holds JSRT films.
    """
    return sorted(Path(data_dir).glob("cxr-ctr/*/png/*.png"))


def shared_png(data_dir: str | Path, index: int = 0) -> np.ndarray:
    """A real chest X-ray as uint8 (rows, cols): realistic content for decoders."""
    paths = shared_png_paths(data_dir)
    if not paths:
        raise FileNotFoundError(f"no cxr-ctr/*/png/*.png under {data_dir}")
    if not -len(paths) <= index < len(paths):
        raise IndexError(f"image index {index}: {data_dir} has {len(paths)} chest images")
    with Image.open(paths[index]) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def to_bits(img8: np.ndarray, bits: int) -> np.ndarray:
    """Stretch 8-bit values over the full ``bits`` range, as a 12/16-bit detector would."""
    if bits <= 8:
        return np.asarray(img8, dtype=np.uint8)
    scale = ((1 << bits) - 1) / 255.0
    return np.round(np.asarray(img8, dtype=np.float64) * scale).astype(np.uint16)


def monochrome1_twin(pixels: np.ndarray, bits: int) -> np.ndarray:
    """Stored values that, read as MONOCHROME1, display like ``pixels`` as MONOCHROME2."""
    return (((1 << bits) - 1) - np.asarray(pixels, dtype=np.int64)).astype(pixels.dtype)


def make_nonsquare(img: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Resize (not crop) so the anatomy spans the whole grid, like a real detector."""
    resized = Image.fromarray(np.asarray(img, dtype=np.float32), mode="F").resize(
        (cols, rows), Image.BILINEAR)
    out = np.asarray(resized)
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(img.dtype)


def truncate(path: str | Path, keep_fraction: float = 0.6) -> Path:
    """Cut a file short, as an interrupted copy does."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


# --- folders ----------------------------------------------------------------

def write_text_sr(path: str | Path, **kw: Any) -> Path:
    """A Basic Text SR: a valid DICOM file with no pixel data at all."""
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    item.TextValue = "Heart size within normal limits."
    return write_dicom(
        path, None, modality="SR", view_position=None, sop_class="SR", body_part=None,
        ValueType="CONTAINER", ContinuityOfContent="SEPARATE", CompletionFlag="COMPLETE",
        VerificationFlag="UNVERIFIED",
        ConceptNameCodeSequence=[_code("18748-4", "LN", "Diagnostic imaging report")],
        ContentSequence=[item], **kw)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def mixed_folder(root: str | Path, data_dir: str | Path) -> dict[str, str]:
    """A folder like a real export: two frontal CRs among files to skip or fail.

    Returns file name (relative to ``root``) -> expected status.  The 12-bit
    frontal is an AP view so that view-position summaries have both kinds.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    img0, img1 = shared_png(data_dir, 0), shared_png(data_dir, 1)
    write_dicom(root / "frontal_pa_jpeg.dcm", img0, transfer_syntax=JPEGBaseline8Bit)
    write_dicom(root / "frontal_ap_12bit.dcm", to_bits(img1, 12), bits_stored=12,
                view_position="AP", window=(2048, 4096))
    write_dicom(root / "lateral.dcm", img1, view_position="LL")
    shutil.copyfile(get_testdata_file("CT_small.dcm"), root / "ct_small.dcm")
    (root / "README").write_text("not a DICOM file\n")
    truncate(write_dicom(root / "truncated.dcm", to_bits(img0, 16)), 0.6)
    write_text_sr(root / "report_sr.dcm")
    return {
        "frontal_pa_jpeg.dcm": "ok",
        "frontal_ap_12bit.dcm": "ok",
        "lateral.dcm": "skipped",
        "ct_small.dcm": "skipped",
        "README": "skipped",
        "truncated.dcm": "error",
        "report_sr.dcm": "skipped",
    }


def brightness_image(fraction: float, seed: int = 0, rows: int = 160, cols: int = 128) -> np.ndarray:
    """Top ``fraction`` of rows bright, the rest dark, with texture: the
    preprocessed mean is close to ``fraction`` (drives the intensity test model)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 40, size=(rows, cols)).astype(np.uint8)
    cut = int(round(rows * fraction))
    image[:cut] = rng.integers(200, 220, size=(cut, cols))
    return image
