"""Resumable `heartbatch run`: the ledger, re-runs, changed and new files, the
report lock, and `kill -9` at random moments followed by restarts.

The crash test runs the real command in real subprocesses (with decode worker
processes) and kills it with SIGKILL; every wait is bounded and every process
group started here is killed in teardown.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from dicom_factory import truncate, write_dicom
from heartbatch import cli
from heartbatch.report.ledger import Ledger
from heartbatch.report.paths import ReportFiles
from helpers import (body_lines, check_report, check_summary_agrees, count_complete_rows, hb, output, quiet_json,
                     session_members, thumbnail, wait_until, write_chests)

#: Override to replay another sequence of kill moments: HEARTBATCH_CRASH_SEED=123 pytest ...
CRASH_SEED = int(os.environ.get("HEARTBATCH_CRASH_SEED", "20240115"))
MIN_KILLS = 5
#: Of those, kills that landed while rows were being written: after this round's process was seen
#: adding a row, and before it exited by itself.
MIN_ROW_KILLS = 2


# --- helpers (the shared ones are in helpers.py; `procs` is a fixture of conftest.py) -------

def run_inprocess(capsys, inputs, out: Path, model: Path, *extra) -> tuple[int, dict]:
    """`heartbatch run --quiet` in this process, no worker processes."""
    capsys.readouterr()
    code = cli.main(["run", *[str(p) for p in (inputs if isinstance(inputs, list) else [inputs])],
                     "--out", str(out), "--model", str(model), "--workers", "0", "--threads", "1",
                     "--quiet", *[str(e) for e in extra]])
    captured = capsys.readouterr()
    return code, (quiet_json(captured.out) if code in (0, 4) else {"stderr": captured.err})


def ledger_count(report: Path) -> int:
    """Rows in the report's ledger (call only while no process writes it)."""
    db_path = ReportFiles.of(report).state_dir / "ledger.sqlite"
    if not db_path.is_file():
        return 0
    db = sqlite3.connect(db_path)
    try:
        return db.execute("SELECT count(*) FROM files").fetchone()[0]
    finally:
        db.close()


def pause_unless_exited(proc: subprocess.Popen, until: float) -> None:
    """Let ``proc`` run until the moment ``until`` (time.monotonic()) or its exit, whichever comes
    first: a chosen moment to act at, not a wait for an event (nothing is asserted after it)."""
    try:
        proc.wait(timeout=max(until - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        pass


# --- re-runs -------------------------------------------------------------------

@pytest.fixture
def chest_dir(tmp_path, chest_pngs) -> Path:
    """Ten frontal chests, a lateral, a text file and a truncated DICOM: all three statuses."""
    folder = tmp_path / "studies"
    write_chests(folder, chest_pngs, 10)
    write_dicom(folder / "lateral.dcm", thumbnail(chest_pngs[12]), view_position="LL")
    (folder / "notes.txt").write_text("not a DICOM file\n")
    truncate(write_dicom(folder / "cut.dcm", thumbnail(chest_pngs[13])), 0.6)
    return folder


def test_second_run_processes_nothing_and_leaves_the_report_byte_identical(chest_dir, intensity_model,
                                                                            tmp_path, capsys):
    out = tmp_path / "out" / "report.csv"
    code, first = run_inprocess(capsys, chest_dir, out, intensity_model)
    assert code == 0
    assert (first["processed"], first["unchanged"]) == (13, 0)
    assert (first["ok"], first["skipped"], first["error"]) == (10, 2, 1)
    report_bytes = out.read_bytes()
    summary_json = ReportFiles.of(out).summary_json.read_text()

    code, second = run_inprocess(capsys, chest_dir, out, intensity_model)
    assert code == 0
    assert (second["files"], second["processed"], second["unchanged"]) == (13, 0, 13)
    assert (second["ok"], second["skipped"], second["error"]) == (0, 0, 0)
    assert out.read_bytes() == report_bytes
    assert json.loads(ReportFiles.of(out).summary_json.read_text()) == json.loads(summary_json)
    check_summary_agrees(out)


def test_same_folder_given_another_way_is_the_same_files(chest_dir, intensity_model, tmp_path, capsys,
                                                         monkeypatch):
    """The ledger knows files by absolute path: `run studies` then `run ./studies/` re-does nothing."""
    out = tmp_path / "report.csv"
    assert run_inprocess(capsys, chest_dir, out, intensity_model)[0] == 0
    monkeypatch.chdir(chest_dir.parent)
    code, again = run_inprocess(capsys, Path(".") / chest_dir.name, out, intensity_model)
    assert code == 0
    assert (again["processed"], again["unchanged"]) == (0, 13)


def test_force_measures_every_file_again_without_duplicating_rows(chest_dir, intensity_model, tmp_path,
                                                                  capsys):
    out = tmp_path / "report.csv"
    assert run_inprocess(capsys, chest_dir, out, intensity_model)[0] == 0
    before = body_lines(out)
    code, forced = run_inprocess(capsys, chest_dir, out, intensity_model, "--force")
    assert code == 0
    assert (forced["processed"], forced["unchanged"]) == (13, 0)
    after = body_lines(out)
    assert len(after) == 13
    assert sorted(after) == sorted(before)
    check_summary_agrees(out)


def test_changed_file_is_measured_again_and_its_row_replaced(chest_dir, intensity_model, tmp_path, capsys,
                                                             chest_pngs):
    out = tmp_path / "report.csv"
    assert run_inprocess(capsys, chest_dir, out, intensity_model)[0] == 0
    target = chest_dir / "cxr_0003.dcm"
    old_rows = {r["path"]: r for r in check_report(out)}
    old_lines = body_lines(out)
    old_stat = target.stat()

    # the same file name, new content: an inverted chest has a very different mean, so a
    # different CTR with the intensity model, and a new SOP Instance UID
    write_dicom(target, 255 - thumbnail(chest_pngs[3]))
    new_stat = target.stat()
    if (new_stat.st_size, new_stat.st_mtime_ns) == (old_stat.st_size, old_stat.st_mtime_ns):
        os.utime(target, ns=(new_stat.st_atime_ns, old_stat.st_mtime_ns + 1_000_000_000))
    new_uid = pydicom.dcmread(target, stop_before_pixels=True).SOPInstanceUID

    code, result = run_inprocess(capsys, chest_dir, out, intensity_model)
    assert code == 0
    assert (result["processed"], result["unchanged"]) == (1, 12)
    rows = check_report(out, set(old_rows))  # exactly one row per file, the changed one included
    new_row = next(r for r in rows if r["path"] == str(target))
    assert new_row["status"] == "ok"
    assert new_row["sop_instance_uid"] == new_uid != old_rows[str(target)]["sop_instance_uid"]
    assert abs(float(new_row["ctr"]) - float(old_rows[str(target)]["ctr"])) > 0.01
    # the other rows are untouched, byte for byte
    assert sorted(line for line in body_lines(out) if not line.startswith(str(target) + ",")) == \
        sorted(line for line in old_lines if not line.startswith(str(target) + ","))
    check_summary_agrees(out)

    # and once more: nothing to do, report unchanged
    report_bytes = out.read_bytes()
    code, again = run_inprocess(capsys, chest_dir, out, intensity_model)
    assert (code, again["processed"], again["unchanged"]) == (0, 0, 13)
    assert out.read_bytes() == report_bytes


def test_new_file_is_appended(chest_dir, intensity_model, tmp_path, capsys, chest_pngs):
    out = tmp_path / "report.csv"
    assert run_inprocess(capsys, chest_dir, out, intensity_model)[0] == 0
    before = out.read_bytes()
    added = write_chests(chest_dir / "later", chest_pngs, 1, start=40, prefix="new")[0]
    code, result = run_inprocess(capsys, chest_dir, out, intensity_model)
    assert code == 0
    assert (result["processed"], result["unchanged"]) == (1, 13)
    after = out.read_bytes()
    assert after.startswith(before), "existing rows were rewritten instead of the new row appended"
    (new_line,) = after[len(before):].decode().splitlines()
    assert new_line.startswith(str(added) + ",ok,")
    check_summary_agrees(out)


def test_another_model_measures_again_into_the_same_rows(chest_dir, intensity_model, box8_model, tmp_path,
                                                         capsys):
    """The ledger key includes the model: a new model re-measures, rows are replaced."""
    out = tmp_path / "report.csv"
    assert run_inprocess(capsys, chest_dir, out, intensity_model)[0] == 0
    code, result = run_inprocess(capsys, chest_dir, out, box8_model)
    assert code == 0
    assert (result["processed"], result["unchanged"]) == (13, 0)
    rows = check_report(out)
    assert len(rows) == 13
    assert {r["ctr"] for r in rows if r["status"] == "ok"} == {"0.5000"}
    check_summary_agrees(out)


def test_repeated_runs_in_one_process_keep_one_debug_log_handler(chest_dir, intensity_model, tmp_path, capsys):
    """main() runs many times in one process (tests, notebooks): --debug's log handler is added
    once per call and removed (and closed) on return, so no run writes into another's debug log."""
    import logging

    logger = logging.getLogger("heartbatch")
    handlers, level = list(logger.handlers), logger.level
    reports = [tmp_path / f"run{i}" / "report.csv" for i in range(3)]
    for report in reports:
        assert cli.main(["run", str(chest_dir), "--out", str(report), "--model", str(intensity_model),
                         "--workers", "0", "--threads", "1", "--quiet", "--debug"]) == 0
        assert logger.handlers == handlers and logger.level == level
    capsys.readouterr()
    mentions = [ReportFiles.of(r).debug_log.read_text().count("cut.dcm") for r in reports]
    assert mentions[0] > 0 and mentions == [mentions[0]] * 3, mentions


# --- one writer per report -------------------------------------------------------

def test_second_writer_fails_fast_while_the_report_is_locked(chest_dir, intensity_model, tmp_path, procs):
    out = tmp_path / "report.csv"
    holder = Ledger(ReportFiles.of(out).state_dir)  # what a running `heartbatch run` holds
    try:
        # the holder keeps the lock until the refused run has exited: a run that waited for the lock
        # would never exit, and procs.run fails the test at its (generous) timeout
        # (how fast the refusal is: benchmarks/response_times.py)
        code, text = procs.run(hb("run", chest_dir, "--out", out, "--model", intensity_model, "--workers", "0",
                                  "--quiet"), "locked", timeout=60)
        assert code == 2, text
        assert "lock" in text.lower() and "another heartbatch process" in text.lower(), text
        assert not out.exists() or count_complete_rows(out) == 0
    finally:
        holder.close()
    code, text = procs.run(hb("run", chest_dir, "--out", out, "--model", intensity_model, "--workers", "0",
                              "--quiet"), "unlocked", timeout=120)
    assert code == 0, text
    assert quiet_json(text)["processed"] == 13


def test_run_is_refused_while_watch_writes_the_same_report(chest_dir, intensity_model, tmp_path, procs):
    """Two real processes: `watch` holds the report, a concurrent `run` exits 2 at once."""
    out = tmp_path / "report.csv"
    watcher = procs.start(hb("watch", chest_dir, "--out", out, "--model", intensity_model, "--workers", "0",
                             "--threads", "1", "--settle", "0.2", "--incomplete-grace", "0.5", "--quiet"), "watch")
    # catch-up done: the lock is certainly held
    wait_until(lambda: count_complete_rows(out) >= 13, timeout=90, message="watch's 13 catch-up rows", proc=watcher)
    report_bytes = out.read_bytes()
    code, text = procs.run(hb("run", chest_dir, "--out", out, "--model", intensity_model, "--workers", "0",
                              "--quiet", "--force"), "run", timeout=60)  # the watcher holds the lock throughout
    assert code == 2, text
    assert "lock" in text.lower(), text
    assert out.read_bytes() == report_bytes, "the refused run touched the report"
    assert watcher.poll() is None, "the refused run stopped the watcher"
    watcher.send_signal(signal.SIGTERM)
    try:
        assert watcher.wait(timeout=30) == 0, output(watcher)
    except subprocess.TimeoutExpired:
        pytest.fail(f"watch did not stop within 30 s of SIGTERM:\n{output(watcher)}")


# --- kill -9 at random moments ------------------------------------------------------

@pytest.mark.slow
def test_kill_9_leaves_no_decode_workers_behind(tmp_path, chest_pngs, box8_model, procs):
    """The OOM killer or `kill -9` takes the main process only: its decode workers (and the
    forkserver that started them) must not live on, orphaned, after it."""
    folder = tmp_path / "studies"
    write_chests(folder, chest_pngs, 150)
    out = tmp_path / "report.csv"
    proc = procs.start(hb("run", folder, "--out", out, "--model", box8_model, "--workers", "2", "--threads", "1",
                          "--batch-size", "4", "--quiet"), "run")
    # (proc=: the run ending before it could be killed fails the test)
    wait_until(lambda: count_complete_rows(out) >= 8, timeout=120, interval=0.01, message="8 rows", proc=proc)
    assert len(session_members(proc.pid)) >= 3, "expected the run, a forkserver and decode workers"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)

    def left() -> list[str]:
        commands = []
        for pid in session_members(proc.pid):
            try:
                commands.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                                .decode(errors="replace")[:120])
            except OSError:  # it has just gone
                pass
        return commands

    wait_until(lambda: not left(), timeout=15, interval=0.2,
               message=lambda: f"the run's processes to end after its kill -9; still running: {left()}")


@pytest.mark.slow
def test_kill_9_at_random_moments_then_restart_gives_exactly_the_uninterrupted_report(
        tmp_path, chest_pngs, intensity_model, procs):
    """>= 200 real DICOMs; the real command, with decode worker processes, is killed with
    SIGKILL at random moments at least five times, each followed by the same command again.
    The final report equals the uninterrupted run's, row for row."""
    rng = random.Random(CRASH_SEED)
    folder = tmp_path / "studies"
    files = write_chests(folder, chest_pngs, 236)
    files.append(write_dicom(folder / "lateral.dcm", thumbnail(chest_pngs[14]), view_position="LL"))
    files.append(truncate(write_dicom(folder / "cut.dcm", thumbnail(chest_pngs[15])), 0.6))
    (folder / "README.txt").write_text("exported by hand\n")
    files.append(folder / "README.txt")
    expected = {str(p) for p in files}

    def command(out: Path) -> list[str]:
        return hb("run", folder, "--out", out, "--model", intensity_model, "--workers", "2", "--threads", "1",
                  "--batch-size", "4", "--quiet")

    # the reference: uninterrupted
    ref = tmp_path / "ref" / "report.csv"
    started = time.monotonic()
    code, text = procs.run(command(ref), "reference", timeout=300)
    run_time = time.monotonic() - started
    assert code == 0, text
    assert quiet_json(text)["processed"] == len(expected)
    ref_lines = body_lines(ref)
    check_report(ref, expected)
    ref_summary = check_summary_agrees(ref)
    started = time.monotonic()
    code, text = procs.run(command(ref), "reference-again", timeout=300)
    startup = time.monotonic() - started  # what a run costs with nothing to do
    assert code == 0 and quiet_json(text)["processed"] == 0, text
    work = max(run_time - startup, 0.5)

    out = tmp_path / "crash" / "report.csv"
    # (how, seconds after start, rows in the report after the kill); a "rows" kill counts only when
    # it landed mid-write: this round's process was seen adding a row and was still running when
    # SIGKILL reached it (it died of the signal). A round whose process finished first is no kill.
    kills: list[tuple[str, float, int]] = []
    rounds = 0

    def row_kills() -> int:
        return sum(how == "rows" for how, _, _ in kills)

    while len(kills) < MIN_KILLS or row_kills() < MIN_ROW_KILLS:
        rounds += 1
        assert rounds <= 4 * MIN_KILLS, f"could not place {MIN_KILLS} kills in {rounds} rounds: {kills}"
        # rows there before this round: the report's, or the ledger's when a kill came between a
        # ledger commit and the CSV append (the restart first rewrites the report from the ledger)
        rows_at_start = max(count_complete_rows(out), ledger_count(out))
        remaining = 1 - rows_at_start / len(expected)
        # alternate; once only mid-write kills are missing, every round is one
        mid_write = rounds % 2 == 0 or MIN_KILLS - len(kills) <= MIN_ROW_KILLS - row_kills()
        proc = procs.start(command(out), f"crash{rounds}")
        t0 = time.monotonic()
        if not mid_write:  # a random moment after start, up to about this run's typical length
            how = "delay"
            pause_unless_exited(proc, t0 + rng.uniform(0.2, startup + 0.8 * remaining * work))
        else:              # a random moment after this process was seen writing a row
            how = "rows"
            pause = rng.uniform(0.0, 0.1)
            wait_until(lambda: count_complete_rows(out) > rows_at_start or proc.poll() is not None, timeout=120,
                       interval=0.005, message=lambda: f"a new row from round {rounds}:\n{output(proc)}")
            pause_unless_exited(proc, time.monotonic() + pause)
        landed = False
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the command, as a user or the OOM killer does
            proc.wait(timeout=30)
            landed = proc.returncode == -signal.SIGKILL  # not: it exited by itself just before
        procs.kill_group(proc)  # its orphaned decode workers
        if landed:
            assert how == "delay" or count_complete_rows(out) > rows_at_start
            kills.append((how, round(time.monotonic() - t0, 3), count_complete_rows(out)))
            # whatever the kill left: complete lines are right and alone; at most the last is cut
            lines = body_lines(out) if out.exists() else []
            complete = [line for line in lines if line.endswith("\n")]
            assert all(line.endswith("\n") for line in lines[:-1]), "a cut line before the last one"
            assert set(complete) <= set(ref_lines), "a row differs from the uninterrupted run's"
            assert len(set(complete)) == len(complete), "a row is there twice"
        else:
            assert proc.returncode == 0, output(proc)
            if count_complete_rows(out) == len(expected):
                # finished before the kill: more files, so there is work left to interrupt
                files += write_chests(folder, chest_pngs, 40, start=1000 + rounds * 40, prefix="late")
                expected = {str(p) for p in files}
                code, text = procs.run(command(ref), f"reference-top-up{rounds}", timeout=300)
                assert code == 0, text
                ref_lines = body_lines(ref)
                ref_summary = check_summary_agrees(ref)

    print(f"seed {CRASH_SEED}: reference {run_time:.2f} s, no-op {startup:.2f} s; kills (how, s, rows) {kills}")
    assert row_kills() >= MIN_ROW_KILLS, kills  # holds by construction: the loop runs until it does
    code, text = procs.run(command(out), "final", timeout=300)
    assert code == 0, text
    final = quiet_json(text)
    assert final["files"] == len(expected)

    rows = check_report(out, expected)
    assert len(rows) == len(expected)
    assert sorted(body_lines(out)) == sorted(ref_lines), f"rows differ from the uninterrupted run (kills {kills})"
    summary = check_summary_agrees(out)
    assert summary["files"] == ref_summary["files"]
    assert summary["ctr"]["n"] == ref_summary["ctr"]["n"]
    assert summary["ctr"]["median"] == ref_summary["ctr"]["median"]
    assert summary["studies"]["n"] == ref_summary["studies"]["n"]
    # and the crashed-then-finished report is as resumable as any other
    before = out.read_bytes()
    code, text = procs.run(command(out), "after", timeout=300)
    assert code == 0 and quiet_json(text)["processed"] == 0, text
    assert out.read_bytes() == before
