"""The worker processes' start method, in a module light enough to import first.

Workers are forked from a forkserver (never from the main process, whose
onnxruntime threads would not survive a fork), which imports the decoders and
onnxruntime once for all of them.  Starting it before the main process checks
its model overlaps those imports with the main process's own.
"""

from __future__ import annotations

import multiprocessing

PRELOAD = ["heartbatch._forkserver", "heartbatch.workers", "onnxruntime"]
INLINE_MAX_FILES = 4  # this many files or fewer run in the main process: starting workers costs more


def context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def start_early() -> None:
    """Start the forkserver now; it imports while this process does other work."""
    from multiprocessing import forkserver

    context()
    forkserver.ensure_running()
