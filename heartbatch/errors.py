"""Every error a user can meet, each with the exit status the command line gives it, and the
status a report row can have.

Problems with one file (`FileProblem`) become report rows; every other error here stops a
command with a message that says what to do, and `cli.main` maps it to ``exit_code`` in one place.
"""

from __future__ import annotations

from enum import Enum, IntEnum


class ExitCode(IntEnum):
    OK = 0              # every file got a row
    INTERNAL = 1        # a bug: heartbatch says so and points at --debug
    USAGE = 2           # bad arguments, an unusable state folder, a cluster that cannot be used
    MODEL = 3           # the model file was refused (or changed under a run)
    NOTHING = 4         # no file could be read
    INTERRUPTED = 130   # Ctrl-C


class Status(str, Enum):
    """A report row's status; compares equal to, and prints as, its text ("ok", ...)."""

    OK = "ok"
    SKIPPED = "skipped"
    ERROR = "error"

    # as its text in CSV cells, f-strings and dict keys (Enum would hash and print its name)
    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__


class HeartbatchError(Exception):
    """Base of every error that stops a command; ``exit_code`` is the command line's exit status."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str = "", exit_code: ExitCode | int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = ExitCode(exit_code)


class UsageError(HeartbatchError):
    """The command line names something that cannot be used (a missing input, a folder as --out)."""


class ContractError(HeartbatchError):
    """The model file does not satisfy the heartbatch ONNX contract."""

    exit_code = ExitCode.MODEL


class WorkerModelError(ContractError):
    """A worker process cannot use the client's model: missing, a different file, or refused."""


class LedgerError(HeartbatchError):
    """The state folder cannot be used with these settings; says what to do."""


class DistributedError(HeartbatchError):
    """The cluster cannot be used (bad address, no connection, Dask missing, model not found on a
    worker); says what to do."""


class LabelError(HeartbatchError, ValueError):
    """A label or box file cannot be used; says which and why."""


class SplitError(LabelError):
    """A persisted train/validation split does not fit the data it is used with."""


class FileProblem(Exception):
    """One file cannot be measured: it becomes a report row, not an exit. ``reason`` is for
    people; ``code`` (e.g. "not_dicom", "truncated") is for programs, so they never match reason
    texts; ``header`` is what was read before the problem, for the row."""

    status: Status = Status.ERROR

    def __init__(self, reason: str, header=None, *, code: str):
        super().__init__(reason)
        self.reason = reason
        self.code = code
        self.header = header


class Skipped(FileProblem):
    """The file is fine but is not a frontal chest radiograph we measure."""

    status = Status.SKIPPED


class ReadError(FileProblem):
    """The file should be measurable but could not be read or decoded."""


class FileTimeout(BaseException):
    """Reading one file took longer than --timeout. A BaseException, so no library's
    `except Exception` swallows the time limit."""
