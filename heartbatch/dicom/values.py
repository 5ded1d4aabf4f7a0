"""Element values as text: raw for decisions, sanitized for report cells and reasons.

Shared by header reading, the candidate rules, decoding and the display
transforms (:mod:`heartbatch.pixels`); it imports none of them, so each can use it.
Header values reach outputs only through :mod:`heartbatch.sanitize`.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from .. import sanitize


def text(ds: Dataset, keyword: str) -> str:
    """The raw value as a string, for decisions; outputs take :func:`cell` or :func:`shown`."""
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element must not sink the file  # noqa: BLE001
        return ""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().replace("\x00", "")


def cell(ds: Dataset, keyword: str) -> str:
    """The value for a report cell: valid for its VR, else empty (see heartbatch.sanitize)."""
    return sanitize.cell(keyword, text(ds, keyword))


def shown(ds: Dataset, keyword: str) -> str:
    """The value for a reason: valid for its VR, else described."""
    return sanitize.shown(keyword, text(ds, keyword))


def integer(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword, default)
        return int(value) if value not in (None, "") else default
    except Exception:  # noqa: BLE001
        return default


def uid_name(keyword: str, uid: str, missing: str) -> str:
    """A UID's registered name (an unknown valid UID is itself), or what it is."""
    valid = sanitize.value(keyword, uid)
    if valid is None:
        return sanitize.invalid(keyword)
    return UID(valid).name if valid else missing


def named(ds: Dataset, keyword: str) -> str:
    """An element for a reason: "SeriesDescription 'LAT'", or what it is when invalid."""
    valid = sanitize.value(keyword, text(ds, keyword))
    return sanitize.invalid(keyword) if valid is None else f"{keyword} {valid!r}"


def transfer_syntax(ds: Dataset) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
