"""What every result file shares on the way out: the device it names as its maker, and an atomic
save, so a reader never sees half a file and a result written again replaces the old one."""

from __future__ import annotations

from pathlib import Path

import pydicom

from ..files import replacing

MANUFACTURER = "heartbatch"


def software_version() -> str:
    """heartbatch's version, cut to the 64 characters of a LO value."""
    from .. import __version__

    return str(__version__)[:64]


def save(dataset: pydicom.Dataset, path: Path) -> Path:
    """Write ``dataset`` to ``path`` (its folder made if needed) through a temporary file renamed
    into place; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        dataset.save_as(tmp, enforce_file_format=True)
    return path
