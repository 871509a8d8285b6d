"""The HTTP/1.1 server end: wire requests in, exchanges out, responses back.

One ``H1Server`` speaks HTTP/1 on one client connection once detection says
``http1``. The parser is llhttp (through ``httptools``): it is strict where
request smuggling lives (obs-fold, ``Content-Length`` with
``Transfer-Encoding``, duplicate lengths, bad chunk sizes, header bytes) and
parses a small request in well under a microsecond; what it lets through
that a proxy must not (HTTP/0.9 and HTTP/2.0 request lines, a second
``Host``, ``Transfer-Encoding`` on HTTP/1.0 or with codings other than
``chunked``, oversized heads) is checked here.

Requests are handed to the dispatcher one at a time, in order; pipelined
requests wait their turn (their bodies buffer up to ``BODY_HIGH_WATER``, then
reading stops). Bodies stream both ways: the request body's source is this
connection (a full upstream pauses reading from the client) and the
response body is paused while the client's socket buffer is full. After a
``101 Switching Protocols`` (or a 2xx to an allowed ``CONNECT``) the client
connection and the upstream connection become a byte relay.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpRequestParser,
)
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from l5dproxy.exchange.contracts import RequestContext
from l5dproxy.exchange.message import (
    Body,
    Headers,
    ProxyError,
    Response,
)
from l5dproxy.http.h1.framing import (
    SMALL_CHUNK,
    chunk_head,
    error_head,
    frame_chunk,
    interim_head,
    last_chunk,
    response_head,
)
from l5dproxy.http.h1.request import (
    PIPELINE_DEPTH,
    RequestReader,
    _Message,
    _parser_reason,
    _RejectError,
)
from l5dproxy.http.h1.upgrade import ServerTunnel, TunnelResponse, UpgradeRequest
from l5dproxy.http.headers import HOP_BY_HOP
from l5dproxy.net.batchsend import BatchSender
from l5dproxy.net.deadline import Deadline
from l5dproxy.net.writebound import WriteBound

if TYPE_CHECKING:
    from l5dproxy.config.model import HttpConfig
    from l5dproxy.exchange.contracts import Dispatcher, HttpSite
    from l5dproxy.net.connection import InboundConnection

log = Logger()


def h1_handler(dispatcher: Dispatcher, config: HttpConfig,
               sites: Callable[[Any], HttpSite]) -> Callable[[InboundConnection], H1Server]:
    """The listener handler for the ``http1`` verdict: ``config`` is
    ``[http]``; ``sites`` gives each connection's listener's ``HttpSite``."""

    def build(conn: InboundConnection) -> H1Server:
        return H1Server(conn, dispatcher, config, sites(conn.listener))
    return build


@implementer(IHalfCloseableProtocol, IPushProducer)
class H1Server(RequestReader, ServerTunnel, Protocol):
    """HTTP/1 on one client connection."""

    def __init__(self, conn: InboundConnection, dispatcher: Dispatcher, limits: HttpConfig,
                 site: HttpSite) -> None:
        self.conn = conn
        self.dispatcher = dispatcher
        self.limits = limits
        self.site = site
        self.context = RequestContext(self.site, conn, "http1")
        self.parser: HttpRequestParser | None = None
        self.queue: deque[_Message] = deque()   # answered in order; [0] is current
        self._reading: _Message | None = None    # the message whose body is being read
        self._url: list[bytes] = []
        self._url_len = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._in_head = False
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._reject: _RejectError | None = None
        self._discarding = False
        self._pauses: set[str] = set()
        self._out_paused = False
        self._out_chunked = False
        self._out_body: Body | None = None
        self._batch: list[bytes] | None = None   # response bytes held for one write
        self._stopped = False         # no more input is read
        self._last = False            # no request after the current one is read
        self._client_eof = False
        self._draining = False
        self._closed = False
        self._ended_by = "client closed"
        self.tunnel = None
        #: The request-head and idle timeouts: times "head", "idle" or nothing.
        self._timeout = Deadline(site.clock, self._timed_out)

    # -- connection --

    def connectionMade(self) -> None:
        self._send = BatchSender(self.transport).write
        self._bound = WriteBound(lambda: self._pause_reading("write"),
                                 lambda: self._resume_reading("write"), self._write_overflow)
        self.parser = HttpRequestParser(self)
        self.transport.registerProducer(self, True)
        self.conn.on_drain = self.drain
        self._timeout.arm("idle", self.limits.idle_timeout)

    def dataReceived(self, data: bytes) -> None:
        self.conn.count_read(len(data))
        if self.tunnel is not None:
            self.tunnel.tunnel_write(data)
            return
        while data:
            data = self._parse(data)
        if self._in_head and self._timeout.wait != "head" and not self._closed:
            # A head begun in this read and not finished in it: its deadline
            # counts from now (a head read whole needs no timer moved).
            self._timeout.arm("head", self.limits.request_header_timeout)
        self._kick()

    def _parse(self, data: bytes) -> bytes:
        """Parse ``data``; what is left to parse after a stripped upgrade
        (llhttp stops at any upgrade request's head), else ``b""``."""
        reading = self._reading
        if reading is not None and reading.raw_body:
            n = min(reading.raw_body, len(data))
            chunk, data = data[:n], data[n:]
            reading.raw_body -= n
            if not self._discarding and reading.request is not None:
                reading.request.body.write(chunk)
            if not reading.raw_body:
                self.on_message_complete()
            if not data:
                return b""
        parser = self.parser
        if parser is None or self._stopped:
            return b""
        was_in_head = self._in_head
        before = self._head_bytes
        try:
            parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            return self._upgrade_read(data[upgrade.args[0]:])
        except HttpParserCallbackError as e:
            if self._reject is not None:
                self._bad_input(self._reject)
            elif not (self._stopped or self._last):   # input after a close is ignored
                log.failure("HTTP/1 server callback failed", Failure(e.__context__ or e))
                self._bad_input(_RejectError(400, "bad request"))
        except HttpParserError as e:
            if not self._stopped and not (self._last and self._reading is None):
                self._bad_input(_RejectError(400, _parser_reason(e)))
        else:
            if self._in_head and was_in_head and self._head_bytes == before:
                # A whole read inside one header line, which httptools holds
                # until it ends: count it, so a never-ending header is bounded.
                self._head_bytes += len(data)
                if self._head_bytes > self.limits.max_header_bytes:
                    self._bad_input(_RejectError(431, "request header fields too large"))
        return b""

    def readConnectionLost(self) -> None:
        """The client's FIN (``shutdown(SHUT_WR)``, or a close seen first as
        one): it sends nothing more but may still read.

        Every request received whole before the FIN is answered, in order,
        the last one with ``connection: close``, and then the connection
        closes; the one being answered goes on upstream until its response
        or ``response_timeout``. nginx 1.22 and HAProxy 2.6 do the same
        (three pipelined requests, then ``shutdown(SHUT_WR)``: three
        answers, then the close). A request the FIN cut short gets nothing
        forwarded that the client did not send: a head cut short is
        dropped; a body cut short fails (an upstream it was streaming to is
        aborted, and a 400 answers it if no response has begun), and a
        queued request whose body was cut short is answered 400 ``client
        closed mid-body`` in its turn without being dispatched (counted in
        ``http_errors_total``).
        """
        self._client_eof = True
        reading = self._reading
        if reading is not None and not reading.body_done:
            if reading.request is not None:  # the message being read has its request
                reading.request.body.fail(ConnectionLost("client closed mid-body"))
            reading.body_done = True
            reading.close_after = True
            self._reading = None
            if not reading.dispatched and reading.error is None:
                self.site.count_error("client closed mid-body")
                reading.error = ProxyError.bad_request("client closed mid-body")
        if self.tunnel is not None:
            self.tunnel.tunnel_close_write()
            return
        self._stopped = True
        self._in_head = False   # a head cut short: never completed, never timed
        if self._timeout.wait == "head":
            self._timeout.wait = None
        if self.queue:
            self.queue[-1].close_after = True   # the last answer closes
        else:
            close_transport(self.transport)

    def writeConnectionLost(self) -> None:
        if self.tunnel is None:
            close_transport(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        self._timeout.cancel()
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.tunnel_close()
            self._ended_by = "tunnel closed"
        for msg in self.queue:
            if msg.exchange is not None:
                exchange, msg.exchange = msg.exchange, None
                exchange.cancel()
            if msg.request is not None and not msg.body_done:
                msg.request.body.fail(ConnectionLost("client gone"))
                msg.body_done = True
        self.queue.clear()
        body, self._out_body = self._out_body, None
        if body is not None:
            body.cancel()
            self._ended_by = "client closed mid-response"
        self.conn.on_drain = None
        self.conn.closed(reason, self._ended_by)

    def drain(self) -> None:
        """The proxy is stopping: close now if idle, else after this response."""
        self._draining = True
        if not self.queue and not self._in_head and self.tunnel is None:
            self._ended_by = "drained"
            close_transport(self.transport)

    def _bad_input(self, reject: _RejectError) -> None:
        """Malformed input: answer it in turn, read nothing more, then close."""
        self._reject = None
        self._timeout.wait = None
        self._stopped = True
        self._in_head = False
        self.parser = None
        self.site.count_error(reject.reason)
        error = ProxyError.bad_request(reject.reason, reject.status)
        reading = self._reading
        if reading is not None and not reading.body_done:
            # Fail the request's body; answer the error instead of its
            # response (a request not yet dispatched never goes upstream).
            self._reading = None
            reading.body_done = True
            reading.close_after = True
            reading.error = error
            if reading.request is not None:  # the message being read has its request
                reading.request.body.fail(ValueError(reject.reason))
            return
        msg = _Message()
        msg.error = error
        msg.keep_alive = False
        msg.body_done = True
        self.queue.append(msg)

    # -- flow control of reading --

    def _pause_reading(self, why: str) -> None:
        if not self._pauses and not self._closed:
            self.transport.pauseProducing()
        self._pauses.add(why)

    def _resume_reading(self, why: str) -> None:
        if why in self._pauses:
            self._pauses.discard(why)
            if not self._pauses and not self._closed:
                self.transport.resumeProducing()

    # -- answering --

    def _kick(self) -> None:
        """Dispatch the request at the head of the queue, if not yet done."""
        queue = self.queue
        if queue and not queue[0].dispatched and not self._closed:
            self._dispatch(queue[0])

    def _dispatch(self, msg: _Message) -> None:
        msg.dispatched = True
        if msg.error is not None:
            self._write_error(msg, msg.error)
            return
        request = msg.request
        assert request is not None  # an error (_bad_input) or a request (on_headers_complete)
        try:
            exchange = self.dispatcher.dispatch_to(request, self.context, self, msg)
            if not exchange.delivered:
                msg.exchange = exchange   # cancel() gives it up if the client goes
        except Exception:
            log.failure("dispatcher failed")
            self._write_error(msg, ProxyError.bad_gateway("proxy error"))

    def dispatch_failed(self, msg: _Message, failure: Failure) -> None:
        """``ResponseWaiter``: no response; a ``ProxyError`` is answered as
        it says, anything else (a bug) as 502 ``proxy error``."""
        msg.exchange = None
        if self._closed:
            return
        if isinstance(failure.value, ProxyError):
            error = failure.value
        else:
            log.failure("dispatch failed", failure)
            error = ProxyError.bad_gateway("proxy error")
        self._write_error(msg, msg.error or error)

    def _write_error(self, msg: _Message, error: ProxyError) -> None:
        reason = error.reason.encode("ascii", "replace")
        close = not msg.keep_alive or not msg.body_done or msg.close_after or \
            self._draining or error.status in (400, 408, 414, 431, 505, 501, 405)
        msg.close_after = close
        self._write(error_head(error.status, reason, close, msg.version))
        self._answered(msg)

    def dispatch_responded(self, msg: _Message, response: Response) -> None:
        """``ResponseWaiter``: ``msg``'s response, answered in its turn."""
        msg.exchange = None
        if self._closed:
            response.body.cancel()
            return
        if msg.error is not None:   # the client's request turned out malformed
            response.body.cancel()
            self._write_error(msg, msg.error)
            return
        msg.response = response
        head = response.head
        status = head.status
        body = response.body
        tunnel = response.tunnel if isinstance(response, TunnelResponse) else None
        if tunnel is not None and isinstance(msg.request, UpgradeRequest):
            data, self._out_chunked, _ = response_head(head, status, msg.version, False, body,
                                                       upgrade=msg.request.upgrade)
            self._write(data)
            self._start_tunnel(msg, tunnel)
            return
        if status == 101 or tunnel is not None:
            response.body.cancel()
            if tunnel is not None:
                tunnel.tunnel_close()
            self._write_error(msg, ProxyError.bad_gateway("unexpected 101 response"))
            return
        # HEAD, 1xx, 204 and 304 have no body, whatever the headers say.
        if msg.method == b"HEAD" or status in (204, 304) or status < 200:
            data, self._out_chunked, close = response_head(
                head, status, msg.version,
                not msg.keep_alive or msg.close_after or self._draining, body, bodyless=True)
            if close:
                msg.close_after = True
            self._write(data)
            if not body.ended:
                body.cancel()
            self._answered(msg)
            return
        self._out_body = body
        if self._out_paused:
            body.pause()
        # What the body has already is written with the head, in one write.
        data, self._out_chunked, close = response_head(
            head, status, msg.version, not msg.keep_alive or msg.close_after or self._draining,
            body)
        if close:
            msg.close_after = True
        self._batch = [data]
        body.consume(self)
        if self._batch is not None:   # not ended yet: what it had goes now
            self._flush_batch()

    def _flush_batch(self) -> None:
        batch, self._batch = self._batch, None
        if batch:
            self._write(batch[0] if len(batch) == 1 else b"".join(batch))

    def _send_interim(self, head) -> None:
        """Forward a 1xx (103 Early Hints) to the client while the request
        being answered (the only one dispatched) awaits its response."""
        msg = self.queue[0] if self.queue else None
        if msg is None or not msg.dispatched or msg.response is not None or self._closed:
            return
        self._write(interim_head(head))

    def _send_continue(self, msg: _Message) -> None:
        if self.queue and self.queue[0] is msg and msg.response is None and not self._closed:
            msg.continue_sent = True
            self._write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- the response body (this protocol is its sink) --

    def body_data(self, data: bytes) -> None:
        n = len(data)
        batch = self._batch
        if batch is not None:
            if self._out_chunked:
                batch += (chunk_head(n), data, b"\r\n")
            else:
                batch.append(data)
            return
        if not self._out_chunked:
            self._write(data)
        elif n < SMALL_CHUNK:   # one small write beats a sequence
            self._write(frame_chunk(data))
        else:             # a large chunk is not copied
            size = chunk_head(n)
            self.conn.count_written(len(size) + n + 2)
            self.transport.writeSequence((size, data, b"\r\n"))
            self._bound.wrote(len(size) + n + 2)

    def body_end(self, trailers: Headers | None) -> None:
        self._out_body = None
        if self._out_chunked:
            end = last_chunk(trailers, HOP_BY_HOP)
            if self._batch is not None:
                self._batch.append(end)
            else:
                self._write(end)
        self._flush_batch()
        if self.queue:
            self._answered(self.queue[0])

    def body_error(self, reason: Exception) -> None:
        """The upstream died mid-response: the status is sent, so the client
        connection is all that can tell."""
        self._out_body = None
        self._flush_batch()   # the head: the client sees a response cut short
        self._ended_by = "upstream failed mid-response"
        if not self._closed:
            self.transport.abortConnection()

    def _write(self, data: bytes) -> None:
        self.conn.count_written(len(data))
        self._send(data)
        self._bound.wrote(len(data))

    def _write_overflow(self) -> None:
        """``WriteBound``: the client left more than the hard limit unread
        (pipelined requests whose responses it does not read): aborted, counted."""
        self.site.count_error("write buffer limit")
        log.info("HTTP/1 client {peer} does not read: more than {limit} bytes queued, aborted",
                 peer=self.conn.peer, limit=self._bound.limit)
        self._ended_by = "write buffer limit"
        self._stopped = True
        if not self._closed:
            self.transport.abortConnection()

    def _answered(self, msg: _Message) -> None:
        """``msg``'s response is complete: go on with the next, or close."""
        if self.queue and self.queue[0] is msg:
            self.queue.popleft()
        if self._closed:
            return
        if msg.close_after or not msg.keep_alive or not msg.body_done:
            if not msg.body_done and msg.request is not None:
                msg.request.body.cancel()
            self._stopped = True
            self._ended_by = "closed after response"
            close_transport(self.transport)
            return
        if self._draining and not self.queue:
            self._ended_by = "drained"
            close_transport(self.transport)
            return
        if self._pauses and len(self.queue) <= PIPELINE_DEPTH:
            self._resume_reading("pipeline")
        if self.queue:
            self._kick()
        elif self._client_eof:
            close_transport(self.transport)
        elif not self._in_head:
            self._timeout.arm("idle", self.limits.idle_timeout)

    # -- timeouts: the request head (slowloris) and keep-alive idleness --

    def _timed_out(self, wait: str) -> None:
        """``Deadline``: the request head or idleness was timed out."""
        if self._closed or self.tunnel is not None:
            return
        if wait == "head":
            self._bad_input(_RejectError(408, "request header timeout"))
            self._kick()
        elif not self.queue and not self._in_head:
            self._ended_by = "idle timeout"
            close_transport(self.transport)

    # -- IPushProducer: the client's socket buffer pauses the response body --

    def pauseProducing(self) -> None:
        self._out_paused = True
        if self._out_body is not None:
            self._out_body.pause()
        if self.tunnel is not None:
            self.tunnel.transport.pauseProducing()
        else:
            self._bound.full()   # and the client is not read until it drains

    def resumeProducing(self) -> None:
        self._out_paused = False
        self._bound.drained()
        if self._out_body is not None:
            self._out_body.resume()
        if self.tunnel is not None:
            self.tunnel.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass

    # -- tunnels (after 101 or a CONNECT's 2xx; the rest: upgrade.ServerTunnel) --

    def tunnel_close(self) -> None:
        if not self._closed:
            self.tunnel = None
            close_transport(self.transport)


def close_transport(transport) -> None:
    """``transport.loseConnection()`` for a codec end that is registered as
    its transport's streaming producer and is done with the connection.

    Twisted closes once the write buffer has drained, unless a streaming
    producer is registered and paused at that moment: then it resumes the
    producer instead and waits for it to write or unregister, which a
    finished codec never does. A response that ended while the peer's socket
    buffer was full left its connection open for good: neither read nor
    written, so the peer's close was never noticed (it held SIGTERM for the
    whole drain_timeout). Unregistering first makes the close unconditional.
    """
    with suppress(RuntimeError):   # a test transport with none registered
        transport.unregisterProducer()
    transport.loseConnection()


__all__ = [
    "H1Server", "h1_handler",
]

