"""The review web app (Bottle): the page, its JSON API, the films and the outlines of a model's
masks (a transparent layer over the film), served from one report.

Safe by default, because a film is patient data:

- rows are named by their index in the report, never by a path: the only files opened are those
  the report lists (the ledger's keys), and the page's assets are read once from the package;
- on a loopback address the Host header must name it (a DNS-rebinding page cannot talk to us);
  on any other address every request needs the access token printed at start (``?token=``, then
  a cookie that is ``HttpOnly`` and ``SameSite=Strict``);
- a state-changing request is a JSON POST carrying the page's per-server CSRF token, and is
  refused when the browser says it comes from another site (``Origin``, ``Sec-Fetch-Site``);
- the page shows the report's cells, never other DICOM header values: no patient identifiers
  unless the report has them (``--include-patient-id``).
"""

from __future__ import annotations

import functools
import hmac
import io
import ipaddress
import json
import secrets
import socket
import threading
from dataclasses import dataclass
from importlib import resources
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
from socketserver import ThreadingMixIn

import bottle

from ..report.schema import PATIENT_COLUMNS
from .decisions import Decision, Item, ReviewError, ReviewStore

FILM_SIDE = 1024        # longer side of the film sent to the browser, pixels (never above the original)
FILM_CACHE = 16         # films kept rendered
COOKIE = "heartbatch_review"
ASSETS = {"review.js": "text/javascript", "review.css": "text/css"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """Who may talk to the server: the Host names it answers to (loopback), the access token
    (any other address; None on loopback) and the CSRF token of its page."""
    port: int
    loopback: bool
    token: str | None
    csrf: str

    @classmethod
    def for_address(cls, host: str, port: int) -> "Access":
        loopback = is_loopback(host)
        return cls(port, loopback, None if loopback else secrets.token_urlsafe(24), secrets.token_urlsafe(32))

    def host_allowed(self, header: str) -> bool:
        if not self.loopback:
            return True  # the token guards it
        return header in {f"{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]")}


def _json(data, status: int = 200) -> bottle.HTTPResponse:
    return bottle.HTTPResponse(json.dumps(data), status, {"Content-Type": "application/json"})


def _refuse(status: int, why: str) -> bottle.HTTPResponse:
    return _json({"error": why}, status)


def _number(text: str) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def item_summary(item: Item) -> dict:
    """One line of the page's list."""
    return {"id": item.index, "name": item.row.get("path", "").rsplit("/", 1)[-1], "queue": item.in_queue,
            "flagged": item.row.get("review") == "true", "decision": item.review.status if item.review else None,
            "ctr": _number(item.row.get("ctr", ""))}


def item_detail(item: Item, include_patient_id: bool) -> dict:
    """What the page shows of a row: the report's cells (boxes in original-image pixels), the decision."""
    row = item.row
    review = item.review
    detail = {
        **item_summary(item), "path": row.get("path", ""), "view": row.get("view_position", ""),
        "study_date": row.get("study_date", ""), "modality": row.get("modality", ""),
        "rows": int(row.get("rows") or 0), "columns": int(row.get("columns") or 0),
        "heart": item.heart, "thorax": item.thorax, "uncertainty": _number(row.get("uncertainty", "")),
        "chest_score": _number(row.get("chest_score", "")), "review_reason": row.get("review_reason", ""),
        "enlarged": row.get("enlarged", ""), "film": f"/film/{item.index}.png",
        "outlines": f"/outlines/{item.index}.png" if item.has_masks else None,
        "review": None if review is None else {
            "status": review.status, "heart": review.heart, "thorax": review.thorax, "ctr": review.ctr,
            "note": review.note, "reviewer": review.reviewer, "reviewed_at": review.reviewed_at},
    }
    if include_patient_id:
        detail["patient"] = {name: row.get(name, "") for name in PATIENT_COLUMNS}
    return detail


def counts(store: ReviewStore) -> dict:
    decided = [item.review.status for item in store.items if item.review]
    return {"left": len(store.queue()), "rows": len(store.items), "decided": len(decided),
            **{status: decided.count(status) for status in ("accepted", "corrected", "rejected")}}


def render_film(path: str) -> bytes:
    """The film as a greyscale PNG through the runtime's pixel pipeline (modality LUT, VOI window,
    MONOCHROME1), the longer side at most :data:`FILM_SIDE`."""
    import numpy as np
    from PIL import Image

    from ..overlay import load_display

    _, _, image = load_display(path, FILM_SIDE)
    grey = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(grey, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def render_outlines(masks, rows: int, columns: int) -> bytes:
    """The outlines of a row's masks as a transparent PNG of the film's size in the page (that of
    :func:`render_film`, from the row's image size: the film is not read again), drawn by the
    code that draws them on `show`'s and the HTML report's images."""
    from ..overlay import outline_layer
    from ..pixels import fit

    buffer = io.BytesIO()
    outline_layer(masks, *fit(rows, columns, FILM_SIDE)).save(buffer, format="PNG")
    return buffer.getvalue()


def _asset(name: str) -> bytes:
    return resources.files("heartbatch.review").joinpath("static", name).read_bytes()


def build_app(store: ReviewStore, access: Access, reviewer: str) -> bottle.Bottle:
    """The WSGI app for ``store``; every store call is serialized by one lock."""
    app = bottle.Bottle()
    lock = threading.Lock()
    page = _asset("index.html").decode("utf-8").replace("{{csrf}}", access.csrf)
    assets = {name: _asset(name) for name in ASSETS}

    @functools.lru_cache(maxsize=FILM_CACHE)
    def film(index: int) -> bytes:
        return render_film(store.item(index).key)

    @functools.lru_cache(maxsize=FILM_CACHE)
    def outlines(index: int) -> bytes | None:
        with lock:
            item, masks = store.item(index), store.masks(index)
        rows, columns = int(item.row.get("rows") or 0), int(item.row.get("columns") or 0)
        return None if masks is None or not rows or not columns else render_outlines(masks, rows, columns)

    @app.hook("before_request")
    def guard():
        request = bottle.request
        if not access.host_allowed(request.get_header("Host", "")):
            raise _refuse(421, "this server answers on its loopback address only")
        if access.token is not None:
            given = request.query.get("token") or request.get_cookie(COOKIE) or ""
            if not hmac.compare_digest(given.encode(), access.token.encode()):
                raise _refuse(403, "open the address with the token that `heartbatch review` printed")
        if request.method not in ("GET", "HEAD", "POST"):
            raise _refuse(405, "only GET and POST")
        if request.method == "POST":
            site = request.get_header("Sec-Fetch-Site", "same-origin")
            origin = request.get_header("Origin")
            if site not in ("same-origin", "none") or (origin and origin != f"http://{request.get_header('Host')}"):
                raise _refuse(403, "cross-site request refused")
            if not hmac.compare_digest(request.get_header("X-CSRF-Token", "").encode(), access.csrf.encode()):
                raise _refuse(403, "missing or wrong CSRF token: reload the page")
            if not request.content_type.startswith("application/json"):
                raise _refuse(415, "send JSON")

    @app.hook("after_request")
    def headers():
        response = bottle.response
        response.set_header("Content-Security-Policy", CSP)
        response.set_header("X-Content-Type-Options", "nosniff")
        response.set_header("Referrer-Policy", "no-referrer")
        response.set_header("X-Frame-Options", "DENY")
        response.set_header("Cache-Control", "no-store")

    @app.get("/")
    def index():
        if access.token is not None and bottle.request.query.get("token"):
            bottle.response.set_cookie(COOKIE, access.token, httponly=True, samesite="strict", path="/")
        bottle.response.content_type = "text/html; charset=utf-8"
        return page

    @app.get("/favicon.ico")
    def favicon():
        return bottle.HTTPResponse(status=204)  # browsers ask; an answer keeps their console clean

    @app.get("/static/<name>")
    def static(name: str):
        if name not in assets:  # a fixed set, read at start: no path from the request is opened
            raise _refuse(404, "no such asset")
        return bottle.HTTPResponse(assets[name], 200, {"Content-Type": ASSETS[name] + "; charset=utf-8"})

    @app.get("/api/state")
    def state():
        with lock:
            return _json({"reviewer": reviewer, "counts": counts(store),
                          "items": [item_summary(i) for i in store.items]})

    @app.get("/api/items/<index:int>")
    def detail(index: int):
        with lock:
            try:
                return _json(item_detail(store.item(index), store.include_patient_id))
            except ReviewError as exc:
                return _refuse(404, str(exc))

    @app.get("/film/<index:int>.png")
    def film_png(index: int):
        try:
            with lock:
                store.item(index)
            data = film(index)
        except ReviewError as exc:
            return _refuse(404, str(exc))
        except Exception as exc:  # noqa: BLE001 - a film that cannot be read now (moved, changed)
            return _refuse(404, f"cannot read the film now: {getattr(exc, 'reason', None) or type(exc).__name__}")
        return bottle.HTTPResponse(data, 200, {"Content-Type": "image/png"})

    @app.get("/outlines/<index:int>.png")
    def outlines_png(index: int):
        try:
            data = outlines(index)
        except ReviewError as exc:
            return _refuse(404, str(exc))
        except ValueError as exc:  # masks the ledger cannot give back
            return _refuse(404, f"cannot draw the outlines: {exc}")
        if data is None:
            return _refuse(404, "this row has no masks: the model that measured it has none")
        return bottle.HTTPResponse(data, 200, {"Content-Type": "image/png"})

    @app.post("/api/items/<index:int>/decision")
    def decide(index: int):
        try:
            body = json.loads(bottle.request.body.read() or b"{}")
            decision = Decision(str(body.get("status", "")), body.get("heart"), body.get("thorax"),
                                str(body.get("note") or ""))
        except (ValueError, AttributeError):
            return _refuse(400, "the decision must be a JSON object with 'status'")
        with lock:
            try:
                item = store.decide(index, decision, reviewer)
            except ReviewError as exc:
                return _refuse(400, str(exc))
            return _json({"item": item_detail(item, store.include_patient_id), "counts": counts(store)})

    return app


class _Handler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass  # no access log on the terminal: request lines name rows, and the terminal is not an audit log


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(host: str, port: int, app) -> WSGIServer:
    """Bind now (so that the address printed is the one listening; ``port`` 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("Server", (_Server,), {"address_family": family})
    server = server_class((host, port), _Handler)
    server.set_app(app)
    return server
