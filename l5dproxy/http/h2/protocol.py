"""The HTTP/2 protocol both ends share: writing, windows, acks, events, abuse.

``H2Protocol`` is the base of the server end facing clients (``server.py``)
and the client end facing endpoints (``client.py``, ``pool.py``). Both sit on
``ProxyH2Connection`` (``connection.py``) and translate streams
(``stream.py``) to and from the protocol-neutral exchange
(``l5dproxy.exchange.message``, through ``translate.py``), so routing,
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

from contextlib import suppress
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import FlowControlError, ProtocolError
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from l5dproxy.exchange.message import Body, BodyLengthError, Headers, ProxyError
from l5dproxy.http.h2.abuse import AbuseBudget
from l5dproxy.http.h2.connection import StreamResetError
from l5dproxy.http.h2.stream import OUT_LOW_WATER, Stream
from l5dproxy.http.h2.translate import MalformedError, h2_trailers, trailers_from_h2
from l5dproxy.net.batchsend import BatchSender
from l5dproxy.net.transport import IStreamTransport
from l5dproxy.net.writebound import WriteBound

if TYPE_CHECKING:
    from l5dproxy.config.model import H2Config
    from l5dproxy.http.h2.codec import H2Codec

log = Logger()


#: Frames queued in h2 past which they are written at once rather than at
#: the end of the reactor turn (a body sent within a large window).
FLUSH_AT = 64 * 1024


@implementer(IPushProducer)
class H2Protocol(Protocol):
    """What the server and client ends share: the h2 connection, writing,
    sending bodies within the windows, acknowledging what was consumed."""

    h2: H2Codec
    transport: IStreamTransport
    #: What we have queued for a peer that does not read (set at connectionMade).
    _bound: WriteBound

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
        batch = self._sender.batch if self._sender is not None else None
        if batch is None:
            self._flush_now()
        elif not self._flush_queued:
            self._flush_queued = True
            batch.add(self)

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
            if stream.out_body is not None:
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
        closed = self._lost or self.h2.closed
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
            # Its bodies and its attempt point back at it (source, sink,
            # ``H2Attempt.stream``): without these edges they go by reference
            # counting once the exchange lets go, not at the cyclic garbage
            # collector's next pass (about 16 objects per request otherwise).
            stream.in_body = stream.out_body = stream.pending = None

    def _handle(self, events) -> None:
        try:
            self._handle_events(events)
        finally:
            if self._acks:
                self._send_acks()
        budget = self.budget
        if budget is not None and budget.exceeded and not self._lost:
            self._enhance_your_calm(budget)
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

    def _new_budget(self, settings: H2Config, clock) -> None:
        """connectionMade: the peer's ``AbuseBudget``, told of its frames."""
        self.budget = AbuseBudget(settings.abuse_budget, settings.abuse_refill_per_second,
                                  clock)
        self.h2.budget = self.budget

    def _enhance_your_calm(self, budget: AbuseBudget) -> None:
        """The peer crossed its ``AbuseBudget``: GOAWAY(ENHANCE_YOUR_CALM),
        every stream ends (its upstream work cancelled), and the connection
        closes (RFC 9113 5.4.1; Envoy, nginx and Linkerd do the same)."""
        kind = budget.worst()
        log.info("h2 peer {peer} crossed its abuse budget ({spent}): GOAWAY ENHANCE_YOUR_CALM",
                 peer=self._peer(), spent=budget.spent)
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
