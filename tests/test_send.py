"""The --send-to outbox (heartbatch.network.send): what a destination's answers do to the queue. The peer is a
real pynetdicom Storage SCP in this process, scripted to refuse, then accept."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from heartbatch.network import send
from heartbatch.errors import UsageError
from heartbatch.report.ledger import Entry, Fingerprint, Ledger, Results
from helpers import wait_until


@pytest.mark.parametrize("text, expected", [
    ("PACS@10.0.0.5:104", ("PACS", "10.0.0.5", 104)),
    ("ORTHANC@pacs.example.org:4242", ("ORTHANC", "pacs.example.org", 4242)),
    ("A B@[::1]:11112", ("A B", "::1", 11112)),
])
def test_destination_parses(text, expected):
    d = send.Destination.parse(text)
    assert (d.ae_title, d.host, d.port) == expected


@pytest.mark.parametrize("text", ["PACS@host", "@host:104", "PACS@host:0", "PACS@host:70000",
                                  "SEVENTEEN_CHARS_X@host:104", "PACS:104"])
def test_bad_destination_is_a_usage_error(text):
    with pytest.raises(UsageError, match="AET@HOST:PORT"):
        send.Destination.parse(text)


def test_retry_delays_grow_to_a_ceiling():
    assert [send.retry_delay(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert send.retry_delay(50) == send.LAST_RETRY


class ScriptedSCP:
    """A Storage SCP answering each C-STORE with the next status of ``statuses`` (then success)."""

    def __init__(self, statuses: list[int]):
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Comprehensive3DSRStorage, GrayscaleSoftcopyPresentationStateStorage

        self.statuses = list(statuses)
        self.stored: list[str] = []
        ae = AE(ae_title="SCRIPTED")
        for sop_class in (Comprehensive3DSRStorage, GrayscaleSoftcopyPresentationStateStorage):
            ae.add_supported_context(sop_class)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        self.destination = send.Destination("SCRIPTED", "127.0.0.1", self.server.server_address[1])

    def _store(self, event) -> int:
        status = self.statuses.pop(0) if self.statuses else 0x0000
        if status == 0x0000:
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return status


def _queue(state: Path, files: list[Path], destination: str) -> None:
    ledger = Ledger(state)
    try:
        ledger.bind(["path"])
        results = Results("sr+pr:x", str(files[0].parent), tuple(f.name for f in files))
        ledger.commit([Entry("/films/a.dcm", Fingerprint(1, 1), "s", "row\n", results)], destination)
    finally:
        ledger.close()


def test_a_refusal_is_retried_and_success_empties_the_queue(tmp_path, monkeypatch, siim_dicom):
    from heartbatch import results as dr
    from heartbatch.api import predict

    record = predict(siim_dicom)
    names = dr.write_results(record, record.model_id, "", dr.ResultOptions(tmp_path / "results"))
    files = [tmp_path / "results" / n for n in names]
    scp = ScriptedSCP([0xA700])   # "out of resources" for the first file, once
    try:
        _queue(tmp_path / "state", files, str(scp.destination))
        monkeypatch.setattr(send, "FIRST_RETRY", 0.2)
        sender = send.Sender(tmp_path / "state", scp.destination).start()
        try:
            wait_until(lambda: not sender.outbox.pending(), timeout=30,
                       message=lambda: f"an empty outbox; still pending: {sender.outbox.pending()}")
        finally:
            sender.stop()
        assert sorted(scp.stored) == sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
        assert sender.sent == 2
    finally:
        scp.server.shutdown()


def test_a_queued_file_that_is_gone_is_dropped_with_a_warning(tmp_path, caplog):
    scp = ScriptedSCP([])
    try:
        missing = tmp_path / "results" / "2.25.1.sr.dcm"
        missing.parent.mkdir()
        _queue(tmp_path / "state", [missing], str(scp.destination))
        sender = send.Sender(tmp_path / "state", scp.destination)
        sender.send(sender.outbox.due(time.time()))
        assert sender.outbox.pending() == [] and scp.stored == []
        assert "no longer there" in caplog.text
        sender.stop()
    finally:
        scp.server.shutdown()


def test_a_destination_that_is_down_keeps_the_file_queued_with_the_reason(tmp_path, siim_dicom):
    from pacs import free_port

    file = tmp_path / "results" / "x.dcm"
    file.parent.mkdir()
    file.write_bytes(siim_dicom.read_bytes())
    down = send.Destination("NOBODY", "127.0.0.1", free_port())
    _queue(tmp_path / "state", [file], str(down))
    sender = send.Sender(tmp_path / "state", down, timeout=5)
    before = time.time()
    sender.send(sender.outbox.due(time.time()))
    (queued,) = sender.outbox.pending()
    assert queued.attempts == 1 and "could not connect" in queued.last_error
    assert sender.outbox.due(before + 1) == [], "not before its retry time"
    assert sender.outbox.due(before + send.FIRST_RETRY + 5) != []
    sender.stop()
