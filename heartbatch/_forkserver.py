"""Imported only in the forkserver process that starts the decode workers.

Ctrl-C (SIGINT) and `kill -TERM -PGID` go to the whole foreground process group:
the workers are moved to a process group of their own and ignore SIGINT, so
only the main process sees a stop request; it finishes the batch in flight and
shuts the pool down itself.

When the main process ends, the forkserver (which holds the run's stdout and
stderr) exits at once instead of tearing down onnxruntime, numpy and pydicom
module by module: that took ~0.1 s, during which a pipe reading heartbatch's
output stayed open.  It has nothing to flush; its workers are gone by then.
"""

import atexit
import os
import signal

os.setpgrp()
signal.signal(signal.SIGINT, signal.SIG_IGN)
atexit.register(os._exit, 0)  # registered last, so it runs first
