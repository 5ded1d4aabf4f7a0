"""The batch pipeline: scan -> read DICOM -> preprocess -> infer -> measure -> record.

Reading and preprocessing run in worker processes (they are CPU-bound Python
and C decoders), inference runs batched in this process, so decoding the next
images overlaps with running the model on the current batch.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dicom import DicomHeader, ReadError, Skipped, read_dicom
from .model import BoxModel
from .pixels import preprocess
from .records import ERROR, SKIPPED, Record, measure

INLINE_MAX_FILES = 4  # below this, starting worker processes costs more than it saves


@dataclass
class Prepared:
    path: str
    header: DicomHeader
    image: np.ndarray  # S x S model input


@dataclass
class RunOptions:
    batch_size: int = 16
    workers: int | None = None       # decode processes; None: one per core
    threshold: float = 0.5
    include_patient_id: bool = False
    threads: int | None = None       # onnxruntime intra-op threads; None: one per core


def prepare(path: str, size: int) -> Prepared | Record:
    """Read and preprocess one file; every failure becomes a record, never an exception."""
    try:
        dicom = read_dicom(path)
        return Prepared(path, dicom.header, preprocess(dicom.image, size))
    except Skipped as exc:
        return Record(path, SKIPPED, exc.reason, exc.header)
    except ReadError as exc:
        return Record(path, ERROR, exc.reason, exc.header)
    except MemoryError:
        return Record(path, ERROR, "not enough memory to decode this image")
    except Exception as exc:  # noqa: BLE001 - one bad file never stops a run
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return Record(path, ERROR, f"unexpected {type(exc).__name__}: {detail}".rstrip(": "))


def _prepared_stream(paths: Iterable[str], size: int, workers: int) -> Iterator[Prepared | Record]:
    """prepare() over paths, in worker processes with a bounded number in flight."""
    paths = iter(paths)
    head = [p for _, p in zip(range(INLINE_MAX_FILES + 1), paths)]
    if workers <= 0 or len(head) <= INLINE_MAX_FILES:
        for path in head:
            yield prepare(path, size)
        for path in paths:
            yield prepare(path, size)
        return
    context = multiprocessing.get_context("forkserver")
    limit = workers * 4
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        pending: set[Future] = set()
        source = _chain(head, paths)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < limit:
                path = next(source, None)
                if path is None:
                    exhausted = True
                    break
                pending.add(pool.submit(prepare, path, size))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()


def _chain(head: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from head
    yield from rest


class Runner:
    """Turns a stream of file paths into batches of records with one model."""

    def __init__(self, model: BoxModel, options: RunOptions | None = None):
        self.model = model
        self.options = options or RunOptions()

    def _infer(self, batch: list[Prepared]) -> list[Record]:
        info = self.model.info
        boxes = self.model.predict(np.stack([p.image for p in batch]))
        return [measure(p.path, p.header, b, info.model_id, self.options.threshold)
                for p, b in zip(batch, boxes)]

    def process(self, paths: Iterable[str | Path]) -> Iterator[list[Record]]:
        """Yield lists of records: rejected files as they come, measured ones per batch."""
        workers = self.options.workers
        workers = (os.cpu_count() or 1) if workers is None else workers
        size = self.model.info.input_size
        batch: list[Prepared] = []
        for item in _prepared_stream((str(p) for p in paths), size, workers):
            if isinstance(item, Record):
                yield [item]
                continue
            batch.append(item)
            if len(batch) >= self.options.batch_size:
                yield self._infer(batch)
                batch = []
        if batch:
            yield self._infer(batch)


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
    return f"model={model.info.model_id};threshold={options.threshold:g}"


class ReportSession:
    """A report with its ledger, opened for writing: shared by `run` and `watch`."""

    def __init__(self, out: Path, model: BoxModel, options: RunOptions, state_dir: Path | None = None,
                 force: bool = False):
        from .ledger import Ledger, state_dir_for
        from .report import Report, columns
        from .summary import summary_paths

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
        self.outputs = [out, *summary_paths(out), self.state_dir]
        self._fingerprints: dict = {}

    def needs(self, path: str | Path) -> bool:
        """True when the file is new or changed since its row was written (remembers its fingerprint)."""
        from .ledger import Fingerprint
        from .report import ledger_key

        fingerprint = Fingerprint.of(path)
        if self.ledger.is_current(ledger_key(str(path)), fingerprint, self.settings):
            return False
        self._fingerprints[str(path)] = fingerprint
        return True

    def write(self, records: list[Record]) -> None:
        self.report.write(records, self._fingerprints, self.settings)
        for record in records:
            self._fingerprints.pop(record.path, None)

    def summarize(self):
        from .summary import write_summaries

        return write_summaries(self.out, self.options.threshold)

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
    from .scan import scan

    options = options or RunOptions()
    started = time.monotonic()
    counts = {"ok": 0, "skipped": 0, "error": 0}
    unchanged = 0
    with ReportSession(out, model, options, state_dir, force) as session:
        def todo():
            nonlocal unchanged
            for path in scan(paths, exclude=session.outputs):
                if session.needs(path):
                    yield path
                else:
                    unchanged += 1
                    if on_unchanged is not None:
                        on_unchanged()

        for records in Runner(model, options).process(todo()):
            session.write(records)
            for record in records:
                counts[record.status] += 1
            if on_records is not None:
                on_records(records)
        session.report.close()
        json_path, md_path, summary = session.summarize()
    return RunResult(out, json_path, md_path, counts, unchanged, summary, time.monotonic() - started)
