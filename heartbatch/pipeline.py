"""The batch pipeline: scan -> read DICOM -> preprocess -> infer -> measure -> record.

Each file is read, preprocessed and measured in one worker process (one per
core, each with its own single-threaded copy of the model), so every core
runs the whole pipeline and only small records come back; this process scans,
keeps the ledger and writes the report.  A handful of files, or
``workers=0``, run in this process instead.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .confidence import Policy
from .model import BoxModel, remember
from .records import Record
from .workers import DEFAULT_TIMEOUT, DecodePool, measure_files

log = logging.getLogger("heartbatch")

# files per worker task, measured in one inference batch: single-threaded int8 inference is ~7 %
# faster per image at batch 4 than at 1 (no gain beyond), and there are 4x fewer messages
FILES_PER_TASK = 4

@dataclass
class RunOptions:
    batch_size: int = 16             # rows committed to the report together (and files per Dask task)
    workers: int | None = None       # worker processes; None: one per core
    threshold: float = 0.5
    include_patient_id: bool = False
    threads: int | None = None       # onnxruntime threads per model; None: cores / worker processes
    timeout: float | None = DEFAULT_TIMEOUT  # seconds per file
    content_check: bool = True       # refuse films that are not frontal chest films by their pixels
    min_chest_score: float | None = None  # None: the threshold the model recommends (its metadata)

    @classmethod
    def from_args(cls, args) -> "RunOptions":
        """The options of `run` and `watch` from their parsed command line."""
        return cls(batch_size=args.batch_size, workers=args.workers, threshold=args.ctr_threshold,
                   include_patient_id=args.include_patient_id, threads=args.threads, timeout=args.timeout,
                   content_check=args.content_check, min_chest_score=args.min_chest_score)

    def policy(self, model: BoxModel) -> Policy:
        return Policy.for_model(model.info.metadata, self.threshold, self.content_check, self.min_chest_score)


class Runner:
    """Turns a stream of file paths into records with one model."""

    def __init__(self, model: BoxModel, options: RunOptions | None = None):
        self.options = options or RunOptions()
        workers = self.options.workers
        workers = (os.cpu_count() or 1) if workers is None else workers
        threads = self.options.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
        # this process's copy serves inline files; workers load theirs once (and check its hash)
        task = partial(measure_files, model=remember(model), policy=self.options.policy(model), threads=threads)
        # the pool outlives one call to process(), so `watch` starts its workers once
        self.pool = DecodePool(workers, model.info.input_size, self.options.timeout, many=task,
                               chunk=FILES_PER_TASK)

    def process(self, paths: Iterable[str | Path]) -> Iterator[list[Record]]:
        """Yield lists of at most ``batch_size`` records, in completion order."""
        batch: list[Record] = []
        for record in self.pool.map(str(p) for p in paths):
            batch.append(record)
            if len(batch) >= self.options.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def close(self) -> None:
        self.pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@dataclass
class RunResult:
    report: Path
    summary_json: Path
    summary_md: Path
    counts: dict[str, int] = field(default_factory=dict)   # this run's new rows by status
    unchanged: int = 0                                     # files already in the report
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def processed(self) -> int:
        return sum(self.counts.values())


def settings_key(model: BoxModel, options: RunOptions) -> str:
    """What besides the file shapes its row: a new model or threshold re-measures it."""
    return f"model={model.info.model_id};{options.policy(model).key()}"


class ReportSession:
    """A report with its ledger, opened for writing: shared by `run` and `watch`."""

    def __init__(self, out: Path, model: BoxModel, options: RunOptions, state_dir: Path | None = None,
                 force: bool = False):
        from .ledger import Ledger, state_dir_for
        from .report import Report, columns
        from .summary import debug_log_path, summary_paths

        self.out, self.model, self.options = out, model, options
        self.state_dir = state_dir or state_dir_for(out)
        self.ledger = Ledger(self.state_dir)
        try:
            if force:
                self.ledger.clear()
            self.ledger.bind(columns(options.include_patient_id))
            self.report = Report(out, self.ledger, options.include_patient_id)
        except BaseException:
            self.ledger.close()
            raise
        self.settings = settings_key(model, options)
        self.outputs = [out, *summary_paths(out), debug_log_path(out), self.state_dir]
        self._fingerprints: dict = {}
        self.counts = {"ok": 0, "skipped": 0, "error": 0}  # rows written by this session
        self.unchanged = 0

    def needs(self, path: str | Path) -> bool:
        """True when the file is new or changed since its row was written (remembers its fingerprint)."""
        from .ledger import Fingerprint
        from .report import ledger_key

        fingerprint = Fingerprint.of(path)
        if self.ledger.is_current(ledger_key(str(path)), fingerprint, self.settings):
            return False
        self._fingerprints[str(path)] = fingerprint
        return True

    def todo(self, paths: list[str | Path], on_unchanged: Callable[[], None] | None = None) -> Iterator[Path]:
        """The files under ``paths`` that need a row; counts the others as unchanged."""
        from .scan import scan

        for path in scan(paths, exclude=self.outputs):
            if self.needs(path):
                yield path
            else:
                self.unchanged += 1
                if on_unchanged is not None:
                    on_unchanged()

    def write(self, records: list[Record]) -> None:
        self.report.write(records, self._fingerprints, self.settings)
        for record in records:
            self.counts[record.status] += 1
        for record in records:
            if record.status != "ok":
                log.debug("%s: %s: %s%s", record.status, record.path, record.reason,
                          "\n" + record.detail if record.detail else "")
        for record in records:
            self._fingerprints.pop(record.path, None)

    def summarize(self):
        from .summary import write_summaries

        return write_summaries(self.out, self.options.threshold)

    def finish(self, started: float) -> RunResult:
        """Settle the CSV (drop replaced rows), write the summaries, and report this session."""
        self.report.close()
        json_path, md_path, summary = self.summarize()
        return RunResult(self.out, json_path, md_path, dict(self.counts), self.unchanged, summary,
                         time.monotonic() - started)

    def close(self) -> None:
        try:
            self.report.close()
        finally:
            self.ledger.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run(paths: list[str | Path], out: Path, model: BoxModel, options: RunOptions | None = None,
        on_records: Callable[[list[Record]], None] | None = None, state_dir: Path | None = None,
        force: bool = False, on_unchanged: Callable[[], None] | None = None) -> RunResult:
    """`heartbatch run`: every new or changed file under ``paths`` gets its one row in ``out``."""
    options = options or RunOptions()
    started = time.monotonic()
    with ReportSession(out, model, options, state_dir, force) as session:
        with Runner(model, options) as runner:
            for records in runner.process(session.todo(paths, on_unchanged)):
                session.write(records)
                if on_records is not None:
                    on_records(records)
        return session.finish(started)
