"""The `heartbatch` command line: the parser of every command, and the one place that maps what a
command raised to an exit status.  Heavy imports happen inside commands, so `--help` and
`--version` answer instantly."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import ExitCode, HeartbatchError
from . import evaluate, info, listen, report, review, run, show, watch
from .common import close_debug_log, explain, setup_debug_log

COMMANDS = (run, watch, listen, report, review, show, info, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heartbatch",
        description="Heart and thorax boxes and cardiothoracic ratio on every frontal chest X-ray "
                    "in a DICOM archive.")
    parser.add_argument("--version", action="version", version=f"heartbatch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, run the command, and map what it raised to an exit status (ExitCode), here only."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return ExitCode.USAGE
    setup_debug_log(args)
    try:
        return args.func(args)
    except HeartbatchError as exc:
        explain(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a bug must not dump a traceback on a user
        import logging

        logging.getLogger("heartbatch").debug("internal error", exc_info=True)
        print(f"heartbatch: internal error: {type(exc).__name__}: {exc}"
              + ("" if getattr(args, "debug", False) else " (run with --debug for the full trace)"),
              file=sys.stderr)
        return ExitCode.INTERNAL
    finally:
        close_debug_log()
