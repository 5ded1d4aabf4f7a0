"""Real ward films without labels: which films, and a split by patient.

A folder of real frontal chest films from clinical work (portable AP, ICU, lines,
severe disease) with a CSV beside it (``FOLDER.csv``: ``file, patient`` and
optionally ``view``), like ``../shared/data/ward/actualmed``. They carry no boxes:
the content check learns from them that such films are chest films, the review
thresholds are set so that few of them are flagged, and the patients kept out of
any fitting measure how many are refused or flagged. One patient's films are
always on one side of the split.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class WardFilm:
    path: Path
    patient: str
    view: str = ""

    @property
    def key(self) -> str:
        return f"ward/{self.path.name}"


def read_ward(folder: Path) -> list[WardFilm]:
    """The films listed in ``FOLDER.csv`` that exist in ``folder``; ValueError says what is wrong."""
    folder = Path(folder)
    table = folder.with_suffix(".csv")
    if not folder.is_dir() or not table.is_file():
        raise ValueError(f"--ward {folder}: needs a folder of films and {table.name} beside it "
                         f"(columns file, patient[, view])")
    with open(table, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"file", "patient"} <= set(rows[0]):
        raise ValueError(f"{table}: needs the columns file and patient")
    films = [WardFilm(folder / row["file"], row["patient"].strip(), (row.get("view") or "").strip())
             for row in rows if (folder / row["file"]).is_file()]
    if not films:
        raise ValueError(f"{table}: none of its files are in {folder}")
    return sorted(films, key=lambda f: f.path.name)


def patient_split(films: list[WardFilm], seed: int, fit_fraction: float = 0.5) -> tuple[list[WardFilm], list[WardFilm]]:
    """(fit, held out): each patient on one side, by a hash of the seed and the patient id, so the
    same patients are held out on every machine and whatever the file order."""
    def side(patient: str) -> float:
        digest = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64

    fit = [f for f in films if side(f.patient) < fit_fraction]
    held = [f for f in films if side(f.patient) >= fit_fraction]
    return fit, held
