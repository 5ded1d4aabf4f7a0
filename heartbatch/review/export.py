"""Reviewed films as training labels: the box CSV that `heartbatch-train` reads
(:func:`heartbatch.labels.from_box_csv`), so a site can fine-tune on its own films.

Accepted rows give the model's boxes, corrected rows the boxes the person drew; rejected and
unreviewed rows are left out.  Paths are absolute (the ledger's keys), so the labels do not depend
on where the report or the labels file lie.  Every film is checked with the loader training uses
(:func:`heartbatch.images.image_size`): one it cannot read (moved, changed, not a DICOM) is left out
and named, never written for training to trip on.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

from ..files import write_atomic
from ..labels import BOX_COLUMNS
from .decisions import ACCEPTED, CORRECTED, Item

EXTRA_COLUMNS = ["review_status", "ctr_reviewed"]  # for a person reading the file; training ignores them


@dataclass
class Exported:
    path: Path
    written: int = 0
    left_out: list[tuple[str, str]] = field(default_factory=list)  # (report path, why)


def _readable(item: Item) -> str:
    """Why training could not use this film ('' when it can): the loader's own size check."""
    from ..images import image_size

    try:
        rows, columns = image_size(item.key)
    except Exception as exc:  # noqa: BLE001 - any reason a loader fails is a reason to leave it out
        return f"cannot be read for training: {getattr(exc, 'reason', None) or type(exc).__name__}"
    if (str(rows), str(columns)) != (item.row["rows"], item.row["columns"]):
        return "the file changed since the run (its size differs); run heartbatch run again"
    return ""


def export_labels(items: list[Item], out: Path) -> Exported:
    """Write the accepted and corrected ``items`` to ``out`` (atomically)."""
    done = Exported(Path(out))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", *BOX_COLUMNS, *EXTRA_COLUMNS])
    for item in items:
        review = item.review
        if review is None or review.status not in (ACCEPTED, CORRECTED) or review.heart is None:
            continue
        why = _readable(item)
        if why:
            done.left_out.append((item.row.get("path", ""), why))
            continue
        thorax = review.thorax or ("",) * 4
        writer.writerow([item.key, *(f"{v:.3f}" for v in review.heart), *(v if v == "" else f"{v:.3f}" for v in thorax),
                         review.status, "" if review.ctr is None else f"{review.ctr:.4f}"])
        done.written += 1
    done.path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(done.path, buffer.getvalue())
    return done
