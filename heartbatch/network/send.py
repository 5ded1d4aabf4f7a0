"""``--send-to AET@HOST:PORT``: DICOM results delivered by C-STORE from the ledger's outbox.

A row's result files are queued in the same transaction that commits the row (see
:mod:`heartbatch.report.ledger`), so a result is queued exactly when its row exists. The :class:`Sender`
thread sends what is due in one association, removes what the destination acknowledged, and puts
back what failed with a growing delay (2 s, 4 s, ... up to 5 minutes), so a PACS that is down or
slow loses nothing and is not flooded. Killed after the destination acknowledged a file but before
the queue forgot it, the file is sent again on restart: its SOP Instance UID is the same (see
:func:`heartbatch.results.uids.result_uid`), so the PACS files it once.

pynetdicom is imported here only, when something is sent.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..report.ledger import Outbox, Queued

log = logging.getLogger("heartbatch")

FIRST_RETRY = 2.0      # seconds after the first failure
LAST_RETRY = 300.0     # the longest wait between tries
PER_ASSOCIATION = 64   # files sent in one association


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Destination":
        """``AET@HOST:PORT``, e.g. ``ORTHANC@pacs.example.org:4242`` (IPv6 hosts in brackets)."""
        match = re.fullmatch(r"([^@]{1,16})@(\[[^\]]+\]|[^:@]+):(\d{1,5})", text.strip())
        if not match or not 0 < int(match.group(3)) < 65536:
            raise UsageError(f"--send-to {text!r}: expected AET@HOST:PORT, e.g. PACS@10.0.0.5:104")
        ae_title, host, port = match.groups()
        return cls(ae_title.strip(), host.strip("[]"), int(port))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def retry_delay(attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failure (1, 2, ...)."""
    return min(LAST_RETRY, FIRST_RETRY * 2 ** max(0, attempts - 1))


@functools.cache
def stored_statuses() -> frozenset[int]:
    """C-STORE statuses that mean the destination has the instance: Success, and the Warnings of
    the Storage Service Class itself (PS3.4 B.2.3: coercion of data elements, element discarded,
    data set does not match SOP class: 0xB000, 0xB006, 0xB007), which store it all the same. The
    general Warnings pynetdicom lists beside them (0x0107, 0x0116) answer the N- services, not a
    C-STORE; any other answer puts the file back, to be tried again."""
    from pynetdicom.status import GENERAL_STATUS, STATUS_SUCCESS, STATUS_WARNING, STORAGE_SERVICE_CLASS_STATUS

    storage_only = STORAGE_SERVICE_CLASS_STATUS.keys() - GENERAL_STATUS.keys()
    return frozenset(code for code, (category, _) in STORAGE_SERVICE_CLASS_STATUS.items()
                     if category == STATUS_SUCCESS or (category == STATUS_WARNING and code in storage_only))


class Sender:
    """A thread that empties the outbox for one destination until stopped."""

    def __init__(self, state_dir: Path, destination: Destination, calling_aet: str = "HEARTBATCH",
                 timeout: float = 30.0):
        self.destination = destination
        self.calling_aet = calling_aet
        self.timeout = timeout
        self.outbox = Outbox(state_dir, str(destination))
        self.sent = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbatch-send", daemon=True)

    def start(self) -> "Sender":
        self._thread.start()
        return self

    def wake(self) -> None:
        """New results were queued: look at the outbox now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the association in flight (at most ``timeout`` s), then stop; what is left stays queued."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.outbox.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            due = self.outbox.due(time.time(), PER_ASSOCIATION)
            if due:
                try:
                    self.send(due)
                except Exception as exc:  # noqa: BLE001 - the thread must outlive one bad round; tried again later
                    log.exception("sending to %s failed", self.destination)
                    for item in due:
                        self._failed(item, f"{self.destination}: {type(exc).__name__}: {exc}")
                continue
            next_try = self.outbox.next_try()
            wait = 1.0 if next_try is None else min(1.0, max(0.05, next_try - time.time()))
            self._wake.wait(wait)
            self._wake.clear()

    def send(self, queued: list[Queued]) -> None:
        """Send ``queued`` files in one association; each is removed from the outbox or put back."""
        import pydicom
        from pynetdicom import AE

        datasets, missing = [], []
        for item in queued:
            try:
                datasets.append((item, pydicom.dcmread(item.file)))
            except FileNotFoundError:
                missing.append(item)
            except Exception as exc:  # noqa: BLE001 - a result file we cannot read is reported, not retried forever
                self._failed(item, f"cannot read {item.file}: {exc}")
        for item in missing:  # removed from --dicom-out by someone: nothing left to send
            log.warning("%s: queued for %s but no longer there; not sent", item.file, self.destination)
            self.outbox.sent(item.file)
        if not datasets:
            return
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = min(self.timeout, 10.0)
        for sop_class, syntax in sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
                                         for _, ds in datasets}):
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(self.destination.host, self.destination.port, ae_title=self.destination.ae_title)
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "could not connect or association aborted"
            for item, _ in datasets:
                self._failed(item, f"{self.destination}: {why}")
            return
        try:
            for item, ds in datasets:
                if self._stop.is_set() and item is not datasets[0][0]:
                    break
                try:
                    status = assoc.send_c_store(ds)
                except Exception as exc:  # noqa: BLE001 - pynetdicom raises on unusable contexts
                    self._failed(item, f"{self.destination}: {exc}")
                    continue
                code = getattr(status, "Status", None)
                if code in stored_statuses():
                    self.outbox.sent(item.file)
                    self.sent += 1
                elif code is None:
                    self._failed(item, f"{self.destination}: no answer (association lost)")
                else:
                    self._failed(item, f"{self.destination}: C-STORE status 0x{code:04X}")
                if not assoc.is_established:
                    break
        finally:
            if assoc.is_established:
                assoc.release()

    def _failed(self, item: Queued, why: str) -> None:
        delay = retry_delay(item.attempts + 1)
        if item.attempts == 0 or why != item.last_error:
            log.warning("%s: not sent (%s); trying again in %.0f s", item.file, why, delay)
        self.outbox.failed(item.file, why, time.time() + delay)
