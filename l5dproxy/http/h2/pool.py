"""The HTTP/2 client end's pool: per service and endpoint, connections and a queue.

``H2Client`` keeps, per service and endpoint (the ``Target`` handed over with
each request names the service and its connect and idle timeouts), an
``_EndpointPool``: connections that each carry streams up to the peer's
SETTINGS_MAX_CONCURRENT_STREAMS, another dialled when they are all full (up
to ``max_connections_per_endpoint``, per pool), and requests waiting for a
stream (at most ``WAITING_LIMIT``; more are answered 503 at once).
``H2Attempt`` is one request waiting for, or carried by, an upstream stream.
A connection without streams for the target's ``idle_timeout`` sends GOAWAY
and closes (``H2ClientProtocol``); a reload hands existing pools their
service's new target (``H2Client.retarget``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from twisted.internet.interfaces import IConnector, IDelayedCall
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.config.model import H2Config
from l5dproxy.exchange.message import ProxyError, Request, Response, as_proxy_error
from l5dproxy.http.h2.client import H2ClientProtocol
from l5dproxy.http.h2.stream import Stream
from l5dproxy.net.connection import errno_name
from l5dproxy.tls.errors import TlsError

if TYPE_CHECKING:
    from l5dproxy.config.model import HostPort, Target
    from l5dproxy.exchange.contracts import AttemptWaiter, Dialable
    from l5dproxy.telemetry import Metrics

log = Logger()


#: Requests one endpoint's pool keeps waiting for a stream (connections at
#: ``max_connections_per_endpoint``, or being made); more are answered 503 at
#: once. Envoy's default ``max_pending_requests`` per cluster.
WAITING_LIMIT = 1024


class H2Attempt:
    """One try of a request on one endpoint (``contracts.Attempt``): waiting
    for, or carried by, an upstream stream; its outcome goes to ``waiter``."""

    __slots__ = ("done", "queued", "request", "stream", "timer", "waiter")

    def __init__(self, request: Request, waiter: AttemptWaiter) -> None:
        self.request = request
        self.waiter: AttemptWaiter | None = waiter
        self.stream: Stream | None = None
        self.done = False
        #: The pool whose queue it waits in, and the end of its wait.
        self.queued: _EndpointPool | None = None
        self.timer: IDelayedCall | None = None

    def respond(self, response: Response) -> None:
        if self.done:
            return
        self.done = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.attempt_responded(response)

    def fail(self, error: Exception) -> None:
        if self.done:
            return
        self.done = True
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter.attempt_failed(Failure(error))

    def cancel(self) -> None:
        """Give the request up; nothing is reported after. The dispatcher
        gave up (the client reset its stream, a deadline passed): the
        upstream stream is reset with CANCEL, or the request leaves the
        queue at once (nothing is dialled for it any more)."""
        if self.done:
            return
        self.waiter = None
        self.done = True
        if self.queued is not None:
            self.queued.unqueue(self)
        stream = self.stream
        if stream is not None and not stream.reset:
            stream.deferred = None
            stream.conn.reset(stream, ErrorCodes.CANCEL)


class H2Client:
    """The ``h2`` upstream client: per service and endpoint, connections
    that each carry streams up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS;
    another connection opens when they are all full."""

    def __init__(self, reactor: Any, settings: H2Config | None = None,
                 metrics: Metrics | None = None) -> None:
        self.reactor = reactor
        self.settings = settings or H2Config()
        self.metrics = metrics
        #: (service, endpoint label) -> its pool.
        self.pools: dict[tuple[str, str], _EndpointPool] = {}

    def send(self, target: Target, endpoint: Dialable, request: Request,
             waiter: AttemptWaiter) -> H2Attempt:
        """Send ``request`` to ``endpoint`` on ``target``'s pool:
        ``waiter.attempt_responded(response)`` or
        ``waiter.attempt_failed(failure)`` is called once (maybe before this
        returns); the returned attempt's ``cancel()`` gives it up (nothing is
        called then)."""
        key = (target.service, endpoint.label)
        pool = self.pools.get(key)
        if pool is None:
            pool = self.pools[key] = _EndpointPool(self, target, endpoint.address, endpoint.label)
        elif pool.target is not target:
            pool.retarget(target)
        attempt = H2Attempt(request, waiter)
        pool.submit(attempt)
        return attempt

    def retarget(self, targets: Mapping[str, Target]) -> None:
        """A reload: each pool takes its service's target from ``targets``;
        the pools of services not in it are forgotten (connections without
        streams close now, the others when their last stream ends)."""
        for key, pool in list(self.pools.items()):
            target = targets.get(key[0])
            if target is None:
                del self.pools[key]
                pool.retire_all()
            elif pool.target is not target:
                pool.retarget(target)


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

    def __init__(self, client: H2Client, target: Target, address: HostPort, label: str) -> None:
        self.client = client
        #: The service's settings: connect and idle timeouts, the dst label.
        self.target = target
        self.address = address
        self.label = label
        self.connections: list[H2ClientProtocol] = []
        #: Dialled and not yet usable (no SETTINGS yet).
        self.connecting = 0
        #: Dialled and not yet lost: usable, connecting and retired ones.
        self.open = 0
        self.max_connections = client.settings.max_connections_per_endpoint
        self.waiting: deque[H2Attempt] = deque()
        #: Its service is gone (a reload): connections close once idle.
        self.retired = False

    def retarget(self, target: Target) -> None:
        """The service's settings changed (a reload): the next dial and wait
        use the new connect timeout; idle connections re-check their idle
        deadline against the new idle timeout."""
        self.target = target
        for conn in list(self.connections):
            conn.idle_timeout_changed()

    def retire_all(self) -> None:
        """The service is gone (a reload): connections without streams send
        GOAWAY and close now, the others once their last stream ends."""
        self.retired = True
        for conn in list(self.connections):
            conn.idle_timeout_changed()

    def submit(self, pending: H2Attempt) -> None:
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
            self.target.connect_timeout, self._waited_too_long, pending)
        self.waiting.append(pending)
        self._maybe_connect()

    def unqueue(self, pending: H2Attempt) -> None:
        """``pending`` leaves the queue (cancelled or timed out)."""
        _stop_waiting(pending)
        with suppress(ValueError):
            self.waiting.remove(pending)

    def _waited_too_long(self, pending: H2Attempt) -> None:
        pending.timer = None
        self.unqueue(pending)
        error: ProxyError
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
                   and conn.h2.remote_max_concurrent_streams == 0
                   for conn in self.connections)

    def _maybe_connect(self) -> None:
        if (self.waiting and self.connecting == 0 and self.open < self.max_connections
                and not self._refusing()):
            self.connecting += 1
            self.open += 1
            target = self.target
            if target.tls is not None:  # TLS origination: the endpoint must choose h2
                from l5dproxy.tls.client import dial
                dial(self.client.reactor, target.tls, self.address, _ClientFactory(self),
                     target.connect_timeout, "h2", ("h2",))
                return
            self.client.reactor.connectTCP(
                self.address.host, self.address.port, _ClientFactory(self),
                timeout=target.connect_timeout)

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
                self.target.service, self.label, errno_name(reason) or "closed").inc()
        log.info("h2 connect to {endpoint} failed: {reason}", endpoint=self.label,
                 reason=reason.getErrorMessage())
        self._fail_waiting(as_proxy_error(reason))  # refused: 502, timeout: 504

    def lost(self, conn: H2ClientProtocol) -> None:
        self.open -= 1
        if conn in self.connections:
            self.connections.remove(conn)
        if not conn.settings_received:
            self.connecting -= 1
            reason = conn.lost_reason
            if reason is not None and reason.check(TlsError):
                # After the handshake, before SETTINGS: a TLS 1.3 endpoint
                # refusing the client certificate says so now.
                self._fail_waiting(as_proxy_error(reason))
                return
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


def _stop_waiting(pending: H2Attempt) -> None:
    """``pending`` is out of its pool's queue: its wait ends."""
    pending.queued = None
    timer, pending.timer = pending.timer, None
    if timer is not None and timer.active():
        timer.cancel()


class _ClientFactory(ClientFactory):
    noisy = False

    def __init__(self, pool: _EndpointPool) -> None:
        self.pool = pool

    def buildProtocol(self, addr: Any) -> H2ClientProtocol:
        return H2ClientProtocol(self.pool)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.pool.connect_failed(reason)
