"""`heartbatch review`: a person works through the review queue in a local web page, or exports the
reviewed films as training labels (``--export``)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from ..errors import ExitCode, UsageError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "review", help="review flagged measurements in a local web page; export reviewed films as labels",
        description="Serve a local web page showing the review queue of a report (and any other measured row): "
                    "the film with its heart (red) and thorax (blue) boxes, the CTR with its uncertainty and why "
                    "it was flagged. Accept, correct by dragging box edges (the CTR follows), or reject with a "
                    "reason. Each decision is saved in the report's ledger at once and written to the report's "
                    "review columns and summaries. Loopback only unless --host says otherwise, and then only "
                    "with the access token printed at start. With --export, write the accepted and corrected "
                    "films as a box CSV that heartbatch-train reads, and exit.")
    p.add_argument("report", type=Path, metavar="REPORT", help="report CSV written by `heartbatch run`")
    p.add_argument("--port", type=int, default=8765, help="port to listen on (8765; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1); any non-loopback address requires the printed token")
    p.add_argument("--reviewer", help="name recorded with each decision (default: your login name)")
    p.add_argument("--state", type=Path, help="the report's state folder, if the run was given --state")
    p.add_argument("--export", type=Path, metavar="LABELS_CSV",
                   help="write the accepted and corrected films as training labels (path + heart and thorax "
                        "boxes in image pixels, the format of heartbatch-train --labels) and exit")
    p.set_defaults(func=cmd_review)


def _reviewer(name: str | None) -> str:
    if name:
        return name
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "reviewer"


def cmd_review(args) -> int:
    from ..review.decisions import ReviewStore

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: give a port from 1 to 65535 (0 picks a free one)")
    if args.export:
        with ReviewStore(args.report, args.state) as store:
            return _export(store, args.export)
    from importlib.util import find_spec

    if find_spec("bottle") is None:
        raise UsageError("heartbatch review needs the web extra: pip install 'heartbatch[review]'")
    with ReviewStore(args.report, args.state, shared=True) as store:
        return _serve(store, args.host, args.port, _reviewer(args.reviewer))


def _export(store, out: Path) -> int:
    from ..review.export import export_labels

    done = export_labels(store.items, out)
    for path, why in done.left_out:
        print(f"left out {path}: {why}", file=sys.stderr)
    print(f"{done.path}: {done.written} reviewed films (accepted and corrected)"
          + (f"; {len(done.left_out)} left out" if done.left_out else ""))
    return ExitCode.OK


def _serve(store, host: str, port: int, reviewer: str) -> int:
    from ..review.app import Access, build_app, make_server

    try:
        server = make_server(host, port, None)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                         f"give another --port (0 picks a free one) or --host") from None
    bound = server.server_address[1]
    access = Access.for_address(host, bound)
    server.set_app(build_app(store, access, reviewer))
    name = f"[{host}]" if ":" in host else host
    url = f"http://{name}:{bound}/" + (f"?token={access.token}" if access.token else "")
    left = len(store.queue())
    print(f"heartbatch review: {left} of {len(store.items)} measured rows to review in {store.files.report}",
          flush=True)
    if access.token:
        print("not a loopback address: the page needs this token (share it only with the reviewers)", flush=True)
    print(f"open {url}  (Ctrl-C to stop; every decision is saved as it is made)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return ExitCode.OK
