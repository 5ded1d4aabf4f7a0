"""Reading, preprocessing and measuring files in worker processes, safely.

:func:`prepare` turns one path into model input or a record, never an
exception, within a time limit; :func:`measure_file` also runs the model on
it, so only a small record leaves the process.  :class:`DecodePool` runs one
of them over many files in worker processes, with a bounded number of files
in flight; a worker that dies
(a decoder crash, the OOM killer) costs only the file that killed it: the
files it had in flight are retried one at a time, and a file that kills a
worker twice gets an `error` row.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from .dicom import DicomHeader, ReadError, Skipped, read_dicom
from .model import ModelRef, worker_model
from .pixels import preprocess
from .records import ERROR, SKIPPED, Record, measure
from .worker_context import INLINE_MAX_FILES, context

DEFAULT_TIMEOUT = 60.0  # seconds per file; an 8000 x 8000 JPEG 2000 decodes in ~10 s here
MAX_CRASHES = 2


@dataclass
class Prepared:
    path: str
    header: DicomHeader
    image: np.ndarray  # S x S model input


class FileTimeout(BaseException):
    """A BaseException, so no library's `except Exception` swallows the time limit."""


def _on_alarm(signum, frame):
    raise FileTimeout()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _prepare(path: str, size: int) -> Prepared | Record:
    try:
        dicom = read_dicom(path, min_side=size)
        return Prepared(path, dicom.header, preprocess(dicom.image, size))
    except Skipped as exc:
        return Record(path, SKIPPED, exc.reason, exc.header)
    except ReadError as exc:
        return Record(path, ERROR, exc.reason, exc.header)
    except MemoryError:
        return Record(path, ERROR, "not enough memory to decode this image")
    except (FileTimeout, KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - one bad file never stops a run
        record = Record(path, ERROR, f"unexpected {type(exc).__name__}: {_first_line(exc)}".rstrip(": "))
        record.detail = traceback.format_exc()
        return record
    except BaseException as exc:  # noqa: BLE001 - Rust decoders panic with pyo3's PanicException
        record = Record(path, ERROR, f"the decoder failed on this file ({type(exc).__name__}: "
                                     f"{_first_line(exc)})")
        record.detail = traceback.format_exc()
        return record


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
        return Record(path, ERROR, f"reading took longer than {timeout:g} s; skipped so the run can go on")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measure_file(path: str, size: int, timeout: float | None = DEFAULT_TIMEOUT, *, model: ModelRef,
                 threshold: float, threads: int | None = 1) -> Record:
    """prepare() then the model (loaded once per process): one file's record.

    Run in the worker processes, each core decodes and infers its own files:
    no image crosses between processes, and single-threaded inference on
    every core beats one multi-threaded model waiting for decoded images.
    """
    item = prepare(path, size, timeout)
    if isinstance(item, Record):
        return item
    box_model = worker_model(model, threads)
    boxes = box_model.predict(item.image[None])[0]
    return measure(item.path, item.header, boxes, box_model.info.model_id, threshold)


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


class DecodePool:
    """prepare() over many paths in worker processes, results in completion order."""

    def __init__(self, workers: int, size: int, timeout: float | None = DEFAULT_TIMEOUT, function=None):
        self.function = function or prepare  # module-level, so worker processes can import it
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
        head = [p for _, p in zip(range(INLINE_MAX_FILES + 1), paths)]
        if self.workers <= 0 or len(head) <= INLINE_MAX_FILES:
            for path in (*head, *paths):
                yield self.function(path, self.size, self.timeout)
            return
        yield from self._parallel(_chain(head, paths))

    def _parallel(self, source: Iterator[str]) -> Iterator[Prepared | Record]:
        limit = self.workers * 4
        pending: dict[Future, str] = {}
        suspects: deque[str] = deque()   # in flight when a worker died: retried one at a time
        crashes: dict[str, int] = {}
        exhausted = False
        while pending or suspects or not exhausted:
            cap = 1 if suspects or any(p in crashes for p in pending.values()) else limit
            while len(pending) < cap:
                if suspects:
                    path = suspects.popleft()
                elif not exhausted:
                    path = next(source, None)
                    if path is None:
                        exhausted = True
                        break
                else:
                    break
                pending[self._pool().submit(self.function, path, self.size, self.timeout)] = path
            if not pending:
                continue
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                path = pending.pop(future)
                try:
                    yield future.result()
                except BrokenProcessPool:
                    broken = True
                    crashes[path] = crashes.get(path, 0) + 1
                    if crashes[path] >= MAX_CRASHES:
                        yield Record(path, ERROR, "the decoder crashed on this file (worker process died)")
                    else:
                        suspects.append(path)
            if broken:
                for future, path in pending.items():  # lost with the pool: retry them singly
                    crashes[path] = crashes.get(path, 0)
                    suspects.append(path)
                pending.clear()
                self._reset()


def _chain(head: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from head
    yield from rest
