"""Finding input files: recursive, lazy, symlink-loop safe, one entry per real file."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def scan(paths: Iterable[str | Path], exclude: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield every regular file under ``paths`` once, in sorted order per folder.

    Files need not end in ``.dcm``.  Symlinked folders are followed, but a
    folder already visited (same device and inode) is not entered again, so
    a symlink loop ends.  A file reached twice (e.g. through a symlink) is
    yielded once.  ``exclude`` names outputs that live inside the tree.
    """
    excluded = {os.path.realpath(p) for p in exclude}
    seen_files: set[tuple[int, int]] = set()
    seen_dirs: set[tuple[int, int]] = set()
    for root in paths:
        root = Path(root)
        if root.is_dir():
            yield from _walk(root, excluded, seen_files, seen_dirs)
        elif _take(root, excluded, seen_files):
            yield root


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _take(path: Path, excluded: set[str], seen: set[tuple[int, int]]) -> bool:
    try:
        st = path.stat()
    except OSError:
        # broken symlink or vanished file: still an input the user gave us
        return not path.is_dir() and str(path) not in excluded
    if os.path.realpath(path) in excluded or _key(st) in seen:
        return False
    seen.add(_key(st))
    return True


def _walk(folder: Path, excluded, seen_files, seen_dirs) -> Iterator[Path]:
    try:
        st = folder.stat()
    except OSError:
        return
    if _key(st) in seen_dirs or os.path.realpath(folder) in excluded:
        return
    seen_dirs.add(_key(st))
    try:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        path = Path(entry.path)
        try:
            is_dir = entry.is_dir(follow_symlinks=True)
        except OSError:
            is_dir = False
        if is_dir:
            yield from _walk(path, excluded, seen_files, seen_dirs)
        elif _take(path, excluded, seen_files):
            yield path
