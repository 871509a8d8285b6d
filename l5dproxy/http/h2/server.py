"""The HTTP/2 server end: streams from one client become dispatched requests.

``h2_handler`` builds an ``H2ServerProtocol`` for each connection detected as
h2 (prior knowledge). Each request stream is translated
(``translate.request_head_from_h2``, a malformed one refused as a stream
error), dispatched, and its response written back on the stream; a drain
sends a graceful GOAWAY and lingers ``LINGER_SECONDS`` for the client to
close its side.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.events import RemoteSettingsChanged, RequestReceived
from h2.exceptions import ProtocolError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.exchange.contracts import RequestContext
from l5dproxy.exchange.message import (
    Body,
    BodyLengthError,
    ProxyError,
    Request,
    Response,
    error_response,
)
from l5dproxy.http.h2.codec import server_codec
from l5dproxy.http.h2.connection import StreamResetError
from l5dproxy.http.h2.protocol import H2Protocol
from l5dproxy.http.h2.stream import Stream
from l5dproxy.http.h2.translate import (
    MalformedError,
    _is_grpc,
    declared_length,
    h2_response_headers,
    header_list_size,
    request_head_from_h2,
)
from l5dproxy.net.connection import set_no_delay

if TYPE_CHECKING:
    from l5dproxy.config.model import H2Config
    from l5dproxy.exchange.contracts import Dispatcher, HttpSite
    from l5dproxy.http.h2.abuse import AbuseBudget
    from l5dproxy.net.connection import InboundConnection

log = Logger()


#: How long a closing connection waits for the client to close its side.
LINGER_SECONDS = 2.0


def h2_handler(dispatcher: Dispatcher, settings: H2Config, sites: Callable[[Any], HttpSite],
               ) -> Callable[[InboundConnection], H2ServerProtocol]:
    """The listener handler for the ``h2`` verdict: ``settings`` is ``[h2]``;
    ``sites`` gives each connection's listener's ``HttpSite``."""

    def handler(conn: InboundConnection) -> H2ServerProtocol:
        return H2ServerProtocol(conn, dispatcher, settings, sites(conn.listener))

    return handler


class H2ServerProtocol(H2Protocol):
    """Speaks HTTP/2 to one client: each stream becomes a dispatched Request."""

    #: Made at connectionMade (``_new_budget``), before any frame is read.
    budget: AbuseBudget
    #: The listener's clock (timers, idleness), from connectionMade on.
    _clock: IReactorTime

    def __init__(self, conn: InboundConnection, dispatcher: Dispatcher,
                 settings: H2Config, site: HttpSite) -> None:
        super().__init__()
        self.conn = conn
        self.dispatcher = dispatcher
        self.settings = settings
        self.site = site
        self.context = RequestContext(self.site, conn, "h2")
        self.draining = False
        self._last_stream_id = 0
        self._how = "client closed"
        self._linger_timer: IDelayedCall | None = None
        #: Until the client's SETTINGS: closes the connection (preface_timeout).
        self._preface_timer: IDelayedCall | None = None
        #: Checks the connection for idleness every idle_timeout seconds;
        #: ``_idle_since``: when its last stream ended (or it opened).
        self._idle_timer: IDelayedCall | None = None
        self._idle_since = 0.0

    def connectionMade(self) -> None:
        s = self.settings
        clock = self._clock = self.site.clock
        if s.preface_timeout:
            self._preface_timer = clock.callLater(s.preface_timeout, self._preface_timed_out)
        if s.idle_timeout:
            self._idle_since = clock.seconds()
            self._idle_timer = clock.callLater(s.idle_timeout, self._idle_check)
        # Streams past max_concurrent_streams are refused here
        # (REFUSED_STREAM), not by the codec; header lists past the
        # advertised size get a 431, up to the codec's hard cap.
        self.h2 = server_codec(s)
        self._new_budget(s, clock)
        set_no_delay(self.transport)
        self.transport.registerProducer(self, True)
        self._start_writing()
        self.conn.on_drain = self.drain
        self._write()

    def dataReceived(self, data: bytes) -> None:
        self.conn.count_read(len(data))
        if self._linger_timer is not None:
            return  # closing: what the client still sends is read and dropped
        self._receive(data)
        if self.draining and not self.streams:
            self._close()

    def _count_written(self, n: int) -> None:
        self.conn.count_written(n)

    def _peer(self) -> str:
        return self.conn.peer

    def _count_abuse(self, kind: str) -> None:
        self.site.count_abuse(kind)

    def _last_stream_seen(self) -> int | None:
        return self._last_stream_id

    def _close_now(self) -> None:
        self._how = "abuse budget crossed"
        self._linger()

    def _write_overflow(self) -> None:
        self._how = "write buffer limit"
        super()._write_overflow()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        for timer in (self._linger_timer, self._preface_timer, self._idle_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._preface_timer = self._idle_timer = None
        for stream in list(self.streams.values()):
            self._abandon(stream, ConnectionAbortedError("client connection lost"))
        self.conn.on_drain = None
        self.conn.closed(reason, self._how)

    # -- timeouts --

    def _settings_changed(self, event: RemoteSettingsChanged) -> None:
        timer, self._preface_timer = self._preface_timer, None
        if timer is not None and timer.active():   # the client's preface is complete
            timer.cancel()

    def _preface_timed_out(self) -> None:
        """The client sent the preface's magic but no SETTINGS within
        ``preface_timeout`` (a slowloris on h2): GOAWAY(SETTINGS_TIMEOUT)
        and close, counted in http_errors_total, as HTTP/1's
        request_header_timeout closes a client that never ends its head."""
        self._preface_timer = None
        if self._lost:
            return
        self.site.count_error("h2 preface timeout")
        self._end("preface timeout", ErrorCodes.SETTINGS_TIMEOUT)

    def _idle_check(self) -> None:
        """Every ``idle_timeout`` seconds: a connection that has had no
        stream open for that long gets a graceful GOAWAY(NO_ERROR) naming
        the last stream it processed, and is closed (nginx and Envoy close
        idle h2 connections the same way); one that is busy is checked again."""
        self._idle_timer = None
        if self._lost:
            return
        timeout = self.settings.idle_timeout
        clock = self._clock
        wait = timeout
        if not self.streams:
            wait = self._idle_since + timeout - clock.seconds()
            if wait <= 0:
                self.draining = True
                self._end("idle timeout", ErrorCodes.NO_ERROR)
                return
        self._idle_timer = clock.callLater(wait, self._idle_check)

    def _end(self, how: str, code: ErrorCodes) -> None:
        """Close now with a GOAWAY carrying ``code`` (no stream is in flight
        or worth waiting for), then linger as ``_close`` does."""
        self._how = how
        self._lost = True
        with suppress(ProtocolError):
            self.h2.close_connection(error_code=code, last_stream_id=self._last_stream_id)
            data = self.h2.data_to_send()
            self._count_written(len(data))
            self.transport.write(data)
        self._linger()

    # -- streams --

    def _other_event(self, event) -> None:
        if type(event) is RequestReceived:
            self._on_request(event)

    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        self._last_stream_id = max(self._last_stream_id, sid)
        h2 = self.h2
        if self.draining or len(self.streams) >= self.settings.max_concurrent_streams:
            if not self.draining:
                self.budget.spend("refused")
            with suppress(ProtocolError):   # the client reset it in the same read
                h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            return
        headers = event.headers
        ended = event.stream_ended is not None
        try:
            head = request_head_from_h2(headers)
            body = Body(declared_length(head))
            if ended:
                body.finish()   # BodyLengthError: content-length, no DATA
        except (MalformedError, BodyLengthError) as e:
            self._count_error(e.reason)
            self.budget.spend("refused")
            status = e.status if isinstance(e, MalformedError) else 400
            if status != 400:   # well-formed, refused: answered
                stream = self.streams[sid] = Stream(self, sid)
                stream.in_body = Body.empty()
                stream.in_discard = True
                stream.in_done = ended
                self._respond(stream, error_response(ProxyError.bad_request(
                    e.reason, status), _is_grpc(headers)))
                return
            with suppress(ProtocolError):
                h2.reset_stream(sid, ErrorCodes.PROTOCOL_ERROR)
            return
        stream = Stream(self, sid)
        stream.grpc = head.is_grpc
        self.streams[sid] = stream
        if ended:
            stream.in_done = True
        else:
            body.set_source(stream)
        stream.in_body = body
        if header_list_size(headers) > self.settings.max_header_list_size:
            self.budget.spend("refused")
            stream.in_discard = True
            self._respond(stream, error_response(
                ProxyError.bad_request("request header list too large", 431), stream.grpc))
            return
        exchange = self.dispatcher.dispatch_to(Request(head, body), self.context, self, stream)
        if not exchange.delivered:
            stream.deferred = exchange   # cancel() gives it up if the stream goes

    def dispatch_responded(self, stream: Stream, response: Response) -> None:
        """``ResponseWaiter``: the stream's response."""
        try:
            self._respond(stream, response)
        except Exception:
            self._respond_failed(stream, Failure())

    def dispatch_failed(self, stream: Stream, failure: Failure) -> None:
        """``ResponseWaiter``: no response; a ``ProxyError`` is answered as
        it says, anything else (a bug) as 502 ``internal proxy error``."""
        try:
            stream.deferred = None
            if stream.reset or self._lost:
                return
            if isinstance(failure.value, ProxyError):
                error = failure.value
            else:
                log.failure("dispatch failed", failure)
                error = ProxyError.bad_gateway("internal proxy error")
            self._respond(stream, error_response(error, stream.grpc))
        except Exception:
            self._respond_failed(stream, Failure())

    def _respond(self, stream: Stream, response: Response) -> None:
        stream.deferred = None
        if stream.reset or self._lost:
            response.body.cancel()
            return
        self._start_outbound(stream, h2_response_headers(response.head), response.body)

    def _respond_failed(self, stream: Stream, failure: Failure) -> None:
        # Writing the response raised (a bug: refusals end the stream in
        # _send_failed): this stream is reset, the connection lives on.
        log.failure("h2 response to {peer} stream {sid} failed", failure,
                    peer=self.conn.peer, sid=stream.sid)
        if not stream.reset:
            self.reset(stream, ErrorCodes.INTERNAL_ERROR)

    def _peer_reset(self, stream: Stream, code: int) -> None:
        if not stream.out_done:
            # Reset before its response was complete: whatever the request
            # cost (a dispatch, an upstream stream or connection) was for nothing.
            self.budget.spend("reset")
        self._abandon(stream, StreamResetError(code))

    def _count_error(self, reason: str) -> None:
        self.site.count_error(reason)

    def _malformed(self, stream: Stream, reason: str) -> None:
        # RST_STREAM first, then the dispatch is given up: whatever the
        # upstream answers meanwhile is not sent on a malformed stream.
        if stream.reset:
            return
        self._count_error(reason)
        # A stream error the peer caused spends a point like a peer reset
        # (MadeYouReset, CVE-2025-8671: the request was dispatched, and the
        # peer made the proxy cancel it; Envoy, nginx and h2o count it so).
        self.budget.spend("reset")
        if not self._lost and not (stream.out_done and stream.in_done):
            with suppress(ProtocolError):   # already closed in h2's view
                self.h2.reset_stream(stream.sid, ErrorCodes.PROTOCOL_ERROR)
            self._write()
        self._abandon(stream, MalformedError(reason))

    def _abandon(self, stream: Stream, reason: Exception) -> None:
        stream.reset = True
        d, stream.deferred = stream.deferred, None
        if d is not None:
            d.cancel()
        self._release(stream, reason)

    def _connection_failed_stream(self, stream: Stream, reason: Exception) -> None:
        self._abandon(stream, reason)

    def inbound_stopped(self, stream: Stream) -> None:
        # Nobody wants the rest of the request: once the response is out,
        # end the stream (RST_STREAM NO_ERROR, RFC 9113 8.1).
        if stream.out_done and not stream.in_done:
            self._reset_finished(stream)

    def _outbound_done(self, stream: Stream) -> None:
        # The response is complete and the request is not: nothing more of
        # it can matter (RFC 9113 8.1), and holding it would hold its
        # flow-control credit forever.
        if not stream.in_done:
            self.budget.earn()   # complete, though the request body is not needed
            self._reset_finished(stream)
        self._maybe_forget(stream)

    def _reset_finished(self, stream: Stream) -> None:
        stream.in_done = True
        if not self._lost:
            with suppress(ProtocolError):   # the client reset it meanwhile
                self.h2.reset_stream(stream.sid, ErrorCodes.NO_ERROR)
            self._write()
        self._release(stream, ConnectionAbortedError("request body not needed"))

    def _stream_gone(self, stream: Stream) -> None:
        if not self.streams:
            if self._idle_timer is not None:
                self._idle_since = self._clock.seconds()
            if self.draining and not self._lost:
                self._clock.callLater(0, self._close)

    # -- ending the connection --

    def drain(self) -> None:
        """Shutdown: GOAWAY now, let in-flight streams finish, then close."""
        if self.draining or self._lost:
            return
        self.draining = True
        self._how = "drained"
        if not self.streams:
            self._close()
            return
        self.h2.send_goaway(self._last_stream_id, ErrorCodes.NO_ERROR)
        self._flush_now()

    def _close(self) -> None:
        if self._lost:
            return
        self._lost = True
        try:
            self.h2.close_connection(last_stream_id=self._last_stream_id)
            data = self.h2.data_to_send()
            self._count_written(len(data))
            self.transport.write(data)
        except ProtocolError:
            pass
        self._linger()

    def _linger(self) -> None:
        """Close as nginx's lingering close does: our FIN goes after the last
        frame, then what the client still sends (a WINDOW_UPDATE for the data
        it is reading) is read and dropped until it closes too, or for
        ``LINGER_SECONDS``. Closing with unread bytes in the receive buffer
        would make the kernel answer with a RST, and a RST destroys whatever
        the client had not read yet: the end of the last response."""
        transport = self.transport
        transport.unregisterProducer()
        close_write = getattr(transport, "loseWriteConnection", None)
        if close_write is None:  # a transport that cannot half-close
            transport.loseConnection()
            return
        close_write()
        self._linger_timer = self._clock.callLater(
            LINGER_SECONDS, transport.abortConnection)
