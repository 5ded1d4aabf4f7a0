"""`heartbatch run --scheduler ADDRESS`: the same run, on a Dask cluster.

Files are cut into chunks (one inference batch each) and each chunk is a Dask
task.  A worker process loads the model once and keeps it; a task runs the
same :class:`~heartbatch.pipeline.Runner` as a local run (decoding inline, in
the Dask worker) and returns the chunk's :class:`~heartbatch.records.Record`
objects.  The client scans lazily, asks the ledger which files need a row,
schedules the chunks as a local run does (:mod:`heartbatch.scheduler`: a
bounded number in flight, failed ones retried file by file), and writes each returned chunk
through the same :class:`~heartbatch.report.session.ReportSession` as a local run,
so resume and exactly-once hold unchanged.

Failures: a worker that dies has its tasks rescheduled by Dask on other
workers; a chunk that keeps killing workers (Dask's ``KilledWorker``) or
raises is split into single files, and a single file that still fails gets
an ``error`` row, as a decoder crash does in a local run.  Rows are written
only when a chunk's result reaches the client and the ledger keys them by
path, so every file gets exactly one row.

Workers read the DICOM files and the model by path: they need the client's
filesystem (a shared filesystem on a cluster); the client alone writes the
report.  Dask is imported only here, inside functions, so heartbatch works
without it.
"""

from __future__ import annotations

import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from .errors import DistributedError, ExitCode
from .model import BoxModel, ModelRef, WorkerModelError, worker_model  # noqa: F401 - re-exported
from .pipeline import RunOptions, Runner
from .report.session import ReportSession, RunResult
from .records import Record
from .scheduler import Backend, Failed, chunks, schedule

INSTALL_HINT = "install heartbatch[dask] (pip install 'heartbatch[dask]')"
IN_FLIGHT_PER_THREAD = 3      # chunks in flight per worker thread: enough to keep workers busy
MIN_IN_FLIGHT = 4
REFRESH_SECONDS = 5.0         # how often the client re-reads the cluster size (adaptive clusters grow)
RETRIES = 1                   # Dask retries of a task that raised (a transient error)


# --- the scheduler address ------------------------------------------------------

def parse_scheduler(address: str) -> tuple[str, object]:
    """``local:N`` -> ("local", N); an existing ``*.json`` file -> ("file", path); else ("address", text)."""
    text = address.strip()
    if text.startswith("local:") or text == "local":
        count = text.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise DistributedError(f"--scheduler {address!r}: local:N needs N, the number of worker "
                                   f"processes to start (1 or more), e.g. local:2")
        return "local", int(count)
    if text.endswith(".json") and Path(text).is_file():
        return "file", text
    if "://" in text or text.rpartition(":")[2].isdigit():
        return "address", text
    raise DistributedError(f"--scheduler {address!r} is not a Dask scheduler address: give tcp://HOST:PORT, "
                           f"a scheduler file (JSON), or local:N")


def require_dask() -> None:
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise DistributedError(f"--scheduler needs Dask distributed ({exc}); {INSTALL_HINT}") from None


def check_scheduler(address: str) -> None:
    """Fail fast, before the model is loaded: Dask installed and the address well-formed."""
    parse_scheduler(address)
    require_dask()


def _local_cluster(workers: int):
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                        host="127.0.0.1")


@contextmanager
def connect(scheduler) -> Iterator[tuple[object, int | None]]:
    """Yield (client, local worker count or None) for an address, ``local:N``, a scheduler file, a
    ``distributed.Client`` (used as is, left open) or a cluster object (e.g. ``SLURMCluster``)."""
    require_dask()
    from distributed import Client

    if isinstance(scheduler, Client):
        yield scheduler, None
        return
    cluster = None
    local = None
    try:
        if isinstance(scheduler, str):
            kind, value = parse_scheduler(scheduler)
            try:
                if kind == "local":
                    local = value
                    cluster = _local_cluster(value)
                    client = Client(cluster, set_as_default=False)
                elif kind == "file":
                    client = Client(scheduler_file=value, set_as_default=False)
                else:
                    client = Client(value, set_as_default=False)
            except (OSError, TimeoutError, ValueError) as exc:
                raise DistributedError(f"cannot connect to the Dask scheduler {scheduler!r}: "
                                       f"{type(exc).__name__}: {str(exc).strip()[:300]}") from None
        else:  # a cluster object the caller owns
            client = Client(scheduler, set_as_default=False)
        try:
            yield client, local
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


# --- the worker side ------------------------------------------------------------

def _auto_threads(host_threads: dict[str, int]) -> int:
    """onnxruntime threads per worker process: this host's cores over the task threads Dask runs on it."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        from distributed import get_worker

        worker = get_worker()
        host = worker.address.rpartition(":")[0]
        running = host_threads.get(host) or worker.state.nthreads
    except (ImportError, ValueError):
        running = 1
    return max(1, cores // max(1, running))


def process_chunk(items: list[tuple[str, str]], ref: ModelRef, options: RunOptions,
                  host_threads: dict[str, int] | None = None) -> list[Record]:
    """The Dask task: (report path, absolute path) pairs -> one record per file.

    Runs the local pipeline's Runner with decoding inline (``workers=0``), so
    the per-file logic is the same code as ``heartbatch run`` without Dask.
    Records carry the client's path, so the report reads as a local run's.
    """
    threads = options.threads or _auto_threads(host_threads or {})
    model = worker_model(ref, threads)
    by_abs = {absolute: path for path, absolute in items}
    records: list[Record] = []
    with Runner(model, replace(options, workers=0)) as runner:
        for batch in runner.process(absolute for _, absolute in items):
            records.extend(batch)
    for record in records:
        record.path = by_abs.get(record.path, record.path)
    return records


# --- the client side ------------------------------------------------------------

class _Cluster:
    """How many chunks to keep in flight, and the task threads per host (re-read now and then)."""

    def __init__(self, client, max_in_flight: int | None):
        self.client = client
        self.fixed = max_in_flight
        self.limit = max_in_flight or MIN_IN_FLIGHT
        self.host_threads: dict[str, int] = {}
        self._read_at = -REFRESH_SECONDS
        self.refresh()

    def refresh(self) -> None:
        if time.monotonic() - self._read_at < REFRESH_SECONDS:
            return
        self._read_at = time.monotonic()
        workers = self.client.scheduler_info().get("workers", {})
        hosts: dict[str, int] = {}
        for address, info in workers.items():
            host = address.rpartition(":")[0]
            hosts[host] = hosts.get(host, 0) + int(info.get("nthreads", 1))
        self.host_threads = hosts
        if self.fixed is None:
            self.limit = max(MIN_IN_FLIGHT, IN_FLIGHT_PER_THREAD * sum(hosts.values()))


class _DaskTasks(Backend):
    """:func:`~heartbatch.scheduler.schedule` on a Dask cluster.  Dask itself reruns a task
    whose worker died (up to its ``allowed-failures``, then ``KilledWorker``) or that raised
    (:data:`RETRIES`), so a file that still fails alone gets its error row at once."""

    max_failures = 1

    def __init__(self, client, ref: ModelRef, options: RunOptions, max_in_flight: int | None):
        from distributed import as_completed

        self.client, self.ref, self.options = client, ref, options
        self.cluster = _Cluster(client, max_in_flight)
        self.done = as_completed(loop=client.loop)
        self.run_id = uuid.uuid4().hex[:8]
        self.submitted = 0

    def limit(self) -> int:
        self.cluster.refresh()
        return self.cluster.limit

    def submit(self, chunk: list[str]):
        items = [(p, os.path.abspath(p)) for p in chunk]
        self.submitted += 1
        future = self.client.submit(process_chunk, items, self.ref, self.options, self.cluster.host_threads,
                                    key=f"heartbatch-{self.run_id}-{self.submitted}", retries=RETRIES, pure=False)
        self.done.add(future)
        return future

    def wait(self, pending) -> list:
        return [next(self.done)]

    def outcome(self, future) -> list[Record] | Failed:
        try:
            # a result lost with its worker before it was fetched is recomputed: result() waits for it
            return future.result()
        except Exception as exc:  # noqa: BLE001 - the task's own exception, re-raised here
            if future.status == "cancelled":
                raise DistributedError("the Dask scheduler cancelled the run's tasks (scheduler lost or "
                                       "restarted?); the rows written so far are kept: run the same command "
                                       "again to continue") from None
            if isinstance(exc, WorkerModelError):
                raise DistributedError(str(exc), exit_code=ExitCode.MODEL) from None
            return Failed(exc, crashed=type(exc).__name__ == "KilledWorker")
        finally:
            future.release()

    def abandon(self, pending) -> None:
        for future in pending:  # an aborted run leaves no work behind on the cluster
            try:
                future.cancel()
            except Exception:  # noqa: BLE001 - the client may be gone already
                pass


def run(paths: list[str | Path], out: Path, model: BoxModel, options: RunOptions | None = None,
        on_records: Callable[[list[Record]], None] | None = None, state_dir: Path | None = None,
        force: bool = False, on_unchanged: Callable[[], None] | None = None,
        on_total: Callable[[int], None] | None = None, *, scheduler, chunk_size: int | None = None, max_in_flight: int | None = None) -> RunResult:
    """:func:`heartbatch.pipeline.run` on a Dask cluster; same arguments, same result.

    ``scheduler``: ``"tcp://host:8786"``, ``"local:N"``, a scheduler file, a
    ``distributed.Client`` or a cluster object.  ``chunk_size`` files per task
    (default: the batch size); at most ``max_in_flight`` tasks at a time
    (default: 3 per worker thread, at least 4).  ``options.workers`` is not
    used (each Dask worker decodes in its own process); ``options.threads`` is
    onnxruntime's threads per worker process (default: the host's cores over
    its Dask worker threads).
    """
    options = options or RunOptions()
    started = time.monotonic()
    ref = ModelRef.of(model)
    size = chunk_size or options.batch_size
    with ReportSession(out, model, options, state_dir, force) as session:
        def write(records: list[Record]) -> None:
            session.write(records)
            if on_records is not None:
                on_records(records)

        todo = chunks((str(p) for p in session.todo(paths, on_unchanged, on_total)), size)
        first = next(todo, None)
        if first is not None:  # nothing new: no cluster to start
            with connect(scheduler) as (client, local_workers):
                task_options = options
                if local_workers and not options.threads:  # N processes on this machine share its cores
                    task_options = replace(options, threads=max(1, (os.cpu_count() or 1) // local_workers))
                tasks = _DaskTasks(client, ref, task_options, max_in_flight)
                for records in schedule(tasks, itertools.chain([first], todo)):
                    write(records)
        return session.finish(started)
