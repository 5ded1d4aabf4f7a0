"""The report's columns: the one schema the CSV, the ledger and the summaries read.

A leaf module (it imports nothing of heartbatch), so that whoever needs the column names
can have them without the CSV writer.  Add new columns only at the end of ``COLUMNS``:
rows already written keep their meaning, and an old report is upgraded in place.
"""

from __future__ import annotations

COLUMNS = [
    "path", "status", "reason", "sop_instance_uid", "study_instance_uid", "series_instance_uid",
    "study_date", "modality", "view_position", "rows", "columns", "pixel_spacing_mm",
    "heart_x0", "heart_y0", "heart_x1", "heart_y1", "thorax_x0", "thorax_y0", "thorax_x1", "thorax_y1",
    "ctr", "heart_width_mm", "thoracic_width_mm", "enlarged", "model_id",
    "chest_score", "uncertainty", "review", "review_reason",
    "review_status", "ctr_reviewed", "reviewed_at", "reviewer", "review_note",
]
#: Filled by a person (`heartbatch review`), not by a measurement: a report that gains only these
#: columns is upgraded without re-measuring its files.
REVIEW_COLUMNS = ["review_status", "ctr_reviewed", "reviewed_at", "reviewer", "review_note"]
PATIENT_COLUMNS = ["patient_id", "accession_number"]


def columns(include_patient_id: bool = False) -> list[str]:
    return COLUMNS + (PATIENT_COLUMNS if include_patient_id else [])
