"""Fakes shared by the unit tests of the HTTP ends and the dispatcher.

One copy of each stand-in: the listener a connection belongs to, the
dispatcher a server end hands its requests to (through the production entry,
``dispatch_to(request, context, waiter, token)``), the client end the
dispatcher sends to (``FakeClient``: ``send(target, endpoint, request,
waiter)``), body sinks and sources, the h2 client end's rig, and the bridges
that let a test written against Deferreds drive the waiter-based production
path: ``dispatch`` (an exchange) and ``send`` (a client end's attempt).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from h2.config import H2Configuration
from h2.connection import H2Connection
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from l5dproxy.accept.listener import Listener
from l5dproxy.app.listeners import build_listener
from l5dproxy.app.sites import http_site
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import (
    DetectConfig,
    H2Config,
    HostPort,
    ListenerConfig,
    RouteConfig,
    ServiceConfig,
    Target,
)
from l5dproxy.exchange.contracts import HttpSite, RequestContext
from l5dproxy.exchange.message import Body, Request, RequestHead, Response
from l5dproxy.http.h2.pool import H2Client
from l5dproxy.net.connection import ListenerSite
from l5dproxy.telemetry import Metrics

#: An h2 peer that sends whatever it is told (for malformed blocks).
LOOSE = {"validate_outbound_headers": False, "normalize_outbound_headers": False}


# -- the listener and the connection record ------------------------------------

class FakeListener:
    """What the ends and the dispatcher read of a ``Listener``: its config
    (a real ``ListenerConfig``: name ``in``, default service ``app``, the
    ``routes`` given), name, metrics, clock and reactor, connections."""

    def __init__(self, clock: Any = None, config: ListenerConfig | None = None,
                 routes: Iterable[RouteConfig] = ()) -> None:
        self.config = config or ListenerConfig("in", "tcp:0", "app", routes=tuple(routes))
        self.name = self.config.name
        self.metrics = Metrics()
        self.clock = clock
        self.reactor = clock
        self.connections: set = set()
        self.log_connections = False
        #: The connection records' view (l5dproxy.net.connection.ListenerSite).
        self.site = ListenerSite(self.name, self.config.service, clock, self.metrics,
                                 self.log_connections, self.connections)


class FakeConnection:
    """The dispatcher's view of an inbound connection (every attribute of
    exchange.contracts.ClientConnection, with InboundConnection's defaults):
    plaintext, not pinned, no endpoint known."""

    peer = "192.0.2.10:40000"
    endpoint = ""
    pinned = None
    tls = None
    client_id: str | None = None
    authorized = True
    client_host = "192.0.2.10"   # the client's address (InboundConnection.client_host)
    secure = False


def make_listener(clock) -> Listener:
    """A real ``Listener`` (``inbound``, service ``app`` at 127.0.0.1:8080)."""
    service = ServiceConfig("app", (HostPort("127.0.0.1", 8080),))
    detect = DetectConfig()
    backends = {"app": BackendSet(service, detect.opaque_ports, clock=clock)}
    config = ListenerConfig("inbound", "tcp:0", "app")
    return build_listener(config, detect, backends, Metrics(), clock, log_connections=False)


def site(listener: Any, **changes: Any) -> HttpSite:
    """``listener``'s ``HttpSite`` as app builds it (``app.sites.http_site``),
    with ``changes`` (``upgrades=frozenset({b"foo"})``, ``allow_connect=True``)."""
    return dataclasses.replace(http_site(listener), **changes)


# -- the dispatcher, seen from a server end ------------------------------------

class _Dispatched:
    """What ``dispatch_to`` returns: the waiter is told when the Deferred
    fires; ``cancel`` (the client went away) cancels it and tells nobody."""

    __slots__ = ("d", "delivered", "done")

    def __init__(self, d: defer.Deferred, waiter: Any, token: Any) -> None:
        self.d = d
        self.delivered = False
        self.done = False

        def responded(response):
            if not self.done:
                self.done = self.delivered = True
                waiter.dispatch_responded(token, response)

        def failed(failure):
            if not self.done:   # else cancelled: the waiter hears nothing
                self.done = self.delivered = True
                waiter.dispatch_failed(token, failure)
        d.addCallbacks(responded, failed)

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            self.d.cancel()


class DeferredDispatcher:
    """A test dispatcher written as ``dispatch(request, context) ->
    Deferred``, reached through the production entry ``dispatch_to``: the
    Deferred's result tells the waiter (``dispatch_responded`` /
    ``dispatch_failed``), cancelling the exchange cancels the Deferred."""

    def dispatch(self, request: Request, context: Any) -> defer.Deferred:
        raise NotImplementedError

    def dispatch_to(self, request: Request, context: Any, waiter: Any,
                    token: Any) -> _Dispatched:
        return _Dispatched(self.dispatch(request, context), waiter, token)


class FakeDispatcher(DeferredDispatcher):
    """Records what it is asked; the test answers through the Deferreds:
    ``requests`` [(request, d)], ``calls`` [(request, context, d)],
    ``cancelled`` [request] (the server end gave the exchange up)."""

    def __init__(self) -> None:
        self.requests: list[tuple[Request, defer.Deferred]] = []
        self.calls: list[tuple[Request, object, defer.Deferred]] = []
        self.cancelled: list[Request] = []

    def dispatch(self, request: Request, context: Any) -> defer.Deferred:
        d = defer.Deferred(lambda _: self.cancelled.append(request))
        self.requests.append((request, d))
        self.calls.append((request, context, d))
        return d


def dispatch(proxy: Any, request: Request, context: RequestContext) -> defer.Deferred:
    """``proxy.dispatch_to`` seen through a Deferred (cancelling it cancels
    the exchange): an error the exchange answered itself is an errback."""
    exchange = None
    d = defer.Deferred(lambda _d: exchange.cancel())

    class Waiter:
        def dispatch_responded(self, token, response):
            assert token == "token"
            if response.error is not None:   # the exchange answered an error itself
                d.errback(response.error)
            else:
                d.callback(response)

        def dispatch_failed(self, token, failure):
            assert token == "token"
            d.errback(failure)

    exchange = proxy.dispatch_to(request, context, Waiter(), "token")
    return d


# -- client ends, seen from the dispatcher ------------------------------------

#: The target a client end is given when a test names none: the settings a
#: pool had before targets existed (no service, 5 s connect, 60 s idle).
DEFAULT_TARGET = Target("")


def send(client: Any, endpoint: Any, request: Request,
         target: Target = DEFAULT_TARGET) -> defer.Deferred[Response]:
    """``client.send(target, endpoint, request, waiter)`` seen through a
    Deferred: it fires with the response, or fails with what the attempt
    failed with; cancelling it cancels the attempt (CancelledError)."""
    attempt = None
    d: defer.Deferred[Response] = defer.Deferred(lambda _d: attempt.cancel())

    class Waiter:
        def attempt_responded(self, response: Response) -> None:
            d.callback(response)

        def attempt_failed(self, failure: Failure) -> None:
            d.errback(failure)

    attempt = client.send(target, endpoint, request, Waiter())
    return d


class _FakeAttempt:
    """A ``FakeClient`` attempt: ``d`` is what the test answers; it tells
    the dispatcher's waiter unless the dispatcher cancelled the attempt."""

    def __init__(self, client: FakeClient, waiter: Any) -> None:
        self.cancelled = False
        self.client = client
        self.waiter = waiter
        self.d: defer.Deferred[Response] = defer.Deferred(self._counted)
        self.d.addCallbacks(self._responded, self._failed)

    def _counted(self, _d: defer.Deferred) -> None:
        self.client.cancelled += 1

    def _responded(self, response: Response) -> None:
        if not self.cancelled:
            self.waiter.attempt_responded(response)

    def _failed(self, failure: Failure) -> None:
        if not self.cancelled:
            self.waiter.attempt_failed(failure)

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.d.cancel()


class FakeClient:
    """A client end (``contracts.ClientEnd``) that records each attempt as
    ``(endpoint, request, d, sink)`` for the test to answer through ``d``
    (``callback(response)``, ``errback(error)``); ``sink`` (a ``Sink``)
    consumes the request body when ``consume_bodies``, else it is None.
    ``targets`` holds the target of each attempt, ``retargeted`` what each
    reload handed over; ``cancelled`` counts the attempts given up."""

    def __init__(self, consume_bodies: bool = False) -> None:
        self.calls: list[tuple[Any, Request, defer.Deferred[Response], Sink | None]] = []
        self.targets: list[Target] = []
        self.retargeted: list[dict[str, Target]] = []
        self.cancelled = 0
        self.consume_bodies = consume_bodies

    def send(self, target: Target, endpoint: Any, request: Request,
             waiter: Any) -> _FakeAttempt:
        attempt = _FakeAttempt(self, waiter)
        self.targets.append(target)
        sink = Sink(request.body) if self.consume_bodies else None
        self.calls.append((endpoint, request, attempt.d, sink))
        return attempt

    def retarget(self, targets: dict[str, Target]) -> None:
        self.retargeted.append(dict(targets))


# -- bodies -------------------------------------------------------------------

class Sink:
    """A BodySink that keeps what it gets (``data`` chunks, ``trailers``,
    ``ended``, ``error``); given a body, it consumes it (paused first if
    asked)."""

    def __init__(self, body: Body | None = None, paused: bool = False) -> None:
        self.body = body
        self.data: list[bytes] = []
        self.trailers = None
        self.ended = False
        self.error: Exception | None = None
        if body is not None:
            if paused:
                body.pause()
            body.consume(self)

    def body_data(self, data: bytes) -> None:
        self.data.append(data)

    def body_end(self, trailers) -> None:
        self.ended = True
        self.trailers = trailers

    def body_error(self, reason: Exception) -> None:
        self.error = reason

    @property
    def bytes(self) -> bytes:
        return b"".join(self.data)


class Source:
    """A BodySource that records what its consumer asks of it: ``paused``
    (whether it is paused now), ``pauses``, ``resumed`` and ``stopped``
    (how often); given a body, it becomes its source."""

    def __init__(self, body: Body | None = None) -> None:
        self.paused = False
        self.pauses = 0
        self.resumed = 0
        self.stopped = 0
        if body is not None:
            body.set_source(self)

    def pause_body(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_body(self) -> None:
        self.paused = False
        self.resumed += 1

    def stop_body(self) -> None:
        self.stopped += 1


# -- h2 ------------------------------------------------------------------------

class Transport(StringTransport):
    """A StringTransport with addresses, and ``take`` (read and clear)."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                         hostAddress=IPv4Address("TCP", "127.0.0.1", 4143))

    def take(self) -> bytes:
        data = self.value()
        self.clear()
        return data


class Endpoint:
    """An endpoint as the client ends see it (``contracts.Dialable``): an
    address and its label."""

    def __init__(self, port: int = 9000) -> None:
        self.address = HostPort("127.0.0.1", port)
        self.label = str(self.address)


class H2ClientRig:
    """Mixin: the h2 client end (``self.client``, settings from
    ``self.settings``) on a MemoryReactorClock, its dials completed by real
    h2 servers on StringTransports (``connect``), bytes exchanged by
    ``pump``, requests sent with ``send``."""

    settings = H2Config(initial_window_size=65535, connection_window_size=65535)
    reactor: MemoryReactorClock
    client: H2Client
    servers: list[tuple[H2Connection, Transport, Any]]
    seen: list[list]

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.client = H2Client(self.reactor, settings=self.settings)
        self.servers = []
        self.seen = []

    def connect(self, max_streams: int = 100):
        """Complete the newest pending connectTCP with a fake h2 server."""
        _host, _port, factory, _timeout, _ = self.reactor.tcpClients[len(self.servers)]
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        server = H2Connection(H2Configuration(client_side=False, header_encoding=None,
                                              **LOOSE))
        server.local_settings.max_concurrent_streams = max_streams
        server.local_settings.acknowledge()
        server.initiate_connection()
        self.servers.append((server, transport, protocol))
        self.seen.append([])
        self.pump(len(self.servers) - 1)
        return server, transport, protocol

    def pump(self, index: int = 0):
        server, transport, protocol = self.servers[index]
        events = []
        for _ in range(20):
            out = transport.take()
            if out:
                events.extend(server.receive_data(out))
            back = server.data_to_send()
            if back:
                protocol.dataReceived(back)
            if not out and not back:
                break
        self.seen[index].extend(events)
        return events

    def send(self, head=None, body=None) -> defer.Deferred:
        head = head or RequestHead(b"GET", b"/x", b"svc.test",
                                   [(b"accept", b"*/*"), (b"connection", b"keep-alive")])
        return send(self.client, Endpoint(), Request(head, body or Body.empty()))


__all__ = [
    "DEFAULT_TARGET",
    "LOOSE",
    "DeferredDispatcher",
    "Endpoint",
    "FakeClient",
    "FakeConnection",
    "FakeDispatcher",
    "FakeListener",
    "H2ClientRig",
    "Sink",
    "Source",
    "Transport",
    "dispatch",
    "make_listener",
    "send",
    "site",
]
