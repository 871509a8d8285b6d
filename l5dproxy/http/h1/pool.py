"""The HTTP/1.1 client end's pools: exchanges out to endpoints over pooled connections.

``H1Client`` keeps one pool of keep-alive connections per endpoint address,
shared by every client connection of the proxy. A request takes the most
recently used idle connection (or opens one), writes its head, streams its
body (paused while the endpoint's socket buffer is full), and turns the
endpoint's answer into a ``Response`` whose body pauses the endpoint's
connection while the client is slow. When the response and the request are
both complete and the endpoint allows it, the connection goes back to the
pool; idle connections beyond ``max_idle`` or older than ``idle_timeout``
are closed.

A pool opens at most ``max_connections`` connections to its endpoint (those
being made, busy, idle and tunnelling included). A request that finds none
free and the pool at its limit waits in a queue of at most
``WAITING_LIMIT`` (past it: 503 at once) and takes the next connection that
comes free, in order; a request given up leaves the queue at once, and one
still waiting after the service's connect timeout fails with 503
``endpoint ADDR: connection limit reached``.

A pooled connection the endpoint closed while idle leaves the pool as soon as
its close is read. If the close crosses a request on the way, the request is
sent again on a new connection only when that is safe: the connection had
served earlier requests, not a byte of response came back, and the request
had no body (so nothing but its head, which is kept, was lost).

The connection itself (writing a request, reading its response) is
``l5dproxy.http.h1.client``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

from twisted.internet import defer
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.exchange.message import ProxyError, Request, Response
from l5dproxy.http.h1.client import H1ClientConnection
from l5dproxy.net.connection import errno_name

if TYPE_CHECKING:
    from l5dproxy.balance.backends import Endpoint
    from l5dproxy.config.model import ServiceConfig
    from l5dproxy.telemetry import Metrics

log = Logger(namespace="l5dproxy.http")

#: Requests one endpoint's pool keeps waiting for a connection when it is at
#: ``max_connections``; more are answered 503 at once. Envoy's default
#: ``max_pending_requests`` per cluster.
WAITING_LIMIT = 1024


class H1Client:
    """Sends requests to endpoints over pooled HTTP/1.1 connections."""

    def __init__(self, reactor, metrics: Metrics,
                 target_of: Callable[[Endpoint], ServiceConfig | None] | None = None,
                 max_idle: int = 256, max_connections: int = 1024) -> None:
        self.reactor = reactor
        self.metrics = metrics
        #: The service config of an endpoint (connect and idle timeouts, name).
        self.target_of = target_of or (lambda endpoint: None)
        self.max_idle = max_idle
        #: Connections to one endpoint at most ([http] max_connections_per_endpoint).
        self.max_connections = max_connections
        self.pools: dict[object, _Pool] = {}

    def request(self, endpoint: Endpoint, request: Request) -> defer.Deferred[Response]:
        pool = self.pools.get(endpoint.address)
        if pool is None:
            pool = self.pools[endpoint.address] = _Pool(self, endpoint)
        return _Call(pool, request).start()

    def call(self, endpoint: Endpoint, request: Request, waiter) -> _Call:
        """``request`` without a Deferred: ``waiter.upstream_responded(response)``
        or ``waiter.upstream_failed(failure)`` is called once; the returned
        call's ``cancel()`` gives it up (nothing is called then)."""
        pool = self.pools.get(endpoint.address)
        if pool is None:
            pool = self.pools[endpoint.address] = _Pool(self, endpoint)
        call = _Call(pool, request, waiter)
        call.start()
        return call


class _Pool:
    """The keep-alive connections to one endpoint address."""

    __slots__ = ("address", "client", "connect_timeout", "endpoint", "idle", "idle_timeout",
                 "label", "open", "service", "sweep", "waiting")

    def __init__(self, client: H1Client, endpoint: Endpoint) -> None:
        self.client = client
        self.endpoint = endpoint
        self.address = endpoint.address
        self.label = endpoint.label
        config = client.target_of(endpoint)
        self.service = config.name if config is not None else ""
        self.connect_timeout = config.connect_timeout if config is not None else 5.0
        self.idle_timeout = getattr(config, "idle_timeout", 60.0)
        self.idle: list[H1ClientConnection] = []   # most recently used last
        self.sweep = None
        #: Connections dialled and not yet closed (connecting, busy, idle, tunnels).
        self.open = 0
        #: Requests waiting for a connection while the pool is at its limit.
        self.waiting: deque[_Call] = deque()

    def take(self) -> H1ClientConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn
        return None

    def place(self, call: _Call) -> None:
        """An idle connection for ``call``, or a new one, or a place in the queue."""
        conn = self.take()
        if conn is not None:
            conn.send(call)
        elif self.open < self.client.max_connections:
            self.connect(call)
        elif len(self.waiting) >= WAITING_LIMIT:
            call.fail(ProxyError.not_placed(
                f"endpoint {self.label}: connection limit reached"
                f" ({len(self.waiting)} requests waiting)"))
        else:
            call.queued = True
            call.timer = self.client.reactor.callLater(
                self.connect_timeout, self._waited_too_long, call)
            self.waiting.append(call)

    def unqueue(self, call: _Call) -> None:
        """``call`` leaves the queue (given up or timed out)."""
        _stop_waiting(call)
        with suppress(ValueError):
            self.waiting.remove(call)

    def _waited_too_long(self, call: _Call) -> None:
        call.timer = None
        self.unqueue(call)
        call.fail(ProxyError.not_placed(f"endpoint {self.label}: connection limit reached"))

    def _next_waiting(self) -> _Call | None:
        waiting = self.waiting
        while waiting:
            call = waiting.popleft()
            _stop_waiting(call)
            if not call.done:
                return call
        return None

    def connect(self, call: _Call) -> None:
        client = self.client
        self.open += 1
        factory = _Factory(self, call)
        call.connector = client.reactor.connectTCP(
            self.address.host, self.address.port, factory,
            timeout=self.connect_timeout)

    def closed(self) -> None:
        """A connection dialled by this pool is gone (closed or never made):
        its room goes to the first request waiting, on a new connection."""
        self.open -= 1
        if self.waiting and self.open < self.client.max_connections:
            call = self._next_waiting()
            if call is not None:
                self.connect(call)

    def release(self, conn: H1ClientConnection) -> None:
        if not conn.reusable():
            conn.close()
            return
        if self.waiting:   # the first request waiting takes it, in order
            call = self._next_waiting()
            if call is not None:
                conn.send(call)
                return
        if len(self.idle) >= self.client.max_idle:
            conn.close()
            return
        conn.idle_since = self.client.reactor.seconds()
        self.idle.append(conn)
        if self.sweep is None:
            self.sweep = self.client.reactor.callLater(self.idle_timeout, self._sweep)

    def forget(self, conn: H1ClientConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def _sweep(self) -> None:
        self.sweep = None
        now = self.client.reactor.seconds()
        deadline = now - self.idle_timeout
        keep = []
        for conn in self.idle:
            if conn.idle_since <= deadline:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep
        if keep:
            wait = keep[0].idle_since + self.idle_timeout - now
            self.sweep = self.client.reactor.callLater(max(wait, 0.01), self._sweep)


def _stop_waiting(call: _Call) -> None:
    """``call`` is out of its pool's queue: its wait ends."""
    call.queued = False
    timer, call.timer = call.timer, None
    if timer is not None and timer.active():
        timer.cancel()


class _Call:
    """One request's way to a response: a connection, maybe a second try."""

    __slots__ = ("conn", "connector", "d", "done", "pool", "queued", "request", "retried",
                 "timer", "waiter")

    def __init__(self, pool: _Pool, request: Request, waiter=None) -> None:
        self.pool = pool
        self.request = request
        self.conn: H1ClientConnection | None = None
        self.connector = None
        self.retried = False
        self.done = False
        #: Told the outcome directly (H1Client.call), else through ``d``.
        self.waiter = waiter
        self.d: defer.Deferred[Response] | None = (
            defer.Deferred(self._cancel) if waiter is None else None)
        #: Waiting in the pool's queue, until ``timer`` (the connect timeout).
        self.queued = False
        self.timer = None

    def start(self) -> defer.Deferred[Response]:
        self.pool.place(self)
        return self.d

    def connected(self, conn: H1ClientConnection) -> None:
        self.connector = None
        if self.done:
            self.pool.release(conn)
            return
        conn.send(self)

    def connect_failed(self, reason: Failure) -> None:
        self.connector = None
        pool = self.pool
        pool.client.metrics.connect_errors_total.labels(
            pool.service, pool.label, errno_name(reason) or "closed").inc()
        self.fail(reason)

    def lost_before_response(self, conn: H1ClientConnection, reason: Failure) -> None:
        """The connection closed before any response byte: retry if safe."""
        self.conn = None
        if (not self.done and not self.retried and conn.requests > 1
                and self.request.body.is_empty):
            self.retried = True
            self.pool.connect(self)
            return
        self.fail(reason)

    def responded(self, response: Response) -> None:
        if not self.done:
            self.done = True
            waiter = self.waiter
            if waiter is None:
                self.d.callback(response)
                return
            try:
                waiter.upstream_responded(response)
            except Exception:
                log.failure("handling a response failed")
        else:
            response.body.cancel()

    def fail(self, reason: Failure | Exception) -> None:
        if not self.done:
            self.done = True
            waiter = self.waiter
            if waiter is None:
                self.d.errback(reason)
                return
            try:
                waiter.upstream_failed(reason if isinstance(reason, Failure)
                                       else Failure(reason))
            except Exception:
                log.failure("handling a failed request failed")

    def cancel(self) -> None:
        """Give the request up (H1Client.call); nothing is reported after."""
        if not self.done:
            self._cancel(None)

    def _cancel(self, d: defer.Deferred) -> None:
        """Timed out or the client went away before the response head."""
        self.done = True
        if self.queued:
            self.pool.unqueue(self)
        connector, self.connector = self.connector, None
        if connector is not None:
            connector.stopConnecting()
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.abort()


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, pool: _Pool, call: _Call) -> None:
        self.pool = pool
        self.call = call

    def buildProtocol(self, addr) -> H1ClientConnection:
        return H1ClientConnection(self.pool, self.call)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        if not self.call.done:
            self.call.connect_failed(reason)
        self.pool.closed()


__all__ = ["WAITING_LIMIT", "H1Client"]
