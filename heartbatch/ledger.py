"""The durable record of what has been processed, shared by `run` and `watch`.

A SQLite database in a state folder (default ``<report>.state/``) holds, for
every file, its fingerprint (size, mtime, and the settings that shape its
row: model and CTR threshold) and the exact CSV row written for it.  The
ledger is the source of truth; the CSV is its readable copy:

* a batch is committed to the ledger first, then appended to the CSV;
* on start, the CSV is compared with the ledger and rewritten atomically
  from it if they differ (a crash mid-append, a replaced row);
* so ``kill -9`` at any moment, then a re-run, leaves each file exactly once,
  and a re-run with nothing new leaves the report byte-identical.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LedgerError

SCHEMA_VERSION = "1"
STALE = "stale: written by an earlier heartbatch"  # a settings value no run has: the file is re-measured


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str | Path) -> "Fingerprint":
        """Size and mtime; (-1, -1) for a path that cannot be stat'ed (it stays 'unchanged'
        while it stays missing, so a broken link is not re-reported on every run)."""
        try:
            st = os.stat(path)
        except OSError:
            return cls(-1, -1)
        return cls(st.st_size, st.st_mtime_ns)


def _upgradable(old: list[str], new: list[str]) -> bool:
    """``new`` is ``old`` with report columns added (in place, order kept), nothing removed."""
    from .report import COLUMNS

    return [c for c in new if c in old] == old and all(c in COLUMNS for c in new if c not in old)


def key_of(path: str) -> str:
    """Files are known by absolute path, so `run studies` and `run ./studies` agree."""
    return os.path.abspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class Ledger:
    def __init__(self, state_dir: Path):
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(state_dir / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise LedgerError(f"another heartbatch process is writing this report (lock {state_dir / 'lock'}); "
                              f"wait for it to finish or stop it") from None
        self.path = state_dir / "ledger.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS files (
                path TEXT PRIMARY KEY,
                size INTEGER NOT NULL,
                mtime_ns INTEGER NOT NULL,
                settings TEXT NOT NULL,
                row TEXT NOT NULL,
                seq INTEGER NOT NULL
            );
            CREATE INDEX IF NOT EXISTS files_seq ON files(seq);
        """)

    # -- settings -----------------------------------------------------------
    def bind(self, columns: list[str]) -> None:
        """Bind the ledger to the report's columns.

        A report started by an earlier heartbatch (its columns these, less some report
        columns added since) is upgraded in place rather than refused: its rows get empty
        cells in the new columns and are marked stale, so the next run re-measures every
        file it reaches (the new columns need the new measurement) and rows of files it
        does not reach are kept, never lost.  Any other difference (--include-patient-id
        changed, or a newer heartbatch wrote it) is refused.
        """
        stored = self._meta("columns")
        wanted = json.dumps(columns)
        if stored is None:
            self._set_meta("schema", SCHEMA_VERSION)
            self._set_meta("columns", wanted)
        elif stored != wanted:
            old = json.loads(stored)
            if not _upgradable(old, columns):
                raise LedgerError("this report was started with a different column set (--include-patient-id "
                                  "differs, or a newer heartbatch wrote it); use the same options and version, "
                                  "another --out, or --force to start over")
            self._upgrade(old, columns, wanted)

    def _upgrade(self, old: list[str], columns: list[str], wanted: str) -> None:
        """Rewrite every row in the new columns (new cells empty) and mark it stale, in one transaction."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for path, row in db.execute("SELECT path, row FROM files").fetchall():
                cells = dict(zip(old, next(csv.reader(io.StringIO(row)), [])))
                out = io.StringIO()
                csv.writer(out, lineterminator="\n").writerow([cells.get(c, "") for c in columns])
                db.execute("UPDATE files SET row=?, settings=? WHERE path=?", (out.getvalue(), STALE, path))
            self._set_meta("columns", wanted)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def _set_meta(self, key: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # -- queries ------------------------------------------------------------
    def is_current(self, path: str, fingerprint: Fingerprint, settings: str) -> bool:
        row = self._db.execute("SELECT size, mtime_ns, settings FROM files WHERE path=?", (path,)).fetchone()
        return row is not None and row == (fingerprint.size, fingerprint.mtime_ns, settings)

    def rows(self) -> Iterator[str]:
        for (row,) in self._db.execute("SELECT row FROM files ORDER BY seq"):
            yield row

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    # -- updates ------------------------------------------------------------
    def commit(self, entries: Iterable[tuple[str, Fingerprint, str, str]]) -> int:
        """Store (path, fingerprint, settings, csv_row) in one transaction.

        Returns how many entries replaced an existing row (so the CSV needs
        a rewrite to drop the old ones).
        """
        entries = list(entries)
        if not entries:
            return 0
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM files").fetchone()[0]
            replaced = 0
            for path, fp, settings, row in entries:
                seq += 1
                replaced += db.execute("SELECT 1 FROM files WHERE path=?", (path,)).fetchone() is not None
                db.execute("INSERT OR REPLACE INTO files(path, size, mtime_ns, settings, row, seq) "
                           "VALUES (?, ?, ?, ?, ?, ?)", (path, fp.size, fp.mtime_ns, settings, row, seq))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return replaced

    def clear(self) -> None:
        self._db.execute("DELETE FROM files")
        self._db.execute("DELETE FROM meta")

    def close(self) -> None:
        self._db.close()
        self._lock.close()  # releases the flock
