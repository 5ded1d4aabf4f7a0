"""The CSV report: a stable column schema, safe cells, rows written as they come.

Rows are appended and flushed batch by batch, so a crash loses at most the
batch in flight.  Add new columns only at the end of ``COLUMNS``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .records import Record

COLUMNS = [
    "path", "status", "reason", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
    "study_date", "modality", "view_position", "rows", "columns", "pixel_spacing_mm",
    "heart_x0", "heart_y0", "heart_x1", "heart_y1", "thorax_x0", "thorax_y0", "thorax_x1", "thorax_y1",
    "ctr", "heart_width_mm", "thoracic_width_mm", "enlarged", "model_id",
]
PATIENT_COLUMNS = ["patient_id", "accession_number"]
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def columns(include_patient_id: bool = False) -> list[str]:
    return COLUMNS + (PATIENT_COLUMNS if include_patient_id else [])


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


class ReportWriter:
    """Appends rows to a new report, durably, one batch at a time."""

    def __init__(self, path: Path, include_patient_id: bool = False):
        self.path = path
        self.include_patient_id = include_patient_id
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "w", encoding="utf-8", newline="")
        self._fh.write(header_line(include_patient_id))
        self._sync()

    def _sync(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def write(self, records: list[Record]) -> None:
        if records:
            self._fh.write(format_rows(records, self.include_patient_id))
            self._sync()

    def close(self) -> None:
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
