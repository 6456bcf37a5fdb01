"""`dicom-watcher web`: the read-only status page and `/metrics`.

A process of its own that reads what the daemon publishes
(`state/status.json`, rewritten every 2 s) and nothing else: a request can
never stall or crash placement, and a daemon that stopped publishing shows
as stale. Pages:

- `/`: destinations and their states, pending and parked studies, recent
  placements, quarantine and unmatched files, hook jobs;
- `/lab/<lab>`: what one lab sees (its studies, placements and jobs);
- `/metrics`: Prometheus text format (`watcher.metrics`).

Patient IDs, and the destination folders that contain them, are shown only
with `web_show_patients: true`. Every value is HTML-escaped: header values
come from the scanners and rule names from the labs.
"""

from __future__ import annotations

import contextlib
import html
import ipaddress
import json
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from watcher import metrics
from watcher.config import Config
from watcher.logs import kv
from watcher.rules import NAME_PATTERN
from watcher.stopping import StopRequest

log = logging.getLogger(__name__)

#: The daemon publishes its status every 2 s: older than this, it is stale.
STALE_SECONDS = 10.0
#: The page reloads itself this often.
REFRESH_SECONDS = 5
#: Longest request target answered (a longer one gets 414).
MAX_TARGET = 2048
#: A client has this long for each read of its request, and this long in all
#: for its request and the answer (then its connection is cut).
REQUEST_TIMEOUT = 10.0
REQUEST_DEADLINE = 30.0
#: Connections served at once; more are closed at once, so that slow
#: clients can hold neither all threads nor all file descriptors.
MAX_CONNECTIONS = 32
RECENT_ON_OVERVIEW = 30

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left;font-size:.9em}
th{background:#f3f3f3}.num{text-align:right}
.banner{padding:.6em 1em;margin:.5em 0;border-radius:4px}
.ok{background:#e6f4e6}.stale{background:#fde2e2;font-weight:bold}
.state-healthy{color:#176017}.state-unavailable,.state-hung,.parked{color:#a00;font-weight:bold}
.empty{color:#777}
"""


class StatusSource:
    """The daemon's published status, read afresh for each request."""

    def __init__(self, state: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = state / "status.json"
        self.clock = clock

    def read(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None


class StatusServer(ThreadingHTTPServer):
    daemon_threads = True
    #: Requests waiting to be accepted; more are refused by the kernel.
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], config: Config, source: StatusSource) -> None:
        self.config = config
        self.source = source
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.listen_host = address[0]
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # busy: refused, not queued
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        def cut() -> None:
            with contextlib.suppress(OSError):
                request.shutdown(socket.SHUT_RDWR)

        deadline = threading.Timer(REQUEST_DEADLINE, cut)
        deadline.daemon = True
        deadline.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            deadline.cancel()
            self.slots.release()

    def allowed_host(self, header: str | None) -> bool:
        """A Host an honest client sends: an address, localhost, or the
        listening name. Any other name may be DNS rebinding: a page of some
        site whose name now points at this machine, reading the status."""
        if header is None:
            return True  # (HTTP/1.0)
        host = header.rsplit(":", 1)[0] if not header.endswith("]") else header
        host = host.strip("[]").lower()
        if host in ("localhost", self.listen_host.lower()):
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True


class Handler(BaseHTTPRequestHandler):
    server: StatusServer
    timeout = REQUEST_TIMEOUT
    server_version = "dicom-watcher-web"
    sys_version = ""
    #: A request without a version still gets a status line and headers.
    default_request_version = "HTTP/1.0"

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own refusals, as the client's errors they are: an
        unknown method (501 there) is 405, an unknown HTTP version (505) 400."""
        if code == HTTPStatus.NOT_IMPLEMENTED:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, "read-only: GET or HEAD"
        elif code == HTTPStatus.HTTP_VERSION_NOT_SUPPORTED:
            code = HTTPStatus.BAD_REQUEST
        super().send_error(code, message, explain)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _refuse_method(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, "text/plain", b"read-only: GET or HEAD\n")

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

    def _answer(self, body: bool) -> None:
        self._body = body
        self._answered = False
        try:
            if len(self.path) > MAX_TARGET:
                self._send(HTTPStatus.REQUEST_URI_TOO_LONG, "text/plain", b"request too long\n")
                return
            if not self.server.allowed_host(self.headers.get("Host")):
                self._send(HTTPStatus.MISDIRECTED_REQUEST, "text/plain", b"unknown host name\n")
                return
            path = unquote(urlsplit(self.path).path)
            if path == "/metrics":
                self._metrics()
            elif path == "/":
                self._page(None)
            elif path.startswith("/lab/") and NAME_PATTERN.fullmatch(path[5:]):
                self._page(path[5:])
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client left, or took too long
        except Exception:  # noqa: BLE001 - one bad request never ends the server
            log.exception(kv("web_error", path=self.path[:200]))
            if not self._answered:
                try:
                    self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", b"internal error\n")
                except OSError:
                    self.close_connection = True

    def _metrics(self) -> None:
        status = self.server.source.read()
        if status is None:
            self._send(HTTPStatus.SERVICE_UNAVAILABLE, "text/plain", b"no status published yet\n")
            return
        text = metrics.render(status, self.server.source.clock())
        self._send(HTTPStatus.OK, "text/plain; version=0.0.4; charset=utf-8", text)

    def _page(self, lab: str | None) -> None:
        status = self.server.source.read()
        now = self.server.source.clock()
        if lab is not None and (
            status is None or lab not in known_labs(status, self.server.config)
        ):
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no such lab\n")
            return
        page = render_page(status, now, self.server.config.web_show_patients, lab)
        self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.encode())

    def _send(self, code: HTTPStatus, kind: str, data: bytes) -> None:
        self._answered = True
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'")
        self.end_headers()
        if getattr(self, "_body", True) and self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's
        log.debug(kv("web_request", client=self.client_address[0], request=format % args))


def known_labs(status: Mapping[str, Any], config: Config) -> set[str]:
    """Labs with a page: the config's, and every lab the status names."""
    labs = set(config.labs or {})
    labs |= set(status.get("labs") or {})
    labs |= set((status.get("hooks") or {}).get("labs") or {})
    for study in status.get("studies") or []:
        labs |= set(study.get("labs") or [])
    return labs


def serve(config: Config, listen: tuple[str, int], stop: StopRequest) -> int:
    server = StatusServer(listen, config, StatusSource(config.state))
    host, port = server.server_address[:2]
    log.info(kv("web_listening", url=f"http://{_host(str(host))}:{port}/", state=config.state))
    thread = threading.Thread(target=server.serve_forever, name="web", daemon=True)
    thread.start()
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
    log.info(kv("web_stopped"))
    return 0


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# -- the page -----------------------------------------------------------------


def render_page(
    status: Mapping[str, Any] | None, now: float, show_patients: bool, lab: str | None
) -> str:
    title = "dicom-watcher" + (f": lab {lab}" if lab else "")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta http-equiv='refresh' content='{REFRESH_SECONDS}'>",
        f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
    ]
    if status is None:
        parts.append(
            "<p class='banner stale' id='daemon' data-state='absent'>The daemon has not "
            "published a status yet (no readable state/status.json).</p></body></html>"
        )
        return "".join(parts)
    age = now - float(status.get("updated", 0))
    if age > STALE_SECONDS:
        parts.append(
            f"<p class='banner stale' id='daemon' data-state='stale'>STALE: the daemon last "
            f"published its status {age:,.0f} s ago (pid {esc(status.get('pid'))}); it may be "
            "stopped or stuck. What follows is as of then.</p>"
        )
    else:
        parts.append(
            f"<p class='banner ok' id='daemon' data-state='running'>The daemon is running "
            f"(pid {esc(status.get('pid'))}, updated {age:.0f} s ago; this page reloads every "
            f"{REFRESH_SECONDS} s).</p>"
        )
    if lab is None:
        parts += _overview(status, now, show_patients)
    else:
        parts += _lab_page(status, now, show_patients, lab)
    parts.append("</body></html>")
    return "".join(parts)


def _overview(status: Mapping[str, Any], now: float, show_patients: bool) -> list[str]:
    studies = status.get("studies") or []
    labs = status.get("labs") or {}
    parts = [
        "<p id='summary'>",
        f"Files arriving: <b>{esc(status.get('files_arriving', 0))}</b> &middot; pending studies: "
        f"<b>{len(studies)}</b> &middot; parked: "
        f"<b>{sum(1 for s in studies if s.get('parked_since') is not None)}</b> &middot; "
        f"placed since start: <b>{esc(status.get('placed_studies', 0))}</b> studies, "
        f"<b>{esc(status.get('placed_files', 0))}</b> files",
        "</p>",
        "<h2>Destinations</h2>",
        _table(
            "destinations",
            ("destination", "state", "since", "reason"),
            (
                (
                    d["destination"],
                    _cell(d["state"], f"state-{d['state']}"),
                    _ago(now, d.get("since")),
                    d.get("reason") or "",
                )
                for d in status.get("destinations") or []
            ),
        ),
        "<h2>Pending studies</h2>",
        _studies_table(studies, now, show_patients),
        "<h2>Recent placements</h2>",
        _placements_table(
            sorted(
                ((name, r) for name, counts in labs.items() for r in counts.get("recent", [])),
                key=lambda item: -float(item[1].get("time", 0)),
            )[:RECENT_ON_OVERVIEW],
            now,
            show_patients,
        ),
        "<h2>Labs</h2>",
        _table(
            "labs",
            ("lab", "studies placed", "files", "bytes"),
            (
                (
                    _link(f"/lab/{name}", name),
                    _num(c.get("studies", 0)),
                    _num(c.get("files", 0)),
                    _num(c.get("bytes", 0)),
                )
                for name, c in sorted(labs.items())
            ),
        ),
        "<h2>Quarantine and unmatched</h2>",
        f"<p id='quarantine'>In quarantine: <b>{esc(status.get('quarantine_files', 0))}</b> file(s)"
        f"; not quarantined yet (kept in the inbox): "
        f"<b>{len(status.get('quarantine_failed') or [])}</b>; unmatched (no rule): "
        f"<b>{esc(status.get('unmatched_files', 0))}</b></p>",
        _table(
            "quarantine-reasons",
            ("reason", "files"),
            ((reason, _num(n)) for reason, n in (status.get("quarantine_reasons") or {}).items()),
        ),
        "<h2>Hook jobs</h2>",
        _hooks_table(status, None),
    ]
    return parts


def _lab_page(status: Mapping[str, Any], now: float, show_patients: bool, lab: str) -> list[str]:
    counts = (status.get("labs") or {}).get(lab) or {}
    studies = [s for s in status.get("studies") or [] if lab in (s.get("labs") or [])]
    return [
        "<p><a href='/'>all labs</a></p>",
        f"<p id='summary'>Placed for this lab since the daemon started: "
        f"<b>{esc(counts.get('studies', 0))}</b> studies, <b>{esc(counts.get('files', 0))}</b> "
        f"files; pending now: <b>{len(studies)}</b></p>",
        "<h2>Pending studies</h2>",
        _studies_table(studies, now, show_patients),
        "<h2>Recent placements</h2>",
        _placements_table([(lab, r) for r in counts.get("recent", [])], now, show_patients),
        "<h2>Hook jobs</h2>",
        _hooks_table(status, lab),
    ]


def _studies_table(studies: list[Mapping[str, Any]], now: float, show_patients: bool) -> str:
    heads = ("study", *(("patient",) if show_patients else ()), "labs", "files", "age", "state")
    rows = []
    for study in studies:
        parked = study.get("parked_since") is not None
        state = study.get("next", "")
        if parked and study.get("last_error"):
            # An error names the file or folder it is about, which may be a
            # patient's: shown only where patient IDs are.
            error = study["last_error"] if show_patients else "(see dicom-watcher status)"
            state = f"{state}; last error: {error} (attempts {study.get('attempts')})"
        rows.append(
            (
                study["study"],
                *((study.get("patient", ""),) if show_patients else ()),
                ", ".join(study.get("labs") or []),
                _num(study.get("files", 0)),
                _duration(float(study.get("age_seconds", 0))),
                _cell(("PARKED: " if parked else "") + state, "parked" if parked else ""),
            )
        )
    return _table("pending", heads, rows)


def _placements_table(
    placements: list[tuple[str, Mapping[str, Any]]], now: float, show_patients: bool
) -> str:
    heads = (
        "placed",
        "lab",
        "rule",
        "study",
        *(("patient", "folder") if show_patients else ()),
        "files",
        "new",
        "seconds",
    )
    rows = (
        (
            _ago(now, r.get("time")),
            lab,
            r.get("rule", ""),
            r.get("study", ""),
            *((r.get("patient", ""), r.get("destination", "")) if show_patients else ()),
            _num(r.get("files", 0)),
            _num(r.get("new", 0)),
            _num(r.get("seconds", 0)),
        )
        for lab, r in placements
    )
    return _table("placed", heads, rows)


def _hooks_table(status: Mapping[str, Any], lab: str | None) -> str:
    hooks = status.get("hooks") or {}
    rows = []
    operator = hooks.get("operator") or {}
    if lab is None:
        rows.append(
            (
                "(operator's, in the daemon)",
                _num(operator.get("waiting", 0)),
                _num(operator.get("running", 0)),
                "",
                _num(operator.get("failed", 0)),
                "",
            )
        )
    for name, jobs in sorted((hooks.get("labs") or {}).items()):
        if lab is not None and name != lab:
            continue
        rows.append(
            (
                name,
                _num(jobs.get("waiting", 0)),
                _num(jobs.get("running", 0)),
                _num(jobs.get("retrying", 0)),
                _num(jobs.get("failed", 0)),
                jobs.get("runner", "") + (f" ({jobs['problem']})" if jobs.get("problem") else ""),
            )
        )
    return _table("hooks", ("jobs of", "waiting", "running", "retrying", "failed", "runner"), rows)


class _Html(str):
    """Markup made here, not escaped again."""


def esc(value: object) -> str:
    return value if isinstance(value, _Html) else html.escape(str(value), quote=True)


def _cell(text: object, css: str) -> _Html:
    return _Html(f"<span class='{esc(css)}'>{esc(text)}</span>")


def _num(value: object) -> _Html:
    number = float(value) if isinstance(value, int | float) else 0.0
    if not math.isfinite(number):
        return _Html("<span class='num'>?</span>")
    shown = f"{number:,.0f}" if number == int(number) else f"{number:,.2f}"
    return _Html(f"<span class='num'>{shown}</span>")


def _link(href: str, text: str) -> _Html:
    return _Html(f"<a href='{esc(href)}'>{esc(text)}</a>")


def _table(name: str, heads: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    body = "".join("<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    if not body:
        return f"<p class='empty' id='{name}'>none</p>"
    head = "".join(f"<th>{esc(h)}</th>" for h in heads)
    return f"<table id='{name}'><tr>{head}</tr>{body}</table>"


def _ago(now: float, when: object) -> str:
    if not isinstance(when, int | float):
        return ""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    return f"{stamp} ({_duration(now - when)} ago)"


def _duration(seconds: float) -> str:
    seconds = max(seconds, 0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
