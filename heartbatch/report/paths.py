"""The files that belong to a report, named in one place: scans leave them out, and no command
rebuilds a name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReportFiles:
    """``report.csv`` and what heartbatch keeps next to it: ``report.summary.json``,
    ``report.summary.md``, ``report.debug.log`` (with --debug) and ``report.csv.state/`` (the
    ledger; another folder with --state)."""

    report: Path
    state_dir: Path
    dicom_out: Path | None = None   # --dicom-out: the DICOM results folder

    @classmethod
    def of(cls, report: Path, state_dir: Path | None = None, dicom_out: Path | None = None) -> "ReportFiles":
        report = Path(report)
        return cls(report, Path(state_dir) if state_dir else report.with_name(report.name + ".state"),
                   Path(dicom_out) if dicom_out else None)

    @property
    def _stem(self) -> Path:
        return self.report.with_suffix("") if self.report.suffix else self.report

    @property
    def summary_json(self) -> Path:
        return Path(f"{self._stem}.summary.json")

    @property
    def summary_md(self) -> Path:
        return Path(f"{self._stem}.summary.md")

    @property
    def debug_log(self) -> Path:
        return Path(f"{self._stem}.debug.log")

    @property
    def outputs(self) -> list[Path]:
        """Everything a run writes, so that scanning a folder that holds the report skips them."""
        extra = [self.dicom_out] if self.dicom_out else []
        return [self.report, self.summary_json, self.summary_md, self.debug_log, self.state_dir, *extra]
