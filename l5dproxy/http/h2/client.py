"""The HTTP/2 client end: one connection to an endpoint, carrying many streams.

``H2ClientProtocol`` starts a stream for each request its pool hands it
(``start``), translates the response (``translate.response_head_from_h2``, a
malformed one failing that request with 502), honours the endpoint's
SETTINGS_MAX_CONCURRENT_STREAMS and GOAWAY, and tells its pool when it is
ready, settled, retired or lost. The pool and the requests are declared
here as ``PoolSide`` and ``AttemptSide`` (``pool._EndpointPool`` and
``pool.H2Attempt``) so that only ``pool.py`` imports this module.

A connection with no stream open for its pool's ``target.idle_timeout``
sends GOAWAY(NO_ERROR) and closes (README: ``idle_timeout``; Envoy's
``idle_timeout`` of upstream HTTP/2 connections does the same). The timer is
armed when the last stream ends (or at the endpoint's first SETTINGS) and
not touched while streams come and go: at expiry a busy connection is left
alone (the next idle period arms it again), a recently busy one waits for
the rest of its idle time.
"""


from __future__ import annotations

from contextlib import suppress
from typing import TYPE_CHECKING, Any, Protocol

from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, RemoteSettingsChanged, ResponseReceived
from h2.exceptions import NoAvailableStreamIDError, ProtocolError
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.exchange.message import Body, BodyLengthError, ProxyError, Request, Response
from l5dproxy.http.h2.codec import client_codec
from l5dproxy.http.h2.connection import _MAX_STREAM_ID, StreamResetError, _code
from l5dproxy.http.h2.protocol import H2Protocol
from l5dproxy.http.h2.stream import Stream
from l5dproxy.http.h2.translate import (
    MalformedError,
    declared_length,
    h2_request_headers,
    response_head_from_h2,
)
from l5dproxy.net.connection import errno_name, set_no_delay

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from l5dproxy.config.model import Target
    from l5dproxy.telemetry import TcpSideMetrics

log = Logger()


class AttemptSide(Protocol):
    """A request a connection carries (``pool.H2Attempt``)."""

    request: Request
    stream: Stream | None

    def respond(self, response: Response) -> None:
        """The response head arrived (its body follows)."""

    def fail(self, error: Exception) -> None:
        """The request failed before a response."""


class PoolSide(Protocol):
    """The pool that dialled a connection (``pool._EndpointPool``)."""

    #: ``pool.H2Client``: its ``settings``, ``metrics`` and ``reactor``.
    client: Any
    #: The service's settings: its name labels the dst metrics; idle_timeout.
    target: Target
    label: str
    #: The service is gone (a reload): close as soon as no stream is open.
    retired: bool

    def connected(self, conn: H2ClientProtocol) -> None:
        """``conn``'s TCP connection is made."""

    def settled(self, conn: H2ClientProtocol) -> None:
        """``conn`` received the endpoint's first SETTINGS."""

    def ready(self, conn: H2ClientProtocol) -> None:
        """``conn`` may take another stream."""

    def retire(self, conn: H2ClientProtocol) -> None:
        """``conn`` takes no new streams (GOAWAY, or its stream ids ran out)."""

    def lost(self, conn: H2ClientProtocol) -> None:
        """``conn`` closed."""

    def submit(self, pending: Any) -> None:
        """Carry ``pending`` (an attempt this pool started on the
        connection: ``pool.H2Attempt``) on another connection (or queue it)."""


class H2ClientProtocol(H2Protocol):
    """One HTTP/2 connection to an endpoint, carrying many streams."""

    def __init__(self, pool: PoolSide) -> None:
        super().__init__()
        self.pool = pool
        self.settings_received = False
        #: Why the connection ended (the pool reads it: a TLS error names itself).
        self.lost_reason: Failure | None = None
        self.goaway = False
        #: Streams started on it so far (0 at the end: it took no work).
        self.streams_started = 0
        #: (pending, response) received in this read, passed on at its end.
        self._responses: list[tuple[AttemptSide, Response]] = []
        self.dst: TcpSideMetrics | None = None
        self.connected_at = 0.0
        #: The idle deadline's timer (while no stream is open) and when the
        #: last stream ended.
        self._idle_timer: IDelayedCall | None = None
        self._idle_since = 0.0

    def connectionMade(self) -> None:
        s = self.pool.client.settings
        self.h2 = client_codec(s)
        client = self.pool.client
        self._new_budget(s, client.reactor)
        if client.metrics is not None:
            # Shared by every listener that routes here: no listener label.
            dst = self.dst = client.metrics.tcp_side("dst", "", self.pool.target.service, "h2",
                                                     self.pool.label)
            dst.opened()
        self.connected_at = client.reactor.seconds()
        transport: Any = self.transport   # a TCP transport: ITCPTransport and IConsumer
        set_no_delay(transport)
        transport.registerProducer(self, True)
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

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._lost = True
        self.lost_reason = reason
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._fail_all(ProxyError.bad_gateway(f"connection to {self.pool.label} lost"))
        if self.dst is not None:
            self.dst.closed(errno_name(reason),
                            self.pool.client.reactor.seconds() - self.connected_at)
            self.dst = None
        self.pool.lost(self)

    def capacity(self) -> int:
        if not self.settings_received or self.goaway or self._lost:
            return 0
        return self.h2.remote_max_concurrent_streams - len(self.streams)

    def _settings_changed(self, event: RemoteSettingsChanged) -> None:
        if not self.settings_received:
            self.settings_received = True
            self.pool.settled(self)
            self.pool.ready(self)
            if not self.streams and not self._lost:
                self._went_idle()   # usable, and nothing for it yet
            return
        self.pool.ready(self)

    def start(self, pending: AttemptSide) -> None:
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
            if not self.streams:
                self._went_idle()

    # -- idle timeout --

    def _went_idle(self) -> None:
        """The last stream ended: the idle time starts (the timer is armed
        once; a connection whose pool is retired closes at once)."""
        reactor = self.pool.client.reactor
        self._idle_since = reactor.seconds()
        if self._idle_timer is None:
            pool = self.pool
            self._idle_timer = reactor.callLater(
                0 if pool.retired else pool.target.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        """The idle deadline: a connection without streams for the target's
        ``idle_timeout`` sends GOAWAY(NO_ERROR) and closes; a busy one is
        left alone (``_went_idle`` arms the timer again)."""
        self._idle_timer = None
        if self._lost or self.goaway or self.streams:
            return
        pool = self.pool
        reactor = pool.client.reactor
        if not pool.retired:
            wait = self._idle_since + pool.target.idle_timeout - reactor.seconds()
            if wait > 0:
                self._idle_timer = reactor.callLater(wait, self._idle_check)
                return
        self.goaway = True
        pool.retire(self)
        with suppress(ProtocolError):
            self.h2.close_connection(error_code=ErrorCodes.NO_ERROR)
        self._lose_connection()

    def idle_timeout_changed(self) -> None:
        """Its pool's target changed or was retired (a reload): an idle
        connection checks its deadline against the new idle timeout now."""
        timer, self._idle_timer = self._idle_timer, None
        if timer is not None:
            if timer.active():
                timer.cancel()
            self._idle_check()

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
