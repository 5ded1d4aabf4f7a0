"""Reading, preprocessing and measuring files in worker processes, safely.

:func:`prepare` turns one path into model input or a record, never an
exception, within a time limit; :func:`measure_files` also runs the model on
a few of them in one batch, so only small records leave the process (a model's
masks packed to a few KB, for the ledger).
:class:`WorkerPool` runs one of them over many files in worker processes, a
few files per task, scheduled by :func:`heartbatch.scheduler.schedule`; a
worker that dies (a decoder crash, the OOM killer) costs only the file that
killed it: the files it had in flight are retried one at a time, and a file
that kills a worker twice gets an `error` row.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain, islice

import numpy as np

from . import contract, sanitize
from .confidence import Policy
from .dicom import DicomHeader, read_dicom
from .results import ResultOptions, write_results
from .errors import FileTimeout, ReadError, Skipped
from .model import ModelRef, worker_model
from .pixels import preprocess
from .records import ERROR, SKIPPED, Record, measure
from .scheduler import Backend, Failed, chunks, schedule
from .worker_context import INLINE_MAX_FILES, context

DEFAULT_TIMEOUT = 60.0  # seconds per file; an 8000 x 8000 JPEG 2000 decodes in ~10 s here
MAX_CRASHES = 2


@dataclass
class Prepared:
    path: str
    header: DicomHeader
    image: np.ndarray  # S x S model input


def _on_alarm(signum, frame):
    raise FileTimeout()


def _prepare(path: str, size: int) -> Prepared | Record:
    try:
        dicom = read_dicom(path, min_side=size)
        return Prepared(path, dicom.header, preprocess(dicom.image, size))
    except Skipped as exc:
        return Record(path, SKIPPED, exc.reason, exc.header, code=exc.code)
    except ReadError as exc:
        return Record(path, ERROR, exc.reason, exc.header, code=exc.code)
    except MemoryError:
        return Record(path, ERROR, "not enough memory to decode this image", code="memory")
    except (FileTimeout, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file never stops a run
        return Record(path, ERROR, f"unexpected {sanitize.exception(exc)}",
                      detail=sanitize.traceback_text(exc), code="unexpected")
    except BaseException as exc:  # noqa: BLE001 - Rust decoders panic with pyo3's PanicException
        return Record(path, ERROR, f"the decoder failed on this file ({sanitize.exception(exc)})",
                      detail=sanitize.traceback_text(exc), code="decoder_panic")


def prepare(path: str, size: int, timeout: float | None = DEFAULT_TIMEOUT) -> Prepared | Record:
    """Read and preprocess one file; every failure becomes a record, never an exception.

    The time limit uses SIGALRM, so it applies in a process's main thread
    (worker processes, the CLI); elsewhere the file runs unbounded.
    """
    use_alarm = bool(timeout) and threading.current_thread() is threading.main_thread()
    if not use_alarm:
        return _prepare(path, size)
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        return _prepare(path, size)
    except FileTimeout:
        return Record(path, ERROR, f"reading took longer than {timeout:g} s; skipped so the run can go on",
                      code="timeout")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measure_files(paths: list[str], size: int, timeout: float | None = DEFAULT_TIMEOUT, *, model: ModelRef,
                  policy: Policy, threads: int | None = 1, results: ResultOptions | None = None) -> list[Record]:
    """prepare() each file, then one batch through the model (loaded once per process):
    the files' records, in order; with ``results`` (--dicom-out), each ok record's DICOM results
    are written here too, so that they cost a core each like the measurement.

    Run in the worker processes, each core decodes and infers its own files:
    no image crosses between processes, and single-threaded inference on
    every core beats one multi-threaded model waiting for decoded images.
    """
    items = [prepare(path, size, timeout) for path in paths]
    if not any(isinstance(item, Prepared) for item in items):
        return items
    box_model = worker_model(model, threads)
    records = _measure_prepared(items, box_model, policy)
    if results is not None:
        _write_dicom_results(records, box_model.info, results)
    for record in records:  # only small records leave the process: the masks packed, not the arrays
        _pack_masks(record)
    return records


def _pack_masks(record: Record) -> None:
    """Replace a record's mask arrays by their packed bytes (a few KB, kept in the ledger for the
    outlines), so that what crosses to the main process or the Dask client stays small."""
    if record.masks is not None:
        from .masks import encode_masks

        record.packed_masks = encode_masks(record.masks)
        record.masks = None


def _measure_prepared(items: list[Prepared | Record], model, policy: Policy) -> list[Record]:
    """The prepared items through the model in one batch; records (unreadable files) as they are."""
    ready = [item for item in items if isinstance(item, Prepared)]
    predictions = iter(model.infer(np.stack([item.image for item in ready])) if ready else ())
    return [measure(item.path, item.header, next(predictions), model.info.model_id, policy)
            if isinstance(item, Prepared) else item for item in items]


def measure_one(path: str, model, policy: Policy, timeout: float | None = DEFAULT_TIMEOUT
                ) -> tuple[Record, np.ndarray | None]:
    """One file through exactly the steps of `heartbatch run`, in this process: `show` and the API
    give the record the report would hold.  Also the model input (None when the file was not read)."""
    item = prepare(str(path), model.info.input_size, timeout)
    return _measure_prepared([item], model, policy)[0], item.image if isinstance(item, Prepared) else None


def _write_dicom_results(records: list[Record], info, options: ResultOptions) -> None:
    """Each ok record's DICOM results; a failure is noted on the record (the row stays, measured),
    never raised: the session records it so the next run tries again."""
    version = info.metadata.get(contract.META_CODE_VERSION, "")
    for record in records:
        if record.ok:
            try:
                record.results = write_results(record, info.model_id, version, options)
            except Exception as exc:  # noqa: BLE001 - a header highdicom refuses, a full disk: one row's results
                record.results_error = sanitize.exception(exc)
                record.detail = sanitize.traceback_text(exc)


def _end_with(main_pid: int) -> None:
    """Worker initializer: exit when the main process is gone (kill -9, OOM killer), so no
    orphaned worker, forkserver or resource tracker is left behind."""
    def watch() -> None:
        while True:
            time.sleep(1.0)
            try:
                os.kill(main_pid, 0)
            except ProcessLookupError:
                os._exit(0)
            except PermissionError:
                pass

    threading.Thread(target=watch, name="end-with-main", daemon=True).start()


def prepare_files(paths: list[str], size: int, timeout: float | None = DEFAULT_TIMEOUT) -> list[Prepared | Record]:
    """prepare() each of a task's files: :class:`WorkerPool`'s default task."""
    return [prepare(path, size, timeout) for path in paths]


class WorkerPool:
    """A task function over many paths in worker processes, results in completion order.

    ``many(paths, size, timeout)`` handles a task's list of up to ``chunk`` files
    and returns one result per file, in order: :func:`prepare_files` (the default)
    or :func:`measure_files` (which batches their inference).  It must be a
    module-level function (or a partial of one), so worker processes can import it.
    """

    def __init__(self, workers: int, size: int, timeout: float | None = DEFAULT_TIMEOUT, many=prepare_files,
                 chunk: int = 1):
        self._task = many
        self.chunk = max(1, chunk)
        self.workers = workers
        self.size = size
        self.timeout = timeout
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=context(),
                                                 initializer=_end_with, initargs=(os.getpid(),))
        return self._executor

    def _reset(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map(self, paths: Iterable[str]) -> Iterator[Prepared | Record]:
        paths = iter(paths)
        head = list(islice(paths, INLINE_MAX_FILES + 1))
        source = chunks(chain(head, paths), self.chunk)
        if self.workers <= 0 or len(head) <= INLINE_MAX_FILES:
            for chunk in source:
                yield from self._task(chunk, self.size, self.timeout)
            return
        for results in schedule(_Processes(self), source):
            yield from results


class _Processes(Backend):
    """:func:`~heartbatch.scheduler.schedule` on the pool's worker processes.  A dead worker
    breaks the whole pool: every task in flight fails with it and the pool is started anew."""

    max_failures = MAX_CRASHES

    def __init__(self, pool: WorkerPool):
        self.pool = pool

    def limit(self) -> int:
        return self.pool.workers * max(2, 4 // self.pool.chunk)  # each worker has its next task queued

    def submit(self, chunk: list[str]) -> Future:
        return self.pool._pool().submit(self.pool._task, chunk, self.pool.size, self.pool.timeout)

    def wait(self, pending: Collection[Future]) -> set[Future]:
        return wait(pending, return_when=FIRST_COMPLETED).done

    def outcome(self, future: Future) -> list | Failed:
        try:
            return future.result()
        except BrokenProcessPool as exc:
            return Failed(exc, crashed=True, took_all=True)

    def restart(self) -> None:
        self.pool._reset()
