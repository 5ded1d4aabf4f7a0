"""`heartbatch listen` (issue 18) against real DICOM peers: dcmtk's echoscu and storescu send films,
an Orthanc server (a real PACS, see tests/pacs.py) sends films and receives the results through
``--send-to``. The listener runs as the real command in a subprocess, killed with SIGKILL in the
crash test.

As in test_watch.py, no test sleeps and then asserts that nothing happened.  "An instance sent
again is not measured again" is asserted after a positive event (:func:`prove_handled`: sentinel
films sent after it have their rows), on the ledger's commit sequence numbers; "nothing more
reaches the PACS" once the ledger's outbox is empty (nothing left to send)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pydicom
import pytest

import highdicom as hd

from dicom_factory import write_dicom
from heartbatch import results as dr
from heartbatch.report.paths import ReportFiles
from helpers import Processes, check_report, count_complete_rows, hb, output, thumbnail, wait_until, write_chests
from pacs import Orthanc, dsrdump, echoscu, skip_or_fail_without, storescu

AET = "HEARTBATCH"
LOOPBACK = "127.0.0.1"


@pytest.fixture
def pacs(tmp_path):
    skip_or_fail_without("Orthanc")
    with Orthanc(tmp_path / "orthanc", graceful_stop=False) as server:
        yield server


def start_listen(procs: Processes, out: Path, *extra, name: str = "listen") -> tuple[subprocess.Popen, int]:
    """The real `heartbatch listen --quiet` on a free loopback port; (process, port) once it listens."""
    skip_or_fail_without("storescu", "echoscu")
    proc = procs.start(hb("listen", "--port", "0", "--host", LOOPBACK, "--ae-title", AET, "--out", out,
                          "--threads", "1", "--quiet", *extra), name)

    def listening_port() -> int | None:
        for line in output(proc).splitlines(keepends=True):
            if line.startswith('{"listening"') and line.endswith("\n"):
                return json.loads(line)["listening"]["port"]
        return None

    return proc, wait_until(listening_port, timeout=90, message="listen to start listening", proc=proc)


def wait_rows(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> list[dict]:
    """Until the report has ``n`` rows (checked by check_report); returns them."""
    def rows() -> list[dict] | None:
        found = check_report(out) if out.exists() else []
        return found if len(found) >= n else None

    return wait_until(rows, timeout=timeout, message=lambda: f"{n} rows (the report has {count_complete_rows(out)})",
                      proc=proc)


def ledger_seqs(out: Path) -> dict[str, int]:
    """Path -> sequence number of the ledger commit that wrote its row: a file measured again gets a
    new one."""
    db = sqlite3.connect(ReportFiles.of(out).state_dir / "ledger.sqlite")
    try:
        return dict(db.execute("SELECT path, seq FROM files"))
    finally:
        db.close()


def prove_handled(out: Path, port: int, proc: subprocess.Popen, folder: Path, chest_pngs: list[Path]) -> list[dict]:
    """Positive control for "the listener did nothing more with what it had received": two sentinel
    films, the second sent once the first has its row.  A film is handed to the listener's watcher
    before its C-STORE is acknowledged, so everything acknowledged before the first sentinel was
    taken in no later than the round that measured that sentinel (a round takes in every event, then
    measures every file ready).  The second sentinel can only be taken in by a later round, so once
    it has its row, that round is over.  Returns the sentinels' rows."""
    rows = []
    for i in range(2):
        film = write_chests(folder, chest_pngs, 1, start=900 + i, prefix="sentinel")[0]
        uid = pydicom.dcmread(film, stop_before_pixels=True).SOPInstanceUID
        storescu(film, AET, LOOPBACK, port)
        rows.append(wait_until(lambda: by_sop(check_report(out)).get(uid), timeout=120,
                               message=f"the row of {film.name}", proc=proc))
    return rows


def stop(proc: subprocess.Popen, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def studies(folder: Path, chest_pngs: list[Path], siim: Path, count: int = 4) -> dict[str, str]:
    """Films a ward sends: chest CRs, the SIIM chest (JPEG), a lateral, a secondary capture of a
    chest, and a CR whose pixel data is missing. SOP Instance UID -> expected status."""
    expected = {}
    for path in write_chests(folder, chest_pngs, count):
        expected[pydicom.dcmread(path).SOPInstanceUID] = "ok"
    (folder / "siim.dcm").write_bytes(siim.read_bytes())
    expected[pydicom.dcmread(siim).SOPInstanceUID] = "ok"
    lateral = write_dicom(folder / "lateral.dcm", thumbnail(chest_pngs[5]), view_position="LL")
    expected[pydicom.dcmread(lateral).SOPInstanceUID] = "skipped"
    capture = write_dicom(folder / "capture.dcm", thumbnail(chest_pngs[6]), modality="OT", view_position=None,
                          sop_class="SC")
    expected[pydicom.dcmread(capture).SOPInstanceUID] = "any"  # measured, or skipped by its header: a row
    empty = write_dicom(folder / "no_pixels.dcm", None)
    expected[pydicom.dcmread(empty).SOPInstanceUID] = "skipped"
    return expected


def by_sop(rows: list[dict]) -> dict[str, dict]:
    result = {r["sop_instance_uid"]: r for r in rows}
    assert len(result) == len(rows), "an instance with two rows"
    return result


def result_uids(rows: list[dict]) -> set[str]:
    return {dr.result_uid(r["sop_instance_uid"], r["model_id"], kind)
            for r in rows if r["status"] == "ok" for kind in ("sr", "pr")}


def sr_ctr(data: bytes, tmp: Path) -> float:
    path = tmp / "sr.dcm"
    path.write_bytes(data)
    sr = hd.sr.srread(path)
    values = [float(m.value) for g in sr.content.get_image_measurement_groups() for m in g.get_measurements()
              if "ardiothoracic" in m.name.meaning]
    assert len(values) == 1
    return values[0]


def test_films_sent_by_storescu_get_one_row_each_and_their_results_reach_orthanc(
        tmp_path, procs, pacs, chest_pngs, siim_dicom):
    folder = tmp_path / "ward"
    expected = studies(folder, chest_pngs, siim_dicom)
    out = tmp_path / "report.csv"
    proc, port = start_listen(procs, out, "--workers", "0", "--send-to", f"{pacs.aet}@{LOOPBACK}:{pacs.dicom_port}")

    echoscu(AET, LOOPBACK, port)
    storescu(folder, AET, LOOPBACK, port)
    rows = by_sop(wait_rows(out, len(expected), proc))
    assert set(rows) == set(expected)
    for uid, status in expected.items():
        assert status in ("any", rows[uid]["status"]), (rows[uid]["path"], rows[uid]["status"], rows[uid]["reason"])
    received = ReportFiles.of(out).state_dir / "received"
    assert sorted(p.name for p in received.iterdir()) == sorted(f"{uid}.dcm" for uid in expected)

    # the same films again, as a PACS retrying would: acknowledged, not stored or measured twice
    def files_stored() -> dict[str, tuple[int, int]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in received.iterdir()}

    stored, measured = files_stored(), ledger_seqs(out)
    storescu(folder, AET, LOOPBACK, port)  # returns once every instance is acknowledged
    assert files_stored() == stored, "an instance sent again was written again"  # decided before the answer
    sentinels = prove_handled(out, port, proc, tmp_path / "sentinels", chest_pngs)
    assert {path: seq for path, seq in ledger_seqs(out).items() if path in measured} == measured, \
        "an instance sent again was measured again"
    rows = by_sop(check_report(out))
    assert set(rows) == set(expected) | {r["sop_instance_uid"] for r in sentinels}

    # the SRs and presentation states reach Orthanc, each once, and say what the CSV says
    ok = [r for r in rows.values() if r["status"] == "ok"]
    wanted = result_uids(ok)
    in_pacs = pacs.wait_for_count(len(wanted), timeout=90)
    assert sorted(in_pacs) == sorted(wanted)
    siim_row = rows[pydicom.dcmread(siim_dicom).SOPInstanceUID]
    sr_uid = dr.result_uid(siim_row["sop_instance_uid"], siim_row["model_id"], "sr")
    sr_bytes = pacs.instance_file(sr_uid)
    assert sr_ctr(sr_bytes, tmp_path) == pytest.approx(float(siim_row["ctr"]), abs=1e-4)
    (tmp_path / "from_pacs.dcm").write_bytes(sr_bytes)
    dump = dsrdump(tmp_path / "from_pacs.dcm")
    assert "Cardiothoracic ratio" in dump and f"{float(siim_row['ctr']):.4f}".rstrip("0") in dump
    assert pacs.tags(sr_uid)["StudyInstanceUID"] == pydicom.dcmread(siim_dicom).StudyInstanceUID

    assert stop(proc) == 0, output(proc)
    assert not outbox(out), "everything was sent"


def outbox(out: Path) -> list[tuple]:
    db = sqlite3.connect(ReportFiles.of(out).state_dir / "ledger.sqlite")
    try:
        return db.execute("SELECT file, destination, attempts, last_error FROM outbox").fetchall()
    finally:
        db.close()


def test_a_pacs_that_sends_films_gets_the_results_back(tmp_path, procs, pacs, chest_pngs):
    """Orthanc as the hospital PACS: it holds the films, sends them to `listen` (a DICOM modality
    declared in its configuration), and receives the SR and presentation state of each."""
    folder = tmp_path / "films"
    films = write_chests(folder, chest_pngs, 3)
    out = tmp_path / "report.csv"
    proc, port = start_listen(procs, out, "--workers", "0", "--send-to", f"{pacs.aet}@{LOOPBACK}:{pacs.dicom_port}")
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in films]
    for film in films:
        pacs.upload(film)
    pacs.add_modality("heartbatch", AET, LOOPBACK, port)
    pacs.echo("heartbatch")
    pacs.send("heartbatch", uids)
    rows = wait_rows(out, 3, proc)
    assert all(r["status"] == "ok" for r in rows)
    pacs.wait_for_count(3 + 2 * 3, timeout=90)
    assert sorted(pacs.sop_instance_uids()) == sorted(set(uids) | result_uids(rows))
    assert stop(proc) == 0


def test_callers_sop_classes_and_titles_that_are_refused(tmp_path, procs, chest_pngs):
    out = tmp_path / "report.csv"
    proc, port = start_listen(procs, out, "--workers", "0", "--allow", "WARD1", "--allow", "WARD2",
                              "--max-instance-mb", "1")
    assert echoscu(AET, LOOPBACK, port, calling_aet="WARD2", check=False).returncode == 0
    refused = echoscu(AET, LOOPBACK, port, calling_aet="STRANGER", check=False)
    assert refused.returncode != 0, "a caller not in --allow"
    wrong_title = echoscu("SOMEONE_ELSE", LOOPBACK, port, calling_aet="WARD1", check=False)
    assert wrong_title.returncode != 0, "an association addressed to another AE title"
    mr = write_dicom(tmp_path / "mr.dcm", thumbnail(chest_pngs[0]), modality="MR", view_position=None)
    sent = storescu(mr, AET, LOOPBACK, port, calling_aet="WARD1", check=False)
    assert sent.returncode != 0, "an MR image: no presentation context for it"
    large = write_chests(tmp_path / "large", chest_pngs, 1, size=1100)[0]  # 1.2 MB, over --max-instance-mb 1
    assert large.stat().st_size > 1 << 20
    sent = storescu(large, AET, LOOPBACK, port, calling_aet="WARD1", check=False)
    assert sent.returncode != 0 or "0xa700" in (sent.stdout + sent.stderr).lower(), sent.stdout + sent.stderr
    film = write_chests(tmp_path / "cr", chest_pngs, 1)[0]
    storescu(film, AET, LOOPBACK, port, calling_aet="WARD1")
    rows = wait_rows(out, 1, proc)
    assert [(r["status"], r["sop_instance_uid"]) for r in rows] == [("ok", pydicom.dcmread(film).SOPInstanceUID)]
    received = ReportFiles.of(out).state_dir / "received"
    assert [p.name for p in received.iterdir()] == [f"{rows[0]['sop_instance_uid']}.dcm"], "nothing refused was kept"
    assert stop(proc) == 0


def test_results_wait_in_the_ledger_while_the_pacs_is_down(tmp_path, procs, chest_pngs):
    """Sent to a PACS that is not running: rows are written, results stay queued; after a stop
    and restart (nothing received again), the PACS, now up, gets them, once."""
    skip_or_fail_without("Orthanc")
    pacs = Orthanc(tmp_path / "orthanc", graceful_stop=False).start()
    destination = f"{pacs.aet}@{LOOPBACK}:{pacs.dicom_port}"
    try:
        pacs.stop()   # down, its ports known
        out = tmp_path / "report.csv"
        proc, port = start_listen(procs, out, "--workers", "0", "--send-to", destination)
        films = write_chests(tmp_path / "films", chest_pngs, 2)
        storescu(films, AET, LOOPBACK, port)
        rows = wait_rows(out, 2, proc)

        def all_tried() -> list[tuple] | None:
            queued = outbox(out)
            return queued if len(queued) >= 4 and all(attempts > 0 for *_, attempts, _ in queued) else None

        queued = wait_until(all_tried, timeout=30, interval=0.1, proc=proc,
                            message=lambda: f"4 results queued, each tried once (the outbox: {outbox(out)})")
        assert all("could not connect" in error for *_, error in queued)
        assert stop(proc) == 0
        assert len(outbox(out)) == 4, "kept for later"

        pacs.start(keep_ports=True)
        proc, port = start_listen(procs, out, "--workers", "0", "--send-to", destination, name="restart")
        pacs.wait_for_count(4, timeout=90)
        # once the outbox is empty, nothing more can reach the PACS: what it holds is final
        wait_until(lambda: not outbox(out), timeout=60, interval=0.1, proc=proc,
                   message=lambda: f"an empty outbox (still queued: {outbox(out)})")
        assert sorted(pacs.sop_instance_uids()) == sorted(result_uids(rows))
        assert stop(proc) == 0
    finally:
        pacs.stop()


def test_kill_9_mid_transfer_then_restart_measures_and_delivers_each_instance_once(
        tmp_path, procs, pacs, chest_pngs, intensity_model):
    """storescu sends 40 films; `listen` (two worker processes) is killed with SIGKILL after some
    were acknowledged; the sender's retry after the restart sends them all again. Every instance
    has one row, and its results are in Orthanc once."""
    folder = tmp_path / "ward"
    films = write_chests(folder, chest_pngs, 40)
    uids = {pydicom.dcmread(f).SOPInstanceUID for f in films}
    out = tmp_path / "report.csv"
    destination = f"{pacs.aet}@{LOOPBACK}:{pacs.dicom_port}"
    extra = ("--model", intensity_model, "--workers", "2", "--batch-size", "4", "--send-to", destination)
    proc, port = start_listen(procs, out, *extra)
    received = ReportFiles.of(out).state_dir / "received"
    sender = subprocess.Popen(["storescu", "-aet", "WARD", "-aec", AET, "-nh", LOOPBACK, str(port),
                               *map(str, films)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_until(lambda: len(list(received.glob("*.dcm"))) >= 10, timeout=60, interval=0.005,
               message="10 films stored (then the kill)", proc=proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    procs.kill_group(proc)
    sender.communicate(timeout=60)
    acknowledged = len(list(received.glob("*.dcm")))
    assert acknowledged < len(films), "the kill came after the whole transfer: no mid-transfer kill"

    proc, port = start_listen(procs, out, *extra, name="restart")
    # what was acknowledged before the kill is measured and delivered without being sent again
    stored = {p.stem for p in received.glob("*.dcm")}
    rows = wait_rows(out, len(stored), proc, timeout=180)
    assert {r["sop_instance_uid"] for r in rows} == stored
    pacs.wait_for_count(2 * len(stored), timeout=120)
    assert set(pacs.sop_instance_uids()) == result_uids(rows)
    storescu(films, AET, LOOPBACK, port, calling_aet="WARD")  # the ward's retry: everything again
    rows = wait_rows(out, len(films), proc, timeout=180)
    assert set(by_sop(rows)) == uids
    # whatever the retry made the listener do (measure, queue results) is done once the sentinels
    # have their rows (this retry negotiates another transfer syntax than the first send, so the
    # instances stored before the kill arrive as other bytes and are measured again, by design)
    sentinels = prove_handled(out, port, proc, tmp_path / "sentinels", chest_pngs)
    rows = check_report(out)
    assert set(by_sop(rows)) == uids | {r["sop_instance_uid"] for r in sentinels}
    wanted = result_uids(rows)
    assert len(wanted) == 2 * len(rows)
    # once the outbox is empty, nothing more can reach Orthanc: what it holds is final
    wait_until(lambda: not outbox(out), timeout=120, interval=0.1, proc=proc,
               message=lambda: f"an empty outbox (still queued: {len(outbox(out))})")
    in_pacs = pacs.sop_instance_uids()
    assert len(in_pacs) == len(set(in_pacs)) and set(in_pacs) == wanted
    assert stop(proc) == 0
    assert len(check_report(out)) == len(films) + len(sentinels)


def test_twenty_instances_sent_twice_by_a_python_client_give_twenty_rows_and_captures_reach_storescp(
        tmp_path, procs, chest_pngs, intensity_model):
    """Another DICOM client (pynetdicom, as a PACS script would be) sends 20 films twice, in two
    associations; dcmtk's storescp receives the results (SR + secondary capture) through --send-to."""
    from pynetdicom import AE

    from pacs import StoreSCP

    films = write_chests(tmp_path / "films", chest_pngs, 20)
    datasets = [pydicom.dcmread(f) for f in films]
    results = tmp_path / "results"
    with StoreSCP(tmp_path / "storescp") as scp:
        out = tmp_path / "report.csv"
        proc, port = start_listen(procs, out, "--model", intensity_model, "--workers", "1",
                                  "--dicom-out", results, "--dicom-out-capture",
                                  "--send-to", f"{scp.aet}@{LOOPBACK}:{scp.port}")
        for _ in range(2):
            client = AE(ae_title="PACSSCRIPT")
            client.add_requested_context(datasets[0].SOPClassUID, datasets[0].file_meta.TransferSyntaxUID)
            assoc = client.associate(LOOPBACK, port, ae_title=AET)
            assert assoc.is_established
            try:
                assert [assoc.send_c_store(ds).Status for ds in datasets] == [0x0000] * 20
            finally:
                assoc.release()
        rows = wait_rows(out, 20, proc)
        assert {r["sop_instance_uid"] for r in rows} == {ds.SOPInstanceUID for ds in datasets}
        assert all(r["status"] == "ok" for r in rows)
        wait_until(lambda: len(scp.files()) >= 40, timeout=90, interval=0.1, proc=proc,
                   message=lambda: f"40 results at storescp (it has {len(scp.files())})")
        got = {}
        for path in scp.files():
            ds = pydicom.dcmread(path)
            got[ds.SOPInstanceUID] = ds.SOPClassUID.name
        wanted = {dr.result_uid(r["sop_instance_uid"], r["model_id"], kind): kind for r in rows for kind in ("sr", "sc")}
        assert set(got) == set(wanted)
        assert sorted(got.values()) == sorted(["Comprehensive 3D SR Storage"] * 20 + ["Secondary Capture Image Storage"] * 20)
        assert stop(proc) == 0
        assert len(check_report(out)) == 20


def test_watch_sends_its_results_too(tmp_path, procs, chest_pngs, intensity_model):
    """`watch --dicom-out DIR --send-to`: films dropped into a folder, results at dcmtk's storescp."""
    from pacs import StoreSCP

    incoming, out = tmp_path / "incoming", tmp_path / "report.csv"
    incoming.mkdir()
    with StoreSCP(tmp_path / "storescp") as scp:
        proc = procs.start(hb("watch", incoming, "--out", out, "--model", intensity_model, "--workers", "0",
                              "--settle", "0.2", "--dicom-out", tmp_path / "results",
                              "--send-to", f"{scp.aet}@{LOOPBACK}:{scp.port}"), "watch")
        films = write_chests(tmp_path / "staging", chest_pngs, 2)
        for film in films:
            film.rename(incoming / film.name)
        rows = wait_rows(out, 2, proc)
        wait_until(lambda: len(scp.files()) >= 4, timeout=60, interval=0.1, proc=proc,
                   message=lambda: f"4 results at storescp (it has {len(scp.files())})")
        assert {pydicom.dcmread(p).SOPInstanceUID for p in scp.files()} == result_uids(rows)
        assert stop(proc) == 0, output(proc)
