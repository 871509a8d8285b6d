"""The HTTP/2 client end's pool: per endpoint, connections and a queue.

``H2Client`` keeps, per endpoint address, an ``_EndpointPool``: connections
that each carry streams up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS,
another dialled when they are all full (up to
``max_connections_per_endpoint``), and requests waiting for a stream (at most
``WAITING_LIMIT``; more are answered 503 at once). ``_Pending`` is one
request waiting for, or carried by, an upstream stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import suppress

from h2.errors import ErrorCodes
from twisted.internet import defer
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.exchange.message import ProxyError, Request, Response
from l5dproxy.http.h2.client import H2ClientProtocol
from l5dproxy.http.h2.connection import H2Settings
from l5dproxy.http.h2.stream import Stream
from l5dproxy.net.connection import errno_name
from l5dproxy.route.dispatcher import as_proxy_error

log = Logger(namespace="l5dproxy.h2")


#: Requests one endpoint's pool keeps waiting for a stream (connections at
#: ``max_connections_per_endpoint``, or being made); more are answered 503 at
#: once. Envoy's default ``max_pending_requests`` per cluster.
WAITING_LIMIT = 1024


class _Pending:
    """A request waiting for, or carried by, an upstream stream; its outcome
    goes to ``waiter`` (``H2Client.call``) or to ``deferred`` (``request``)."""

    __slots__ = ("deferred", "done", "queued", "request", "stream", "timer", "waiter")

    def __init__(self, request: Request, waiter=None) -> None:
        self.request = request
        self.waiter = waiter
        self.deferred: defer.Deferred | None = (
            defer.Deferred(self._cancel) if waiter is None else None)
        self.stream: Stream | None = None
        self.done = False
        #: The pool whose queue it waits in, and the end of its wait.
        self.queued: _EndpointPool | None = None
        self.timer = None

    def respond(self, response: Response) -> None:
        if self.done:
            return
        self.done = True
        waiter, self.waiter = self.waiter, None
        if waiter is None:
            self.deferred.callback(response)
        else:
            waiter.upstream_responded(response)

    def fail(self, error: Exception) -> None:
        if self.done:
            return
        self.done = True
        waiter, self.waiter = self.waiter, None
        if waiter is None:
            self.deferred.errback(error)
        else:
            waiter.upstream_failed(Failure(error))

    def cancel(self) -> None:
        """Give the request up (``H2Client.call``); nothing is reported after."""
        if not self.done:
            self.waiter = None
            self._cancel(None)

    def _cancel(self, d) -> None:
        # The dispatcher gave up (the client reset its stream, a deadline
        # passed): the upstream stream is reset with CANCEL, or the request
        # leaves the queue at once (nothing is dialled for it any more).
        self.done = True
        if self.queued is not None:
            self.queued.unqueue(self)
        stream = self.stream
        if stream is not None and not stream.reset:
            stream.deferred = None
            stream.conn.reset(stream, ErrorCodes.CANCEL)


class H2Client:
    """The ``h2`` upstream client: per endpoint address, connections that
    each carry streams up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS;
    another connection opens when they are all full."""

    def __init__(self, reactor, connect_timeout: float = 5.0,
                 settings: H2Settings | None = None, metrics=None,
                 target_of: Callable | None = None) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.settings = settings or H2Settings()
        self.metrics = metrics
        #: endpoint -> its ServiceConfig (HttpProxy.target_of): connect
        #: timeout and the service label of the dst metrics.
        self.target_of = target_of
        self.pools: dict[str, _EndpointPool] = {}

    def request(self, endpoint, request: Request) -> defer.Deferred:
        pool = self._pool(endpoint)
        pending = _Pending(request)
        pool.submit(pending)
        return pending.deferred

    def call(self, endpoint, request: Request, waiter) -> _Pending:
        """``request`` without a Deferred: ``waiter.upstream_responded(response)``
        or ``waiter.upstream_failed(failure)`` is called once; the returned
        handle's ``cancel()`` gives it up (nothing is called then)."""
        pool = self._pool(endpoint)
        pending = _Pending(request, waiter)
        pool.submit(pending)
        return pending

    def _pool(self, endpoint) -> _EndpointPool:
        address = endpoint.address
        key = str(address)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = _EndpointPool(self, address, key)
        if self.target_of is not None:
            config = self.target_of(endpoint)
            if config is not None:
                pool.service = config.name
                pool.connect_timeout = config.connect_timeout
        return pool


class _EndpointPool:
    """The connections to one endpoint address and the requests waiting for
    a stream on them.

    A connection is dialled when a request finds every connection full, one
    at a time, up to ``max_connections_per_endpoint`` (connecting ones
    included). Requests that find no stream wait in a queue of at most
    ``WAITING_LIMIT`` (a cancelled one leaves it at once) for the service's
    connect timeout, and then fail: 503 ``endpoint ADDR accepts no streams``
    when the endpoint's SETTINGS allow no stream at all, 503 ``endpoint
    ADDR: connection limit reached`` when every allowed connection is full,
    504 ``connect timeout`` while a connection is still being made. An
    endpoint that advertises ``MAX_CONCURRENT_STREAMS = 0``, or closes (or
    sends GOAWAY on) a connection without taking a stream while requests
    wait, is not dialled again for them: they fail at once (the dispatcher
    counts each failure for failure accrual and may retry elsewhere).
    """

    def __init__(self, client: H2Client, address, label: str) -> None:
        self.client = client
        self.address = address
        self.label = label
        self.connections: list[H2ClientProtocol] = []
        #: Dialled and not yet usable (no SETTINGS yet).
        self.connecting = 0
        #: Dialled and not yet lost: usable, connecting and retired ones.
        self.open = 0
        self.max_connections = client.settings.max_connections_per_endpoint
        self.waiting: deque[_Pending] = deque()
        self.service = ""
        self.connect_timeout = client.connect_timeout

    def submit(self, pending: _Pending) -> None:
        for conn in self.connections:
            if conn.capacity() > 0:
                conn.start(pending)
                return
        if len(self.waiting) >= WAITING_LIMIT:
            pending.fail(ProxyError.not_placed(
                f"endpoint {self.label}: connection limit reached"
                f" ({len(self.waiting)} requests waiting)"))
            return
        pending.queued = self
        pending.timer = self.client.reactor.callLater(
            self.connect_timeout, self._waited_too_long, pending)
        self.waiting.append(pending)
        self._maybe_connect()

    def unqueue(self, pending: _Pending) -> None:
        """``pending`` leaves the queue (cancelled or timed out)."""
        _stop_waiting(pending)
        with suppress(ValueError):
            self.waiting.remove(pending)

    def _waited_too_long(self, pending: _Pending) -> None:
        pending.timer = None
        self.unqueue(pending)
        if self._refusing():
            error = ProxyError.not_placed(f"endpoint {self.label} accepts no streams")
        elif self.connecting:
            error = ProxyError.timeout("connect timeout")
        else:
            error = ProxyError.not_placed(f"endpoint {self.label}: connection limit reached")
        pending.fail(error)

    def _refusing(self) -> bool:
        """Whether the endpoint's SETTINGS allow no stream at all: another
        connection would say the same, so none is dialled."""
        return any(conn.settings_received and not conn.goaway
                   and conn.h2.remote_settings.max_concurrent_streams == 0
                   for conn in self.connections)

    def _maybe_connect(self) -> None:
        if (self.waiting and self.connecting == 0 and self.open < self.max_connections
                and not self._refusing()):
            self.connecting += 1
            self.open += 1
            self.client.reactor.connectTCP(
                self.address.host, self.address.port, _ClientFactory(self),
                timeout=self.connect_timeout)

    def ready(self, conn: H2ClientProtocol) -> None:
        """A connection has the peer's settings, or a stream slot came free."""
        waiting = self.waiting
        while waiting and conn.capacity() > 0:
            pending = waiting.popleft()
            _stop_waiting(pending)
            if pending.done:
                continue
            conn.start(pending)
        self._maybe_connect()

    def connected(self, conn: H2ClientProtocol) -> None:
        self.connections.append(conn)

    def settled(self, conn: H2ClientProtocol) -> None:
        """``conn`` has the peer's first SETTINGS: it is no longer connecting."""
        self.connecting -= 1

    def connect_failed(self, reason: Failure) -> None:
        self.connecting -= 1
        self.open -= 1
        client = self.client
        if client.metrics is not None:
            client.metrics.connect_errors_total.labels(
                self.service, self.label, errno_name(reason) or "closed").inc()
        log.info("h2 connect to {endpoint} failed: {reason}", endpoint=self.label,
                 reason=reason.getErrorMessage())
        self._fail_waiting(as_proxy_error(reason))  # refused: 502, timeout: 504

    def lost(self, conn: H2ClientProtocol) -> None:
        self.open -= 1
        if conn in self.connections:
            self.connections.remove(conn)
        if not conn.settings_received:
            self.connecting -= 1
            # The endpoint never said HTTP/2: an HTTP/1-only server answers
            # the preface with an error and closes. Connecting again would
            # only repeat that, as fast as the reactor turns, so the requests
            # waiting for this connection fail now, as after a failed connect.
            log.info("h2 connection to {endpoint} closed before its SETTINGS:"
                     " does it speak HTTP/2?", endpoint=self.label)
            self._fail_waiting(ProxyError.bad_gateway(
                f"{self.label} closed the connection before speaking HTTP/2"))
            return
        if not conn.streams_started and self.waiting:
            self._fruitless("closed")
            return
        self._maybe_connect()

    def _fruitless(self, how: str) -> None:
        """A connection ended without taking one of the waiting requests:
        dialling again for them would only repeat it (a dial loop), so they
        fail now."""
        log.info("h2 connection to {endpoint} {how} without taking a stream",
                 endpoint=self.label, how=how)
        self._fail_waiting(ProxyError.not_placed(f"endpoint {self.label} accepts no streams"))

    def _fail_waiting(self, error: ProxyError) -> None:
        waiting, self.waiting = self.waiting, deque()
        for pending in waiting:
            _stop_waiting(pending)
            pending.fail(error)

    def retire(self, conn: H2ClientProtocol) -> None:
        """The peer sent GOAWAY: no new streams on ``conn``."""
        if conn in self.connections:
            self.connections.remove(conn)
        if conn.settings_received and not conn.streams_started and self.waiting:
            self._fruitless("sent GOAWAY")
            return
        self._maybe_connect()


def _stop_waiting(pending: _Pending) -> None:
    """``pending`` is out of its pool's queue: its wait ends."""
    pending.queued = None
    timer, pending.timer = pending.timer, None
    if timer is not None and timer.active():
        timer.cancel()


class _ClientFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: _EndpointPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr) -> H2ClientProtocol:
        return H2ClientProtocol(self.pool)

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.pool.connect_failed(reason)
