"""The CSV report: a stable column schema, safe cells, rows written as they come.

Rows are appended and flushed batch by batch, so a crash loses at most the
batch in flight.  Add new columns only at the end of ``COLUMNS``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from ..files import replacing
from ..records import Record
from .ledger import Entry, Results, key_of
from .schema import REVIEW_COLUMNS, columns

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def safe_text(value: str) -> str:
    """Neutralize spreadsheet formulas: a leading ' makes Excel/LibreOffice show text."""
    # undecodable file-name bytes (surrogate escapes) are shown as \xNN, never dropped
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    value = value.replace("\x00", "")
    return "'" + value if value.startswith(FORMULA_PREFIXES) else value


def _num(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def to_row(record: Record, include_patient_id: bool = False) -> list[str]:
    h = record.header
    spacing = h.pixel_spacing_mm if h else None
    text = [record.path, record.status, record.reason,
            h.sop_instance_uid if h else "", h.study_instance_uid if h else "",
            h.series_instance_uid if h else "", h.study_date if h else "", h.modality if h else "",
            h.view_position if h else ""]
    row = [safe_text(v) for v in text]
    row += [str(h.rows) if h and h.rows else "", str(h.columns) if h and h.columns else "",
            _num(spacing[1] if spacing else None, 6)]
    row += [_num(v, 3) for v in (record.heart or (None,) * 4)]
    row += [_num(v, 3) for v in (record.thorax or (None,) * 4)]
    row += [_num(record.ctr, 4), _num(record.heart_width_mm, 2), _num(record.thoracic_width_mm, 2),
            "" if record.enlarged is None else str(record.enlarged).lower(), record.model_id]
    row += [_num(record.chest_score, 3), _num(record.uncertainty, 4),
            str(bool(record.review)).lower() if record.ok else "", safe_text(record.review_reason)]
    row += [""] * len(REVIEW_COLUMNS)  # a person's review; the ledger adds it (heartbatch.report.reviews)
    if include_patient_id:
        row += [safe_text(h.patient_id if h else ""), safe_text(h.accession_number if h else "")]
    return row


def format_rows(records: list[Record], include_patient_id: bool = False) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for record in records:
        writer.writerow(to_row(record, include_patient_id))
    return buffer.getvalue()


def header_line(include_patient_id: bool = False) -> str:
    return ",".join(columns(include_patient_id)) + "\n"


class Report:
    """The report CSV, kept identical to the ledger's rows (in ledger order).

    On open, a CSV that differs from the ledger (crash mid-append, rows replaced
    by a changed file) is rewritten from it atomically; an identical one is left
    untouched, byte for byte.  Rows are committed to the ledger, then appended.
    """

    def __init__(self, path: Path, ledger, include_patient_id: bool = False):
        self.path = path
        self.ledger = ledger
        self.include_patient_id = include_patient_id
        self._header = header_line(include_patient_id)
        self._stale = False
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self._matches_ledger():
            self._rewrite()
        self._fh = open(path, "a", encoding="utf-8", newline="")

    def _expected(self):
        yield self._header
        yield from self.ledger.rows()

    def _matches_ledger(self) -> bool:
        if not self.path.is_file():
            return False
        with open(self.path, encoding="utf-8", newline="", errors="replace") as fh:
            for chunk in self._expected():
                if fh.read(len(chunk)) != chunk:
                    return False
            return fh.read(1) == ""

    def _rewrite(self) -> None:
        with replacing(self.path, durable=True) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
            for chunk in self._expected():
                fh.write(chunk)

    def write(self, records: list[Record], fingerprints: dict, settings: str,
              results: list[Results] | None = None, send_to: str | None = None) -> list[str]:
        """Commit a batch (with each row's DICOM results and packed masks) to the ledger, then append it
        to the CSV.  Returns the result files that the batch superseded."""
        if not records:
            return []
        rows = [format_rows([r], self.include_patient_id) for r in records]
        results = results or [Results()] * len(records)
        done = self.ledger.commit((Entry(key_of(r.path), fingerprints[r.path], settings, row, res, r.packed_masks)
                                   for r, row, res in zip(records, rows, results)), send_to)
        self._stale |= done.replaced > 0
        self._fh.write("".join(done.rows))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        return done.obsolete

    def sync(self) -> None:
        """Drop the rows that re-measured files superseded, now (watch calls this after each batch)."""
        if self._stale:
            self._fh.close()
            self._rewrite()
            self._stale = False
            self._fh = open(self.path, "a", encoding="utf-8", newline="")

    def rewrite(self) -> None:
        """Write the CSV again from the ledger, now (after a person's review changed a row)."""
        self._fh.close()
        self._rewrite()
        self._stale = False
        self._fh = open(self.path, "a", encoding="utf-8", newline="")

    def close(self) -> None:
        self._fh.close()
        if self._stale:  # drop the rows that changed files replaced
            self._rewrite()
            self._stale = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
