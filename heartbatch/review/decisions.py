"""A person's decisions on a report's rows, durable in the report's ledger.

:class:`ReviewStore` opens the report the way `run` does (its ledger, and so its lock: one writer
at a time), and :meth:`ReviewStore.decide` commits each decision to the ledger at once (SQLite,
``synchronous=FULL``: it survives ``kill -9``) before anyone is told it was saved; the CSV and the
summaries, copies of the ledger, are written again after it.  A store killed between the two is
repaired by the next open, which rewrites the CSV from the ledger.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import LedgerError, Status, UsageError
from ..geometry import ctr as ctr_of
from ..records import Box
from ..report.ledger import Ledger
from ..report.paths import ReportFiles
from ..report.schema import PATIENT_COLUMNS, columns as report_columns
from ..report.summary import saved_settings, write_summaries
from ..report.table import Report, safe_text

ACCEPTED, CORRECTED, REJECTED = "accepted", "corrected", "rejected"
STATUSES = (ACCEPTED, CORRECTED, REJECTED)
NOTE_LIMIT = 200  # characters of a rejection reason kept


class ReviewError(UsageError):
    """A decision or a report the review cannot use; the message says what to do."""


@dataclass(frozen=True)
class Decision:
    """What a person decided on one row: accept the model's boxes, correct them (``heart`` and
    ``thorax`` are the boxes drawn, original-image pixels), or reject the row (``note``: why)."""
    status: str
    heart: Box | None = None
    thorax: Box | None = None
    note: str = ""


@dataclass(frozen=True)
class Review:
    """A decision as stored: the boxes it stands for, their CTR, who and when."""
    status: str
    heart: Box | None
    thorax: Box | None
    ctr: float | None
    note: str
    reviewer: str
    reviewed_at: str  # ISO 8601 UTC

    def cells(self) -> dict[str, str]:
        """The report's review cells (safe for a spreadsheet)."""
        return {"review_status": self.status,
                "ctr_reviewed": "" if self.ctr is None else f"{self.ctr:.4f}",
                "reviewed_at": self.reviewed_at, "reviewer": safe_text(self.reviewer),
                "review_note": safe_text(self.note)}

    def dumps(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def loads(cls, text: str) -> "Review":
        data = json.loads(text)
        for key in ("heart", "thorax"):
            data[key] = tuple(data[key]) if data[key] is not None else None
        return cls(**data)


@dataclass(frozen=True)
class Item:
    """A report row that can be reviewed (an ``ok`` row with a heart box), known by ``index``:
    requests name rows by index, never by path.  ``key`` is the file's absolute path; ``has_masks``:
    the ledger keeps the row's masks (a model with masks measured it), whose outlines the page draws."""
    index: int
    key: str
    row: dict[str, str]
    review: Review | None = None
    has_masks: bool = False

    @property
    def heart(self) -> Box | None:
        return _box(self.row, "heart")

    @property
    def thorax(self) -> Box | None:
        return _box(self.row, "thorax")

    @property
    def in_queue(self) -> bool:
        """Flagged by the model and not decided yet: what a person must look at."""
        return self.row.get("review") == "true" and self.review is None


def _number(text: str) -> float | None:
    try:
        value = float(text) if text else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _box(row: dict[str, str], prefix: str) -> Box | None:
    values = [_number(row.get(f"{prefix}_{k}", "")) for k in ("x0", "y0", "x1", "y1")]
    return None if any(v is None for v in values) else tuple(values)  # type: ignore[return-value]


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _checked_box(box, name: str, rows: int, columns: int) -> Box:
    """A drawn box, clipped to the image; refused when it is not four numbers with a positive size."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ReviewError(f"the {name} box must be four numbers x0, y0, x1, y1 (image pixels)") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ReviewError(f"the {name} box has a coordinate that is not a number")
    x0, x1 = sorted((min(max(x0, 0.0), columns), min(max(x1, 0.0), columns)))
    y0, y1 = sorted((min(max(y0, 0.0), rows), min(max(y1, 0.0), rows)))
    if not (x1 > x0 and y1 > y0):
        raise ReviewError(f"the {name} box has no width or no height inside the image")
    return (round(x0, 3), round(y0, 3), round(x1, 3), round(y1, 3))


def review_of(item: Item, decision: Decision, reviewer: str, when: str) -> Review:
    """The stored form of ``decision`` on ``item``: accepted rows keep the model's boxes, corrected
    rows the boxes drawn (checked), and the CTR is the runtime's, of those boxes."""
    if decision.status not in STATUSES:
        raise ReviewError(f"unknown decision {decision.status!r}: use one of {', '.join(STATUSES)}")
    note = " ".join(decision.note.split())[:NOTE_LIMIT]
    if decision.status == REJECTED:
        if not note:
            raise ReviewError("a rejection needs a reason (e.g. 'not measurable', 'lateral')")
        return Review(REJECTED, None, None, None, note, reviewer, when)
    if decision.status == ACCEPTED:
        heart, thorax = item.heart, item.thorax
    else:
        rows, columns = int(item.row["rows"] or 0), int(item.row["columns"] or 0)
        if decision.heart is None or (item.thorax is not None and decision.thorax is None):
            raise ReviewError("a correction gives both boxes (heart and thorax)")
        heart = _checked_box(decision.heart, "heart", rows, columns)
        thorax = _checked_box(decision.thorax, "thorax", rows, columns) if decision.thorax is not None else None
    ctr = ctr_of(heart, thorax) if thorax is not None else None
    return Review(decision.status, heart, thorax, ctr if ctr is None or math.isfinite(ctr) else None,
                  note, reviewer, when)


def _parse(row: str, names: list[str]) -> dict[str, str]:
    return dict(zip(names, next(csv.reader(io.StringIO(row)), [])))


class ReviewStore:
    """A report opened for review: its reviewable rows, and decisions stored as they are made."""

    def __init__(self, report: Path, state_dir: Path | None = None, shared: bool = False):
        self.files = ReportFiles.of(Path(report), state_dir)
        ledger_file = self.files.state_dir / "ledger.sqlite"
        if not self.files.report.is_file() or not ledger_file.is_file():
            raise ReviewError(f"{self.files.report}: no heartbatch report with its ledger here "
                              f"({ledger_file} is missing); run `heartbatch run FOLDER --out {self.files.report}` "
                              f"first, or give --state where the run kept it")
        self.ledger = Ledger(self.files.state_dir, shared=shared)
        try:
            stored = self.ledger.columns()
            include_patient_id = PATIENT_COLUMNS[0] in stored
            self.ledger.bind(report_columns(include_patient_id))  # a report of an earlier version gains the columns
            self.columns = self.ledger.columns()
            self.report = Report(self.files.report, self.ledger, include_patient_id)  # the CSV agrees with the ledger
        except BaseException:
            self.ledger.close()
            raise
        self.include_patient_id = include_patient_id
        self.items = self._load()
        self.write_summaries()

    def _load(self) -> list[Item]:
        reviews = {path: Review.loads(text) for path, text in self.ledger.decisions().items()}
        with_masks = self.ledger.with_masks()
        items = []
        for stored in self.ledger.stored():
            row = _parse(stored.row, self.columns)
            if row.get("status") == Status.OK and _box(row, "heart") is not None:
                items.append(Item(len(items), stored.path, row, reviews.get(stored.path), stored.path in with_masks))
        return items

    def masks(self, index: int):
        """Row ``index``'s masks, float32 ``[3, H, W]`` probabilities on the model's grid, as the
        ledger keeps them; None when the row has none."""
        from ..masks import decode_masks

        packed = self.ledger.masks(self.item(index).key)
        return None if packed is None else decode_masks(packed)

    def item(self, index: int) -> Item:
        if not 0 <= index < len(self.items):
            raise ReviewError(f"no reviewable row {index} (this report has {len(self.items)})")
        return self.items[index]

    def queue(self) -> list[Item]:
        """The rows still to review, in report order."""
        return [item for item in self.items if item.in_queue]

    def decide(self, index: int, decision: Decision, reviewer: str) -> Item:
        """Store ``decision`` on row ``index`` durably (the ledger commits before this returns),
        then write the CSV and the summaries again from the ledger."""
        item = self.item(index)
        review = review_of(item, decision, reviewer, utc_now())
        try:
            row = self.ledger.save_review(item.key, review.cells(), review.dumps())
        except LedgerError as exc:
            raise ReviewError(f"{item.row.get('path')}: {exc}") from None
        item = replace(item, row=_parse(row, self.columns), review=review)
        self.items[index] = item
        self.report.rewrite()
        self.write_summaries()
        return item

    def write_summaries(self) -> None:
        """The summaries again, with the run's threshold (they count reviewed CTRs, not rejected rows)."""
        threshold, arithmetic = saved_settings(self.files.report)
        write_summaries(self.files.report, 0.5 if threshold is None else threshold, arithmetic)

    def close(self) -> None:
        try:
            self.report.close()
        finally:
            self.ledger.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


__all__ = ["ACCEPTED", "CORRECTED", "REJECTED", "STATUSES", "Decision", "Item", "Review", "ReviewError",
           "ReviewStore", "review_of"]
