"""`heartbatch watch`: the pipeline on files as they arrive in folders."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import Status, UsageError
from .common import add_common, add_send_to, send_destination, run_options, start


def add_parser(sub) -> None:
    p = sub.add_parser(
        "watch", help="run the pipeline on files as they arrive in DIR(s)",
        description="Process files already in DIR(s), then each new or changed file once it is complete "
                    "(size and mtime stable). Rows go to the same report and ledger as `heartbatch run`; "
                    "summaries are refreshed after each batch. Stop with Ctrl-C or SIGTERM: the batch in "
                    "flight is finished and flushed; a restart continues where it stopped.")
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="folders to watch (recursively)")
    add_common(p)
    p.add_argument("--polling", action="store_true",
                   help="poll the folders instead of inotify (network shares, some container mounts)")
    p.add_argument("--settle", type=float, default=1.0,
                   help="seconds a file must stay unchanged before it is read (1.0)")
    p.add_argument("--incomplete-grace", type=float, default=30.0,
                   help="a file modified this recently that fails to parse is re-checked, not reported (30)")
    add_send_to(p)
    p.add_argument("--quiet", action="store_true", help="no per-batch lines")
    p.set_defaults(func=cmd_watch)


def cmd_watch(args) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    missing = [str(d) for d in args.dirs if not d.is_dir()]
    if missing:
        raise UsageError(f"not a folder: {', '.join(missing)}")
    model = start(args, console, args.dirs)
    from ..watch import WatchOptions, Watcher

    options = run_options(args)
    wopts = WatchOptions(settle=args.settle, incomplete_grace=args.incomplete_grace, polling=args.polling)

    def report(records):
        if not args.quiet:
            counts = {s: sum(r.status == s for r in records) for s in Status}
            console.print(f"{time.strftime('%H:%M:%S')} wrote {len(records)} rows ("
                          + ", ".join(f"{k} {v}" for k, v in counts.items() if v) + ")", highlight=False)

    def caught_up(present: int) -> None:
        if not args.quiet:
            console.print(f"{time.strftime('%H:%M:%S')} caught up ({present} files present at start); "
                          "waiting for new files", highlight=False)

    destination = send_destination(args)
    if destination is not None and options.dicom_out is None:
        raise UsageError("watch --send-to needs --dicom-out DIR (where the results are written before they are sent)")
    watcher = Watcher(args.dirs, args.out, model, options, wopts, args.state, on_records=report,
                      on_caught_up=caught_up, send_to=str(destination) if destination else None)
    sender = None
    if destination is not None:
        from ..network.send import Sender

        sender = Sender(watcher.session.files.state_dir, destination).start()
        watcher.on_records = lambda records: (report(records), sender.wake())
    if not args.quiet:
        console.print(f"watching {', '.join(map(str, args.dirs))} -> {args.out} "
                      f"(model {model.info.model_id}; Ctrl-C to stop)", highlight=False)
    try:
        code = watcher.run()
    finally:
        if sender is not None:
            sender.stop()
    if not args.quiet:
        console.print(f"stopped; {watcher.processed} rows written this session")
    return code

