"""Helpers shared by the test files: bounded waits, real chest DICOMs for end-to-end tests, the real
command in subprocesses (killed, group and all, in teardown) and checks of a report's rows.

Fixtures live in ``conftest.py``; DICOM writing in ``dicom_factory.py``, the DICOM peers in
``pacs.py``.  Test files import from here, never from one another.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pytest
from PIL import Image

from dicom_factory import write_dicom
from heartbatch.report.paths import ReportFiles
from heartbatch.report.schema import COLUMNS

REPO = Path(__file__).resolve().parents[1]

T = TypeVar("T")


# --- waiting ---------------------------------------------------------------------

def wait_until(condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05,
               message: str | Callable[[], str] = "the condition", *,
               proc: subprocess.Popen | None = None) -> T:
    """Call ``condition`` every ``interval`` seconds until it returns something truthy, and return
    that.  After ``timeout`` seconds the test fails, saying what it waited for (``message``; a
    callable is called then, for details known only at that moment).  With ``proc``, the test fails
    at once if that process exits first, with its exit status and the end of its output.  An
    exception raised by ``condition`` (an assertion on the way) ends the wait and goes to the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) while waiting for {_text(message)}"
                        f"{_output_tail(proc)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {_text(message)}{_output_tail(proc)}")
        time.sleep(interval)


def _text(message: str | Callable[[], str]) -> str:
    return message() if callable(message) else message


def _output_tail(proc: subprocess.Popen | None, chars: int = 3000) -> str:
    if proc is None or not hasattr(proc, "log"):
        return ""
    return f"\n--- its output (last {chars} characters) ---\n{output(proc)[-chars:]}"


# --- real chest DICOMs --------------------------------------------------------------

def thumbnail(png: Path, size: int = 128) -> np.ndarray:
    """A real chest X-ray, downsized so hundreds of files stay cheap to decode."""
    with Image.open(png) as im:
        return np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.uint8)


def write_chests(folder: Path, pngs: list[Path], count: int, start: int = 0, size: int = 128,
                 prefix: str = "cxr") -> list[Path]:
    """``count`` real frontal chest DICOMs (uncompressed), one study each."""
    paths = []
    for i in range(start, start + count):
        paths.append(write_dicom(folder / f"{prefix}_{i:04d}.dcm", thumbnail(pngs[i % len(pngs)], size),
                                 patient_id=f"HB-{i:04d}", accession=f"ACC{i:04d}"))
    return paths


# --- the real command in subprocesses --------------------------------------------------

def hb_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def hb(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "heartbatch", *(str(a) for a in args)]


class Processes:
    """Processes started by a test; each in its own session so that its whole
    group (decode workers, forkserver) can be killed in teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen] = []

    def start(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.{len(self.started)}.log", "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=hb_env(), cwd=REPO, start_new_session=True)
        log.close()
        proc.log = Path(log.name)  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def run(self, args: list[str], name: str, timeout: float = 120) -> tuple[int, str]:
        """Run to completion (bounded); returns (exit code, output)."""
        proc = self.start(args, name)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_group(proc)
            pytest.fail(f"{' '.join(args)} did not finish within {timeout} s:\n{output(proc)}")
        self.kill_group(proc)
        return proc.returncode, output(proc)

    @staticmethod
    def kill_group(proc: subprocess.Popen) -> None:
        """Kill the process, then whatever it left behind in its session (forkserver, decode
        workers, even in a process group of their own)."""
        if proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for pid in session_members(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def cleanup(self) -> None:
        for proc in self.started:
            self.kill_group(proc)


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session ``sid`` (Linux /proc; empty elsewhere)."""
    members = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getsid(int(entry)) != sid:
                continue
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != b"Z":
            members.append(int(entry))
    return members


def output(proc: subprocess.Popen) -> str:
    """What a process started by :class:`Processes` has written so far (stdout and stderr)."""
    return proc.log.read_text(errors="replace")  # type: ignore[attr-defined]


def quiet_json(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in the output:\n{text}"
    return json.loads(lines[-1])


# --- the report --------------------------------------------------------------------------

def body_lines(report: Path) -> list[str]:
    """Data lines as written (with their newline; a last line without one is partial)."""
    text = report.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    assert lines and lines[0] == ",".join(COLUMNS) + "\n", f"bad header in {report}: {lines[:1]}"
    return lines[1:]


def check_report(report: Path, expected_paths: set[str] | None = None) -> list[dict[str, str]]:
    """Every row complete, well formed and alone for its file; returns the rows."""
    lines = body_lines(report)
    for line in lines:
        assert line.endswith("\n"), f"partial line in {report}: {line!r}"
        fields = next(csv.reader(io.StringIO(line)))
        assert len(fields) == len(COLUMNS), f"row with {len(fields)} fields: {line!r}"
        assert fields[1] in ("ok", "skipped", "error"), line
    rows = [dict(zip(COLUMNS, next(csv.reader(io.StringIO(line))))) for line in lines]
    paths = [r["path"] for r in rows]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    assert not duplicates, f"files with more than one row: {duplicates}"
    if expected_paths is not None:
        missing, unexpected = sorted(expected_paths - set(paths)), sorted(set(paths) - expected_paths)
        assert not missing and not unexpected, f"missing: {missing[:5]}, unexpected: {unexpected[:5]}"
    return rows


def check_summary_agrees(report: Path) -> dict:
    rows = check_report(report)
    summary = json.loads(ReportFiles.of(report).summary_json.read_text())
    assert summary["files"]["total"] == len(rows)
    assert summary["files"]["by_status"] == {s: sum(r["status"] == s for r in rows)
                                             for s in ("ok", "skipped", "error")}
    assert summary["ctr"]["n"] == sum(r["status"] == "ok" and r["ctr"] != "" for r in rows)
    return summary


def count_complete_rows(report: Path) -> int:
    try:
        data = report.read_bytes()
    except FileNotFoundError:
        return 0
    return max(data.count(b"\n") - 1, 0)


# --- heartbatch review ---------------------------------------------------------------------

def review_studies(folder: Path, data_dir: Path, chests: int = 3, dark: int = 2) -> list[Path]:
    """Real chest films (measured, not flagged by the intensity test model) and nearly black films
    (their CTR falls below the review range, so they are flagged): a report with a review queue."""
    from dicom_factory import brightness_image, shared_png

    folder.mkdir(parents=True, exist_ok=True)
    paths = [write_dicom(folder / f"chest{i}.dcm", shared_png(data_dir, i), patient_id=f"HB-PATIENT-{i}")
             for i in range(chests)]
    paths += [write_dicom(folder / f"dark{i}.dcm", brightness_image(0.02, seed=i, rows=300, cols=260),
                          patient_id=f"HB-PATIENT-D{i}") for i in range(dark)]
    return paths


def start_review(procs: "Processes", report: Path, *args: str, name: str = "review") -> tuple[subprocess.Popen, str]:
    """`heartbatch review REPORT --port 0 ...` as a real subprocess; returns it and the address it printed."""
    import re

    proc = procs.start(hb("review", report, "--port", "0", *args), name)
    found = wait_until(lambda: re.search(r"open (http://\S+)", output(proc)), timeout=60,
                       message="the review server's address", proc=proc)
    return proc, found.group(1)
