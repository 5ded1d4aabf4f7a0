"""Writing files so that a reader (or a crash) never sees half of one, and naming a file by its bytes."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Path, *, suffix: str = ".tmp", durable: bool = False):
    """Yield a temporary path next to ``path``; when the block ends without an error it replaces
    ``path`` in one rename (with ``durable``, after an fsync of the file and its folder). On an
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def remove_leftovers(folder: Path, pattern: str, *, suffix: str = ".tmp") -> None:
    """Remove the temporary files that :func:`replacing` left under ``pattern`` in ``folder`` when
    its process was killed before the rename (files only; a folder of that name is left alone)."""
    for leftover in Path(folder).glob(pattern + suffix):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes, *, durable: bool = False) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` in one rename."""
    with replacing(path, durable=durable) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
