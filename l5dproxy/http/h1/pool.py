"""The HTTP/1.1 client end's pools: exchanges out to endpoints over pooled connections.

``H1Client`` keeps one pool of keep-alive connections per service and
endpoint (the ``Target`` handed over with each request names the service,
its connect and idle timeouts), shared by every client connection of the
proxy: two services whose endpoints share an address never share a
connection. A request takes the most
recently used idle connection (or opens one), writes its head, streams its
body (paused while the endpoint's socket buffer is full), and turns the
endpoint's answer into a ``Response`` whose body pauses the endpoint's
connection while the client is slow. When the response and the request are
both complete and the endpoint allows it, the connection goes back to the
pool; idle connections beyond ``max_idle`` or older than the target's
``idle_timeout`` are closed. A reload hands existing pools their service's
new target (``retarget``): a shorter idle timeout applies to the connections
already idle, and a removed service's pools close their idle connections
and drop the rest as they finish.

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
from collections.abc import Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IConnector, IDelayedCall
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.exchange.message import ProxyError, Request, Response
from l5dproxy.http.h1.client import H1ClientConnection
from l5dproxy.net.connection import errno_name

if TYPE_CHECKING:
    from l5dproxy.config.model import Target
    from l5dproxy.exchange.contracts import AttemptWaiter, Dialable
    from l5dproxy.telemetry import Metrics

log = Logger()

#: Requests one endpoint's pool keeps waiting for a connection when it is at
#: ``max_connections``; more are answered 503 at once. Envoy's default
#: ``max_pending_requests`` per cluster.
WAITING_LIMIT = 1024


class H1Client:
    """Sends requests to endpoints over pooled HTTP/1.1 connections."""

    def __init__(self, reactor: Any, metrics: Metrics,
                 max_idle: int = 256, max_connections: int = 1024) -> None:
        self.reactor = reactor
        self.metrics = metrics
        #: Idle connections kept per pool ([http] pool_max_idle).
        self.max_idle = max_idle
        #: Connections per pool at most ([http] max_connections_per_endpoint):
        #: a pool is one service's, so two services sharing an address may
        #: open this many each.
        self.max_connections = max_connections
        #: (service, endpoint label) -> its pool.
        self.pools: dict[tuple[str, str], _Pool] = {}

    def send(self, target: Target, endpoint: Dialable, request: Request,
             waiter: AttemptWaiter) -> H1Attempt:
        """Send ``request`` to ``endpoint`` on ``target``'s pool:
        ``waiter.attempt_responded(response)`` or
        ``waiter.attempt_failed(failure)`` is called once (maybe before this
        returns); the returned attempt's ``cancel()`` gives it up (nothing is
        called then)."""
        key = (target.service, endpoint.label)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = _Pool(self, target, endpoint)
        elif pool.target is not target:
            pool.retarget(target)
        attempt = H1Attempt(pool, request, waiter)
        pool.place(attempt)
        return attempt

    def retarget(self, targets: Mapping[str, Target]) -> None:
        """A reload: each pool takes its service's target from ``targets``;
        the pools of services not in it are forgotten (idle connections
        closed now, busy ones when they finish)."""
        for key, pool in list(self.pools.items()):
            target = targets.get(key[0])
            if target is None:
                del self.pools[key]
                pool.retire()
            elif pool.target is not target:
                pool.retarget(target)


class _Pool:
    """The keep-alive connections of one service to one endpoint."""

    __slots__ = ("address", "client", "idle", "label", "open", "retired", "sweep", "target",
                 "waiting")

    def __init__(self, client: H1Client, target: Target, endpoint: Dialable) -> None:
        self.client = client
        #: The service's settings: connect and idle timeouts, the dst label.
        self.target = target
        self.address = endpoint.address
        self.label = endpoint.label
        self.idle: list[H1ClientConnection] = []   # most recently used last
        self.sweep: IDelayedCall | None = None
        #: Connections dialled and not yet closed (connecting, busy, idle, tunnels).
        self.open = 0
        #: Requests waiting for a connection while the pool is at its limit.
        self.waiting: deque[H1Attempt] = deque()
        #: Its service is gone (a reload): connections close as they come free.
        self.retired = False

    @property
    def service(self) -> str:
        """The ``service`` label of its connections' dst metrics."""
        return self.target.service

    def retarget(self, target: Target) -> None:
        """The service's settings changed (a reload): the next dial uses the
        new connect timeout, and the idle sweep is re-armed, so a shorter
        idle timeout reaches the connections already idle."""
        self.target = target
        sweep, self.sweep = self.sweep, None
        if sweep is not None:
            if sweep.active():
                sweep.cancel()
            self._sweep()

    def retire(self) -> None:
        """The service is gone (a reload): idle connections close now, busy
        ones when their exchange ends; requests already queued still go."""
        self.retired = True
        sweep, self.sweep = self.sweep, None
        if sweep is not None and sweep.active():
            sweep.cancel()
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def take(self) -> H1ClientConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.reusable():
                return conn
        return None

    def place(self, call: H1Attempt) -> None:
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
                self.target.connect_timeout, self._waited_too_long, call)
            self.waiting.append(call)

    def unqueue(self, call: H1Attempt) -> None:
        """``call`` leaves the queue (given up or timed out)."""
        _stop_waiting(call)
        with suppress(ValueError):
            self.waiting.remove(call)

    def _waited_too_long(self, call: H1Attempt) -> None:
        call.timer = None
        self.unqueue(call)
        call.fail(ProxyError.not_placed(f"endpoint {self.label}: connection limit reached"))

    def _next_waiting(self) -> H1Attempt | None:
        waiting = self.waiting
        while waiting:
            call = waiting.popleft()
            _stop_waiting(call)
            if not call.done:
                return call
        return None

    def connect(self, call: H1Attempt) -> None:
        client = self.client
        self.open += 1
        factory = _Factory(self, call)
        target = self.target
        if target.tls is not None:  # TLS origination: ALPN http/1.1 (or none)
            from l5dproxy.tls.client import dial
            connector: Any = dial(client.reactor, target.tls, self.address, factory,
                                  target.connect_timeout, "http/1.1", ("http/1.1",))
            call.connector = connector  # stopConnecting() works in either step
            return
        call.connector = client.reactor.connectTCP(
            self.address.host, self.address.port, factory,
            timeout=target.connect_timeout)

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
        if len(self.idle) >= self.client.max_idle or self.retired:
            conn.close()
            return
        conn.idle_since = self.client.reactor.seconds()
        self.idle.append(conn)
        if self.sweep is None:
            self.sweep = self.client.reactor.callLater(self.target.idle_timeout, self._sweep)

    def forget(self, conn: H1ClientConnection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)

    def _sweep(self) -> None:
        self.sweep = None
        now = self.client.reactor.seconds()
        idle_timeout = self.target.idle_timeout
        deadline = now - idle_timeout
        keep = []
        for conn in self.idle:
            if conn.idle_since <= deadline:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep
        if keep:
            wait = keep[0].idle_since + idle_timeout - now
            self.sweep = self.client.reactor.callLater(max(wait, 0.01), self._sweep)


def _stop_waiting(call: H1Attempt) -> None:
    """``call`` is out of its pool's queue: its wait ends."""
    call.queued = False
    timer, call.timer = call.timer, None
    if timer is not None and timer.active():
        timer.cancel()


class H1Attempt:
    """One try of a request on one endpoint (``contracts.Attempt``): a
    connection, maybe a second one (``lost_before_response``)."""

    __slots__ = ("conn", "connector", "done", "pool", "queued", "request", "retried", "timer",
                 "waiter")

    def __init__(self, pool: _Pool, request: Request, waiter: AttemptWaiter) -> None:
        self.pool = pool
        self.request = request
        self.conn: H1ClientConnection | None = None
        self.connector: IConnector | None = None
        self.retried = False
        self.done = False
        #: Told the outcome, once.
        self.waiter = waiter
        #: Waiting in the pool's queue, until ``timer`` (the connect timeout).
        self.queued = False
        self.timer: IDelayedCall | None = None

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
            pool.target.service, pool.label, errno_name(reason) or "closed").inc()
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
            try:
                self.waiter.attempt_responded(response)
            except Exception:
                log.failure("handling a response failed")
        else:
            response.body.cancel()

    def fail(self, reason: Failure | Exception) -> None:
        if not self.done:
            self.done = True
            try:
                self.waiter.attempt_failed(reason if isinstance(reason, Failure)
                                           else Failure(reason))
            except Exception:
                log.failure("handling a failed request failed")

    def cancel(self) -> None:
        """Timed out or the client went away before the response head: give
        the request up; nothing is reported after."""
        if self.done:
            return
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

    def __init__(self, pool: _Pool, call: H1Attempt) -> None:
        self.pool = pool
        self.call = call

    def buildProtocol(self, addr: Any) -> H1ClientConnection:
        return H1ClientConnection(self.pool, self.call)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.call.done:
            self.call.connect_failed(reason)
        self.pool.closed()


__all__ = ["WAITING_LIMIT", "H1Attempt", "H1Client"]
