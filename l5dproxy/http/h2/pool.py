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
from typing import TYPE_CHECKING

from h2.config import H2Configuration
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, RemoteSettingsChanged, ResponseReceived
from h2.exceptions import NoAvailableStreamIDError, ProtocolError
from h2.settings import SettingCodes, Settings
from twisted.internet import defer
from twisted.internet.protocol import ClientFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.exchange.message import Body, BodyLengthError, ProxyError, Request, Response
from l5dproxy.http.h2.connection import (
    _H2_CONFIG,
    _MAX_STREAM_ID,
    H2Settings,
    ProxyH2Connection,
    StreamResetError,
    _code,
    closed_streams_kept,
)
from l5dproxy.http.h2.protocol import H2Protocol
from l5dproxy.http.h2.stream import Stream
from l5dproxy.http.h2.translate import (
    MalformedError,
    declared_length,
    h2_request_headers,
    response_head_from_h2,
)
from l5dproxy.net.connection import errno_name, set_no_delay
from l5dproxy.route.dispatcher import as_proxy_error

if TYPE_CHECKING:
    pass

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


class H2ClientProtocol(H2Protocol):
    """One HTTP/2 connection to an endpoint, carrying many streams."""

    def __init__(self, pool: _EndpointPool) -> None:
        super().__init__()
        self.pool = pool
        self.settings_received = False
        self.goaway = False
        #: Streams started on it so far (0 at the end: it took no work).
        self.streams_started = 0
        #: (pending, response) received in this read, passed on at its end.
        self._responses: list[tuple[_Pending, Response]] = []
        self.dst = None
        self.connected_at = 0.0

    def connectionMade(self) -> None:
        s = self.pool.client.settings
        h2 = ProxyH2Connection(H2Configuration(
            client_side=True, header_encoding=None, **_H2_CONFIG), closed_streams_kept(s))
        h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: s.initial_window_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: max(s.max_header_list_size, 64 * 1024),
        })
        h2.initiate_connection()
        if s.connection_window_size > 65535:
            h2.increment_flow_control_window(s.connection_window_size - 65535)
        self.h2 = h2
        client = self.pool.client
        self._new_budget(s, client.reactor)
        if client.metrics is not None:
            # Shared by every listener that routes here: no listener label.
            self.dst = client.metrics.tcp_side("dst", "", self.pool.service, "h2",
                                               self.pool.label)
            self.dst.opened()
        self.connected_at = client.reactor.seconds()
        set_no_delay(self.transport)
        self.transport.registerProducer(self, True)
        self._start_writing()
        self.pool.connected(self)
        self._write()

    def _count_written(self, n: int) -> None:
        if self.dst is not None:
            self.dst.write_bytes.inc(n)

    def _peer(self) -> str:
        return self.pool.label

    def _count_abuse(self, kind: str) -> None:
        if self.pool.client.metrics is not None:
            self.pool.client.metrics.h2_abuse_total.labels(kind).inc()

    def dataReceived(self, data: bytes) -> None:
        if self.dst is not None:
            self.dst.read_bytes.inc(len(data))
        self._receive(data)

    def connectionLost(self, reason: Failure = None) -> None:
        self._lost = True
        self._fail_all(ProxyError.bad_gateway(f"connection to {self.pool.label} lost"))
        if self.dst is not None:
            self.dst.closed(errno_name(reason),
                            self.pool.client.reactor.seconds() - self.connected_at)
            self.dst = None
        self.pool.lost(self)

    def capacity(self) -> int:
        if not self.settings_received or self.goaway or self._lost:
            return 0
        return self.h2.remote_settings.max_concurrent_streams - len(self.streams)

    def _settings_changed(self, event: RemoteSettingsChanged) -> None:
        if not self.settings_received:
            self.settings_received = True
            self.pool.settled(self)
        self.pool.ready(self)

    def start(self, pending: _Pending) -> None:
        request = pending.request
        try:
            sid = self.h2.get_next_available_stream_id()
        except NoAvailableStreamIDError:
            # Stream ids used up: no more streams here, the next connection takes it.
            self.goaway = True
            self.pool.retire(self)
            self.pool.submit(pending)
            if not self.streams:
                self._lose_connection()
            return
        self.streams_started += 1
        stream = Stream(self, sid)
        stream.pending = pending
        stream.deferred = pending
        stream.grpc = request.head.is_grpc
        pending.stream = stream
        self.streams[sid] = stream
        self._start_outbound(stream, h2_request_headers(request.head), request.body)

    def _other_event(self, event) -> None:
        if type(event) is ResponseReceived:
            stream = self.streams.get(event.stream_id)
            if stream is None:
                return
            ended = event.stream_ended is not None
            try:
                head = response_head_from_h2(event.headers)
                # No content, whatever content-length says (RFC 9113 8.1.1):
                # a response to HEAD, a 204 or a 304.
                bodiless = (head.status in (204, 304)
                            or stream.pending.request.head.method == b"HEAD")
                body = Body(0 if bodiless else declared_length(head))
                if ended:
                    body.finish()   # BodyLengthError: content-length, no DATA
            except (MalformedError, BodyLengthError) as e:
                self._malformed(stream, e.reason)
                return
            if ended:
                stream.in_done = True
            else:
                body.set_source(stream)
            stream.in_body = body
            d, stream.deferred = stream.deferred, None
            if d is not None:
                self._responses.append((d, Response(head, body)))
            if stream.in_done:
                self._maybe_forget(stream)

    def _handle(self, events) -> None:
        super()._handle(events)
        # Responses are passed on at the end of the read, so a small one
        # whose DATA and END_STREAM came in the same read goes on complete
        # (the server end then sends HEADERS and one DATA ending the stream).
        responses = self._responses
        if responses:
            self._responses = []
            for pending, response in responses:
                error = response.body.error
                if isinstance(error, MalformedError):   # in this same read
                    pending.fail(ProxyError.bad_gateway(f"invalid response: {error.reason}"))
                else:
                    pending.respond(response)

    def _on_end(self, stream: Stream) -> None:
        super()._on_end(stream)

    def _peer_reset(self, stream: Stream, code: int) -> None:
        stream.reset = True
        d, stream.deferred = stream.deferred, None
        if d is not None and not d.done:
            code = _code(code)
            # An unknown code (RFC 9113 7: no special meaning) is not named:
            # the reason is a metric label, and a peer picks the number.
            name = code.name if isinstance(code, ErrorCodes) else "unknown error code"
            if code == ErrorCodes.REFUSED_STREAM:
                error = ProxyError.unavailable(f"upstream refused stream ({name})")
            else:
                error = ProxyError.bad_gateway(f"upstream reset stream ({name})")
            d.fail(error)
        self._release(stream, StreamResetError(code))

    def reset(self, stream: Stream, code: int) -> None:
        d, stream.deferred = stream.deferred, None
        super().reset(stream, code)
        if d is not None:
            d.fail(ProxyError.bad_gateway("request abandoned"))

    def _malformed(self, stream: Stream, reason: str) -> None:
        # The endpoint's response is malformed: its stream is reset, the
        # request fails with 502 (before the response was handed on) or the
        # response body fails (after: the server end cuts its client off).
        if stream.reset:
            return
        d, stream.deferred = stream.deferred, None
        stream.reset = True
        if not self._lost and not (stream.out_done and stream.in_done):
            with suppress(ProtocolError):
                self.h2.reset_stream(stream.sid, ErrorCodes.PROTOCOL_ERROR)
            self._write()
        self._release(stream, MalformedError(reason))
        if d is not None:
            d.fail(ProxyError.bad_gateway(f"invalid response: {reason}"))

    def inbound_stopped(self, stream: Stream) -> None:
        # The response body's consumer is gone: cancel the upstream stream.
        if not stream.in_done:
            self.reset(stream, ErrorCodes.CANCEL)

    def _connection_failed_stream(self, stream: Stream, reason: Exception) -> None:
        stream.reset = True
        d, stream.deferred = stream.deferred, None
        if d is not None:
            d.fail(reason if isinstance(reason, ProxyError)
                      else ProxyError.bad_gateway(str(reason)))
        self._release(stream, ConnectionAbortedError(str(reason)))

    def _stream_gone(self, stream: Stream) -> None:
        if self._lost:
            return
        if self.goaway:
            if not self.streams:
                self._lose_connection()
        else:
            self.pool.ready(self)

    def _goaway(self, event: ConnectionTerminated) -> None:
        self.goaway = True
        last = event.last_stream_id if event.last_stream_id is not None else _MAX_STREAM_ID
        unprocessed = [sid for sid in self.streams if sid > last]
        # Streams the GOAWAY did not process were not taken: a connection
        # that took none refused all work, and its requests are not sent
        # again (on a new connection that would do the same: a dial loop).
        self.streams_started -= len(unprocessed)
        fruitless = self.streams_started <= 0
        self.pool.retire(self)
        # The streams it spares still send and receive (ProxyH2Connection stays open).
        for sid in unprocessed:
            stream = self.streams.get(sid)
            if stream is None:
                continue
            pending = stream.pending
            stream.reset = True
            d, stream.deferred = stream.deferred, None
            self._release(stream, ConnectionAbortedError("upstream GOAWAY"))
            if d is not None and not d.done:
                request = pending.request
                if fruitless:
                    d.fail(ProxyError.not_placed(
                        f"endpoint {self.pool.label} accepts no streams"))
                elif request.body.is_empty:
                    # Never processed (the GOAWAY says so) and nothing to
                    # replay: send it again, elsewhere.
                    pending.request = Request(request.head, Body.empty())
                    pending.stream = None
                    self.pool.submit(pending)
                else:
                    d.fail(ProxyError.unavailable("upstream GOAWAY before the request"))
        if not self.streams:
            self._lose_connection()
