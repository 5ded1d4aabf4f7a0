"""The batch pipeline: scan -> read DICOM -> preprocess -> infer -> measure -> record.

Each file is read, preprocessed and measured in one worker process (one per
core, each with its own single-threaded copy of the model), so every core
runs the whole pipeline and only small records come back; this process scans,
keeps the ledger and writes the report.  A handful of files, or
``workers=0``, run in this process instead.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from .confidence import Policy
from .results import ResultOptions
from .model import BoxModel, remember
from .records import Record
from .report.session import ReportSession, RunResult
from .workers import DEFAULT_TIMEOUT, WorkerPool, measure_files


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
    dicom_out: ResultOptions | None = None  # --dicom-out: write each ok row's DICOM results (SR + PR or SC)

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
        task = partial(measure_files, model=remember(model), policy=self.options.policy(model), threads=threads,
                       results=self.options.dicom_out)
        # the pool outlives one call to process(), so `watch` starts its workers once
        self.pool = WorkerPool(workers, model.info.input_size, self.options.timeout, many=task,
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


def run(paths: list[str | Path], out: Path, model: BoxModel, options: RunOptions | None = None,
        on_records: Callable[[list[Record]], None] | None = None, state_dir: Path | None = None,
        force: bool = False, on_unchanged: Callable[[], None] | None = None,
        on_total: Callable[[int], None] | None = None) -> RunResult:
    """`heartbatch run`: every new or changed file under ``paths`` gets its one row in ``out``.
    The callbacks serve a progress bar: the files found, each batch of rows, each file unchanged."""
    options = options or RunOptions()
    started = time.monotonic()
    with ReportSession(out, model, options, state_dir, force) as session:
        with Runner(model, options) as runner:
            for records in runner.process(session.todo(paths, on_unchanged, on_total)):
                session.write(records)
                if on_records is not None:
                    on_records(records)
        return session.finish(started)
