"""`heartbatch watch`: the batch pipeline on files as they arrive.

A watchdog observer (inotify, or polling for network shares) reports paths;
a path is processed once it is complete: its size and mtime have not changed
for ``settle`` seconds.  A file that still fails to parse while it was
modified less than ``incomplete_grace`` seconds ago is treated as a copy in
progress and looked at again later, never reported as an error for being
incomplete.  Files already present are caught up at start; the ledger makes
restarts continue where they stopped.  SIGINT/SIGTERM finish the batch in
flight, flush, and return; the handlers that were there before are put back.

What a caller (or a test) can observe, besides the rows: ``Watcher.caught_up``
is set (and ``on_caught_up`` called) once every file present at start has
been looked at; ``Watcher.rounds`` counts completed rounds (events taken in,
ready files measured and written), so a row announced in round ``r`` means
everything that round took in has been dealt with once ``rounds > r``.
"""

from __future__ import annotations

import fnmatch
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEventHandler

from .report.ledger import Fingerprint
from .model import BoxModel
from .pipeline import RunOptions, Runner
from .records import ERROR, SKIPPED, Record
from .scan import scan
from .report.session import ReportSession

#: Names that copy tools use while a file is still being written.
TEMPORARY_NAMES = ("*.part", "*.partial", "*.tmp", "*.crdownload", "*.swp", ".*", "*~")
#: Skip codes (heartbatch.dicom) that a file still being copied also gets.
INCOMPLETE_SKIPS = ("not_dicom", "empty", "no_pixels")


@dataclass
class WatchOptions:
    settle: float = 1.0            # seconds a file's size/mtime must stay unchanged
    incomplete_grace: float = 30.0  # a failing file this recently modified is re-checked, not reported
    poll_interval: float = 0.2
    polling: bool = False          # PollingObserver, for network shares inotify does not see
    max_batch_files: int = 256     # files taken per round, so a stop request is honoured soon
    observe: bool = True           # False: no watchdog observer; files arrive through Watcher.notify


@dataclass
class _Pending:
    fingerprint: Fingerprint
    changed_at: float


def is_temporary(path: str) -> bool:
    name = os.path.basename(path)
    return any(fnmatch.fnmatch(name, pattern) for pattern in TEMPORARY_NAMES)


def _looks_incomplete(record: Record, now: float, grace: float) -> bool:
    """A failure on a file modified moments ago is most likely a copy in progress."""
    if record.status == ERROR or (record.status == SKIPPED and record.code in INCOMPLETE_SKIPS):
        try:
            return now - os.stat(record.path).st_mtime < grace
        except OSError:
            return False
    return False


class _Handler(FileSystemEventHandler):
    """watchdog callbacks -> a thread-safe queue of paths."""

    def __init__(self, paths: "queue.Queue[str]"):
        super().__init__()
        self.paths = paths

    def dispatch(self, event) -> None:
        if event.is_directory:
            if event.event_type in ("created", "moved"):
                self.paths.put(os.fsdecode(getattr(event, "dest_path", "") or event.src_path) + os.sep)
            return
        target = getattr(event, "dest_path", "") if event.event_type == "moved" else event.src_path
        if target:
            self.paths.put(os.fsdecode(target))


class Watcher:
    def __init__(self, dirs: list[Path], out: Path, model: BoxModel, options: RunOptions,
                 watch_options: WatchOptions | None = None, state_dir: Path | None = None,
                 on_records: Callable[[list[Record]], None] | None = None,
                 on_caught_up: Callable[[int], None] | None = None, send_to: str | None = None,
                 exclude: list[Path] | None = None):
        """``send_to``: queue the rows' DICOM results for this destination (a Sender sends them);
        ``exclude``: what scans leave out (default: the report's own files)."""
        self.dirs = dirs
        self.model = model
        self.options = options
        self.wopts = watch_options or WatchOptions()
        self.session = ReportSession(out, model, options, state_dir, send_to=send_to)
        self.runner = Runner(model, options)
        self.on_records = on_records
        self.on_caught_up = on_caught_up   # called once, with the number of files present at start
        self.stop_requested = threading.Event()
        #: set once every file present at start was measured, found unchanged in the ledger, or gone
        #: (a copy still in progress at start keeps it unset until it is complete)
        self.caught_up = threading.Event()
        #: completed rounds of the watch loop (see the module docstring)
        self.rounds = 0
        self._catching_up: set[str] = set()
        self._present_at_start = 0
        self._events: queue.Queue[str] = queue.Queue()
        self._pending: dict[str, _Pending] = {}
        self._exclude = self.session.files.outputs if exclude is None else exclude
        self._excluded = {os.path.realpath(p) for p in self._exclude}
        self.processed = 0

    def notify(self, path: str | Path) -> None:
        """A file is complete at ``path`` (thread-safe): what an observer event does."""
        self._events.put(os.fspath(path))

    # -- what to look at ----------------------------------------------------
    def _excluded_path(self, path: str) -> bool:
        real = os.path.realpath(path)
        return is_temporary(path) or any(real == e or real.startswith(e + os.sep) for e in self._excluded)

    def _note(self, path: str, now: float) -> None:
        if path.endswith(os.sep):  # a folder moved or created: take what is inside
            for inner in scan([path]):
                self._note(str(inner), now)
            return
        if self._excluded_path(path):
            return
        fingerprint = Fingerprint.of(path)
        entry = self._pending.get(path)
        if entry is None or entry.fingerprint != fingerprint:
            self._pending[path] = _Pending(fingerprint, now)

    def _drain_events(self, now: float) -> None:
        while True:
            try:
                self._note(self._events.get_nowait(), now)
            except queue.Empty:
                return

    def _ready(self, now: float) -> list[str]:
        """Files unchanged for `settle` seconds; vanished ones are dropped."""
        ready = []
        for path, entry in list(self._pending.items()):
            fingerprint = Fingerprint.of(path)
            if fingerprint.size < 0:
                del self._pending[path]          # deleted or renamed away before it settled
                self._catching_up.discard(path)
            elif fingerprint != entry.fingerprint:
                self._pending[path] = _Pending(fingerprint, now)
            elif now - entry.changed_at >= self.wopts.settle:
                ready.append(path)
            if len(ready) >= self.wopts.max_batch_files:
                break
        return ready

    # -- processing ---------------------------------------------------------
    def _process(self, paths: list[str]) -> bool:
        """Measure ready files; returns True when rows were written."""
        todo = []
        for path in paths:
            del self._pending[path]
            if self.session.needs(path):
                todo.append(path)
        wrote = False
        for records in self.runner.process(todo):
            now = time.time()
            final = []
            for record in records:
                if _looks_incomplete(record, now, self.wopts.incomplete_grace):
                    self._pending[record.path] = _Pending(Fingerprint.of(record.path), time.monotonic())
                else:
                    final.append(record)
            if final:
                self.session.write(final)
                self.session.report.sync()  # a re-measured file's old row goes before anyone is told
                self.processed += len(final)
                wrote = True
                if self.on_records is not None:
                    self.on_records(final)
            if self.stop_requested.is_set():
                # the rest of this round stays in the ledger's "to do": a restart picks it up
                break
        self._catching_up.difference_update(p for p in paths if p not in self._pending)
        return wrote

    def catch_up(self) -> None:
        now = time.monotonic()
        for path in scan(self.dirs, exclude=self._exclude):
            if not self._excluded_path(str(path)):
                self._pending[str(path)] = _Pending(Fingerprint.of(path), now - self.wopts.settle)
        self._catching_up = set(self._pending)
        self._present_at_start = len(self._catching_up)

    def _end_round(self) -> None:
        if not self.caught_up.is_set() and not self._catching_up:
            self.caught_up.set()
            if self.on_caught_up is not None:
                self.on_caught_up(self._present_at_start)
        self.rounds += 1

    def run(self, install_signal_handlers: bool = True) -> int:
        """Watch until ``stop_requested`` is set (or SIGINT/SIGTERM arrive, when
        ``install_signal_handlers``: only possible in the main thread); the
        previous SIGINT/SIGTERM handlers are restored on return."""
        previous = {}
        if install_signal_handlers:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: self.stop_requested.set())
        try:
            return self._watch()
        finally:
            for sig, handler in previous.items():
                # None: a handler not set from Python; the default is the closest we can put back
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)

    def _watch(self) -> int:
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        observer = None
        if self.wopts.observe:
            observer = PollingObserver(timeout=1) if self.wopts.polling else Observer()
            handler = _Handler(self._events)
            for folder in self.dirs:
                observer.schedule(handler, str(folder), recursive=True)
            observer.start()
        try:
            self.catch_up()
            while not self.stop_requested.is_set():
                now = time.monotonic()
                self._drain_events(now)
                ready = self._ready(now)
                wrote = bool(ready) and self._process(ready)
                if wrote:
                    self.session.summarize()
                self._end_round()
                if not wrote:
                    self.stop_requested.wait(self.wopts.poll_interval)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self.runner.close()
            self.session.report.close()
            self.session.summarize()
            self.session.close()
        return 0
