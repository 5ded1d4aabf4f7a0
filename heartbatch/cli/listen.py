"""`heartbatch listen`: a DICOM Storage SCP whose instances go through the `watch` pipeline."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..argtypes import positive_int
from ..errors import UsageError
from .common import add_common, add_send_to, ae_title, send_destination, require, run_options, start


def add_parser(sub) -> None:
    p = sub.add_parser(
        "listen", help="receive chest films by DICOM C-STORE and measure each one (a Storage SCP)",
        description="A DICOM Storage SCP (C-STORE of CR, DX and secondary-capture images; C-ECHO). Each "
                    "instance is stored under <state>/received/ before it is acknowledged, then measured by "
                    "the `watch` pipeline into the same report and ledger: one row per instance, exactly once, "
                    "resumed after a restart. With --send-to, the DICOM results go back by C-STORE, retried "
                    "until the destination has them. Stop with Ctrl-C or SIGTERM.",
        epilog="Point the PACS at this machine's address, --port and --ae-title (a DICOM node or modality). "
               "Needs heartbatch[dicom].")
    p.add_argument("--port", type=int, default=11112, help="TCP port to listen on (11112; 0: any free port)")
    p.add_argument("--ae-title", default="HEARTBATCH", type=ae_title,
                   help="this node's AE title: callers must address it (HEARTBATCH)")
    p.add_argument("--host", default="0.0.0.0", help="address to bind (0.0.0.0: all; 127.0.0.1: this machine only)")
    p.add_argument("--allow", action="append", default=[], type=ae_title, metavar="AET",
                   help="accept associations only from this calling AE title (repeat for several; default: any)")
    p.add_argument("--max-associations", type=positive_int, default=8, help="associations served at once (8)")
    p.add_argument("--max-instance-mb", type=positive_int, default=1024,
                   help="refuse an instance larger than this many MiB (1024)")
    p.add_argument("--network-timeout", type=float, default=60.0,
                   help="seconds of silence before an association is dropped (60)")
    add_common(p)
    add_send_to(p)
    p.add_argument("--quiet", action="store_true", help="no per-instance lines")
    p.set_defaults(func=cmd_listen)


def cmd_listen(args) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    require("pynetdicom", "listen")
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port}: not a TCP port")
    destination = send_destination(args)
    model = start(args, console, ["."])
    from ..network.listen import ListenOptions, Listener

    listen = ListenOptions(port=args.port, ae_title=args.ae_title, host=args.host, allow=tuple(args.allow),
                           max_associations=args.max_associations,
                           max_instance_bytes=args.max_instance_mb << 20, timeout=args.network_timeout)

    def stored(path: Path, calling: str, duplicate: bool) -> None:
        if not args.quiet:
            console.print(f"{time.strftime('%H:%M:%S')} received {path.stem} from {calling}"
                          + (" (again: already stored)" if duplicate else ""), highlight=False)

    def measured(records) -> None:
        if not args.quiet:
            for r in records:
                what = f"CTR {r.ctr:.3f}" if r.ok and r.ctr is not None else f"{r.status}: {r.reason}"
                console.print(f"{time.strftime('%H:%M:%S')} {Path(r.path).stem}: {what}", highlight=False)

    listener = Listener(args.out, model, run_options(args), listen, args.state, destination,
                        on_records=measured, on_stored=stored)
    listener.start_server()
    if not args.quiet:
        console.print(f"listening as {args.ae_title} on {args.host}:{listener.port} -> {args.out} "
                      f"(model {model.info.model_id}"
                      + (f"; results to {destination}" if destination else "") + "; Ctrl-C to stop)", highlight=False)
    if args.quiet:
        print(json.dumps({"listening": {"ae_title": args.ae_title, "host": args.host, "port": listener.port},
                          "report": str(args.out)}), flush=True)
    code = listener.run()
    if not args.quiet:
        console.print(f"stopped; {listener.stored} instances stored ({listener.duplicates} sent again), "
                      f"{listener.watcher.processed} rows written this session"
                      + (f", {listener.sender.sent} results sent" if listener.sender else ""), highlight=False)
    return code

