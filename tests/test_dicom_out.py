"""`run --dicom-out` (issue 18): every ok row gets its TID 1500 SR and its presentation state (or
secondary capture), written by the worker, recorded in the ledger with the row: re-runs replace
rather than duplicate, a failed write is retried by the next run, and `kill -9` then a restart
leaves exactly one result set per ok row."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pydicom
import pytest

import highdicom as hd

from dicom_factory import write_dicom
from heartbatch import cli
from heartbatch import results as dr
from helpers import check_report, count_complete_rows, hb, output, quiet_json, thumbnail, wait_until, write_chests

SR, PR, SC = "sr", "pr", "sc"


def run(capsys, *args) -> tuple[int, dict, str]:
    """`heartbatch run --quiet` in this process: (exit code, its JSON line, stderr)."""
    capsys.readouterr()
    code = cli.main(["run", *map(str, args), "--workers", "0", "--threads", "1", "--quiet"])
    captured = capsys.readouterr()
    return code, quiet_json(captured.out), captured.err


def result_path(out_dir: Path, row: dict, kind: str) -> Path:
    return out_dir / f"{dr.result_uid(row['sop_instance_uid'], row['model_id'], kind)}.{kind}.dcm"


def sr_ctr(path: Path) -> tuple[float, str]:
    """(CTR, referenced SOP Instance UID) read back from an SR with highdicom."""
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    ctr = [m for g in groups for m in g.get_measurements() if "ardiothoracic" in m.name.meaning]
    assert len(ctr) == 1, [m.name for g in groups for m in g.get_measurements()]
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    return float(ctr[0].value), evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID


def check_results(out_dir: Path, rows: list[dict], second: str = PR) -> None:
    """Each ok row has exactly its SR (CTR and reference as in the CSV) and its second object;
    nothing else is in the folder."""
    expected = set()
    for row in rows:
        if row["status"] != "ok":
            continue
        sr_file, other = result_path(out_dir, row, SR), result_path(out_dir, row, second)
        assert sr_file.is_file() and other.is_file(), f"results missing for {row['path']}"
        expected |= {sr_file.name, other.name}
        ctr, referenced = sr_ctr(sr_file)
        assert referenced == row["sop_instance_uid"]
        assert ctr == pytest.approx(float(row["ctr"]), abs=1e-4)
        ds = pydicom.dcmread(other)
        assert ds.StudyInstanceUID == pydicom.dcmread(row["path"], stop_before_pixels=True).StudyInstanceUID
        if second == PR:
            assert ds.ReferencedSeriesSequence[0].ReferencedImageSequence[0].ReferencedSOPInstanceUID == \
                row["sop_instance_uid"]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(expected)


def test_run_writes_one_result_set_per_ok_row_and_reruns_replace_it(tmp_path, capsys, siim_dicom, chest_pngs):
    folder = tmp_path / "studies"
    write_chests(folder, chest_pngs, 3)
    (folder / "siim.dcm").write_bytes(siim_dicom.read_bytes())
    write_dicom(folder / "lateral.dcm", thumbnail(chest_pngs[4]), view_position="LL")
    (folder / "notes.txt").write_text("not a DICOM\n")
    results, out = tmp_path / "results", tmp_path / "report.csv"

    code, info, _ = run(capsys, folder, "--out", out, "--dicom-out", results)
    assert code == 0
    rows = check_report(out)
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) >= 4 and len(rows) == 6, [(r["path"], r["status"], r["reason"]) for r in rows]
    assert (info["dicom_results"], info["dicom_failed"]) == (2 * len(ok), 0)
    check_results(results, rows)
    written = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}

    # nothing new: nothing measured or written again
    code, info, _ = run(capsys, folder, "--out", out, "--dicom-out", results)
    assert (code, info["processed"], info["dicom_results"]) == (0, 0, 0)
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == written
    # without --dicom-out the rows are current too: results are an addition, not a setting of the row
    code, info, _ = run(capsys, folder, "--out", out)
    assert (code, info["processed"]) == (0, 0)

    # secondary captures instead: every ok file measured again, its presentation state replaced
    code, info, _ = run(capsys, folder, "--out", out, "--dicom-out", results, "--dicom-out-capture")
    assert (code, info["processed"], info["dicom_results"]) == (0, len(rows), 2 * len(ok))
    rows = check_report(out)
    check_results(results, rows, second=SC)
    capture = pydicom.dcmread(result_path(results, ok[0], SC))
    assert capture.BurnedInAnnotation == "YES"

    # a changed file: its row and its results replaced, never a second set
    changed = Path(ok[0]["path"])
    os.utime(changed, ns=(time.time_ns(), time.time_ns()))
    code, info, _ = run(capsys, folder, "--out", out, "--dicom-out", results, "--dicom-out-capture")
    assert (code, info["processed"], info["dicom_results"]) == (0, 1, 2)
    check_results(results, check_report(out), second=SC)


def test_results_inside_the_scanned_folder_are_not_read_as_input(tmp_path, capsys, siim_dicom):
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "siim.dcm").write_bytes(siim_dicom.read_bytes())
    results, out = folder / "results", tmp_path / "report.csv"
    for processed, written in ((1, 2), (0, 0)):
        code, info, _ = run(capsys, folder, "--out", out, "--dicom-out", results)
        assert (code, info["processed"], info["dicom_results"]) == (0, processed, written)
    assert len(check_report(out)) == 1
    check_results(results, check_report(out))


def test_a_result_that_cannot_be_written_keeps_the_row_and_is_retried(tmp_path, capsys, siim_dicom):
    folder = tmp_path / "studies"
    folder.mkdir()
    (folder / "siim.dcm").write_bytes(siim_dicom.read_bytes())
    results, out = tmp_path / "results", tmp_path / "report.csv"
    code, info, _ = run(capsys, folder, "--out", tmp_path / "probe.csv")  # the row's model id and UID
    row = check_report(tmp_path / "probe.csv")[0]
    assert row["status"] == "ok"
    blocker = Path(f"{result_path(results, row, SR)}.tmp")
    blocker.mkdir(parents=True)  # the temporary file cannot be created: as a full or broken disk would

    capsys.readouterr()
    code = cli.main(["run", str(folder), "--out", str(out), "--workers", "0", "--dicom-out", str(results)])
    err = capsys.readouterr().err
    assert code == 0
    assert check_report(out)[0]["status"] == "ok", "the measurement stands"
    assert "DICOM results not written" in " ".join(err.split()) and "next run tries again" in " ".join(err.split())
    assert not result_path(results, row, SR).exists()

    blocker.rmdir()
    code, info, _ = run(capsys, folder, "--out", out, "--dicom-out", results)
    assert (code, info["processed"], info["dicom_results"], info["dicom_failed"]) == (0, 1, 2, 0)
    check_results(results, check_report(out))


def test_usage_errors(tmp_path, capsys, siim_dicom):
    assert cli.main(["run", str(siim_dicom), "--out", str(tmp_path / "r.csv"), "--dicom-out-capture"]) == 2
    (tmp_path / "file").write_text("x")
    assert cli.main(["run", str(siim_dicom), "--out", str(tmp_path / "r.csv"), "--dicom-out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert "--dicom-out-capture needs --dicom-out" in err and "is a file; give a folder" in err
    watch = ["watch", str(tmp_path), "--out", str(tmp_path / "w.csv")]
    assert cli.main([*watch, "--send-to", "PACS@127.0.0.1:104"]) == 2
    assert cli.main([*watch, "--dicom-out", str(tmp_path / "res"), "--send-to", "PACS@127.0.0.1"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "watch --send-to needs --dicom-out" in err and "expected AET@HOST:PORT" in err


def test_kill_9_then_restart_leaves_exactly_one_result_set_per_ok_row(tmp_path, chest_pngs, intensity_model, procs):
    """The real command with two worker processes, killed with SIGKILL while it writes rows and
    results, then run again: every ok row has its SR and presentation state once, nothing
    half-written is left, no result without its row."""
    folder = tmp_path / "studies"
    write_chests(folder, chest_pngs, 80)
    results, out = tmp_path / "results", tmp_path / "report.csv"
    command = hb("run", folder, "--out", out, "--model", intensity_model, "--workers", "2", "--threads", "1",
                 "--batch-size", "4", "--dicom-out", results, "--quiet")
    for round_ in range(2):
        proc = procs.start(command, f"killed{round_}")
        start_rows = count_complete_rows(out)
        wait_until(lambda: count_complete_rows(out) >= start_rows + 8, timeout=120, interval=0.01,
                   message=f"8 new rows in round {round_} (then the kill)", proc=proc)
        assert proc.poll() is None, f"finished before the kill:\n{output(proc)}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        procs.kill_group(proc)
    code, text = procs.run(command, "restart", timeout=300)
    assert code == 0, text
    rows = check_report(out, {str(p) for p in folder.glob("*.dcm")})
    assert all(r["status"] == "ok" for r in rows)
    check_results(results, rows)


def test_watch_writes_results_into_the_watched_folder_without_reading_them(tmp_path, chest_pngs, intensity_model):
    """`watch --dicom-out incoming/results`: the results appear beside the films the watcher reads,
    and are never taken for new films."""
    import threading

    from heartbatch.model import BoxModel
    from heartbatch.pipeline import RunOptions
    from heartbatch.watch import WatchOptions, Watcher

    incoming, out = tmp_path / "incoming", tmp_path / "report.csv"
    incoming.mkdir()
    results = incoming / "results"
    options = RunOptions(workers=0, threads=1, dicom_out=dr.ResultOptions(results))
    built: list[Watcher] = []
    # no grace for failing files: a result read as a film (an SR or presentation state has no pixel
    # data) gets its skipped row at once instead of being looked at again for 30 s as a copy in progress
    watch_options = WatchOptions(settle=0.2, incomplete_grace=0.0)

    def watch() -> None:  # the ledger's SQLite connection belongs to the thread that opens it
        built.append(Watcher([incoming], out, BoxModel(intensity_model), options, watch_options))
        built[0].run(install_signal_handlers=False)

    thread = threading.Thread(target=watch)
    thread.start()

    def alive() -> bool:
        assert thread.is_alive(), "the watcher thread ended by itself"
        return True

    def has_row(path: Path) -> bool:
        lines = out.read_text(encoding="utf-8").splitlines(keepends=True) if out.exists() else []
        return any(line.startswith(f"{path},") and line.endswith("\n") for line in lines)

    def built_watcher() -> Watcher | None:
        if built:
            return built[0]
        alive()  # a Watcher that could not be built ends the thread
        return None

    watcher = wait_until(built_watcher, timeout=30, interval=0.01, message="the Watcher to be built")
    films = [incoming / p.name for p in write_chests(tmp_path / "staging", chest_pngs, 3)]
    try:
        for film in films:
            (tmp_path / "staging" / film.name).rename(film)
        wait_until(lambda: alive() and watcher.processed >= 3, timeout=60, message="the 3 films measured")
        # Positive control: the films' results were written (into the watched folder) before their
        # rows, so before this sentinel film; their events came first.  Once the round that measured
        # the sentinel is over, the watcher has looked at the results, and measured them if it was
        # going to (it takes in all events, then all files ready, in each round).
        sentinel = write_chests(tmp_path / "staging", chest_pngs, 1, start=9, prefix="sentinel")[0]
        sentinel = sentinel.rename(incoming / sentinel.name)
        wait_until(lambda: alive() and has_row(sentinel), timeout=60, message=f"the row of {sentinel.name}")
        seen_in = watcher.rounds  # the round that wrote the sentinel's row: this one or an earlier one
        wait_until(lambda: alive() and watcher.rounds > seen_in, timeout=30,
                   message=f"the end of the round that measured {sentinel.name}")
    finally:
        watcher.stop_requested.set()
        thread.join(30)
    assert watcher.processed == 4, "a result file was read as a film"
    rows = check_report(out, {str(p) for p in films + [sentinel]})
    assert all(r["status"] == "ok" for r in rows)
    check_results(results, rows)
