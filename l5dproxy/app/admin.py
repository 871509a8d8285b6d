"""The admin HTTP server: the operator's view of a running proxy.

``/`` lists every endpoint (``ENDPOINTS``). Served with twisted.web in the
reactor thread: rendering the registry is a few milliseconds, and staying
off a thread pool keeps the numbers consistent with the connection state
they describe. Every resource answers HEAD as GET without the body (with
its ``content-length``), as RFC 9110 section 9.3.2 asks.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from l5dproxy.telemetry import families_to_json

if TYPE_CHECKING:
    from l5dproxy.app.stats import Stats
    from l5dproxy.app.tap import TapHub
    from l5dproxy.detect.early import ServerFirst

PLAIN = "text/plain; charset=utf-8"
JSON = "application/json"

#: (path, methods, what it serves): the index at ``/`` and README's tour.
ENDPOINTS = (
    ("/dashboard", "GET", "live dashboard: listeners, services, endpoints, tap"),
    ("/stats.json", "GET", "the numbers the dashboard shows (JSON)"),
    ("/tap", "GET", "live requests, one JSON object a line (or SSE); filters service, "
                    "authority, path_prefix, method, status; limit, seconds, start=1"),
    ("/metrics", "GET", "Prometheus metrics (with --workers: the whole group on the admin"
                        " port; ?local for this process alone; ?format=json as JSON)"),
    ("/ready", "GET", "200 once every listener is bound, 503 while starting or stopping"),
    ("/live", "GET", "200 while the process runs"),
    ("/config.json", "GET", "the effective configuration (JSON)"),
    ("/version", "GET", "version of l5dproxy and of what it runs on (JSON)"),
    ("/log-level", "GET, PUT, POST", "the log level; PUT or POST a level to change it"),
    ("/opaque", "GET", "server-speaks-first destinations learned (JSON)"),
)

DASHBOARD_FILES = {
    b"": ("index.html", "text/html; charset=utf-8"),
    b"app.js": ("app.js", "text/javascript; charset=utf-8"),
    b"style.css": ("style.css", "text/css; charset=utf-8"),
}


class _Resource(Resource):
    isLeaf = True


class _AdminSite(Site):
    """The admin site: HEAD is answered as GET without its body (status,
    headers and ``content-length`` of the GET), for every resource that does
    not answer HEAD itself, so no HEAD is logged as a body eaten. No access
    log: scrapes every few seconds are not news."""

    displayTracebacks = False
    noisy = False

    def log(self, request) -> None:
        pass

    def getResourceFor(self, request):
        resource = super().getResourceFor(request)
        if (request.method == b"HEAD"
                and getattr(type(resource), "render_HEAD", None) is Resource.render_HEAD):
            return _HeadAsGet(resource)
        return resource


class _HeadAsGet:
    def __init__(self, resource: Resource) -> None:
        self.resource = resource

    def render(self, request) -> bytes | int:
        request.method = b"GET"
        try:
            body = self.resource.render(request)
        finally:
            request.method = b"HEAD"
        if isinstance(body, bytes):
            request.setHeader(b"content-length", str(len(body)).encode())
            return b""
        return body


class _Text(_Resource):
    def __init__(self, render: Callable[[], tuple[int, bytes, str]]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request) -> bytes:
        status, body, content_type = self._render()
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type.encode())
        return body


class _Gathered(_Resource):
    """A resource rendered from metric families: the whole worker group's
    (``gather`` fires with them, later) or, without ``gather`` or when the
    request has ``?local``, this process's (``local``). ``render`` gets the
    families and the query (``{name: [value, ...]}``)."""

    def __init__(self, gather: Callable[[], Deferred] | None,
                 render: Callable[[Any, dict[str, list[str]]], tuple[int, bytes, str]],
                 local: Callable[[], Any]) -> None:
        super().__init__()
        self.gather = gather
        self._render = render
        self.local = local

    def render_GET(self, request) -> bytes | int:
        # Not request.args: Twisted's parse_qs drops a name without "=".
        query = parse_qs(request.uri.partition(b"?")[2].decode("latin-1"),
                         keep_blank_values=True)
        if self.gather is None or "local" in query:
            return self._write(request, self._render(self.local(), query))
        finished: list[bool] = []
        request.notifyFinish().addBoth(finished.append)

        def done(families) -> None:
            if not finished:  # else the client has gone
                request.write(self._write(request, self._render(families, query)))
                request.finish()

        self.gather().addCallback(done)
        return NOT_DONE_YET

    @staticmethod
    def _write(request, rendered: tuple[int, bytes, str]) -> bytes:
        status, body, content_type = rendered
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"content-length", str(len(body)).encode())
        return body


class _Families:
    """Metric families as ``generate_latest`` takes them (``collect()``)."""

    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        return self.families


def _json(value: Any) -> bytes:
    return json.dumps(value, indent=1, ensure_ascii=False).encode() + b"\n"


class _Index(Resource):
    """``/``: every endpoint, as HTML (links) or, when asked for, JSON."""

    def __init__(self) -> None:
        super().__init__()

    def getChild(self, path: bytes, request):
        if path == b"":
            return self
        return Resource.getChild(self, path, request)

    def render_GET(self, request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        if "application/json" in accept and "text/html" not in accept:
            request.setHeader(b"content-type", JSON.encode())
            return _json([{"path": p, "methods": m, "description": d}
                          for p, m, d in ENDPOINTS])
        rows = "\n".join(
            f'<li><a href="{p}">{p}</a> <small>{html.escape(m)}</small>: '
            f"{html.escape(d)}</li>" for p, m, d in ENDPOINTS)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>l5dproxy admin"
                f"</title></head><body><h1>l5dproxy admin</h1>\n<ul>\n{rows}\n</ul>"
                f"</body></html>\n").encode()


class _LogLevel(_Resource):
    """``/log-level``: GET the level; PUT or POST one (the body, or
    ``?level=``) to change it at run time, as Linkerd's ``/proxy-log-level``."""

    def render_GET(self, request) -> bytes:
        from l5dproxy.app import logs
        request.setHeader(b"content-type", PLAIN.encode())
        return logs.level().encode() + b"\n"

    def render_PUT(self, request) -> bytes:
        from l5dproxy.app import logs
        wanted = (request.args.get(b"level") or [request.content.read(256)])[0]
        text = wanted.decode("utf-8", "replace").strip()
        request.setHeader(b"content-type", PLAIN.encode())
        try:
            logs.set_level(text)
        except ValueError as e:
            request.setResponseCode(400)
            return f"{e}\n".encode()
        return logs.level().encode() + b"\n"

    render_POST = render_PUT


class _Static(_Resource):
    """The dashboard's files, read once from the package data."""

    def __init__(self, files: dict[bytes, tuple[str, str]]) -> None:
        super().__init__()
        folder = resources.files("l5dproxy") / "data" / "dashboard"
        self.files = {name: ((folder / filename).read_bytes(), content_type)
                      for name, (filename, content_type) in files.items()}

    def render_GET(self, request) -> bytes:
        name = b"/".join(request.postpath)
        if name == b"" and not request.path.endswith(b"/"):
            # /dashboard -> /dashboard/, so the page's relative links resolve.
            request.redirect(request.path + b"/")
            return b""
        found = self.files.get(name)
        if found is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", PLAIN.encode())
            return b"not found\n"
        body, content_type = found
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-cache")
        return body


class _Tap(_Resource):
    def __init__(self, hub: TapHub) -> None:
        super().__init__()
        self.hub = hub

    def render_GET(self, request) -> bytes | int:
        from l5dproxy.app.tap import FILTERS, MAX_SECONDS, Filter, TapError, Watcher

        def arg(name: str) -> str | None:
            values = request.args.get(name.encode())
            return values[0].decode("utf-8", "replace") if values else None

        try:
            match = Filter(**{name: arg(name) for name in FILTERS})
            limit = _number(arg("limit"), "limit", int, 0, 10**9)
            seconds = _number(arg("seconds"), "seconds", float, 0.0, MAX_SECONDS)
        except TapError as e:
            return _plain(request, 400, str(e))
        if len(self.hub.watchers) >= self.hub.max_watchers:
            return _plain(request, 503, f"{len(self.hub.watchers)} tap watchers already:"
                                        " try again later")
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        watcher = Watcher(self.hub, request, match, limit, seconds,
                          sse="text/event-stream" in accept,
                          want_start=arg("start") in ("1", "true"))
        watcher.start()
        return NOT_DONE_YET

    def render_HEAD(self, request) -> bytes:
        request.setHeader(b"content-type", b"application/x-ndjson")
        return b""


class OpaqueResource(Resource):
    """``/opaque`` on the admin server: the learned destinations, as JSON."""

    isLeaf = True

    def __init__(self, server_first: ServerFirst) -> None:
        super().__init__()
        self.server_first = server_first

    def render_GET(self, request) -> bytes:
        sf = self.server_first
        memory = sf.memory
        body = {
            "client_silence_seconds": sf.client_silence,
            "ttl_seconds": memory.ttl,
            "max_entries": memory.max_entries,
            "learned": memory.entries(),
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, indent=1).encode() + b"\n"


def _plain(request, status: int, text: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", PLAIN.encode())
    return text.encode() + b"\n"


def _number(text: str | None, name: str, kind: type, low, high):
    from l5dproxy.app.tap import TapError

    if text is None:
        return None
    try:
        value = kind(text)
    except ValueError:
        raise TapError(f"{name}: expected a number, got {text!r}") from None
    if not low <= value <= high:
        raise TapError(f"{name}: expected {low} to {high}, got {text}")
    return value


def admin_site(registry: CollectorRegistry, is_ready: Callable[[], bool],
               extra: dict[bytes, Resource] | None = None, *,
               config_json: Callable[[], Any] | None = None,
               version: Callable[[], dict] | None = None,
               stats: Stats | None = None, tap: TapHub | None = None,
               gather: Callable[[], Deferred] | None = None) -> Site:
    """The admin site; ``extra`` adds resources (for example ``/opaque``).
    With ``gather`` (worker 0 of ``--workers N``: a Deferred of the group's
    metric families), ``/metrics`` and ``/stats.json`` show the whole group
    and ``?local`` this process alone. ``/metrics?format=json`` gives the
    same families as JSON (``telemetry.families_to_json``: the form worker 0
    gathers the others' in)."""

    def metrics(families, query: dict[str, list[str]]) -> tuple[int, bytes, str]:
        if query.get("format") == ["json"]:
            return 200, families_to_json(families), JSON
        return 200, generate_latest(_Families(families)), CONTENT_TYPE_PLAIN_0_0_4

    def ready() -> tuple[int, bytes, str]:
        return (200, b"ready\n", PLAIN) if is_ready() else (503, b"not ready\n", PLAIN)

    def live() -> tuple[int, bytes, str]:
        return 200, b"live\n", PLAIN

    root = _Index()
    root.putChild(b"metrics", _Gathered(gather, metrics, registry.collect))
    root.putChild(b"ready", _Text(ready))
    root.putChild(b"live", _Text(live))
    root.putChild(b"log-level", _LogLevel())
    root.putChild(b"version", _Text(lambda: (200, _json((version or version_info)()), JSON)))
    if config_json is not None:
        root.putChild(b"config.json", _Text(lambda: (200, _json(config_json()), JSON)))
    if stats is not None:
        root.putChild(b"stats.json", _Gathered(
            gather, lambda families, _: (200, _json(stats.snapshot(families)), JSON),
            registry.collect))
    if tap is not None:
        root.putChild(b"tap", _Tap(tap))
    root.putChild(b"dashboard", _Static(DASHBOARD_FILES))
    for name, resource in (extra or {}).items():
        root.putChild(name, resource)
    return _AdminSite(root)


def version_info() -> dict[str, str]:
    """``/version``: l5dproxy's version and those of what it runs on."""
    import platform
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    import l5dproxy

    info = {"version": l5dproxy.__version__, "python": platform.python_version()}
    for name in ("twisted", "h2", "prometheus-client", "httptools"):
        try:
            info[name] = dist_version(name)
        except PackageNotFoundError:  # pragma: no cover - all are dependencies
            info[name] = ""
    return info


def config_document(config) -> dict[str, Any]:
    """The effective config as JSON values: defaults filled in, durations
    in seconds, addresses as ``host:port``, sets sorted, file paths (keys,
    certificates) as the paths they are, never their contents; a key whose
    name says it holds a secret (password, token, secret) is shown as
    ``"<redacted>"``."""
    import dataclasses

    def convert(value: Any, key: str = "") -> Any:
        if any(word in key for word in ("password", "token", "secret")) and value:
            return "<redacted>"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = dataclasses.fields(value)
            if type(value).__name__ == "HostPort":
                return str(value)
            return {f.name: convert(getattr(value, f.name), f.name) for f in fields}
        if isinstance(value, dict):
            return {str(k): convert(v, str(k)) for k, v in value.items()}
        if isinstance(value, frozenset | set):
            return sorted(convert(v) for v in value)
        if isinstance(value, tuple | list):
            return [convert(v) for v in value]
        if isinstance(value, bytes):
            return value.decode("latin-1")
        return value

    return convert(config)
