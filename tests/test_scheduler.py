"""heartbatch.scheduler on a scripted backend: the algorithm alone, no processes.

The real backends (worker processes, Dask) are tested with real crashes in
test_bad_inputs.py and test_distributed.py; here each rule is pinned down
exactly: the bound on tasks in flight, retries one file per task with nothing
beside them, when a file is given up on, and tasks lost with a broken pool.
"""

from __future__ import annotations

import itertools

import pytest

from heartbatch.scheduler import CRASH_REASON, Backend, Failed, chunks, schedule


class Scripted(Backend):
    """Tasks finish in the order they were submitted; a chunk with a '*crash*' file kills its worker
    (taking every task in flight with it when ``took_all``), one with a '*raise*' file raises."""

    def __init__(self, limit: int = 3, max_failures: int = 2, took_all: bool = False):
        self._limit, self.max_failures, self.took_all = limit, max_failures, took_all
        self.ids = itertools.count()
        self.chunks: dict[int, list[str]] = {}
        self.submitted: list[list[str]] = []
        self.most_in_flight = 0
        self.beside_a_retry = 0   # tasks in flight next to a single-file retry
        self.restarts = 0
        self.abandoned: list[list[str]] = []
        self.failed_files: set[str] = set()

    def limit(self) -> int:
        return self._limit

    def submit(self, chunk):
        handle = next(self.ids)
        self.chunks[handle] = chunk
        self.submitted.append(chunk)
        self.most_in_flight = max(self.most_in_flight, len(self.chunks))
        if any(len(c) == 1 and c[0] in self.failed_files for c in self.chunks.values()) and len(self.chunks) > 1:
            self.beside_a_retry += 1
        return handle

    def wait(self, pending):
        return [min(pending)]

    def outcome(self, handle):
        chunk = self.chunks.pop(handle)
        if any("crash" in p for p in chunk):
            self.failed_files.update(chunk)
            return Failed(RuntimeError("worker died"), crashed=True, took_all=self.took_all)
        if any("raise" in p for p in chunk):
            self.failed_files.update(chunk)
            return Failed(ValueError("bad value"), crashed=False)
        return [f"ok:{p}" for p in chunk]

    def restart(self):
        self.restarts += 1
        self.chunks.clear()

    def abandon(self, pending):
        self.abandoned = [self.chunks[h] for h in pending]


def _results(backend, files, size):
    out = {}
    for results in schedule(backend, chunks(files, size)):
        for result in results:
            path = result[3:] if isinstance(result, str) else result.path
            assert path not in out, f"{path} got two results"
            out[path] = result
    return out


def test_bounded_in_flight_every_file_once():
    files = [f"f{i}" for i in range(23)]
    backend = Scripted(limit=3)
    out = _results(backend, files, 4)
    assert out == {p: f"ok:{p}" for p in files}
    assert backend.most_in_flight == 3
    assert backend.submitted == list(chunks(files, 4))  # chunks in order, none retried


@pytest.mark.parametrize("max_failures,alone_tries", [(1, 1), (2, 1), (3, 2)])
def test_a_failed_chunk_is_retried_file_by_file(max_failures, alone_tries):
    files = ["a", "b", "crash", "c", "d", "e"]
    backend = Scripted(limit=2, max_failures=max_failures)
    out = _results(backend, files, 4)
    assert set(out) == set(files)
    crash = out["crash"]
    assert (crash.status, crash.reason, crash.code) == ("error", CRASH_REASON, "crashed")
    assert all(out[p] == f"ok:{p}" for p in files if p != "crash")
    # its chunk's failure counts: then alone until it has failed max_failures times; its chunk-mates once alone
    assert backend.submitted.count(["crash"]) == alone_tries
    assert all(backend.submitted.count([p]) == 1 for p in ["a", "b", "c"])
    assert backend.beside_a_retry == 0


def test_a_single_file_task_counts_towards_giving_up():
    backend = Scripted(limit=2, max_failures=2)
    out = _results(backend, ["a", "crash", "b"], 1)
    assert out["crash"].reason == CRASH_REASON
    assert backend.submitted.count(["crash"]) == 2


def test_a_raising_task_gives_an_unexpected_error_row():
    out = _results(Scripted(max_failures=1), ["a", "raise_me", "b"], 2)
    row = out["raise_me"]
    assert row.status == "error" and row.reason.startswith("unexpected") and "ValueError" in row.reason
    assert row.code == "" and out["a"] == "ok:a" and out["b"] == "ok:b"


def test_tasks_lost_with_a_broken_pool_are_retried_alone_and_not_counted():
    files = ["crash", "a", "b", "c", "d", "e", "f", "g"]
    backend = Scripted(limit=3, max_failures=2, took_all=True)
    out = _results(backend, files, 2)
    assert out["crash"].reason == CRASH_REASON
    assert all(out[p] == f"ok:{p}" for p in files if p != "crash")
    assert backend.restarts == 2           # the chunk, then the file alone
    # in flight with the crash: ["b", "c"], ["d", "e"]; retried one file per task
    assert all(backend.submitted.count([p]) == 1 for p in "abcde")
    assert ["f", "g"] in backend.submitted and ["f"] not in backend.submitted


def test_stopping_early_abandons_the_tasks_in_flight():
    backend = Scripted(limit=3)
    run = schedule(backend, chunks([f"f{i}" for i in range(20)], 2))
    assert next(run) == ["ok:f0", "ok:f1"]
    run.close()
    assert backend.abandoned == [["f2", "f3"], ["f4", "f5"]]
