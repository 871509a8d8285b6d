"""``/tap``: live HTTP requests, one JSON event each, as Linkerd's ``viz tap``.

The HTTP proxy publishes one event when a response ends (or the proxy
answers an error itself) and, for watchers that asked with ``start=1``, one
when a request head arrives. Nobody watching costs one attribute check per
request (``HttpProxy.tap`` and ``HttpProxy.tap_start`` are None).

Each watcher is a streaming producer on its admin response with a bounded
queue: while the watcher's connection cannot take more (its reader is slow),
up to ``QUEUE_MAX`` events wait; past that they are dropped and counted, and
the stream says so (``{"type": "dropped", "dropped": N, "dropped_total": M}``)
once it flows again. So a slow watcher loses events but never grows the
proxy's memory, and never slows the proxied traffic.

Query parameters: ``service``, ``authority``, ``path_prefix``, ``method``
(exact), ``status`` (``503`` or a class, ``5xx``) filter; ``limit`` (events)
and ``seconds`` end the stream; ``start=1`` adds request-start events.
``Accept: text/event-stream`` gets Server-Sent Events instead of
newline-delimited JSON.

Event fields: ``type`` (``start`` or ``end``), ``time`` (Unix seconds),
``method``, ``authority``, ``path``, ``listener``, ``service``, ``endpoint``
(``""`` when none was picked), ``protocol`` (what the client spoke),
``client`` (its address), and for ``end``: ``status``, ``grpc_status``
(``""`` unless gRPC), ``latency_ms`` (request head to response end),
``request_bytes``, ``response_bytes`` (bodies), ``error`` (``""`` or the
proxy's reason).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()

#: Events one watcher may have waiting while its connection is full.
QUEUE_MAX = 256
#: Watchers at once; more are answered 503.
MAX_WATCHERS = 16
#: Longest ``seconds`` and largest ``limit`` a watcher may ask for.
MAX_SECONDS = 3600.0
FILTERS = ("service", "authority", "path_prefix", "method", "status")


class TapError(ValueError):
    """A tap request that cannot be served (bad parameter): 400 with the reason."""


class Filter:
    """What a watcher wants to see: every given field must match."""

    __slots__ = ("authority", "method", "path_prefix", "service", "status_class",
                 "status_exact")

    def __init__(self, service: str | None = None, authority: str | None = None,
                 path_prefix: str | None = None, method: str | None = None,
                 status: str | None = None) -> None:
        self.service = service
        self.authority = authority.lower() if authority else None
        self.path_prefix = path_prefix
        self.method = method.upper() if method else None
        self.status_exact: int | None = None
        self.status_class: int | None = None
        if status:
            if len(status) == 3 and status[0] in "12345" and status[1:].lower() == "xx":
                self.status_class = int(status[0])
            elif status.isdigit() and 100 <= int(status) <= 599:
                self.status_exact = int(status)
            else:
                raise TapError(f"status: expected a status code (503) or class (5xx), "
                               f"got {status!r}")

    def matches(self, event: dict[str, Any]) -> bool:
        if self.service is not None and event["service"] != self.service:
            return False
        if self.authority is not None and event["authority"].lower() != self.authority:
            return False
        if self.path_prefix is not None and not event["path"].startswith(self.path_prefix):
            return False
        if self.method is not None and event["method"] != self.method:
            return False
        if self.status_exact is not None or self.status_class is not None:
            status = event.get("status")
            if status is None:
                return False
            if self.status_exact is not None and status != self.status_exact:
                return False
            if self.status_class is not None and status // 100 != self.status_class:
                return False
        return True


def _text(value: bytes) -> str:
    return value.decode("latin-1")


class TapHub:
    """The watchers of one proxy; sets the proxy's ``tap``/``tap_start``
    hooks while anyone watches, and clears them when the last one leaves."""

    def __init__(self, proxy, reactor, queue_max: int = QUEUE_MAX,
                 max_watchers: int = MAX_WATCHERS) -> None:
        self.proxy = proxy
        self.reactor = reactor
        self.queue_max = queue_max
        self.max_watchers = max_watchers
        self.watchers: list[Watcher] = []
        proxy.tap = None
        proxy.tap_start = None

    # -- watchers --

    def add(self, watcher: Watcher) -> None:
        if len(self.watchers) >= self.max_watchers:
            raise TapError(f"{self.max_watchers} tap watchers already")
        self.watchers.append(watcher)
        self._hook()

    def remove(self, watcher: Watcher) -> None:
        if watcher in self.watchers:
            self.watchers.remove(watcher)
            self._hook()

    def _hook(self) -> None:
        self.proxy.tap = self if self.watchers else None
        self.proxy.tap_start = self if any(w.want_start for w in self.watchers) else None

    # -- events (called by l5dproxy.route.dispatcher) --

    def _base(self, exchange, kind: str) -> dict[str, Any]:
        head = exchange.request.head
        context = exchange.context
        endpoint = exchange.endpoint
        return {
            "type": kind,
            "time": round(self.reactor.seconds(), 6),
            "method": _text(head.method),
            "authority": _text(head.authority),
            "path": _text(head.target),
            "listener": context.site.listener,
            "service": exchange.labels.labels[2],   # set by the dispatcher before any event
            "endpoint": endpoint.label if endpoint is not None else "",
            "protocol": context.protocol,
            "client": context.connection.peer,
        }

    def started(self, exchange) -> None:
        """A request head arrived (only for watchers with ``start=1``)."""
        event = self._base(exchange, "start")
        for watcher in tuple(self.watchers):
            if watcher.want_start:
                watcher.offer(event)

    def ended(self, exchange, status: int, grpc_status: str, error: str) -> None:
        """A response ended, or the proxy answered ``error`` itself."""
        event = self._base(exchange, "end")
        response = exchange.response
        event.update(
            status=status, grpc_status=grpc_status,
            latency_ms=round((self.reactor.seconds() - exchange.started) * 1000.0, 3),
            request_bytes=exchange.request.body.received,
            response_bytes=response.body.received if response is not None else 0,
            error=error)
        for watcher in tuple(self.watchers):
            watcher.offer(event)


@implementer(IPushProducer)
class Watcher:
    """One ``/tap`` response: a push producer with a bounded queue."""

    def __init__(self, hub: TapHub, request, match: Filter, limit: int | None,
                 seconds: float | None, sse: bool, want_start: bool) -> None:
        self.hub = hub
        self.request = request
        self.match = match
        self.limit = limit
        self.sse = sse
        self.want_start = want_start
        self.queue: deque[bytes] = deque()
        self.paused = False
        self.done = False
        #: Events written or queued (they count against ``limit``).
        self.taken = 0
        #: Events lost while the queue was full: since the last notice, in all.
        self.dropped = 0
        self.dropped_total = 0
        self.seconds = seconds
        self.timer = None

    def start(self) -> None:
        """Send the response head and start taking events."""
        request = self.request
        if self.seconds is not None:
            self.timer = self.hub.reactor.callLater(self.seconds, self.finish)
        request.setHeader(b"content-type", b"text/event-stream" if self.sse
                          else b"application/x-ndjson")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        request.registerProducer(self, True)
        request.write(b"")   # the response head now, before any event
        request.notifyFinish().addBoth(self._gone)
        self.hub.add(self)
        if self.limit == 0:
            self.finish()

    def _encode(self, event: dict[str, Any]) -> bytes:
        data = json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode()
        if self.sse:
            return b"event: " + event["type"].encode() + b"\ndata: " + data + b"\n\n"
        return data + b"\n"

    def offer(self, event: dict[str, Any]) -> None:
        if self.done or not self.match.matches(event):
            return
        if self.paused:
            if len(self.queue) >= self.hub.queue_max:
                self.dropped += 1
                self.dropped_total += 1
                return
            self.queue.append(self._encode(event))
        else:
            self.request.write(self._encode(event))
        self.taken += 1
        if self.limit is not None and self.taken >= self.limit:
            self.finish()

    def _flush(self) -> None:
        request = self.request
        queue = self.queue
        while queue:
            request.write(queue.popleft())
        if self.dropped:
            self.request.write(self._encode({
                "type": "dropped", "dropped": self.dropped,
                "dropped_total": self.dropped_total,
                "note": f"events lost: this watcher read slower than they came "
                        f"(at most {self.hub.queue_max} wait)"}))
            self.dropped = 0

    # -- IPushProducer --

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.done:
            self._flush()

    def stopProducing(self) -> None:
        self._gone(None)

    # -- the end --

    def finish(self) -> None:
        """Write what waits (and the count of what was lost) and end the stream."""
        if self.done:
            return
        self._flush()
        self._gone(None)
        self.request.unregisterProducer()
        self.request.finish()

    def _gone(self, _result) -> None:
        if not self.done:
            self.done = True
            self.queue.clear()
            self.hub.remove(self)
            timer, self.timer = self.timer, None
            if timer is not None and timer.active():
                timer.cancel()
        return None
