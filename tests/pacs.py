"""Real DICOM peers for network tests: an Orthanc PACS and the dcmtk tools.

Tests of the Storage SCP (``heartbatch listen``) and of the C-STORE sender
talk to real, independent implementations instead of a mock:

* :class:`Orthanc` runs the ``Orthanc`` binary (Debian package ``orthanc``)
  in a subprocess with its own configuration, index and storage under a
  temporary folder, on free loopback ports, and reads its REST API with
  ``urllib`` only.
* :func:`echoscu`, :func:`storescu`, :func:`dsrdump` and :func:`dcmdump` wrap
  the dcmtk command-line tools (Debian package ``dcmtk``) with timeouts and
  errors that carry the tool's output.
* :func:`skip_or_fail_without` skips a test where a tool is not installed,
  and fails it in CI, where nothing may skip (see ``tests/conftest.py``).

Install both with ``apt-get install dcmtk orthanc``.  The Debian package
registers a system ``orthanc`` service on ports 4242/8042; :class:`Orthanc`
never uses those ports nor ``/etc/orthanc``, so a running service does not
disturb the tests.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pytest

INSTALL_HINT = "apt-get install dcmtk orthanc"
#: The Debian package each tool comes from.
PACKAGES = {"Orthanc": "orthanc", "echoscu": "dcmtk", "storescu": "dcmtk", "storescp": "dcmtk",
            "dsrdump": "dcmtk", "dcmdump": "dcmtk", "findscu": "dcmtk", "movescu": "dcmtk"}
LOOPBACK = "127.0.0.1"

_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit, implicit VR little endian


# --- tools present? ------------------------------------------------------------

def in_ci() -> bool:
    """True where the CI variable is set (``CI=true`` is what conftest.py checks; any true-ish value counts here)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail_without(*tools: str) -> dict[str, str]:
    """Each tool's path; a missing tool skips the calling test, or fails it in CI.

    Call it at the top of a test or fixture: ``skip_or_fail_without("Orthanc", "storescu")``.
    """
    found = {tool: shutil.which(tool) for tool in tools}
    missing = [tool for tool, path in found.items() if path is None]
    if missing:
        packages = sorted({PACKAGES.get(tool, "dcmtk") for tool in missing})
        message = (f"needs {', '.join(missing)} on PATH (Debian packages {', '.join(packages)}: "
                   f"{INSTALL_HINT})")
        if in_ci():
            pytest.fail(f"{message}; with CI set nothing may skip", pytrace=False)
        pytest.skip(message)
    return {tool: str(path) for tool, path in found.items()}


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (another process may take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


# --- running the dcmtk tools -------------------------------------------------------

class ToolError(subprocess.CalledProcessError):
    """A command-line tool failed; the message carries its command line and output."""

    def __str__(self) -> str:
        status = f"exit status {self.returncode}" if self.returncode is not None else "timed out"
        return (f"{' '.join(map(str, self.cmd))} failed ({status})\n"
                f"--- stdout ---\n{_tail(self.stdout)}\n--- stderr ---\n{_tail(self.stderr)}")


def _tail(text: str | bytes | None, lines: int = 60) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])


def run_tool(args: Sequence[str | os.PathLike], *, timeout: float = 60, check: bool = True,
             failed: Any = None) -> subprocess.CompletedProcess[str]:
    """Run ``args``; with ``check``, raise :class:`ToolError` if it fails or times out.

    ``failed(proc) -> bool`` decides what a failure is (default: a non-zero exit status).
    """
    args = [str(arg) for arg in args]
    skip_or_fail_without(args[0])
    try:
        proc = subprocess.run(args, capture_output=True, text=True, errors="replace", timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise ToolError(None, args, exc.stdout, exc.stderr) from exc  # type: ignore[arg-type]
    if check and (failed(proc) if failed else proc.returncode != 0):
        raise ToolError(proc.returncode, args, proc.stdout, proc.stderr)
    return proc


def _logged_error(proc: subprocess.CompletedProcess[str]) -> bool:
    """dcmtk network tools log ``E:``/``F:`` lines for failures they still exit 0 on (storescu -nh)."""
    lines = (proc.stdout + "\n" + proc.stderr).splitlines()
    return proc.returncode != 0 or any(line.startswith(("E: ", "F: ")) for line in lines)


def _network_timeouts(timeout: float) -> list[str]:
    seconds = str(max(1, int(timeout)))
    return ["-to", seconds, "-ta", seconds, "-td", seconds]


def echoscu(aet: str, host: str, port: int, calling_aet: str = "TESTSCU", *, timeout: float = 30,
            check: bool = True) -> subprocess.CompletedProcess[str]:
    """C-ECHO ``aet`` at ``host:port``."""
    return run_tool(["echoscu", "-aet", calling_aet, "-aec", aet, *_network_timeouts(timeout), host, str(port)],
                    timeout=timeout + 10, check=check, failed=_logged_error)


def storescu(paths: str | os.PathLike | Iterable[str | os.PathLike], aet: str, host: str, port: int,
             calling_aet: str = "TESTSCU", *, propose: str | Sequence[str] | None = "auto",
             recurse: bool = True, pattern: str | None = "*", no_halt: bool = False,
             extra: Sequence[str] = (), timeout: float = 120,
             check: bool = True) -> subprocess.CompletedProcess[str]:
    """C-STORE files, and folders (scanned, recursively unless ``recurse=False``), in one association.

    ``propose`` picks the presentation contexts:

    * ``"auto"`` (default) reads the files first (pydicom) and proposes, for
      each SOP class among them, the uncompressed transfer syntaxes plus one
      context for each other transfer syntax those files are in, through a
      generated ``-xf`` configuration.  storescu sends a file as it is only
      in a context of its own transfer syntax: by default it proposes only
      uncompressed ones and cannot decompress (JPEG baseline, JPEG 2000, RLE
      files fail with "unable to convert dataset"), and ``-xy``/``-xs``/``-xv``
      each add a single compressed syntax, so no one flag covers a mixed folder.
    * a flag or flags such as ``"-xy"`` (JPEG baseline + uncompressed) are passed as given;
    * ``None`` leaves storescu's defaults.

    Folders are sent with ``+sd`` (and ``+r``), files matching ``pattern`` (``+sp``).
    storescu stops at the first failed file (non-DICOM files included) with
    exit status 1; with ``no_halt`` it goes on (``-nh``) and exits 0 even when
    stores failed, so ``check`` also treats any logged ``E:``/``F:`` line as failure.
    """
    items = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not items:
        raise ValueError("storescu: nothing to send")
    args: list[str] = ["storescu", "-aet", calling_aet, "-aec", aet, *_network_timeouts(timeout)]
    if any(item.is_dir() for item in items):
        args += ["+sd", "+r" if recurse else "-r"]
        if pattern:
            args += ["+sp", pattern]
    if no_halt:
        args.append("-nh")
    args += list(extra)
    with tempfile.TemporaryDirectory(prefix="storescu-") as tmp:
        if propose == "auto":
            contexts = _file_contexts(items, recurse, pattern)
            if contexts:
                args += ["-xf", str(_write_storescu_config(Path(tmp) / "storescu.cfg", contexts)), "Auto"]
        elif isinstance(propose, str):
            args.append(propose)
        elif propose is not None:
            args += list(propose)
        args += [host, str(port), *map(str, items)]
        return run_tool(args, timeout=timeout + 10, check=check, failed=_logged_error)


def _input_files(items: Sequence[Path], recurse: bool, pattern: str | None) -> list[Path]:
    files: list[Path] = []
    for item in items:
        if item.is_dir():
            found = item.rglob("*") if recurse else item.glob("*")
            files += sorted(p for p in found if p.is_file() and (not pattern or fnmatch.fnmatch(p.name, pattern)))
        else:
            files.append(item)
    return files


def _file_contexts(items: Sequence[Path], recurse: bool, pattern: str | None) -> dict[str, set[str]]:
    """SOP class UID -> transfer syntax UIDs of the readable DICOM files (others are storescu's to report)."""
    import pydicom  # only storescu(propose="auto") needs it

    contexts: dict[str, set[str]] = {}
    for path in _input_files(items, recurse, pattern):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            meta = ds.file_meta
            sop_class = str(meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID)
            syntax = str(meta.TransferSyntaxUID)
        except Exception:  # not DICOM, no file meta, truncated: storescu logs it
            continue
        contexts.setdefault(sop_class, set()).add(syntax)
    return contexts


def _write_storescu_config(path: Path, contexts: Mapping[str, set[str]]) -> Path:
    """A storescu ``-xf`` file with profile ``Auto``: per SOP class, uncompressed + each file's own syntax."""
    syntaxes = sorted({ts for tss in contexts.values() for ts in tss} - set(_UNCOMPRESSED))
    group = {ts: f"TS{i + 1}" for i, ts in enumerate(syntaxes)}
    lines = ["[[TransferSyntaxes]]", "[TS0]"]
    lines += [f"TransferSyntax{i + 1} = {ts}" for i, ts in enumerate(_UNCOMPRESSED)]
    for ts, name in group.items():
        lines += [f"[{name}]", f"TransferSyntax1 = {ts}"]
    pcs = []
    for sop_class in sorted(contexts):
        pcs.append(f"{sop_class}\\TS0")
        pcs += [f"{sop_class}\\{group[ts]}" for ts in sorted(contexts[sop_class]) if ts in group]
    if len(pcs) > 128:
        raise ValueError(f"storescu: {len(pcs)} presentation contexts needed, an association allows 128")
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    lines += [f"PresentationContext{i + 1} = {pc}" for i, pc in enumerate(pcs)]
    lines += ["[[Profiles]]", "[Auto]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return path


def dcmdump(path: str | os.PathLike, *args: str, timeout: float = 60, check: bool = True) -> str:
    """``dcmdump`` of a file (stdout); extra options such as ``"+P", "0008,0018"`` go before it."""
    return run_tool(["dcmdump", *args, path], timeout=timeout, check=check).stdout


def dsrdump(path: str | os.PathLike, *args: str, timeout: float = 60, check: bool = True) -> str:
    """``dsrdump`` of a structured report (stdout); it exits non-zero for a file that is not a valid SR."""
    return run_tool(["dsrdump", *args, path], timeout=timeout, check=check).stdout


# --- Orthanc ------------------------------------------------------------------------

class PeerError(RuntimeError):
    """A peer process (Orthanc, storescp) did not start, or answered with an error."""


class OrthancError(PeerError):
    """Orthanc did not start, or its REST API answered with an error."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: SIGTERM the child when the test process dies, so no Orthanc outlives a killed run."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _end(proc: subprocess.Popen | None, timeout: float, graceful: bool = True) -> int | None:
    """Stop a peer: SIGTERM, wait up to ``timeout`` s, then SIGKILL (at once unless ``graceful``);
    its exit status, None if it was not started."""
    if proc is None:
        return None
    if not graceful:
        proc.kill()
    elif proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class Orthanc:
    """A private Orthanc server: ``with Orthanc(tmp_path) as pacs: storescu(f, pacs.aet, pacs.host, pacs.dicom_port)``.

    Everything lives under ``workdir``: ``orthanc.json`` (the configuration),
    ``index/``, ``storage/`` and ``orthanc.log``.  DICOM and HTTP listen on
    free ports picked at start (Orthanc binds all interfaces; HTTP accepts
    loopback only, without authentication); the called AE title is not
    checked and any calling AE may store and echo.  ``modalities`` (name ->
    ``(aet, host, port)``) are peers Orthanc can send to (:meth:`send`), also
    addable later with :meth:`add_modality`.  ``config`` overrides or adds
    configuration keys.

    Storing an instance Orthanc already has (Orthanc 1.10.1, default
    ``OverwriteInstances: false``): the C-STORE is answered with status
    Success (0x0000), so the sender sees no difference, but Orthanc keeps the
    first copy: its file and its ``ReceptionDate`` stay, nothing is added, and
    the count does not change.  "Already has" means the same Orthanc id, a
    hash of PatientID, StudyInstanceUID, SeriesInstanceUID and
    SOPInstanceUID: the same SOP Instance UID under another PatientID, study
    or series becomes a second instance, so to assert that an instance
    arrived exactly once, count its SOP Instance UID in
    :meth:`sop_instance_uids` (or use :meth:`instance_ids_of`).  With
    ``overwrite_instances=True`` the new copy replaces the old one, still
    one instance.
    """

    host = LOOPBACK

    def __init__(self, workdir: str | os.PathLike, *, aet: str = "ORTHANC",
                 modalities: Mapping[str, Sequence[Any]] | None = None, overwrite_instances: bool = False,
                 config: Mapping[str, Any] | None = None, startup_timeout: float = 60.0, verbose: bool = False,
                 graceful_stop: bool = True):
        self.workdir = Path(workdir)
        self.aet = aet
        self.modalities = {name: list(peer) for name, peer in (modalities or {}).items()}
        self.overwrite_instances = overwrite_instances
        self.extra_config = dict(config or {})
        self.startup_timeout = startup_timeout
        self.verbose = verbose
        self.graceful_stop = graceful_stop
        self.dicom_port = 0
        self.http_port = 0
        self.startup_seconds: float | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy

    # -- lifecycle ------------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    def configuration(self) -> dict[str, Any]:
        return {
            "Name": f"heartbatch-tests-{self.aet}",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "RegisteredUsers": {},
            "SslEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": self.modalities,
            "DicomModalitiesInDatabase": False,
            "OrthancPeers": {},
            "Plugins": [],
            "LuaScripts": [],
            "OverwriteInstances": self.overwrite_instances,
            "StorageCompression": False,
            "SaveJobs": False,
            "DicomAssociationCloseDelay": 0,  # release an association to a peer as soon as a send is done
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "HttpTimeout": 30,
            "ExecuteLuaEnabled": False,
            **self.extra_config,
        }

    def start(self, attempts: int = 3, keep_ports: bool = False) -> "Orthanc":
        """Start Orthanc and wait until its REST API and DICOM port answer. ``keep_ports``: on the
        ports of its previous start (a PACS coming back after it was down), no retry elsewhere."""
        if self.proc is not None:
            raise OrthancError("Orthanc already started")
        skip_or_fail_without("Orthanc")
        self.workdir.mkdir(parents=True, exist_ok=True)
        keep_ports = keep_ports and bool(self.dicom_port)
        attempts = 1 if keep_ports else attempts
        for attempt in range(1, attempts + 1):
            if not keep_ports:
                self.dicom_port, self.http_port = _two_free_ports()
            self.config_path.write_text(json.dumps(self.configuration(), indent=2))
            if self.log_path.exists():
                self.log_path.unlink()
            started = time.monotonic()
            with open(self.workdir / "orthanc.stderr", "ab") as stderr:
                args = ["Orthanc", f"--logfile={self.log_path}", *(["--verbose"] if self.verbose else []),
                        str(self.config_path)]
                self.proc = subprocess.Popen(args, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=stderr,
                                             stderr=stderr,
                                             preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            if self._wait_ready(started):
                self.startup_seconds = time.monotonic() - started
                return self
            # it exited early: most likely a port taken between picking and binding it
            code, self.proc = self.proc.wait(), None
            if attempt == attempts:
                raise OrthancError(f"Orthanc exited with status {code} while starting "
                                   f"(DICOM port {self.dicom_port}, HTTP port {self.http_port})\n"
                                   f"{self.log_tail()}")
        raise AssertionError("unreachable")

    def _wait_ready(self, started: float) -> bool:
        """True once /system answers and the DICOM port accepts; False if the process exited."""
        assert self.proc is not None
        delay = 0.02
        while True:
            if self.proc.poll() is not None:
                return False
            if self._answers():
                return True
            if time.monotonic() - started > self.startup_timeout:
                self.stop()
                raise OrthancError(f"Orthanc did not answer GET {self.url}/system (and DICOM port "
                                   f"{self.dicom_port}) within {self.startup_timeout:.0f} s\n{self.log_tail()}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def _answers(self) -> bool:
        try:
            system = self.get("/system", timeout=5)
            with socket.create_connection((self.host, self.dicom_port), timeout=5):
                pass
        except (OSError, OrthancError):
            return False
        return system.get("DicomPort") == self.dicom_port

    def stop(self, timeout: float = 20.0, graceful: bool | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; its exit status.

        A clean stop takes Orthanc 1.10 about 3.5 s (its servers' poll
        timeouts), whatever it holds.  ``graceful=False`` (default: the
        ``graceful_stop`` given at construction) kills at once instead, for
        function-scoped fixtures whose folder is thrown away anyway.
        """
        proc, self.proc = self.proc, None
        return _end(proc, timeout, self.graceful_stop if graceful is None else graceful)

    def __enter__(self) -> "Orthanc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        parts = []
        for path in (self.log_path, self.workdir / "orthanc.stderr"):
            if path.exists() and path.stat().st_size:
                parts.append(f"--- {path.name} (last {lines} lines) ---\n"
                             + _tail(path.read_text(errors="replace"), lines))
        return "\n".join(parts) or "(Orthanc wrote no log)"

    # -- REST ------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, timeout: float = 60, raw: bool = False) -> Any:
        """``method`` ``path`` on the REST API: JSON in (str and bytes sent as they are); parsed JSON out,
        text for a text answer, the bytes with ``raw``."""
        data = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else (
            None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        try:
            with self._opener.open(req, timeout=timeout) as response:
                payload = response.read()
                content_type = response.headers.get_content_type()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")
            raise OrthancError(f"{method} {path}: HTTP {exc.code}: {detail}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise OrthancError(f"{method} {path}: {exc}") from exc
        if raw:
            return payload
        if content_type == "application/json":
            return json.loads(payload) if payload.strip() else None
        return payload.decode("utf-8", "replace")  # text/plain: metadata values, "/tools/now"

    def get(self, path: str, *, timeout: float = 60) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any = None, *, timeout: float = 60) -> Any:
        return self.request("POST", path, body, timeout=timeout)

    def put(self, path: str, body: Any = None, *, timeout: float = 60) -> Any:
        return self.request("PUT", path, body, timeout=timeout)

    def delete(self, path: str, *, timeout: float = 60) -> Any:
        return self.request("DELETE", path, timeout=timeout)

    # -- stored instances ----------------------------------------------------------------

    def instances(self) -> list[str]:
        """Orthanc ids of the stored instances."""
        return list(self.get("/instances"))

    def count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])

    def sop_instance_uids(self) -> list[str]:
        """The SOP Instance UID of every stored instance, one per instance (duplicates kept, sorted)."""
        return sorted(item["MainDicomTags"]["SOPInstanceUID"] for item in self.get("/instances?expand"))

    def instance_ids_of(self, sop_uid: str) -> list[str]:
        """Orthanc ids of the instances with this SOP Instance UID (more than one only across patients/studies)."""
        found = self.post("/tools/lookup", sop_uid)
        return [item["ID"] for item in found if item.get("Type") == "Instance"]

    def instance_id(self, sop_uid: str) -> str:
        ids = self.instance_ids_of(sop_uid)
        if len(ids) != 1:
            raise KeyError(f"{len(ids)} instances with SOP Instance UID {sop_uid} in Orthanc (want 1)")
        return ids[0]

    def instance_file(self, sop_uid: str) -> bytes:
        """The stored DICOM file (Part 10, as received) of the one instance with this SOP Instance UID."""
        return self.request("GET", f"/instances/{self.instance_id(sop_uid)}/file", raw=True)

    def tags(self, sop_uid: str) -> dict[str, Any]:
        """``simplified-tags`` of an instance: keyword -> value."""
        return self.get(f"/instances/{self.instance_id(sop_uid)}/simplified-tags")

    def wait_for_count(self, n: int, timeout: float = 60) -> list[str]:
        """Poll until at least ``n`` instances are stored; their SOP Instance UIDs."""
        deadline, delay = time.monotonic() + timeout, 0.02
        while True:
            uids = self.sop_instance_uids()
            if len(uids) >= n:
                return uids
            if time.monotonic() > deadline:
                raise AssertionError(f"Orthanc holds {len(uids)} instances after {timeout:.0f} s, "
                                     f"expected {n}\n{self.log_tail(15)}")
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)

    def clear(self) -> None:
        """Delete every stored instance."""
        for patient in self.get("/patients"):
            self.delete(f"/patients/{patient}")

    def upload(self, path: str | os.PathLike) -> str:
        """Store a file over REST (not DICOM); its Orthanc instance id."""
        return self.post("/instances", Path(path).read_bytes())["ID"]

    # -- Orthanc as a C-STORE/C-ECHO SCU -----------------------------------------------------

    def add_modality(self, name: str, aet: str, host: str, port: int) -> None:
        """Declare a peer (in memory, as if it were in ``DicomModalities``)."""
        self.put(f"/modalities/{urllib.parse.quote(name)}", {"AET": aet, "Host": host, "Port": int(port)})
        self.modalities[name] = [aet, host, int(port)]

    def echo(self, modality: str, timeout: float = 30) -> None:
        """C-ECHO a declared peer; raises :class:`OrthancError` if it does not answer."""
        self.post(f"/modalities/{urllib.parse.quote(modality)}/echo", {"Timeout": int(timeout)},
                  timeout=timeout + 10)

    def send(self, modality: str, sop_uids: Iterable[str], timeout: float = 60) -> dict[str, Any]:
        """C-STORE stored instances (by SOP Instance UID) to a declared peer, in one association.

        Synchronous: returns Orthanc's summary (``InstancesCount``,
        ``FailedInstancesCount``, ...) once the peer answered; raises
        :class:`OrthancError` if the association or a store fails.
        """
        ids = [self.instance_id(uid) for uid in sop_uids]
        return self.post(f"/modalities/{urllib.parse.quote(modality)}/store",
                         {"Resources": ids, "Synchronous": True, "Timeout": int(timeout)}, timeout=timeout + 10)


class StoreSCP:
    """dcmtk ``storescp`` as a receiving peer: ``with StoreSCP(tmp_path) as scp: ... scp.files()``.

    Accepts every storage SOP class and transfer syntax it knows (``+xa``)
    from any calling AE, on a free port unless ``port`` is given, and writes
    what it receives under ``workdir/received`` (file names: modality prefix
    and SOP Instance UID); its log is ``workdir/storescp.log``.  It answers
    each C-STORE only after writing the file, so a synchronous sender's
    success means the file is complete.
    """

    host = LOOPBACK

    def __init__(self, workdir: str | os.PathLike, *, aet: str = "STORESCP", port: int | None = None,
                 extra: Sequence[str] = (), startup_timeout: float = 30.0):
        self.workdir = Path(workdir)
        self.aet = aet
        self.port = port or 0
        self._fixed_port = port is not None
        self.extra = list(extra)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def received_dir(self) -> Path:
        return self.workdir / "received"

    @property
    def log_path(self) -> Path:
        return self.workdir / "storescp.log"

    def start(self, attempts: int = 3) -> "StoreSCP":
        skip_or_fail_without("storescp", "echoscu")
        self.received_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, attempts + 1):
            if not self._fixed_port:
                self.port = free_port()
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(
                    ["storescp", "-aet", self.aet, "-od", str(self.received_dir), "+xa", *self.extra, str(self.port)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    preexec_fn=_die_with_parent if sys.platform == "linux" else None)
            deadline, delay = time.monotonic() + self.startup_timeout, 0.02
            while self.proc.poll() is None:
                answered = echoscu(self.aet, self.host, self.port, timeout=5, check=False).returncode == 0
                if answered and self.proc.poll() is None:  # ours, not another listener on that port
                    return self
                if time.monotonic() > deadline:
                    self.stop()
                    raise PeerError(f"storescp did not answer C-ECHO on port {self.port} within "
                                    f"{self.startup_timeout:.0f} s\n{self.log_tail()}")
                time.sleep(delay)
                delay = min(delay * 1.5, 0.25)
            code, self.proc = self.proc.wait(), None
            if attempt == attempts or self._fixed_port:
                raise PeerError(f"storescp exited with status {code} while starting on port {self.port}\n"
                                f"{self.log_tail()}")
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 10.0) -> int | None:
        proc, self.proc = self.proc, None
        return _end(proc, timeout)

    def __enter__(self) -> "StoreSCP":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(storescp wrote no log)"
        text = self.log_path.read_text(errors="replace")
        return f"--- {self.log_path.name} (last {lines} lines) ---\n{_tail(text, lines)}"

    def files(self) -> list[Path]:
        """The files received so far."""
        return sorted(p for p in self.received_dir.rglob("*") if p.is_file())


def _two_free_ports() -> tuple[int, int]:
    with contextlib.ExitStack() as stack:  # both bound at once, so they differ
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(2)]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        first, second = (sock.getsockname()[1] for sock in socks)
    return first, second
