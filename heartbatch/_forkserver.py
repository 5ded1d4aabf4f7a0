"""Imported only in the forkserver process that starts the decode workers.

Ctrl-C (SIGINT) and `kill -TERM -PGID` go to the whole foreground process group:
the workers are moved to a process group of their own and ignore SIGINT, so
only the main process sees a stop request; it finishes the batch in flight and
shuts the pool down itself.
"""

import os
import signal

os.setpgrp()
signal.signal(signal.SIGINT, signal.SIG_IGN)
