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

With ``--dicom-out``, a row's DICOM result files (written before the row is committed; their
names are deterministic, so a file re-measured after a crash replaces them) are recorded with the
row, and with ``--send-to`` the results still to send are queued in the ``outbox`` table in the
same transaction: a row and its queued results are committed together or not at all.

With a model that has masks, a measured row's masks (packed: :func:`heartbatch.masks.encode_masks`,
a few KB) are kept in the row's ``masks`` column, committed with the row: a file measured again
replaces them (with none, under a model without masks), an unchanged file keeps them.  The HTML
report (:func:`read_masks`) and the review page draw their outlines.

A person's reviews (`heartbatch review`) are kept in the ``reviews`` table, each decision
appended with the fingerprint of the file it judged, and shown in the row's review cells: a
review belongs to the film, so a re-measurement of an unchanged file (another model, threshold,
an upgraded report) keeps it, while a changed file's reviews are set aside (kept, not shown) and
its new row starts unreviewed.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LedgerError
from .schema import COLUMNS, REVIEW_COLUMNS

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
    return [c for c in new if c in old] == old and all(c in COLUMNS for c in new if c not in old)


@dataclass(frozen=True)
class Results:
    """A row's DICOM results: where they went (``key``: the --dicom-out folder and mode), the file
    names written there, and why none were (an error: the next run measures the file again)."""
    key: str = ""
    folder: str = ""
    files: tuple[str, ...] = ()
    error: str = ""

    def done(self, key: str) -> bool:
        return self.key == key and not self.error

    def paths(self) -> set[str]:
        return {os.path.join(self.folder, name) for name in self.files}

    def dumps(self) -> str:
        if not self.key:
            return ""
        return json.dumps({"key": self.key, "folder": self.folder, "files": list(self.files), "error": self.error})

    @classmethod
    def loads(cls, text: str) -> "Results":
        if not text:
            return cls()
        data = json.loads(text)
        return cls(data["key"], data["folder"], tuple(data["files"]), data.get("error", ""))


@dataclass(frozen=True)
class Entry:
    """One row to commit: the file's ledger key, fingerprint and settings, its CSV row, its results."""
    path: str
    fingerprint: Fingerprint
    settings: str
    row: str
    results: Results = Results()
    masks: bytes | None = None   # the row's masks, packed (heartbatch.masks.encode_masks); None: none


@dataclass
class Committed:
    replaced: int = 0                                 # rows that replaced a row (the CSV needs a rewrite)
    obsolete: list[str] = field(default_factory=list)  # result files the new results superseded
    rows: list[str] = field(default_factory=list)      # the rows as stored (a kept review's cells filled in)


def key_of(path: str) -> str:
    """Files are known by absolute path, so `run studies` and `run ./studies` agree."""
    return os.path.abspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True)
class Stored:
    """A row as the ledger holds it: the file's key (absolute path), fingerprint and CSV row."""
    path: str
    fingerprint: Fingerprint
    row: str


def _file_columns(db: sqlite3.Connection) -> set[str]:
    return {c[1] for c in db.execute("PRAGMA table_info(files)")}


def read_masks(state_dir: Path, paths: Iterable[str]) -> dict[str, bytes]:
    """The packed masks of the rows whose ``path`` cell (the report's, as written) is in ``paths``.

    Read-only and without the lock, as a reader beside a writer (the HTML report of a report that a
    review or a watcher holds); the latest row of a path wins, as in the CSV.  A report without a
    ledger, or with one written before masks were kept, has none: an empty dict.
    """
    wanted = set(paths)
    file = Path(state_dir) / "ledger.sqlite"
    if not wanted or not file.is_file():
        return {}
    db = sqlite3.connect(f"{file.absolute().as_uri()}?mode=ro", uri=True, timeout=30)
    try:
        if "masks" not in _file_columns(db):
            return {}
        found = {}
        for row, masks in db.execute("SELECT row, masks FROM files WHERE masks IS NOT NULL ORDER BY seq"):
            path = next(iter(_cells(row)), None)
            if path in wanted:
                found[path] = bytes(masks)
        return found
    finally:
        db.close()


def _cells(row: str) -> list[str]:
    return next(csv.reader(io.StringIO(row)), [])


def _line(cells: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(cells)
    return out.getvalue()


class Ledger:
    def __init__(self, state_dir: Path, shared: bool = False):
        """Open (creating) the ledger in ``state_dir`` and hold its lock.  ``shared``: the
        connection may be used from several threads, one at a time (the caller serializes)."""
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(state_dir / "lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise LedgerError(f"another heartbatch process is writing this report (lock {state_dir / 'lock'}); "
                              f"wait for it to finish or stop it") from None
        self.path = state_dir / "ledger.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=not shared)
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
            CREATE TABLE IF NOT EXISTS outbox (
                file TEXT NOT NULL,
                destination TEXT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0,
                next_try REAL NOT NULL DEFAULT 0,
                last_error TEXT NOT NULL DEFAULT '',
                PRIMARY KEY (file, destination)
            );
            CREATE TABLE IF NOT EXISTS reviews (
                seq INTEGER PRIMARY KEY AUTOINCREMENT,
                path TEXT NOT NULL,
                size INTEGER NOT NULL,
                mtime_ns INTEGER NOT NULL,
                cells TEXT NOT NULL,
                decision TEXT NOT NULL
            );
            CREATE INDEX IF NOT EXISTS reviews_path ON reviews(path);
        """)
        if "results" not in _file_columns(self._db):
            # ledgers written before --dicom-out: their rows have no results recorded
            self._db.execute("ALTER TABLE files ADD COLUMN results TEXT NOT NULL DEFAULT ''")
        if "masks" not in _file_columns(self._db):
            # ledgers written before masks were kept: their rows have none (a re-measure adds them)
            self._db.execute("ALTER TABLE files ADD COLUMN masks BLOB")

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
        """Rewrite every row in the new columns (new cells empty), in one transaction, and mark it
        stale unless the new columns are only a person's review columns (no new measurement)."""
        db = self._db
        remeasure = any(c not in old and c not in REVIEW_COLUMNS for c in columns)
        db.execute("BEGIN IMMEDIATE")
        try:
            for path, row in db.execute("SELECT path, row FROM files").fetchall():
                cells = dict(zip(old, _cells(row)))
                line = _line([cells.get(c, "") for c in columns])
                if remeasure:
                    db.execute("UPDATE files SET row=?, settings=? WHERE path=?", (line, STALE, path))
                else:
                    db.execute("UPDATE files SET row=? WHERE path=?", (line, path))
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
    def is_current(self, path: str, fingerprint: Fingerprint, settings: str, results: str | None = None) -> bool:
        """The file's row is current: same size, mtime and settings, and, when ``results`` (a
        --dicom-out key) is given, its results were written to that destination."""
        row = self._db.execute("SELECT size, mtime_ns, settings, results FROM files WHERE path=?",
                               (path,)).fetchone()
        if row is None or row[:3] != (fingerprint.size, fingerprint.mtime_ns, settings):
            return False
        return results is None or Results.loads(row[3]).done(results)

    def rows(self) -> Iterator[str]:
        for (row,) in self._db.execute("SELECT row FROM files ORDER BY seq"):
            yield row

    def stored(self) -> list[Stored]:
        """Every row with its file's key and fingerprint, in report order."""
        return [Stored(path, Fingerprint(size, mtime), row) for path, size, mtime, row in
                self._db.execute("SELECT path, size, mtime_ns, row FROM files ORDER BY seq")]

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM files").fetchone()[0]

    def masks(self, path: str) -> bytes | None:
        """The packed masks kept with ``path``'s row (:func:`heartbatch.masks.decode_masks` reads
        them); None when the row has none (a model without masks, a row not measured)."""
        found = self._db.execute("SELECT masks FROM files WHERE path=?", (path,)).fetchone()
        return bytes(found[0]) if found and found[0] is not None else None

    def with_masks(self) -> set[str]:
        """The keys of the rows that have masks."""
        return {path for (path,) in self._db.execute("SELECT path FROM files WHERE masks IS NOT NULL")}

    # -- reviews ------------------------------------------------------------
    def columns(self) -> list[str]:
        """The report columns the ledger is bound to (empty for a new ledger)."""
        return json.loads(self._meta("columns") or "[]")

    def _with_review(self, row: str, cells: dict[str, str]) -> str:
        """``row`` with its review cells set from ``cells`` (column -> text, already safe)."""
        columns = self.columns()
        values = _cells(row)
        values += [""] * (len(columns) - len(values))
        for name, value in cells.items():
            values[columns.index(name)] = value
        return _line(values)

    def _current_review(self, path: str, fingerprint: Fingerprint) -> dict[str, str] | None:
        found = self._db.execute("SELECT cells FROM reviews WHERE path=? AND size=? AND mtime_ns=? "
                                 "ORDER BY seq DESC LIMIT 1", (path, fingerprint.size, fingerprint.mtime_ns)
                                 ).fetchone()
        return json.loads(found[0]) if found else None

    def save_review(self, path: str, cells: dict[str, str], decision: str) -> str:
        """Store a person's decision on ``path``'s row and show it in the row's review cells, in one
        durable transaction; returns the new row.  ``cells``: the review columns' text (safe for a
        CSV); ``decision``: what was decided, in full (JSON: the boxes accepted or drawn)."""
        unknown = set(cells) - set(REVIEW_COLUMNS)
        if unknown:
            raise ValueError(f"not review columns: {sorted(unknown)}")
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            found = db.execute("SELECT size, mtime_ns, row FROM files WHERE path=?", (path,)).fetchone()
            if found is None:
                raise LedgerError(f"{path} is not in this report")
            size, mtime_ns, row = found
            row = self._with_review(row, cells)
            db.execute("INSERT INTO reviews(path, size, mtime_ns, cells, decision) VALUES (?, ?, ?, ?, ?)",
                       (path, size, mtime_ns, json.dumps(cells), decision))
            db.execute("UPDATE files SET row=? WHERE path=?", (row, path))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return row

    def decisions(self) -> dict[str, str]:
        """The current decision (JSON, as saved) of every reviewed row, by path: the latest review
        made on the file as it is now."""
        rows = self._db.execute(
            "SELECT r.path, r.decision FROM reviews r JOIN files f ON f.path = r.path "
            "AND f.size = r.size AND f.mtime_ns = r.mtime_ns ORDER BY r.seq")
        return dict(rows.fetchall())

    # -- updates ------------------------------------------------------------
    def commit(self, entries: Iterable[Entry], send_to: str | None = None) -> Committed:
        """Store rows (with their results) in one transaction; with ``send_to``, queue each
        entry's result files for that destination in the same transaction."""
        entries = list(entries)
        done = Committed()
        if not entries:
            return done
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) FROM files").fetchone()[0]
            for entry in entries:
                seq += 1
                old = db.execute("SELECT results FROM files WHERE path=?", (entry.path,)).fetchone()
                if old is not None:
                    done.replaced += 1
                    done.obsolete += Results.loads(old[0]).paths() - entry.results.paths()
                review = self._current_review(entry.path, entry.fingerprint)
                row = entry.row if review is None else self._with_review(entry.row, review)
                done.rows.append(row)
                db.execute("INSERT OR REPLACE INTO files(path, size, mtime_ns, settings, row, seq, results, masks) "
                           "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                           (entry.path, entry.fingerprint.size, entry.fingerprint.mtime_ns, entry.settings,
                            row, seq, entry.results.dumps(), entry.masks))
                if send_to:
                    for file in sorted(entry.results.paths()):
                        db.execute("INSERT OR REPLACE INTO outbox(file, destination) VALUES (?, ?)", (file, send_to))
            for file in done.obsolete:  # a superseded result is not sent any more
                db.execute("DELETE FROM outbox WHERE file=?", (file,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return done

    def clear(self) -> None:
        """Forget the rows (--force); results still queued for sending stay queued, and a person's
        reviews stay (they come back on the rows of files that have not changed)."""
        self._db.execute("DELETE FROM files")
        self._db.execute("DELETE FROM meta")

    def close(self) -> None:
        self._db.close()
        self._lock.close()  # releases the flock


@dataclass(frozen=True)
class Queued:
    file: str
    attempts: int
    last_error: str


class Outbox:
    """The results queued for sending (``--send-to``), seen through a connection of its own so that
    the sending thread works beside the one that commits rows (SQLite's WAL lets both)."""

    def __init__(self, state_dir: Path, destination: str):
        self.destination = destination
        self._db = sqlite3.connect(Path(state_dir) / "ledger.sqlite", isolation_level=None, timeout=30,
                                   check_same_thread=False)
        self._db.execute("PRAGMA synchronous=FULL")

    def due(self, now: float, limit: int = 64) -> list[Queued]:
        rows = self._db.execute("SELECT file, attempts, last_error FROM outbox WHERE destination=? AND next_try<=? "
                                "ORDER BY next_try, file LIMIT ?", (self.destination, now, limit)).fetchall()
        return [Queued(*row) for row in rows]

    def pending(self) -> list[Queued]:
        rows = self._db.execute("SELECT file, attempts, last_error FROM outbox WHERE destination=? ORDER BY file",
                                (self.destination,)).fetchall()
        return [Queued(*row) for row in rows]

    def next_try(self) -> float | None:
        row = self._db.execute("SELECT MIN(next_try) FROM outbox WHERE destination=?", (self.destination,)).fetchone()
        return row[0]

    def sent(self, file: str) -> None:
        self._db.execute("DELETE FROM outbox WHERE file=? AND destination=?", (file, self.destination))

    def failed(self, file: str, error: str, next_try: float) -> None:
        self._db.execute("UPDATE outbox SET attempts=attempts+1, next_try=?, last_error=? WHERE file=? AND destination=?",
                         (next_try, error, file, self.destination))

    def close(self) -> None:
        self._db.close()
