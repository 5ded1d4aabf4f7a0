"""Misbehaving stand-ins for :func:`heartbatch.workers.prepare`, for WorkerPool tests.

Each one behaves like a real decoder would on a pathological file, chosen by a
marker in the file name, and otherwise calls the real ``prepare`` so the other
files give real results.  :func:`each` makes one a WorkerPool task (its
``many=``), which worker processes run: so these live at module level, where a
worker can import them.
"""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path

import heartbatch.workers as workers

#: How long a 'hang' file blocks: far longer than the time limits tests use,
#: short enough that a pool without a time limit still ends.
HANG_SECONDS = 30.0


def each(function):
    """A WorkerPool task that runs ``function(path, size, timeout)`` on each of its files, in order."""
    return partial(_each, function)


def _each(function, paths: list[str], size: int, timeout: float | None) -> list:
    return [function(path, size, timeout) for path in paths]


def crash_on_marker(path: str, size: int, timeout: float | None):
    """SIGKILL this worker for files named '*crash*' (a segfaulting C decoder, the OOM killer)."""
    if "crash" in Path(path).name:
        os.kill(os.getpid(), signal.SIGKILL)
    return workers.prepare(path, size, timeout)


def exit_on_marker(path: str, size: int, timeout: float | None):
    """os._exit() for files named '*crash*': a decoder that calls exit() in C."""
    if "crash" in Path(path).name:
        os._exit(70)
    return workers.prepare(path, size, timeout)


def crash_once(path: str, size: int, timeout: float | None):
    """Kill the worker the first time a '*flaky*' file is read, then read it normally.

    A sentinel file next to the input remembers the first attempt across
    worker processes.
    """
    sentinel = Path(path + ".crashed-once")
    if "flaky" in Path(path).name and not sentinel.exists():
        sentinel.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return workers.prepare(path, size, timeout)


def _blocking_read_dicom(path, min_side=None):
    """A reader stuck in Python code (a decoder loop that never ends)."""
    deadline = time.monotonic() + HANG_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.01)
    return _real_read_dicom(path, min_side)


_real_read_dicom = workers.read_dicom


def hang_on_marker(path: str, size: int, timeout: float | None):
    """The real ``prepare`` (with its time limit), whose reader blocks for '*hang*' files.

    Only the reading step is replaced, so the time limit under test is
    ``prepare``'s own: without it, a 'hang' file comes back ok after
    :data:`HANG_SECONDS`.
    """
    workers.read_dicom = _blocking_read_dicom if "hang" in Path(path).name else _real_read_dicom
    try:
        return workers.prepare(path, size, timeout)
    finally:
        workers.read_dicom = _real_read_dicom
