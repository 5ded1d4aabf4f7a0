"""Opening a file and reading its header: the top-level flow of reading one DICOM file.

:func:`read_header` parses the file with the pixel data deferred and checks it is a
candidate (:mod:`.select`); :func:`read_dicom` then decodes the pixels (:mod:`.decode`)
into the display image (:mod:`heartbatch.pixels`).  Problems are raised as
:class:`Skipped` (not an image we measure) or :class:`ReadError` (should have worked
but did not), each with a reason a user can act on and a short ``code`` programs
decide by.  pydicom's warnings (which quote raw values) never reach stderr.
"""

from __future__ import annotations

import logging
import os
import stat
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .. import sanitize
from ..errors import ReadError, Skipped
from .decode import decode
from .header import DicomHeader, header_of
from .select import check_candidate

_PYDICOM_LOG = logging.getLogger("pydicom")


@dataclass
class DicomImage:
    header: DicomHeader
    image: np.ndarray  # display-oriented float32, rows x columns (or rows/k x columns/k, see read_dicom)


def looks_like_raw_dataset(path: Path) -> bool:
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
        if not looks_like_raw_dataset(path):
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


def read_any_header(path: str | Path) -> tuple[Dataset, DicomHeader]:
    """Parse a file (pixel data deferred) as `run` does, without deciding whether it is measured
    (training labels name a film's size this way, whatever the film)."""
    with _quiet():
        ds = _open(Path(path))
        return ds, header_of(ds)


def read_header(path: str | Path) -> tuple[Dataset, DicomHeader]:
    """Parse a file (pixel data deferred) and check it is a candidate."""
    ds, header = read_any_header(path)
    with _quiet():
        try:
            check_candidate(ds, header)
        except Skipped as exc:
            exc.header = header
            raise
    return ds, header


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
