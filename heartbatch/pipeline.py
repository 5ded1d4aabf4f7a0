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
    counts: dict[str, int] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    seconds: float = 0.0


def run(paths: list[str | Path], out: Path, model: BoxModel, options: RunOptions | None = None,
        on_records: Callable[[list[Record]], None] | None = None) -> RunResult:
    """`heartbatch run`: every file under ``paths`` gets one row in ``out``; then summaries."""
    from .report import ReportWriter
    from .scan import scan
    from .summary import summary_paths, write_summaries

    options = options or RunOptions()
    started = time.monotonic()
    json_path, md_path = summary_paths(out)
    counts = {"ok": 0, "skipped": 0, "error": 0}
    with ReportWriter(out, options.include_patient_id) as writer:
        for records in Runner(model, options).process(scan(paths, exclude=[out, json_path, md_path])):
            writer.write(records)
            for record in records:
                counts[record.status] += 1
            if on_records is not None:
                on_records(records)
    json_path, md_path, summary = write_summaries(out, options.threshold)
    return RunResult(out, json_path, md_path, counts, summary, time.monotonic() - started)
