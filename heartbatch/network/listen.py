"""`heartbatch listen`: a DICOM Storage SCP in front of the `watch` pipeline.

A PACS (or a modality, or ``storescu``) sends chest films by C-STORE. Each instance is written,
fsync'ed, under ``<state>/received/<SOP Instance UID>.dcm`` in one rename *before* the success
status goes back, and then handed to a :class:`~heartbatch.watch.Watcher` on that folder: the same
pipeline, report and ledger as `watch`. So

* an acknowledged instance is on disk: killed at any moment, a restart measures what the ledger
  has not (the watcher's catch-up), and the ledger writes its row exactly once;
* an instance sent twice has one file (its SOP Instance UID names it; identical bytes are not
  written again) and so one row; changed bytes under the same UID replace the file and its row;
* an instance that cannot be measured gets its skipped or error row like any file.

With ``--send-to``, the rows' DICOM results (``--dicom-out``, by default ``<state>/results``) go
back by C-STORE from the ledger's outbox (:mod:`heartbatch.network.send`).

pynetdicom is imported only here (``pip install 'heartbatch[dicom]'``).
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.uid import (ComputedRadiographyImageStorage, DigitalXRayImageStorageForPresentation,
                         DigitalXRayImageStorageForProcessing, SecondaryCaptureImageStorage)

from ..errors import UsageError
from ..files import remove_leftovers, write_atomic
from ..pipeline import RunOptions
from ..records import Record
from ..report.paths import ReportFiles
from ..watch import WatchOptions, Watcher
from .send import Destination, Sender

log = logging.getLogger("heartbatch")

#: What `listen` accepts: projection radiographs and secondary captures. Anything else is refused
#: at association (no presentation context), so the sender knows at once.
ACCEPTED = {
    ComputedRadiographyImageStorage: "Computed Radiography Image",
    DigitalXRayImageStorageForPresentation: "Digital X-Ray Image (for presentation)",
    DigitalXRayImageStorageForProcessing: "Digital X-Ray Image (for processing)",
    SecondaryCaptureImageStorage: "Secondary Capture Image",
}
#: The answers the SCP gives (PS3.4 B.2.3; pynetdicom.status.STORAGE_SERVICE_CLASS_STATUS lists
#: them): success (to a C-ECHO too), "Refused: Out of Resources", "Cannot Understand".
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass
class ListenOptions:
    port: int = 11112
    ae_title: str = "HEARTBATCH"
    host: str = "0.0.0.0"             # address to bind; 127.0.0.1 for this machine only
    allow: tuple[str, ...] = ()       # calling AE titles accepted; empty: any
    max_associations: int = 8         # associations served at once
    max_instance_bytes: int = 1 << 30  # an instance larger than this is refused (out of resources)
    timeout: float = 60.0             # seconds of network / ACSE / DIMSE silence before an association is dropped


def stored_name(sop_instance_uid: str) -> str:
    """The file name of a received instance: its UID when it is a well-formed one, else a hash of it."""
    if re.fullmatch(r"[0-9]+(\.[0-9]+)*", sop_instance_uid) and len(sop_instance_uid) <= 64:
        return f"{sop_instance_uid}.dcm"
    return "x" + hashlib.sha256(sop_instance_uid.encode("utf-8", "backslashreplace")).hexdigest()[:40] + ".dcm"


class Listener:
    """Receive, store, measure; stop with SIGINT/SIGTERM (or :meth:`stop`)."""

    def __init__(self, out: Path, model, options: RunOptions, listen: ListenOptions | None = None,
                 state_dir: Path | None = None, send_to: Destination | None = None,
                 on_records: Callable[[list[Record]], None] | None = None,
                 on_stored: Callable[[Path, str, bool], None] | None = None):
        """``on_stored(path, calling_aet, duplicate)`` is told of each instance acknowledged."""
        from ..results import ResultOptions

        self.listen = listen or ListenOptions()
        files = ReportFiles.of(out, state_dir)
        if send_to is not None and options.dicom_out is None:
            options = replace(options, dicom_out=ResultOptions((files.state_dir / "results").absolute()))
        self.received = files.state_dir / "received"
        self.on_stored = on_stored
        self.on_records = on_records
        self.stored = self.duplicates = 0
        self._write_lock = threading.Lock()
        # everything of the report's but the state folder, which holds the received folder
        exclude = [p for p in ReportFiles.of(out, state_dir, options.dicom_out and options.dicom_out.out_dir).outputs
                   if p != files.state_dir]
        self.watcher = Watcher([self.received], out, model, options,
                               WatchOptions(settle=0.0, incomplete_grace=0.0, observe=False), state_dir,
                               on_records=self._records, send_to=str(send_to) if send_to else None,
                               exclude=exclude)
        self.received.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.received, "*.dcm")  # a store killed before its rename: never acknowledged
        self.sender = Sender(files.state_dir, send_to, self.listen.ae_title) if send_to else None
        self.server = None

    # -- the SCP -------------------------------------------------------------
    def _ae(self):
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.listen.ae_title)
        for sop_class in ACCEPTED:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.listen.allow:
            ae.require_calling_aet = list(self.listen.allow)
        ae.maximum_associations = self.listen.max_associations
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.listen.timeout
        return ae

    def _on_echo(self, event) -> int:
        return SUCCESS

    def _on_store(self, event) -> int:
        """Write the instance durably, then acknowledge it; the watcher measures it."""
        calling = str(event.assoc.requestor.ae_title).strip()
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "")
        if not uid:
            log.warning("C-STORE from %s without an SOP Instance UID: refused", calling)
            return CANNOT_UNDERSTAND
        data = event.encoded_dataset()
        if len(data) > self.listen.max_instance_bytes:
            log.warning("%s from %s: %d bytes, over the %d allowed: refused", uid, calling, len(data),
                        self.listen.max_instance_bytes)
            return OUT_OF_RESOURCES
        path = self.received / stored_name(uid)
        try:
            with self._write_lock:
                duplicate = _same_bytes(path, data)
                if not duplicate:
                    write_atomic(path, data, durable=True)
        except OSError as exc:
            log.error("%s from %s: cannot store it (%s): refused", uid, calling, exc)
            return OUT_OF_RESOURCES
        self.duplicates += duplicate
        self.stored += not duplicate
        if not duplicate:
            self.watcher.notify(path)
        if self.on_stored is not None:
            self.on_stored(path, calling, duplicate)
        return SUCCESS

    def _records(self, records: list[Record]) -> None:
        if self.sender is not None and any(r.results for r in records):
            self.sender.wake()
        if self.on_records is not None:
            self.on_records(records)

    # -- running -------------------------------------------------------------
    def start_server(self) -> None:
        from pynetdicom import evt

        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo)]
        try:
            self.server = self._ae().start_server((self.listen.host, self.listen.port), block=False,
                                                  evt_handlers=handlers)
        except OSError as exc:
            raise UsageError(f"cannot listen on {self.listen.host}:{self.listen.port} ({exc.strerror or exc}); "
                             f"is another listener running? choose another --port") from None

    @property
    def port(self) -> int:
        """The port listened on (the one the system chose, for --port 0)."""
        return self.server.server_address[1] if self.server is not None else self.listen.port

    def run(self, install_signal_handlers: bool = True) -> int:
        """Serve until stopped; returns 0. The watcher closes the report when it stops."""
        try:
            if self.server is None:
                self.start_server()
        except BaseException:
            self.watcher.runner.close()
            self.watcher.session.close()
            raise
        if self.sender is not None:
            self.sender.start()
        try:
            return self.watcher.run(install_signal_handlers)
        finally:
            self.server.shutdown()   # what arrives meanwhile is stored and acknowledged: measured on restart
            if self.sender is not None:
                self.sender.stop()

    def stop(self) -> None:
        self.watcher.stop_requested.set()


def _same_bytes(path: Path, data: bytes) -> bool:
    try:
        if path.stat().st_size != len(data):
            return False
        return path.read_bytes() == data
    except OSError:
        return False
