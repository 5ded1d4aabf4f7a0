"""Reading DICOM files: header fields, candidate checks, and decoded display pixels.

Reading is separate from pixel handling (as in pydicom): :func:`read_header`
parses the file with the pixel data deferred, so a lateral view or a CT slice
is rejected without decoding it; :func:`decode` turns a candidate's pixel data
into a display-oriented float image (modality LUT, VOI LUT/window,
MONOCHROME1 inversion).  Problems are raised as :class:`Skipped` (not an
image we measure) or :class:`ReadError` (should have worked but did not),
each with a reason a user can act on and a short ``code`` programs decide by.
Header values reach the header and the reasons only through
:mod:`heartbatch.sanitize`, and pydicom's warnings (which quote raw values)
never reach stderr.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import stat
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from . import sanitize
from .errors import ReadError, Skipped

_PYDICOM_LOG = logging.getLogger("pydicom")
MAX_PIXELS = 20000 * 20000
MIN_SIDE = 64

# SOP classes of projection radiographs (CR, DX for presentation/processing)
# and of secondary captures, which we accept when nothing says otherwise.
CR_DX_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1",        # CR Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",      # Digital X-Ray, For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",    # Digital X-Ray, For Processing
}
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
PROJECTION_MODALITIES = {"CR", "DX"}
SC_MODALITIES = {"", "OT", "SC", "CR", "DX"}
CHEST_WORDS = ("CHEST", "THORAX", "THORAC", "TORAX", "LUNG", "HEART", "CARDIAC", "THX", "CXR")
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD", "LDEC", "RDEC"}
LATERAL_TEXT = re.compile(r"\b(LAT|LATERAL|LL|RL)\b", re.IGNORECASE)

# Fastest first, measured per transfer syntax (Pillow decodes JPEG Baseline
# several times faster than pylibjpeg); later entries are fallbacks.
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
DECODER_PREFERENCE = {
    JPEG_BASELINE: ("pillow", "pylibjpeg"),                # JPEG Baseline
    "1.2.840.10008.1.2.4.51": ("pylibjpeg", "pillow"),     # JPEG Extended
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "pillow"),     # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "pillow"),     # JPEG 2000
    "1.2.840.10008.1.2.5": ("pylibjpeg", "pydicom"),       # RLE Lossless
}


@dataclass(frozen=True)
class DicomHeader:
    """The header fields the report needs; patient identifiers only travel here."""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    study_date: str = ""
    modality: str = ""
    view_position: str = ""
    rows: int = 0
    columns: int = 0
    pixel_spacing_mm: tuple[float, float] | None = None  # (row, column) spacing
    patient_id: str = ""
    accession_number: str = ""


@dataclass
class DicomImage:
    header: DicomHeader
    image: np.ndarray  # display-oriented float32, rows x columns (or rows/k x columns/k, see read_dicom)


def _text(ds: Dataset, keyword: str) -> str:
    """The raw value as a string, for decisions; outputs take :func:`_value`."""
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element must not sink the file  # noqa: BLE001
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().replace("\x00", "")


def _value(ds: Dataset, keyword: str) -> str:
    """The value for a report cell: valid for its VR, else empty (see heartbatch.sanitize)."""
    return sanitize.cell(keyword, _text(ds, keyword))


def _shown(ds: Dataset, keyword: str) -> str:
    """The value for a reason: valid for its VR, else described."""
    return sanitize.shown(keyword, _text(ds, keyword))


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword, default)
        return int(value) if value not in (None, "") else default
    except Exception:  # noqa: BLE001
        return default


def pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """PixelSpacing, else ImagerPixelSpacing; None when absent, zero or malformed."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is None:
                continue
            values = [float(v) for v in (value if isinstance(value, (list, tuple, pydicom.multival.MultiValue))
                                         else [value])]
        except Exception:  # noqa: BLE001 - malformed strings such as "abc"
            continue
        if len(values) == 1:
            values = values * 2
        if len(values) >= 2 and all(math.isfinite(v) and v > 0 for v in values[:2]):
            return values[0], values[1]
    return None


def _header(ds: Dataset) -> DicomHeader:
    return DicomHeader(
        sop_instance_uid=_value(ds, "SOPInstanceUID"),
        study_instance_uid=_value(ds, "StudyInstanceUID"),
        series_instance_uid=_value(ds, "SeriesInstanceUID"),
        study_date=_value(ds, "StudyDate"),
        modality=_value(ds, "Modality"),
        view_position=_value(ds, "ViewPosition"),
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        pixel_spacing_mm=pixel_spacing(ds),
        patient_id=sanitize.patient_cell("PatientID", _text(ds, "PatientID")),
        accession_number=sanitize.patient_cell("AccessionNumber", _text(ds, "AccessionNumber")),
    )


def _looks_like_raw_dataset(path: Path) -> bool:
    """A DICOM dataset written without preamble/file meta starts with a group 0x0008 tag."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return len(head) == 4 and head[:2] in (b"\x08\x00", b"\x02\x00") and head[3] == 0


TRUNCATION_WARNINGS = ("end of file", "delimiter", "truncat", "ended prematurely")
TRUNCATED = "truncated file: it ends before its data does (an incomplete copy?); copy it again"


class _Drop(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


@contextmanager
def _quiet():
    """pydicom warns (and logs) with the offending value quoted, which for a corrupt
    length is kilobytes of the file (names, IDs, pixels): none of it may reach
    stderr or a log."""
    drop = _Drop()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _PYDICOM_LOG.addFilter(drop)
        try:
            yield
        finally:
            _PYDICOM_LOG.removeFilter(drop)


def _stream_size(ds: Dataset, path: Path) -> int:
    """Bytes in the stream that element offsets count in: for a deflated dataset the
    inflated copy pydicom keeps in memory, otherwise the file itself."""
    buffer = getattr(ds, "buffer", None)
    if buffer is not None and not getattr(buffer, "closed", False):
        here = buffer.tell()
        try:
            return buffer.seek(0, os.SEEK_END)
        finally:
            buffer.seek(here)
    return path.stat().st_size


def _read(path: Path, force: bool = False) -> Dataset:
    """dcmread that turns pydicom's truncation warnings into a ReadError.

    pydicom only warns when a file ends inside encapsulated pixel data and
    then returns what it has, which can be an empty dataset: that is a cut-off
    copy, not a file without pixels.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(path, defer_size="64 KB", force=force)
    for warning in caught:
        if any(word in str(warning.message).lower() for word in TRUNCATION_WARNINGS):
            raise ReadError(TRUNCATED, code="truncated")
    if len(ds) == 0:
        raise ReadError("corrupt DICOM: no data elements could be read after the file meta", code="corrupt_header")
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta and ds.original_encoding[0] is not None:
        implicit, little = ds.original_encoding  # no file meta: decode pixels as the dataset was read
        meta.TransferSyntaxUID = (pydicom.uid.ImplicitVRLittleEndian if implicit else
                                  pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian)
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    if (isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF
            and raw.value_tell + raw.length > _stream_size(ds, Path(path))):
        raise ReadError("truncated file: it ends inside its pixel data (an incomplete copy?); copy it again",
                        code="truncated")
    return ds


def _open(path: Path) -> Dataset:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise ReadError("broken symbolic link: its target does not exist", code="broken_link") from None
        raise ReadError("file disappeared before it could be read", code="disappeared") from None
    except OSError as exc:
        raise ReadError(f"cannot stat file: {exc.strerror or sanitize.message(exc)}", code="os_error") from None
    if not stat.S_ISREG(mode):
        raise Skipped("not a regular file (a pipe, socket or device)", code="not_regular")
    if path.stat().st_size == 0:
        raise Skipped("empty file", code="empty")
    try:
        return _read(path)
    except InvalidDicomError:
        if not _looks_like_raw_dataset(path):
            raise Skipped("not a DICOM file", code="not_dicom") from None
        try:
            return _read(path, force=True)
        except ReadError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ReadError(f"unreadable DICOM without file meta: {sanitize.message(exc)}",
                            code="corrupt_header") from None
    except ReadError:
        raise
    except PermissionError:
        raise ReadError("permission denied; check the file's read permissions", code="permission") from None
    except FileNotFoundError:
        raise ReadError("file disappeared before it could be read", code="disappeared") from None
    except IsADirectoryError:
        raise Skipped("a directory, not a file", code="directory") from None
    except OSError as exc:
        raise ReadError(f"cannot read file: {exc.strerror or sanitize.message(exc)}", code="os_error") from None
    except zlib.error as exc:  # a deflated dataset is inflated whole while reading
        if "truncated" in str(exc):
            raise ReadError(TRUNCATED, code="truncated") from None
        raise ReadError(f"corrupt deflated dataset: {sanitize.message(exc)}", code="corrupt_header") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt headers
        raise ReadError(f"corrupt DICOM header: {sanitize.message(exc)}", code="corrupt_header") from None


def _uid_name(keyword: str, uid: str, missing: str) -> str:
    """A UID's registered name (an unknown valid UID is itself), or what it is."""
    valid = sanitize.value(keyword, uid)
    if valid is None:
        return sanitize.invalid(keyword)
    return UID(valid).name if valid else missing


def _named(ds: Dataset, keyword: str) -> str:
    """An element for a reason: "SeriesDescription 'LAT'", or what it is when invalid."""
    valid = sanitize.value(keyword, _text(ds, keyword))
    return sanitize.invalid(keyword) if valid is None else f"{keyword} {valid!r}"


def check_candidate(ds: Dataset, header: DicomHeader) -> None:
    """Raise :class:`Skipped` unless this is a 2-D greyscale frontal chest radiograph.

    Decisions read the raw values (as before); reasons show them only through
    heartbatch.sanitize.
    """
    sop_keyword = "SOPClassUID"
    sop_class = _text(ds, sop_keyword)
    if not sop_class and hasattr(ds, "file_meta"):
        sop_keyword, sop_class = "MediaStorageSOPClassUID", _text(ds.file_meta, "MediaStorageSOPClassUID")
    if sop_class == DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        raise Skipped("DICOMDIR (a directory index, not an image)", code="dicomdir")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise Skipped(f"no pixel data ({_uid_name(sop_keyword, sop_class, 'unknown SOP class')})",
                      code="no_pixels")
    modality = _text(ds, "Modality").upper()
    is_projection = modality in PROJECTION_MODALITIES or sop_class in CR_DX_SOP_CLASSES
    is_sc = sop_class.startswith(SECONDARY_CAPTURE_PREFIX) and modality in SC_MODALITIES
    if not (is_projection or is_sc):
        valid = sanitize.value("Modality", modality)
        shown = f"modality {valid or 'unknown'}" if valid is not None else sanitize.invalid("Modality")
        raise Skipped(f"{shown} is not a projection radiograph (CR/DX expected)", code="not_projection")
    body_part = _text(ds, "BodyPartExamined").upper()
    if body_part and not any(word in body_part for word in CHEST_WORDS):
        valid = sanitize.value("BodyPartExamined", body_part)
        raise Skipped(f"body part {valid!r} is not the chest" if valid is not None else
                      f"body part is not the chest ({sanitize.invalid('BodyPartExamined')})", code="not_chest")
    view = _text(ds, "ViewPosition").upper()
    if view in LATERAL_VIEWS:
        raise Skipped(f"lateral view (ViewPosition {view}); only frontal PA/AP views are measured", code="lateral")
    if not view:
        for keyword in ("SeriesDescription", "ProtocolName", "StudyDescription"):
            if LATERAL_TEXT.search(_text(ds, keyword)):
                raise Skipped(f"lateral view ({_named(ds, keyword)}); only frontal views are measured",
                              code="lateral")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise Skipped(f"multi-frame image ({frames} frames); single projection images expected", code="multi_frame")
    samples = _int(ds, "SamplesPerPixel", 1)
    photometric = _text(ds, "PhotometricInterpretation").upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        what = _shown(ds, "PhotometricInterpretation") if photometric else f"{samples} samples per pixel"
        raise Skipped(f"colour image ({what}); greyscale expected", code="colour")
    if header.rows < MIN_SIDE or header.columns < MIN_SIDE:
        raise Skipped(f"image too small ({header.rows} x {header.columns} pixels)", code="too_small")
    if header.rows * header.columns > MAX_PIXELS:
        raise Skipped(f"image too large ({header.rows} x {header.columns} pixels)", code="too_large")


def read_header(path: str | Path) -> tuple[Dataset, DicomHeader]:
    """Parse a file (pixel data deferred) and check it is a candidate."""
    path = Path(path)
    with _quiet():
        ds = _open(path)
        header = _header(ds)
        try:
            check_candidate(ds, header)
        except Skipped as exc:
            exc.header = header
            raise
    return ds, header


def _syntax(ds: Dataset) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")


def _stored_pixels(ds: Dataset) -> np.ndarray:
    syntax = _syntax(ds)
    errors = []
    for plugin in DECODER_PREFERENCE.get(syntax, ()) + ("",):
        try:
            ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except (RuntimeError, ValueError, NotImplementedError) as exc:
            errors.append(exc)
            if "plugin" not in str(exc).lower() and "available" not in str(exc).lower():
                break  # a real decoding failure, not a missing plugin: don't retry
    exc = errors[-1]
    text = str(exc).lower()
    if "no pixel data decoders" in text or "missing required dependencies" in text \
            or "missing dependencies" in text:
        name = _uid_name("TransferSyntaxUID", syntax, "this transfer syntax")
        options = "; ".join(line.strip() for line in sanitize.redact(str(exc)).splitlines()[1:] if line.strip())
        raise ReadError(f"no decoder installed for {name}; install pylibjpeg-libjpeg, "
                        f"pylibjpeg-openjpeg and pylibjpeg-rle (or python-gdcm)"
                        + (f" [{sanitize.printable(options, 200)}]" if options else ""), code="no_decoder") from None
    raise ReadError(f"pixel data could not be decoded: {sanitize.message(exc)}", code="decode_failed") from None


def _window(ds: Dataset) -> tuple[float, float, str] | None:
    """First VOI window (center, width, function), or None when absent or unusable."""
    try:
        center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
        if center is None or width is None:
            return None
        center = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        width = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
    except (TypeError, ValueError, IndexError):
        return None
    function = _text(ds, "VOILUTFunction").upper() or "LINEAR"
    if not (math.isfinite(center) and math.isfinite(width) and width >= 1):
        return None
    return center, width, function


def apply_voi(image: np.ndarray, ds: Dataset) -> np.ndarray:
    """VOI LUT sequence or window, in place where possible; identity when absent."""
    if "VOILUTSequence" in ds:
        from pydicom.pixels import apply_voi

        try:
            return np.asarray(apply_voi(image, ds), dtype=np.float32)
        except Exception:  # noqa: BLE001 - a broken LUT: fall back to the window
            pass
    window = _window(ds)
    if window is None:
        return image
    center, width, function = window
    if function == "SIGMOID":
        np.subtract(image, center, out=image)
        np.multiply(image, -4.0 / width, out=image)
        np.exp(image, out=image)
        np.add(image, 1.0, out=image)
        np.reciprocal(image, out=image)
        return image
    if function == "LINEAR_EXACT":
        offset, scale = center, 1.0 / width
    else:  # LINEAR, PS3.3 C.11.2.1.2.1
        offset, scale = center - 0.5, 1.0 / max(width - 1.0, 1.0)
    np.subtract(image, offset, out=image)
    np.multiply(image, scale, out=image)
    np.add(image, 0.5, out=image)
    return np.clip(image, 0.0, 1.0, out=image)


def apply_modality(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored values -> float32 modality values (rescale slope/intercept or LUT)."""
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    image = stored.astype(np.float32)
    try:
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        slope, intercept = 1.0, 0.0
    if slope != 1.0 and math.isfinite(slope) and slope != 0:
        np.multiply(image, slope, out=image)
    if intercept != 0.0 and math.isfinite(intercept):
        np.add(image, intercept, out=image)
    return image


def display_image(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored pixel values -> display-oriented float32 (bright = dense)."""
    image = apply_modality(stored, ds)
    windowed = apply_voi(image.copy() if _window(ds) else image, ds)
    lo, hi = np.percentile(windowed[::8, ::8], [1, 99])
    if hi > lo:  # a window that flattens the image is worse than none
        image = windowed
    if _text(ds, "PhotometricInterpretation").upper() == "MONOCHROME1":
        np.negative(image, out=image)
    return image


DCT_SCALES = (8, 4, 2)  # libjpeg decodes baseline JPEG at 1/8, 1/4, 1/2 by scaling the DCT


def _reduced_jpeg(ds: Dataset, min_side: int) -> np.ndarray | None:
    """An 8-bit greyscale JPEG Baseline frame decoded at 1/k scale, or None when
    that is not possible exactly.

    Decoding at 1/4 costs about a quarter of a full decode, and a box average
    over k x k pixels is what an anti-aliased resize does anyway.  Only scales
    that divide both sides are used, so the reduced image covers exactly the
    same extent; anything unusual returns None and takes the full path, which
    also reports errors properly.
    """
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if (_syntax(ds) != JPEG_BASELINE or _int(ds, "SamplesPerPixel", 1) != 1 or _int(ds, "BitsAllocated") != 8
            or _int(ds, "PixelRepresentation") != 0 or _int(ds, "NumberOfFrames", 1) > 1):
        return None
    scale = next((k for k in DCT_SCALES if rows % k == 0 and columns % k == 0
                  and min(rows, columns) // k >= min_side), None)
    if scale is None:
        return None
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
        with Image.open(io.BytesIO(frame)) as jpeg:
            if jpeg.format != "JPEG" or jpeg.mode != "L" or jpeg.size != (columns, rows):
                return None
            jpeg.draft("L", (columns // scale, rows // scale))
            if jpeg.size != (columns // scale, rows // scale):
                return None
            return np.asarray(jpeg)
    except Exception:  # noqa: BLE001 - whatever went wrong, the full decoder will say it better
        return None


def decode(ds: Dataset, min_side: int | None = None) -> np.ndarray:
    """Display pixels of a candidate dataset.  With ``min_side``, the result may be
    reduced by an exact integer factor, to no less than ``min_side`` a side."""
    stored = _reduced_jpeg(ds, min_side) if min_side else None
    if stored is None:
        stored = _stored_pixels(ds)
    if stored.ndim != 2:
        raise Skipped(f"pixel array has shape {stored.shape}; a single 2-D greyscale frame expected",
                      code="not_2d")
    image = display_image(stored, ds)
    del stored
    if not np.isfinite(image).all():
        raise ReadError("pixel values are not finite after the modality/VOI LUT", code="not_finite")
    return image


def read_dicom(path: str | Path, min_side: int | None = None) -> DicomImage:
    """Header + display pixels of a candidate file (raises Skipped / ReadError).

    ``min_side``: the caller only needs this many pixels a side (the model's
    input size), so a decoder that can cheaply decode at a reduced scale may
    do so.  The header keeps the stored Rows/Columns, which is what boxes map
    back to.
    """
    ds, header = read_header(path)
    try:
        with _quiet():
            return DicomImage(header=header, image=decode(ds, min_side))
    except (Skipped, ReadError) as exc:
        exc.header = header
        raise
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom raises AttributeError, struct.error... on corrupt data
        raise ReadError(f"corrupt pixel data or image attributes: {sanitize.message(exc)}", header,
                        code="corrupt_pixels") from None
