"""Chunks of files through tasks that may fail, each file once: the one scheduling algorithm.

Both ways of running many files, worker processes on this machine
(:class:`heartbatch.workers.WorkerPool`) and a Dask cluster
(:mod:`heartbatch.distributed`), cut the files into chunks, keep a bounded
number of chunk tasks in flight and take results as tasks complete.  When a
task fails (its worker died, or it raised) the files it held are retried one
per task, and no other task starts beside a retry, so a file that kills
workers takes no other file's task with it; a file that fails alone often enough gets an error
row instead of a result.  :func:`schedule` decides all of that; a
:class:`Backend` only says how to submit a task, wait for one, read its
outcome and recover from a failure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

from . import sanitize
from .records import ERROR, Record

CRASH_REASON = "the decoder crashed on this file (worker process died)"


@dataclass
class Failed:
    """A task that returned no results.  ``crashed``: it took its worker process down;
    ``took_all``: every other task in flight was lost with it (a broken process pool)."""

    error: BaseException
    crashed: bool
    took_all: bool = False


class Backend:
    """Where tasks run.  A handle is whatever :meth:`submit` returns; it must be hashable."""

    #: a file whose task fails with it alone gets its error row once it has been in this many failed tasks
    max_failures: int = 1

    def limit(self) -> int:
        """Tasks to keep in flight now; asked before every top-up (a cluster may grow)."""
        raise NotImplementedError

    def submit(self, chunk: list) -> Any:
        raise NotImplementedError

    def wait(self, pending: Collection) -> Iterable:
        """Block until at least one of ``pending`` has finished; return the finished ones."""
        raise NotImplementedError

    def outcome(self, handle) -> list | Failed:
        """A finished task's results (one per file, in the chunk's order), or why it failed.
        Raise to stop the run (a failure that retrying cannot help)."""
        raise NotImplementedError

    def restart(self) -> None:
        """After a failure that took every task with it: make :meth:`submit` work again."""

    def abandon(self, pending: Collection) -> None:
        """The run stops with these tasks still in flight."""


def chunks(paths: Iterable, size: int) -> Iterator[list]:
    """``paths`` in lists of ``size`` (the last one shorter), read lazily."""
    paths = iter(paths)
    while chunk := list(islice(paths, size)):
        yield chunk


def given_up(path: str, failure: Failed) -> Record:
    """The error row for a file whose task failed even with the file alone in it."""
    if failure.crashed:
        return Record(path, ERROR, CRASH_REASON, code="crashed")
    exc = failure.error
    return Record(path, ERROR, f"unexpected {sanitize.exception(exc)}", detail=sanitize.traceback_text(exc))


def schedule(backend: Backend, source: Iterator[list]) -> Iterator[list]:
    """Run every chunk of ``source`` on ``backend``; yield each task's results as it completes
    (a given-up file's error row as a list of one), so every file gets exactly one result."""
    pending: dict[Any, list] = {}   # handle -> its chunk
    retry: deque = deque()          # files of failed (or lost) tasks, to run one per task
    alone: set = set()              # a retried file's task: nothing else runs beside it
    failures: dict = {}             # path -> failed tasks it was in
    exhausted = False
    try:
        while pending or retry or not exhausted:
            limit = backend.limit()
            while len(pending) < (1 if retry or alone else limit):
                suspect = bool(retry)
                if suspect:
                    chunk = [retry.popleft()]
                else:
                    chunk = None if exhausted else next(source, None)
                    if chunk is None:
                        exhausted = True
                        break
                handle = backend.submit(chunk)
                pending[handle] = chunk
                if suspect:
                    alone.add(handle)
            if not pending:
                continue
            took_all = False
            for handle in backend.wait(pending):
                chunk = pending.pop(handle)
                alone.discard(handle)
                result = backend.outcome(handle)
                if not isinstance(result, Failed):
                    yield result
                    continue
                took_all = took_all or result.took_all
                for path in chunk:  # which file of a chunk failed it is unknown: count it against each
                    failures[path] = failures.get(path, 0) + 1
                    if len(chunk) == 1 and failures[path] >= backend.max_failures:
                        yield [given_up(path, result)]
                    else:
                        retry.append(path)
            if took_all:  # the tasks lost with it are no file's fault: retried alone, not counted
                for chunk in pending.values():
                    retry.extend(chunk)
                pending.clear()
                alone.clear()
                backend.restart()
    finally:
        if pending:
            backend.abandon(pending)
