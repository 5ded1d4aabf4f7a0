"""`heartbatch watch`: a real watchdog observer (inotify, and polling), real
writer processes, real signals.

Most tests run the Watcher in a thread of this process (its observer and
report are the real ones; stopped through ``stop_requested``); the signal,
burst and polling tests run ``python -m heartbatch watch`` as a subprocess.
Every wait is bounded and every process started here is killed in teardown.

No test sleeps and then asserts that nothing happened (that passes without
testing anything when the watcher is slow).  "Nothing else was measured" is
asserted after a positive event that proves the watcher has already looked:
a sentinel file written after the events in question has its row, and the
round that measured it is over (``Watcher.rounds``; for a subprocess, a second
sentinel's row, which can only come in a later round).  Catch-up is awaited
through ``Watcher.caught_up``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_factory import write_dicom
from heartbatch import cli
from heartbatch.model import BoxModel
from heartbatch.pipeline import RunOptions
from heartbatch.records import Record
from heartbatch.report.paths import ReportFiles
from heartbatch.watch import WatchOptions, Watcher
from helpers import (Processes, body_lines, check_report, check_summary_agrees, count_complete_rows, hb, output,
                     thumbnail, wait_until, write_chests)


# --- helpers -------------------------------------------------------------------

class ThreadWatcher:
    """A real Watcher (real observer, report and ledger) built and run in a thread of its own."""

    def __init__(self, dirs: list[Path], out: Path, model: Path, *, settle: float = 0.3, grace: float = 30.0,
                 polling: bool = False, workers: int = 0, batch_size: int = 16):
        self.out = out
        self.batches: list[tuple[float, list[Record], int]] = []  # (time, records, watcher round)
        self._lock = threading.Lock()
        self.rc: int | None = None
        self.caught_up_at: float | None = None   # time.time() when on_caught_up was called
        self.error: BaseException | None = None
        self.watcher: Watcher | None = None
        self._ready = threading.Event()
        self._args = (list(dirs), out, model, settle, grace, polling, workers, batch_size)
        self.thread = threading.Thread(target=self._main, name="watcher", daemon=True)
        self.thread.start()
        if not self._ready.wait(30):
            pytest.fail("the watcher was not built within 30 s")
        self.alive()

    def _main(self) -> None:
        dirs, out, model, settle, grace, polling, workers, batch_size = self._args
        try:
            # built in the thread that runs it: the ledger's SQLite connection belongs to one thread
            self.watcher = Watcher(dirs, out, BoxModel(model, threads=1),
                                   RunOptions(batch_size=batch_size, workers=workers, threads=1),
                                   WatchOptions(settle=settle, incomplete_grace=grace, polling=polling),
                                   on_records=self._on_records, on_caught_up=self._on_caught_up)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            return
        finally:
            self._ready.set()
        try:
            self.rc = self.watcher.run(install_signal_handlers=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _on_records(self, records: list[Record]) -> None:
        with self._lock:
            self.batches.append((time.time(), list(records), self.watcher.rounds))  # the round in progress

    def _on_caught_up(self, present: int) -> None:
        self.caught_up_at = time.time()

    def records(self, path: Path | None = None) -> list[tuple[float, Record]]:
        with self._lock:
            return [(t, r) for t, batch, _ in self.batches for r in batch if path is None or r.path == str(path)]

    def alive(self) -> None:
        if self.error is not None:
            raise AssertionError(f"the watcher failed: {self.error!r}") from self.error
        assert self.thread.is_alive(), "the watcher thread ended by itself"

    def wait(self, condition, what: str, timeout: float = 30.0) -> None:
        """Until ``condition()`` is true; the watcher failing or ending first fails the test."""
        def met() -> bool:
            if condition():
                return True
            self.alive()
            return False

        wait_until(met, timeout=timeout, interval=0.02,
                   message=lambda: f"{what} (the report has {count_complete_rows(self.out)} rows)")

    def wait_rows(self, count: int, timeout: float = 30.0) -> None:
        self.wait(lambda: count_complete_rows(self.out) >= count, f"{count} rows", timeout)

    def request_stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop_requested.set()

    def wait_records(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` records were reported to on_records (called just after the rows are written)."""
        self.wait(lambda: len(self.records()) >= count, f"{count} records", timeout)

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Until every file present at start was looked at (measured, or found unchanged in the ledger)."""
        self.wait(lambda: self.watcher is not None and self.watcher.caught_up.is_set(), "the catch-up", timeout)

    def prove_looked(self, folder: Path, pngs: list[Path], name: str = "sentinel") -> Path:
        """Write a valid chest DICOM into ``folder``, wait for its row and for the end of the round
        that wrote it.  Whatever happened in the watched folders before this call (events, reads,
        files that must be ignored) has been dealt with by then: its events came first, so those
        files were ready no later than the sentinel and were measured, if at all, by that round."""
        sentinel = write_dicom(folder / f"{name}.dcm", thumbnail(pngs[7]), patient_id=name.upper())
        self.wait(lambda: self.records(sentinel), f"the row of {sentinel.name}")
        with self._lock:
            wrote_in = next(n for _, batch, n in self.batches if any(r.path == str(sentinel) for r in batch))
        self.wait(lambda: self.watcher.rounds > wrote_in, f"the end of the round that measured {sentinel.name}")
        return sentinel

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the watcher did not stop within {timeout} s"
        if self.error is not None:
            raise AssertionError(f"the watcher failed: {self.error!r}") from self.error
        assert self.rc == 0


@pytest.fixture
def start_watcher():
    started: list[ThreadWatcher] = []

    def start(*args, **kwargs) -> ThreadWatcher:
        w = ThreadWatcher(*args, **kwargs)
        started.append(w)
        return w

    yield start
    for w in started:
        w.request_stop()
        w.thread.join(30)


def ledger_rows(report: Path) -> list[str]:
    db = sqlite3.connect(f"file:{ReportFiles.of(report).state_dir / 'ledger.sqlite'}?mode=ro", uri=True)
    try:
        return [row for (row,) in db.execute("SELECT row FROM files ORDER BY seq")]
    finally:
        db.close()


def check_flushed(report: Path) -> None:
    """After a stop: the CSV is exactly the ledger's rows, and the summary agrees with it."""
    assert body_lines(report) == ledger_rows(report)
    check_summary_agrees(report)


def summary_total(report: Path) -> int:
    try:
        return json.loads(ReportFiles.of(report).summary_json.read_text())["files"]["total"]
    except (FileNotFoundError, ValueError):
        return -1


def rows_by_path(report: Path) -> dict[str, dict[str, str]]:
    return {r["path"]: r for r in check_report(report)}


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


WRITER = r"""
import json, os, sys, time
src, dst, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
data = open(src, "rb").read()
pos = 0
with open(dst, "wb") as fh:
    for end, pause in plan:            # write up to byte `end`, then wait `pause` seconds
        fh.write(data[pos:end]); fh.flush(); os.fsync(fh.fileno()); pos = end
        print("wrote", end, flush=True)
        time.sleep(pause)
    assert pos == len(data)
print("done", time.time(), flush=True)
"""


def start_writer(procs: Processes, src: Path, dst: Path, plan: list[tuple[int, float]]) -> subprocess.Popen:
    """A separate process that writes ``src`` to ``dst`` chunk by chunk, as a slow copy does."""
    proc = procs.start([sys.executable, "-c", WRITER, str(src), str(dst), json.dumps(plan)], "writer")
    return proc


def writer_finished_at(proc: subprocess.Popen, timeout: float = 60) -> float:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the writer did not finish within {timeout} s")
    text = output(proc)
    assert proc.returncode == 0, text
    return float(re.search(r"^done (\S+)", text, re.M).group(1))


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, group: bool = False,
                 timeout: float = 30) -> int:
    (os.killpg if group else os.kill)(proc.pid, sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"watch did not exit within {timeout} s of {signal.Signals(sig).name}"
                    f"{' to its process group' if group else ''}:\n{output(proc)[-3000:]}")


def prove_looked_proc(proc: subprocess.Popen, out: Path, folder: Path, pngs: list[Path],
                      timeout: float = 60) -> list[Path]:
    """For a `heartbatch watch` subprocess: two sentinel files, the second written once the first
    has its row.  The second can only be measured in a later round than the first, so once its row
    is there, the round that measured the first is over, and with it everything that happened in
    the watched folders before the first was written.  Returns both (they have rows)."""
    def has_row(path: Path) -> bool:
        try:
            lines = out.read_text(encoding="utf-8").splitlines(keepends=True)
        except FileNotFoundError:
            return False
        return any(line.startswith(f"{path},") and line.endswith("\n") for line in lines)

    sentinels = []
    for i in range(2):
        sentinels += tiny_dicoms(folder, pngs, 1, start=90000 + i, prefix="sentinel")
        wait_until(lambda: has_row(sentinels[-1]), timeout=timeout, message=f"the row of {sentinels[-1].name}",
                   proc=proc)
    return sentinels


def watch_cmd(dirs, out: Path, model: Path, *extra) -> list[str]:
    return hb("watch", *dirs, "--out", out, "--model", model, "--threads", "1", *extra)


def tiny_dicoms(folder: Path, pngs: list[Path], count: int, start: int = 0, prefix: str = "tiny") -> list[Path]:
    """Small real DICOMs (64 x 64, 8-bit, uncompressed) for bursts."""
    return [write_dicom(folder / f"{prefix}_{i:05d}.dcm", thumbnail(pngs[i % len(pngs)], 64),
                        patient_id=f"T{i:05d}") for i in range(start, start + count)]


# --- catch-up, new files, folders, changes ------------------------------------------

def test_catch_up_then_new_files_and_folders_each_once(tmp_path, chest_pngs, intensity_model, start_watcher):
    watched = tmp_path / "incoming"
    present = write_chests(watched, chest_pngs, 3)
    (watched / "README.txt").write_text("not a DICOM file\n")
    out = tmp_path / "report.csv"
    w = start_watcher([watched], out, intensity_model, settle=0.3, grace=2.0)
    w.wait_rows(4)  # catch-up: files already there at start
    assert {r["path"] for r in check_report(out)} == {str(p) for p in present} | {str(watched / "README.txt")}

    new = write_chests(watched, chest_pngs, 2, start=10, prefix="new")          # written in place
    staging = tmp_path / "staging" / "batch1"
    moved = write_chests(staging, chest_pngs, 2, start=20, prefix="series")     # a folder moved in
    os.rename(staging, watched / "batch1")
    moved = [watched / "batch1" / p.name for p in moved]
    nested = write_chests(watched / "deep" / "er", chest_pngs, 1, start=30)     # new nested folders
    expected = {str(p) for p in present + new + moved + nested} | {str(watched / "README.txt")}
    w.wait_rows(len(expected))
    rows = check_report(out, expected)
    assert sum(r["status"] == "ok" for r in rows) == len(expected) - 1
    # summaries follow the report while watching
    w.wait(lambda: summary_total(out) == len(expected), "summaries refreshed", timeout=15)
    # the watcher's own reads (open/close events) do not bring a file back: they came before the
    # sentinel's events, so once the sentinel's round is over they have been dealt with
    expected.add(str(w.prove_looked(watched, chest_pngs)))
    check_report(out, expected)
    assert len(w.records()) == len(expected)
    w.stop()
    check_report(out, expected)
    check_flushed(out)


def test_watch_keeps_the_masks_of_a_model_with_masks(tmp_path, chest_pngs, start_watcher):
    """Files caught up and files arriving: each ok row's masks reach the ledger packed, as in `run`
    (the outlines of the HTML report and the review page come from there)."""
    import onnx_models as om
    from heartbatch.masks import decode_masks

    masks = om.ellipse_masks(56)
    watched = tmp_path / "incoming"
    write_chests(watched, chest_pngs, 1)
    out = tmp_path / "report.csv"
    w = start_watcher([watched], out, om.masks_model(tmp_path / "m.onnx", masks), settle=0.3, grace=2.0)
    w.wait_rows(1)
    write_chests(watched, chest_pngs, 1, start=5, prefix="new")
    w.wait_rows(2)
    w.stop()
    db = sqlite3.connect(ReportFiles.of(out).state_dir / "ledger.sqlite")
    try:
        kept = dict(db.execute("SELECT path, masks FROM files"))
    finally:
        db.close()
    assert len(kept) == 2 and all(np.abs(decode_masks(m) - masks).max() <= 1 / 255 for m in kept.values())
    assert all(r.masks is None and r.packed_masks for _, r in w.records()), "records carry the packed masks only"


def test_changed_file_while_watching_has_its_row_replaced_not_duplicated(tmp_path, chest_pngs, intensity_model,
                                                                         start_watcher):
    watched = tmp_path / "incoming"
    files = write_chests(watched, chest_pngs, 2)
    out = tmp_path / "report.csv"
    w = start_watcher([watched], out, intensity_model, settle=0.3)
    w.wait_rows(2)
    old = rows_by_path(out)[str(files[0])]

    write_dicom(files[0], 255 - thumbnail(chest_pngs[0]))  # same name, new image
    new_uid = sop_uid(files[0])
    w.wait(lambda: any(r.path == str(files[0]) for _, r in w.records()[2:]), "the changed file measured again")
    rows = check_report(out, {str(p) for p in files})  # while watching: still one row per file
    row = next(r for r in rows if r["path"] == str(files[0]))
    assert row["sop_instance_uid"] == new_uid != old["sop_instance_uid"]
    assert abs(float(row["ctr"]) - float(old["ctr"])) > 0.01
    w.wait(lambda: summary_total(out) != -1, "summaries")
    assert summary_total(out) == 2
    w.stop()
    check_report(out, {str(p) for p in files})
    check_flushed(out)


def test_run_then_watch_share_the_ledger(tmp_path, chest_pngs, intensity_model, start_watcher, capsys):
    watched = tmp_path / "incoming"
    write_chests(watched, chest_pngs, 4)
    out = tmp_path / "report.csv"
    assert cli.main(["run", str(watched), "--out", str(out), "--model", str(intensity_model), "--workers", "0",
                     "--quiet"]) == 0
    before = out.read_bytes()
    w = start_watcher([watched], out, intensity_model, settle=0.2)
    w.wait_caught_up()  # catch-up has looked at the four files
    assert w.records() == [], "watch measured files that `run` had already measured"
    assert out.read_bytes() == before
    added = write_chests(watched, chest_pngs, 1, start=50, prefix="later")[0]
    w.wait_rows(5)
    w.stop()
    after = out.read_bytes()
    assert after.startswith(before)
    assert after[len(before):].decode().startswith(str(added) + ",ok,")
    check_flushed(out)


# --- complete files only -------------------------------------------------------------

@pytest.fixture(scope="module")
def big_chest(tmp_path_factory, data_dir) -> Path:
    """A 512 x 512 uncompressed chest (~260 kB)."""
    from dicom_factory import shared_png

    return write_dicom(tmp_path_factory.mktemp("src") / "chest512.dcm", shared_png(data_dir, 5))


def test_slow_chunked_write_is_processed_once_after_its_last_byte(tmp_path, big_chest, chest_pngs, intensity_model,
                                                                  start_watcher, procs):
    """Twelve chunks over ~3 s, pauses shorter than the settle time (the default 1 s)."""
    watched = tmp_path / "incoming"
    watched.mkdir()
    out = tmp_path / "report.csv"
    w = start_watcher([watched], out, intensity_model, settle=1.0)
    size = big_chest.stat().st_size
    plan = [(size * (i + 1) // 12, 0.25) for i in range(12)]
    plan[-1] = (size, 0.0)
    target = watched / "slow.dcm"
    writer = start_writer(procs, big_chest, target, plan)
    done = writer_finished_at(writer)
    w.wait_records(1)
    records = w.records(target)
    assert [r.status for _, r in records] == ["ok"], [(r.status, r.reason) for _, r in records]
    assert records[0][0] >= done, "the file was measured before its last byte was written"
    sentinel = w.prove_looked(watched, chest_pngs)  # the writer's last events came before the sentinel's
    assert [r.path for _, r in w.records()] == [str(target), str(sentinel)], "the file was measured again"
    w.stop()
    check_report(out, {str(target), str(sentinel)})


@pytest.mark.parametrize("source, where", [
    ("uncompressed", "pixel data"),
    ("jpeg", "pixel data"),
    ("uncompressed", "header"),
], ids=["uncompressed-mid-pixels", "jpeg-mid-pixels", "uncompressed-in-header"])
def test_copy_stalled_longer_than_settle_is_never_reported_incomplete(tmp_path, big_chest, siim_dicom, chest_pngs,
                                                                      intensity_model, start_watcher, procs,
                                                                      source, where):
    """A copy that stops for longer than the settle time looks complete but is not:
    it must not get an error (or any other non-ok) row; it gets its ok row once complete."""
    src = big_chest if source == "uncompressed" else siim_dicom
    data = src.read_bytes()
    pixel_tag = data.find(b"\xe0\x7f\x10\x00")
    assert pixel_tag > 500
    cut = pixel_tag - 300 if where == "header" else len(data) // 2
    watched = tmp_path / "incoming"
    watched.mkdir()
    out = tmp_path / "report.csv"
    w = start_watcher([watched], out, intensity_model, settle=0.5)
    target = watched / "stalled.dcm"
    writer = start_writer(procs, src, target, [(cut, 2.5), (len(data), 0.0)])
    done = writer_finished_at(writer)
    w.wait_records(1)
    sentinel = w.prove_looked(watched, chest_pngs)
    records = w.records(target)
    assert [(r.status, r.reason) for _, r in records] == [("ok", "")], \
        f"an incomplete copy (cut at byte {cut} of {len(data)}) was reported"
    assert records[0][0] >= done
    w.stop()
    rows = rows_by_path(out)
    assert set(rows) == {str(target), str(sentinel)}
    assert rows[str(target)]["status"] == "ok"


def test_copy_in_progress_when_watch_starts_is_caught_up_once_complete(tmp_path, big_chest, intensity_model,
                                                                        start_watcher, procs):
    watched = tmp_path / "incoming"
    watched.mkdir()
    size = big_chest.stat().st_size
    target = watched / "copying.dcm"
    writer = start_writer(procs, big_chest, target, [(size // 3, 1.5), (2 * size // 3, 1.5), (size, 0.0)])
    wait_until(lambda: target.exists() and target.stat().st_size > 0, timeout=30, message="the copy to start",
               proc=writer)
    out = tmp_path / "report.csv"
    w = start_watcher([watched], out, intensity_model, settle=0.5)
    done = writer_finished_at(writer)
    w.wait_records(1)
    records = w.records(target)
    assert [(r.status, r.reason) for _, r in records] == [("ok", "")]
    assert records[0][0] >= done
    w.wait_caught_up()  # the copy present at start is what the catch-up was waiting for
    assert w.caught_up_at >= records[0][0], "caught up before the file present at start was measured"
    w.stop()
    check_report(out, {str(target)})


def test_files_renamed_into_the_folder_are_processed_and_temporary_names_never(tmp_path, chest_pngs,
                                                                               intensity_model, start_watcher):
    watched = tmp_path / "incoming"
    watched.mkdir()
    outside = tmp_path / "outside"
    out = tmp_path / "report.csv"
    w = start_watcher([watched], out, intensity_model, settle=0.3)
    part = write_dicom(watched / "a.dcm.part", thumbnail(chest_pngs[0]))       # copy tools' temp names
    hidden = write_dicom(watched / ".b.dcm", thumbnail(chest_pngs[1]))
    elsewhere = write_dicom(outside / "c.dcm", thumbnail(chest_pngs[2]))      # same file system, outside
    first = w.prove_looked(watched, chest_pngs, "sentinel1")  # the temporary names came first
    assert [r.path for _, r in w.records()] == [str(first)], "a temporary name was measured"
    os.rename(part, watched / "a.dcm")
    os.rename(hidden, watched / "b.dcm")
    os.rename(elsewhere, watched / "c.dcm")
    expected = {str(watched / n) for n in ("a.dcm", "b.dcm", "c.dcm")} | {str(first)}
    w.wait_rows(4)
    expected.add(str(w.prove_looked(watched, chest_pngs, "sentinel2")))  # nothing measured twice
    rows = check_report(out, expected)
    assert {r["status"] for r in rows} == {"ok"}
    assert len(w.records()) == 5
    w.stop()
    check_flushed(out)


# --- signal handlers ----------------------------------------------------------------------

def test_watch_restores_the_signal_handlers_it_replaced(tmp_path, chest_pngs, intensity_model):
    """Watcher.run() in the main thread (where handlers can be set): while it watches, SIGINT and
    SIGTERM ask it to stop; when it returns, normally or by an exception, the previous handlers
    are back (a program or test that watches, then does anything else, keeps its Ctrl-C)."""
    watched = tmp_path / "incoming"
    write_chests(watched, chest_pngs, 1)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def watcher(out: Path, on_caught_up) -> Watcher:
        return Watcher([watched], out, BoxModel(intensity_model, threads=1), RunOptions(workers=0, threads=1),
                       WatchOptions(settle=0.2), on_caught_up=on_caught_up)

    during = {}

    def stop_by_sigterm(present: int) -> None:  # in the watch loop, after the catch-up row
        during.update({sig: signal.getsignal(sig) for sig in before})
        during[signal.SIGTERM](signal.SIGTERM, None)  # what a SIGTERM runs, without sending one

    first = watcher(tmp_path / "a" / "report.csv", stop_by_sigterm)
    assert first.run() == 0
    assert first.processed == 1 and first.stop_requested.is_set()
    assert all(during[sig] is not before[sig] for sig in before), "watch did not install its handlers"
    assert {sig: signal.getsignal(sig) for sig in before} == before

    def fail(present: int) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        watcher(tmp_path / "b" / "report.csv", fail).run()
    assert {sig: signal.getsignal(sig) for sig in before} == before


# --- bursts, signals, restarts (subprocesses) ------------------------------------------

@pytest.mark.slow
def test_burst_of_1000_files_each_processed_once_in_batches(tmp_path, chest_pngs, box8_model, procs):
    watched = tmp_path / "incoming"
    seed = tiny_dicoms(watched, chest_pngs, 1, prefix="seed")
    staging = tmp_path / "staging"
    burst = tiny_dicoms(staging, chest_pngs, 1000)
    out = tmp_path / "report.csv"
    watcher = procs.start(watch_cmd([watched], out, box8_model, "--workers", "2", "--batch-size", "16",
                                    "--settle", "0.5"), "watch")
    wait_until(lambda: count_complete_rows(out) >= 1, timeout=60, message="the catch-up row (watcher ready)",
               proc=watcher)

    copier = procs.start([sys.executable, "-c",
                          "import shutil, sys, os\n"
                          "for name in sorted(os.listdir(sys.argv[1])):\n"
                          "    shutil.copyfile(os.path.join(sys.argv[1], name), os.path.join(sys.argv[2], name))\n",
                          str(staging), str(watched)], "copier")
    expected = {str(p) for p in seed} | {str(watched / p.name) for p in burst}
    wait_until(lambda: count_complete_rows(out) >= len(expected), timeout=240, message=f"{len(expected)} rows",
               proc=watcher)
    assert copier.wait(timeout=60) == 0, output(copier)
    wait_until(lambda: summary_total(out) == len(expected), timeout=30,
               message="summaries refreshed after the last batch", proc=watcher)
    expected |= {str(p) for p in prove_looked_proc(watcher, out, watched, chest_pngs)}  # nothing comes back
    rows = check_report(out, expected)
    assert {r["status"] for r in rows} == {"ok"}
    assert stop_process(watcher) == 0
    check_report(out, expected)
    check_flushed(out)

    batches = [int(n) for n in re.findall(r"wrote (\d+) rows", output(watcher))]
    assert sum(batches) == len(expected)
    assert len(batches) <= len(expected) // 4, f"{len(batches)} writes for {len(expected)} files: not batched"
    assert max(batches) >= 8, batches
    assert f"stopped; {len(expected)} rows written" in output(watcher).replace("\n", " ")


SIGNALS = [
    pytest.param(signal.SIGTERM, False, id="SIGTERM-to-watch"),
    pytest.param(signal.SIGINT, False, id="SIGINT-to-watch"),
    pytest.param(signal.SIGINT, True, id="Ctrl-C-to-process-group"),
    pytest.param(signal.SIGTERM, True, id="SIGTERM-to-process-group"),  # systemd's default KillMode
]


@pytest.fixture(scope="module")
def jpeg_chests(tmp_path_factory, chest_pngs) -> Path:
    """400 JPEG-compressed 512 x 512 chests: decoding keeps the worker processes busy."""
    from PIL import Image
    from pydicom.uid import JPEGBaseline8Bit

    folder = tmp_path_factory.mktemp("jpeg_chests")
    for i in range(400):
        with Image.open(chest_pngs[i % len(chest_pngs)]) as im:
            pixels = np.asarray(im.convert("L"), dtype=np.uint8)
        write_dicom(folder / f"chest_{i:04d}.dcm", pixels, transfer_syntax=JPEGBaseline8Bit, patient_id=f"J{i:04d}")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("sig, group", SIGNALS)
def test_signal_during_a_batch_stops_cleanly_and_a_restart_continues(tmp_path, jpeg_chests, chest_pngs, box8_model,
                                                                     procs, sig, group):
    """The signal arrives while a batch is in flight (decode workers busy): the batch is
    finished and flushed, exit 0; the next start measures exactly the files left."""
    watched = tmp_path / "incoming"
    shutil.copytree(jpeg_chests, watched)
    files = sorted(watched.iterdir())
    expected = {str(p) for p in files}
    out = tmp_path / "report.csv"
    command = watch_cmd([watched], out, box8_model, "--workers", "2", "--batch-size", "8", "--settle", "0.3")

    first = procs.start(command, "watch1")
    wait_until(lambda: count_complete_rows(out) >= 8, timeout=60, message="the first batch", proc=first)
    assert stop_process(first, sig, group) == 0, output(first)[-3000:]
    rows = check_report(out)  # complete rows, none twice
    assert {r["path"] for r in rows} <= expected
    assert 0 < len(rows) < len(expected), "the signal came after all the work: nothing to interrupt"
    check_flushed(out)
    assert "stopped;" in output(first)
    first_session = out.read_bytes()

    second = procs.start(command, "watch2")
    wait_until(lambda: count_complete_rows(out) >= len(expected), timeout=120,
               message=f"{len(expected)} rows after the restart", proc=second)
    expected |= {str(p) for p in prove_looked_proc(second, out, watched, chest_pngs)}  # nothing measured twice
    assert stop_process(second) == 0, output(second)[-3000:]
    check_report(out, expected)
    check_flushed(out)
    assert out.read_bytes().startswith(first_session), "the restart re-did or rewrote rows of the first session"
    written = [int(n) for n in re.findall(r"wrote (\d+) rows", output(second))]
    assert sum(written) == len(expected) - len(rows)


@pytest.mark.slow
def test_polling_observer_sees_new_and_renamed_files(tmp_path, chest_pngs, intensity_model, procs):
    watched = tmp_path / "share"
    seed = write_chests(watched, chest_pngs, 1, prefix="seed")
    out = tmp_path / "report.csv"
    proc = procs.start(watch_cmd([watched], out, intensity_model, "--workers", "0", "--polling", "--settle", "0.3",
                                 "--quiet"), "watch")
    wait_until(lambda: count_complete_rows(out) >= 1, timeout=60, message="the catch-up row", proc=proc)
    written = write_chests(watched, chest_pngs, 1, start=5, prefix="new")
    renamed = write_dicom(tmp_path / "elsewhere" / "moved.dcm", thumbnail(chest_pngs[6]))
    os.rename(renamed, watched / "moved.dcm")
    expected = {str(p) for p in seed + written} | {str(watched / "moved.dcm")}
    wait_until(lambda: count_complete_rows(out) >= 3, timeout=30, message="rows for the polled files", proc=proc)
    expected |= {str(p) for p in prove_looked_proc(proc, out, watched, chest_pngs)}  # nothing measured twice
    assert stop_process(proc) == 0
    check_report(out, expected)
    check_flushed(out)
