"""The HTTP/2 codec ends: a server end facing clients, a client end facing endpoints.

Both sit on ``h2.connection.H2Connection`` and translate streams to and from
the protocol-neutral exchange (``l5dproxy.exchange.message``), so routing,
balancing and metrics never see HTTP/2.

Flow control runs end to end. Received DATA is acknowledged (its
``flow_controlled_length``, padding included) only once the body it went
into is not paused: a slow consumer on the far side holds the acks back,
the peer's window closes, and the proxy's memory stays flat. Sending
respects the peer's windows and frame size, slicing memoryviews (never
re-slicing a large buffer per frame), and stops while the transport's write
buffer is full (the protocol is the transport's streaming producer). What
waits to be sent on a stream pauses the body feeding it past
``OUT_HIGH_WATER``.

One h2 quirk is worked around on purpose: h2 moves the whole connection to
CLOSED when a GOAWAY is sent or received, after which it refuses even the
frames of streams the GOAWAY lets finish. So the graceful GOAWAY on drain is
written as a raw frame, and a received GOAWAY only reports itself
(``ProxyH2Connection``): the streams it spares, and a client's streams after its
own GOAWAY, still send and receive their frames.

A failure on one stream only ever affects that stream. Every h2 operation on
a stream (headers, data, trailers, reset, acknowledgement) may find it, or
the connection, already closed on this side: the peer's RST_STREAM or GOAWAY
may sit in the same read as the frame being answered, a response may come
back for a stream its client reset. Such a refusal ends the stream locally
(``_send_failed``) and never raises into the caller, which is often the
other connection's ``dataReceived`` or a Deferred's callback.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import FlowControlError, NoAvailableStreamIDError, ProtocolError
from h2.settings import SettingCodes, Settings
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from l5dproxy.exchange.message import Body, BodyLengthError, Headers, ProxyError, Request, Response
from l5dproxy.http.h2.abuse import AbuseBudget
from l5dproxy.http.h2.connection import (
    _H2_CONFIG,
    _MAX_STREAM_ID,
    H2Settings,
    ProxyH2Connection,
    StreamResetError,
    _code,
    closed_streams_kept,
)
from l5dproxy.http.h2.stream import OUT_LOW_WATER, Stream
from l5dproxy.http.h2.translate import (
    MalformedError,
    declared_length,
    h2_request_headers,
    h2_trailers,
    response_head_from_h2,
    trailers_from_h2,
)
from l5dproxy.net.batchsend import BatchSender
from l5dproxy.net.connection import errno_name, set_no_delay
from l5dproxy.net.writebound import WriteBound
from l5dproxy.route.dispatcher import as_proxy_error

if TYPE_CHECKING:
    pass

log = Logger(namespace="l5dproxy.h2")


#: Frames queued in h2 past which they are written at once rather than at
#: the end of the reactor turn (a body sent within a large window).
FLUSH_AT = 64 * 1024

#: Requests one endpoint's pool keeps waiting for a stream (connections at
#: ``max_connections_per_endpoint``, or being made); more are answered 503 at
#: once. Envoy's default ``max_pending_requests`` per cluster.
WAITING_LIMIT = 1024


@implementer(IPushProducer)
class H2Protocol(Protocol):
    """What the server and client ends share: the h2 connection, writing,
    sending bodies within the windows, acknowledging what was consumed."""

    h2: H2Connection

    def __init__(self) -> None:
        self.streams: dict[int, Stream] = {}
        self._blocked: dict[int, Stream] = {}   # streams with data waiting for a window
        self._write_paused = False
        self._lost = False
        #: Plain TCP: frames are taken from h2 and sent once per reactor
        #: turn (batchsend), however many events queued them.
        self._sender: BatchSender | None = None
        self._flush_queued = False
        self._unflushed = 0
        #: stream id -> flow-controlled bytes received in this read and
        #: taken by their consumer, acknowledged at its end (_send_acks).
        self._acks: dict[int, int] = {}
        #: What the peer has made us do for nothing (set at connectionMade).
        self.budget: AbuseBudget | None = None
        #: What we have queued for a peer that does not read (_start_writing).
        self._bound: WriteBound | None = None

    # -- writing --

    def _start_writing(self) -> None:
        """connectionMade: pick how frames are written."""
        sender = BatchSender(self.transport)
        if sender.batch is not None:
            self._sender = sender
        self._bound = WriteBound(self.transport.pauseProducing, self._resume_reading,
                                 self._write_overflow)

    def _write(self) -> None:
        """h2 has frames to send: now, or (plain TCP) at the end of this
        reactor turn, together with whatever the rest of the turn adds."""
        if self._sender is None:
            self._flush_now()
        elif not self._flush_queued:
            self._flush_queued = True
            self._sender.batch.add(self)

    def flush(self) -> None:
        """The end of the reactor turn (batchsend): send what h2 queued."""
        self._flush_queued = False
        self._flush_now()

    def _flush_now(self) -> None:
        data = self.h2.data_to_send()
        if data and not self._lost:
            self._count_written(len(data))
            sender = self._sender
            if sender is None:
                self.transport.write(data)
            else:
                sender.write_now(data)
            self._bound.wrote(len(data))

    def _resume_reading(self) -> None:
        if not self._lost:
            self.transport.resumeProducing()

    def _write_overflow(self) -> None:
        """``WriteBound``: the peer has left more than the hard limit unread
        while it was not being read: the connection is aborted, counted."""
        log.info("h2 peer {peer} does not read: more than {limit} bytes queued, aborted",
                 peer=self._peer(), limit=self._bound.limit)
        self._count_abuse("write_buffer")
        self._lost = True
        self.transport.abortConnection()

    def _lose_connection(self) -> None:
        self._flush_now()
        self.transport.loseConnection()

    def _count_written(self, n: int) -> None:
        pass

    def pauseProducing(self) -> None:
        self._write_paused = True
        self._bound.full()   # and the peer is not read until it drains

    def resumeProducing(self) -> None:
        self._write_paused = False
        self._bound.drained()
        self._send_blocked()

    def stopProducing(self) -> None:
        self._write_paused = True

    # -- sending bodies --

    def send_stream(self, stream: Stream) -> None:
        """Send what the stream has queued, as far as windows and the
        transport allow; then its end (trailers or END_STREAM) once empty."""
        if stream.reset or self._lost:
            return
        try:
            ended = self._send_frames(stream)
        except ProtocolError as e:
            self._send_failed(stream, e)
            return
        if ended:
            self._outbound_done(stream)
        elif stream.out_paused and stream.out_queued < OUT_LOW_WATER:
            stream.out_paused = False
            stream.out_body.resume()

    def _send_frames(self, stream: Stream) -> bool:
        """The h2 side of ``send_stream``; True once the stream's end is sent."""
        h2 = self.h2
        sid = stream.sid
        if stream.out_headers is not None and (stream.out_queue or not stream.out_end
                                               or stream.out_trailers):
            headers, _ = stream.out_headers
            stream.out_headers = None
            h2.send_headers(sid, headers)
        queue = stream.out_queue
        while queue:
            if self._write_paused:
                self._blocked[sid] = stream
                break
            window = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
            if window <= 0:
                self._blocked[sid] = stream
                break
            chunk = queue[0]
            if len(chunk) <= window:
                queue.popleft()
                n = len(chunk)
            else:
                queue[0] = chunk[window:]
                chunk = chunk[:window]
                n = window
            stream.out_queued -= n
            if not queue and stream.out_end and not stream.out_trailers:
                stream.out_done = True   # the last chunk ends the stream
                self._blocked.pop(sid, None)
                h2.send_data(sid, chunk, end_stream=True)
                self._unflushed += n
                self._write()
                return True
            h2.send_data(sid, chunk)
            self._unflushed += n
            if self._unflushed >= FLUSH_AT:
                self._unflushed = 0
                self._flush_now()
            else:
                self._write()
        else:
            self._blocked.pop(sid, None)
            if stream.out_end and not stream.out_done:
                stream.out_done = True
                if stream.out_headers is not None:
                    headers, _ = stream.out_headers
                    stream.out_headers = None
                    h2.send_headers(sid, headers, end_stream=True)
                elif stream.out_trailers:
                    h2.send_headers(sid, h2_trailers(stream.out_trailers), end_stream=True)
                else:
                    h2.end_stream(sid)
                self._write()
                return True
        return False

    def _send_failed(self, stream: Stream, error: ProtocolError) -> None:
        """h2 refused to send on ``stream``: it (or the whole connection) is
        already closed on this side, by a RST_STREAM or GOAWAY whose event is
        still to be handled, or the connection is going down. This stream
        alone ends, locally; nothing is raised into whoever was sending."""
        if stream.reset:
            return
        closed = self._lost or self.h2.state_machine.state is ConnectionState.CLOSED
        if isinstance(error, FlowControlError):   # ours to fix, not the peer's doing
            log.warn("h2 stream {sid} to {peer} refused: {error}", sid=stream.sid,
                     peer=self._peer(), error=error)
        else:
            log.debug("h2 stream {sid} to {peer} already closed: {error}", sid=stream.sid,
                      peer=self._peer(), error=error)
        if closed:
            self._connection_failed_stream(
                stream, ProxyError.bad_gateway(f"connection to {self._peer()} closed"))
            return
        with suppress(ProtocolError):   # still open in h2's view: end it there too
            self.h2.reset_stream(stream.sid, ErrorCodes.INTERNAL_ERROR)
        self._write()
        self._peer_reset(stream, ErrorCodes.STREAM_CLOSED)

    def _send_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self._write_paused:
                return
            self.send_stream(stream)

    def _start_outbound(self, stream: Stream, headers: Headers, body: Body) -> None:
        """Send ``headers`` and then ``body`` on the stream. The headers wait
        for the body's first event, so an empty body ends on HEADERS."""
        stream.out_headers = (headers, True)
        stream.out_body = body
        body.consume(stream)
        if stream.reset or self._lost:
            return
        stream.out_headers = (headers, False)
        if stream.out_queue or stream.out_end:
            # What the body had buffered (a small response is often all of
            # it): HEADERS, then DATA ending the stream, in one go.
            self.send_stream(stream)
            return
        stream.out_headers = None
        try:
            self.h2.send_headers(stream.sid, headers)
        except ProtocolError as e:
            self._send_failed(stream, e)
            return
        self._write()

    # -- receiving --

    def ack(self, sid: int, n: int) -> None:
        """A paused consumer resumed: the stream window of what was held for
        it comes back (its connection window already did, as it arrived)."""
        if self._lost:
            return
        self.h2.acknowledge_stream_data(n, sid)
        self._write()

    def _on_data(self, event: DataReceived) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        n = event.flow_controlled_length
        if stream is not None and stream.in_body is not None and not (
                stream.in_discard or stream.in_done):
            if event.data:
                try:
                    stream.in_body.write(event.data)
                except BodyLengthError as e:   # more DATA than its content-length
                    self._malformed(stream, e.reason)
            if n and stream.in_paused and not stream.in_discard and not stream.reset:
                # Held for a paused consumer: the stream window stays closed
                # (it bounds what is held: initial_window_size), the connection
                # window comes back at once, so one stalled stream never
                # stalls the others sharing the connection (key 0: the
                # connection only, in _send_acks).
                stream.held += n
                acks = self._acks
                acks[0] = acks.get(0, 0) + n
                return
        if n:   # taken (or dropped): acknowledged at the end of the read
            acks = self._acks
            acks[sid] = acks.get(sid, 0) + n

    def _send_acks(self) -> None:
        """The end of a read: acknowledge what the consumers took, summed per
        stream; a stream the peer has ended (or that is gone) gets no stream
        window back, so its bytes go into one connection WINDOW_UPDATE."""
        acks, self._acks = self._acks, {}
        if self._lost:
            return
        h2 = self.h2
        streams = self.streams
        spent = 0
        for sid, n in acks.items():
            stream = streams.get(sid)
            if stream is None or stream.in_done:
                spent += n
                continue
            with suppress(ProtocolError):   # h2 already ignores closed streams
                h2.acknowledge_received_data(n, sid)
        if spent:
            h2.acknowledge_connection_data(spent)

    def _on_end(self, stream: Stream) -> None:
        if stream.in_done:
            return
        body = stream.in_body
        if body is not None and not body.ended:
            try:   # on DATA or on trailers: short of its content-length?
                body.check_complete()
            except BodyLengthError as e:
                self._malformed(stream, e.reason)
                return
            stream.in_done = True
            body.finish(stream.in_trailers)
        stream.in_done = True
        self._maybe_forget(stream)

    def _malformed(self, stream: Stream, reason: str) -> None:
        """The peer's message on ``stream`` is malformed (RFC 9113 8.1.1):
        a stream error, RST_STREAM PROTOCOL_ERROR; what was forwarded of it
        fails (a client end aborts its upstream connection)."""
        self.reset(stream, ErrorCodes.PROTOCOL_ERROR)

    def reset(self, stream: Stream, code: int) -> None:
        """Reset the stream (our decision), and let go of both bodies."""
        if stream.reset:
            return
        stream.reset = True
        if not self._lost and not (stream.out_done and stream.in_done):
            with suppress(ProtocolError):   # already closed in h2's view
                self.h2.reset_stream(stream.sid, code)
            self._write()
        self._release(stream, StreamResetError(code))

    def _release(self, stream: Stream, reason: Exception) -> None:
        """The stream is over, one way or another: fail or cancel what is left."""
        stream.reset = True
        self._blocked.pop(stream.sid, None)
        stream.out_queue.clear()
        stream.out_queued = 0
        stream.held = 0   # its connection window came back as it arrived
        if stream.out_body is not None and not stream.out_done:
            stream.out_body.cancel()
        body = stream.in_body
        if body is not None and not stream.in_done:
            stream.in_done = True
            body.fail(reason)
        self.streams.pop(stream.sid, None)
        self._stream_gone(stream)

    def _maybe_forget(self, stream: Stream) -> None:
        if stream.in_done and stream.out_done and self.streams.get(stream.sid) is stream:
            del self.streams[stream.sid]
            if self.budget is not None:
                self.budget.earn()   # a completed stream
            self._stream_gone(stream)

    def _handle(self, events) -> None:
        try:
            self._handle_events(events)
        finally:
            if self._acks:
                self._send_acks()
        budget = self.budget
        if budget is not None and budget.exceeded and not self._lost:
            self._enhance_your_calm()
            return
        self._write()

    def _handle_events(self, events) -> None:
        budget = self.budget
        for event in events:
            if budget is not None and budget.exceeded:
                return   # the rest of the read is dropped: the connection ends
            kind = type(event)
            if kind is DataReceived:
                self._on_data(event)
            elif kind is WindowUpdated:
                if event.stream_id:
                    stream = self._blocked.get(event.stream_id)
                    if stream is not None:
                        self.send_stream(stream)
                else:
                    self._send_blocked()
            elif kind is StreamEnded:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self._on_end(stream)
            elif kind is TrailersReceived:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    try:
                        stream.in_trailers = trailers_from_h2(event.headers)
                    except MalformedError as e:
                        self._malformed(stream, e.reason)
            elif kind is StreamReset:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    self._peer_reset(stream, event.error_code)
            elif kind is RemoteSettingsChanged:
                self._settings_changed(event)
                self._send_blocked()
            elif kind is ConnectionTerminated:
                self._goaway(event)
            else:
                self._other_event(event)

    def _receive(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            log.info("h2 protocol error from {peer}: {error}", peer=self._peer(), error=e)
            self._lose_connection()    # h2 queued the GOAWAY with the error's code
            self._lost = True
            self._fail_all(ProxyError.bad_gateway("h2 protocol error"))
            return
        self._handle(events)

    def _fail_all(self, reason: Exception) -> None:
        for stream in list(self.streams.values()):
            self._connection_failed_stream(stream, reason)
        self._blocked.clear()

    def _new_budget(self, settings: H2Settings, clock) -> None:
        """connectionMade: the peer's ``AbuseBudget``, told of its frames."""
        self.budget = AbuseBudget(settings.abuse_budget, settings.abuse_refill_per_second,
                                  clock)
        self.h2.budget = self.budget

    def _enhance_your_calm(self) -> None:
        """The peer crossed its ``AbuseBudget``: GOAWAY(ENHANCE_YOUR_CALM),
        every stream ends (its upstream work cancelled), and the connection
        closes (RFC 9113 5.4.1; Envoy, nginx and Linkerd do the same)."""
        kind = self.budget.worst()
        log.info("h2 peer {peer} crossed its abuse budget ({spent}): GOAWAY ENHANCE_YOUR_CALM",
                 peer=self._peer(), spent=self.budget.spent)
        self._count_abuse(kind)
        with suppress(ProtocolError):
            self.h2.close_connection(error_code=ErrorCodes.ENHANCE_YOUR_CALM,
                                     last_stream_id=self._last_stream_seen())
        self._flush_now()
        self._lost = True
        self._fail_all(ProxyError.bad_gateway(
            f"h2 peer {self._peer()} crossed its abuse budget ({kind})"))
        self._close_now()

    # -- hooks for the two sides --

    def _peer(self) -> str:
        return ""

    def _count_abuse(self, kind: str) -> None:
        pass

    def _last_stream_seen(self) -> int | None:
        return None

    def _close_now(self) -> None:
        self.transport.loseConnection()

    def _settings_changed(self, event: RemoteSettingsChanged) -> None:
        pass

    def _other_event(self, event) -> None:
        pass

    def _goaway(self, event: ConnectionTerminated) -> None:
        pass

    def _peer_reset(self, stream: Stream, code: int) -> None:
        raise NotImplementedError

    def inbound_stopped(self, stream: Stream) -> None:
        pass

    def _outbound_done(self, stream: Stream) -> None:
        self._maybe_forget(stream)

    def _stream_gone(self, stream: Stream) -> None:
        pass

    def _connection_failed_stream(self, stream: Stream, reason: Exception) -> None:
        raise NotImplementedError


# -- the client end --

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
