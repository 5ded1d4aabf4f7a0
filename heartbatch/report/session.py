"""A report and its companion files, opened for writing: the one place they are named.

`run`, `watch` and the Dask runner write a report the same way: open its ledger (the state
folder), skip files whose row is current, append new rows, then settle the CSV and write the
summaries. :class:`~heartbatch.report.paths.ReportFiles` names the files that belong to a report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import Status
from ..files import remove_leftovers
from .paths import ReportFiles

log = logging.getLogger("heartbatch")


@dataclass
class RunResult:
    report: Path
    summary_json: Path
    summary_md: Path
    counts: dict[str, int] = field(default_factory=dict)   # this run's new rows by status
    unchanged: int = 0                                     # files already in the report
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0
    dicom_out: Path | None = None                          # --dicom-out folder
    dicom_results: int = 0                                 # DICOM result files written (--dicom-out)
    dicom_failed: list[tuple[str, str]] = field(default_factory=list)  # (file, why) results not written

    @property
    def processed(self) -> int:
        return sum(self.counts.values())


def settings_key(model, options) -> str:
    """What besides the file shapes its row: a new model or threshold re-measures it."""
    return f"model={model.info.model_id};{options.policy(model).key()}"


class ReportSession:
    """A report with its ledger, opened for writing: shared by `run`, `watch` and the Dask runner."""

    def __init__(self, out: Path, model, options, state_dir: Path | None = None, force: bool = False,
                 send_to: str | None = None):
        from .ledger import Ledger
        from .schema import columns
        from .table import Report

        dicom_out = options.dicom_out
        self.files = ReportFiles.of(out, state_dir, dicom_out.out_dir if dicom_out else None)
        self.out, self.model, self.options = self.files.report, model, options
        self.ledger = Ledger(self.files.state_dir)
        try:
            if force:
                self.ledger.clear()
            self.ledger.bind(columns(options.include_patient_id))
            self.report = Report(self.out, self.ledger, options.include_patient_id)
        except BaseException:
            self.ledger.close()
            raise
        self.settings = settings_key(model, options)
        self.results_key = dicom_out.key() if dicom_out else None
        self.send_to = send_to
        if dicom_out:
            dicom_out.out_dir.mkdir(parents=True, exist_ok=True)
            remove_leftovers(dicom_out.out_dir, "2.25.*.dcm")  # what a killed run left half-written
            self._results_folder = str(self.files.dicom_out.absolute())
        self._fingerprints: dict = {}
        self.counts = {str(s): 0 for s in Status}  # rows written by this session
        self.unchanged = 0
        self.dicom_results = 0
        self.dicom_failed: list[tuple[str, str]] = []

    def needs(self, path: str | Path) -> bool:
        """True when the file is new or changed since its row was written (remembers its fingerprint)."""
        from .ledger import Fingerprint, key_of

        fingerprint = Fingerprint.of(path)
        if self.ledger.is_current(key_of(str(path)), fingerprint, self.settings, self.results_key):
            return False
        self._fingerprints[str(path)] = fingerprint
        return True

    def todo(self, paths: Iterable[str | Path], on_unchanged: Callable[[], None] | None = None,
             on_total: Callable[[int], None] | None = None) -> Iterator[Path]:
        """The files under ``paths`` that need a row; counts the others as unchanged. With
        ``on_total`` (a progress bar), the folders are scanned first and it gets the file count;
        otherwise files stream from the scan as it finds them."""
        from ..scan import scan

        found = scan(paths, exclude=self.files.outputs)
        if on_total is not None:
            found = list(found)
            on_total(len(found))
        for path in found:
            if self.needs(path):
                yield path
            else:
                self.unchanged += 1
                if on_unchanged is not None:
                    on_unchanged()

    def write(self, records: list) -> None:
        results = [self._results(r) for r in records] if self.results_key else None
        obsolete = self.report.write(records, self._fingerprints, self.settings, results, self.send_to)
        for file in obsolete:  # results of an earlier measurement that these rows replaced
            Path(file).unlink(missing_ok=True)
        for record in records:
            self.counts[record.status] += 1
        for record in records:
            if record.status != Status.OK:
                log.debug("%s: %s: %s%s", record.status, record.path, record.reason,
                          "\n" + record.detail if record.detail else "")
        for record in records:
            self._fingerprints.pop(record.path, None)

    def _results(self, record):
        """What the ledger records of a row's DICOM results (the worker wrote them)."""
        from .ledger import Results

        if record.results_error:
            self.dicom_failed.append((record.path, record.results_error))
            log.warning("%s: DICOM results not written: %s", record.path, record.results_error)
            log.debug("%s", record.detail)
        self.dicom_results += len(record.results)
        return Results(self.results_key, self._results_folder, tuple(record.results), record.results_error)

    def summarize(self):
        from .summary import write_summaries

        return write_summaries(self.out, self.options.threshold, self.model.arithmetic.as_dict())

    def finish(self, started: float) -> RunResult:
        """Settle the CSV (drop replaced rows), write the summaries, and report this session."""
        self.report.close()
        json_path, md_path, summary = self.summarize()
        return RunResult(self.out, json_path, md_path, dict(self.counts), self.unchanged, summary,
                         time.monotonic() - started, self.files.dicom_out, self.dicom_results,
                         list(self.dicom_failed))

    def close(self) -> None:
        try:
            self.report.close()
        finally:
            self.ledger.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

