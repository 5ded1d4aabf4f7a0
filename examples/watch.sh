#!/usr/bin/env bash
# A watch setup: heartbatch measures every DICOM that lands in incoming/.
# Copy tools should write to a temporary name (*.part, *.tmp, hidden) and rename when done;
# plain slow copies are fine too: a file is read only once its size and mtime stay stable.
#
#   bash examples/watch.sh            # then, in another shell:
#   cp some.dcm incoming/             # a row appears in watch-report.csv within ~2 s
#
# Stop with Ctrl-C (or SIGTERM from systemd/supervisor): the batch in flight is finished and
# flushed; starting it again continues where it stopped (state in watch-report.csv.state/).
# On a network share where inotify sees nothing, add --polling.
set -euo pipefail
mkdir -p incoming
exec heartbatch watch incoming/ --out watch-report.csv "$@"
