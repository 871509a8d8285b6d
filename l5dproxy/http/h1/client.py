"""The HTTP/1.1 client end's connection: one connection to an endpoint.

``H1ClientConnection`` writes one request at a time (head, then the body
streamed, paused while the endpoint's socket buffer is full) and turns the
endpoint's answer into a ``Response`` whose body pauses this connection
while the client is slow; after a ``101`` or a ``2xx`` to ``CONNECT`` it
carries the tunnel. Its pool and the request it serves are the
``PoolSide`` and ``AttemptSide`` declared here (``l5dproxy.http.h1.pool``
implements both), so only the pool imports this module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from httptools import (
    HttpParserCallbackError,
    HttpParserError,
    HttpParserUpgrade,
    HttpResponseParser,
)
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from l5dproxy.exchange.message import Body, Headers, ProxyError, Request, Response, ResponseHead
from l5dproxy.http.h1.framing import (
    SMALL_CHUNK,
    ResponseRefusedError,
    chunk_head,
    frame_chunk,
    last_chunk,
    read_response_head,
    request_head,
)
from l5dproxy.http.h1.server import close_transport
from l5dproxy.http.h1.upgrade import TunnelResponse, protocol_names
from l5dproxy.http.headers import HOP_BY_HOP
from l5dproxy.net.batchsend import BatchSender
from l5dproxy.net.connection import errno_name, set_no_delay

if TYPE_CHECKING:
    from l5dproxy.net.transport import IStreamTransport
    from l5dproxy.telemetry import Metrics, TcpSideMetrics

log = Logger()

class _StopAtHeadError(Exception):
    """Stops the parser after the head of a response to HEAD."""


class ClientSide(Protocol):
    """What a connection reads from the client end that owns its pool."""

    @property
    def reactor(self) -> Any: ...

    @property
    def metrics(self) -> Metrics: ...


class PoolSide(Protocol):
    """The pool a connection belongs to (``l5dproxy.http.h1.pool._Pool``)."""

    @property
    def client(self) -> ClientSide: ...

    @property
    def service(self) -> str: ...

    @property
    def label(self) -> str: ...

    def release(self, conn: H1ClientConnection) -> None: ...

    def forget(self, conn: H1ClientConnection) -> None: ...

    def closed(self) -> None: ...


class AttemptSide(Protocol):
    """One request's way to a response, as its connection sees it
    (``l5dproxy.http.h1.pool.H1Attempt``)."""

    request: Request
    conn: H1ClientConnection | None

    @property
    def done(self) -> bool: ...

    def connected(self, conn: H1ClientConnection) -> None: ...

    def lost_before_response(self, conn: H1ClientConnection, reason: Failure) -> None: ...

    def responded(self, response: Response) -> None: ...

    def fail(self, reason: Failure | Exception) -> None: ...


class _ResponseSource:
    """A response body's flow control: only while it is the connection's
    current response (a reader that pauses an ended body must not stop the
    connection for whatever comes next)."""

    __slots__ = ("body", "conn")

    def __init__(self, conn: H1ClientConnection, body: Body) -> None:
        self.conn = conn
        self.body = body

    def pause_body(self) -> None:
        if self.conn._body is self.body:
            self.conn.pause_body()

    def resume_body(self) -> None:
        if self.conn._body is self.body:
            self.conn.resume_body()

    def stop_body(self) -> None:
        if self.conn._body is self.body:
            self.conn.stop_body()


@implementer(IHalfCloseableProtocol, IPushProducer)
class H1ClientConnection(TwistedProtocol):
    """One HTTP/1.1 connection to an endpoint: one request at a time."""

    transport: IStreamTransport

    def __init__(self, pool: PoolSide, first: AttemptSide) -> None:
        self.pool = pool
        self._first: AttemptSide | None = first
        self.call: AttemptSide | None = None
        self.parser = HttpResponseParser(self)
        self.dst: TcpSideMetrics | None = None
        self.connected_at = 0.0
        self.idle_since = 0.0
        self.requests = 0
        self.closed = False
        self.eof = False
        self.tunnel = None
        self._leftover = b""
        # per request
        self._method = b""
        self._upgrade: bytes | None = None
        self._chunked = False
        self._request_done = True
        self._paused = False
        # per response
        self._reason: list[bytes] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._trailers: list[tuple[bytes, bytes]] | None = None
        self._body: Body | None = None
        self._response_started = False
        self._response_done = True
        self._until_close = False
        self._keep_alive = True
        self._interim = False
        self._tunnel_pending = False
        self._pending: tuple[AttemptSide, Response] | None = None
        #: A HEAD request's response bytes as read, until its head ends
        #: (llhttp would wait for a body the response never has).
        self._head_bytes: bytes | None = None
        self._interims = 0          # 1xx responses read before the response
        self._read_paused = False   # reading stopped for the response body's reader

    # -- connection --

    def connectionMade(self) -> None:
        pool = self.pool
        client = pool.client
        self.connected_at = client.reactor.seconds()
        dst = self.dst = client.metrics.tcp_side("dst", "", pool.service, "http1", pool.label)
        dst.opened()
        set_no_delay(self.transport)
        self._send = BatchSender(self.transport).write
        self.transport.registerProducer(self, True)
        first, self._first = self._first, None
        if first is not None:  # the attempt that dialled this connection
            first.connected(self)

    def reusable(self) -> bool:
        """Open, idle (no request, no response under way) and reading: a
        connection whose reading a response's reader left stopped would never
        see the next response, nor the endpoint closing it."""
        return (not self.closed and not self.eof and self.transport.connected
                and self.call is None and self._response_done and not self._read_paused)

    def send(self, call: AttemptSide) -> None:
        """Write ``call``'s request and stream its body."""
        self.call = call
        call.conn = self
        self.requests += 1
        request = call.request
        head = request.head
        body = request.body
        method = head.method
        self._method = method
        self._upgrade = request.upgrade
        self._response_started = False
        self._response_done = False
        self._interim = False
        self._interims = 0
        self._head_bytes = b"" if method == b"HEAD" else None
        self._reason = []
        self._headers = []
        self._trailers = None
        data, self._chunked = request_head(request, self._upgrade)
        self._write(data)
        if body.is_empty:
            self._request_done = True
        else:
            self._request_done = False
            if self._paused:
                body.pause()
            body.consume(self)

    def dataReceived(self, data: bytes) -> None:
        if self.dst is not None:  # from connectionMade on
            self.dst.read_pending += len(data)
        if self.tunnel is not None:
            self.tunnel.tunnel_write(data)
            return
        if self._tunnel_pending:
            self._leftover += data
            return
        if self.call is None and self._response_done:
            # Bytes nobody asked for: this connection cannot be trusted.
            self.close()
            return
        if self._head_bytes is not None:
            self._head_bytes += data
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as upgrade:
            self._leftover += data[upgrade.args[0]:]
        except HttpParserCallbackError as e:
            if isinstance(e.__context__, _StopAtHeadError):
                self._head_done()
            elif isinstance(e.__context__, ResponseRefusedError):
                self._protocol_error(str(e.__context__), str(e.__context__))
            else:
                self._protocol_error(f"invalid response: {e}")
        except HttpParserError as e:
            self._protocol_error(f"invalid response: {e}")
        pending = self._pending
        if pending is not None:
            self._pending = None
            body = pending[1].body
            if body is self._body and not body.ended:
                # Still coming: from now on its reader's pauses stop this
                # connection (one the body outgrew in this read already did).
                body.set_source(_ResponseSource(self, body))
            pending[0].responded(pending[1])

    def readConnectionLost(self) -> None:
        self.eof = True
        if self.tunnel is not None:
            self.tunnel.tunnel_close_write()
            return
        self.pool.forget(self)
        close_transport(self.transport)

    def writeConnectionLost(self) -> None:
        if self.tunnel is None:
            close_transport(self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        try:
            self._connection_lost(reason)
        finally:
            self.pool.closed()

    def _connection_lost(self, reason: Failure) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.dst is not None:
            self.dst.closed(errno_name(reason), self.pool.client.reactor.seconds()
                            - self.connected_at)
        if self.tunnel is not None:
            tunnel, self.tunnel = self.tunnel, None
            tunnel.tunnel_close()
            return
        if self._first is not None:  # pragma: no cover - connectionMade always runs first
            return
        call, self.call = self.call, None
        request_body_open = not self._request_done
        if call is not None and not self._response_started:
            if request_body_open:
                call.request.body.cancel()
            call.lost_before_response(self, reason)
            return
        body, self._body = self._body, None
        if body is not None and not self._response_done:
            self._response_done = True
            if self._until_close and reason.check(ConnectionDone):
                body.finish(self._trailers or None)
            else:
                body.fail(ConnectionLost("upstream closed mid-response"))
        if call is not None and request_body_open:
            call.request.body.cancel()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            close_transport(self.transport)

    def abort(self) -> None:
        """The request was given up: the connection is in an unknown state."""
        self.call = None
        body, self._body = self._body, None
        if body is not None and not self._response_done:
            self._response_done = True
            body.fail(ConnectionAbortedError("request abandoned"))
        if not self.closed:
            self.closed = True
            self.transport.abortConnection()

    # -- the request body (this connection is its sink) --

    def body_data(self, data: bytes) -> None:
        if self._chunked:
            n = len(data)
            if n < SMALL_CHUNK:
                self._write(frame_chunk(data))
            else:
                size = chunk_head(n)
                if self.dst is not None:
                    self.dst.write_pending += len(size) + n + 2
                self.transport.writeSequence((size, data, b"\r\n"))
        else:
            self._write(data)

    def body_end(self, trailers: Headers | None) -> None:
        if self._chunked:
            # Request trailers go as received, hop-by-hop ones included.
            self._write(last_chunk(trailers, frozenset()))
        self._request_done = True
        if self._response_done and self.call is not None:
            self._finished()

    def body_error(self, reason: Exception) -> None:
        """The client's request body broke off: the endpoint must not see a
        truncated request as whole, so the connection goes."""
        self._request_done = True
        call = self.call
        if call is not None and not self._response_started:
            self.call = None
            call.fail(ProxyError.bad_request(str(reason) or "request body failed"))
        self.abort()

    def _write(self, data: bytes) -> None:
        if self.dst is not None:
            self.dst.write_pending += len(data)
        self._send(data)

    # -- the response: httptools callbacks --

    def on_status(self, reason: bytes) -> None:
        self._reason.append(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers is not None:
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        call = self.call
        if call is None:
            raise ValueError("response without a request")
        if status < 200 and status != 101:
            # 103 Early Hints and the like go to the client as they come; 100
            # Continue does not (the server end answers Expect itself).
            self._interim = True
            self._interims += 1
            hook = call.request.interim
            if status != 100 and hook is not None:
                head = ResponseHead(status, [(n, v) for n, v in self._headers
                                             if n.lower() not in HOP_BY_HOP],
                                    b"".join(self._reason))
                try:
                    hook(head)
                except Exception:
                    log.failure("forwarding a {status} response failed", status=status)
            self._headers = []
            self._reason = []
            return
        self._response_started = True
        self._keep_alive = parser.should_keep_alive()
        raw, self._headers = self._headers, []
        try:
            head, length, chunked, switched_to = read_response_head(
                status, raw, b"".join(self._reason), call.request.head.version)
        except ResponseRefusedError:
            self._response_started = False   # the client gets a 502
            raise
        self._trailers = []
        upgrade = self._upgrade
        tunnel = (upgrade is not None and
                  (status == 101 if upgrade != b"CONNECT" else 200 <= status < 300))
        if tunnel and upgrade is not None and upgrade != b"CONNECT":
            # RFC 9110 7.8: the 101 names what the client offered. A switch
            # to anything else (an endpoint answering a WebSocket upgrade
            # with h2c) would relay a protocol the listener never allowed.
            switched = protocol_names(switched_to)
            if not switched or not switched <= protocol_names(upgrade):
                self._response_started = False
                raise ResponseRefusedError(
                    "101 response switching to a protocol not asked for")
        if tunnel:
            self._tunnel_pending = True
            self._response_done = True
            self._keep_alive = False
            self.call = None
            self._pending = (call, TunnelResponse(head, Body.empty(), self))
            return
        if self._method == b"HEAD" or status in (204, 304) or status == 101:
            # llhttp reads no body for 204/304 itself; for HEAD it would
            # wait for the body its headers describe, so parsing stops here
            # and starts over after the head (see _head_done).
            body = Body.empty()
            self._response_done = True
            self._body = None
            self._pending = (call, Response(head, body))
            if self._method == b"HEAD":
                raise _StopAtHeadError()
            if self.call is call:
                self._finished()
            return
        if length == 0:
            body = Body.empty()
            self._body = None
        else:   # its source is set when it is handed on, if it has not ended by then
            body = self._body = Body(length)
        self._until_close = length is None and not chunked
        # Handed on once this read is parsed: a small body is in it by then,
        # and the server end writes head and body at once.
        self._pending = (call, Response(head, body))

    def on_body(self, data: bytes) -> None:
        body = self._body
        if body is not None:
            body.write(data)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self._response_done:   # bodiless, handled at the head
            return
        self._response_done = True
        body, self._body = self._body, None
        trailers, self._trailers = self._trailers, None
        if body is not None:
            body.finish(trailers or None)
        if self.call is not None and self._request_done:
            self._finished()
        elif self.call is not None:
            # The endpoint answered before reading the whole request: the
            # rest of the body will not be sent, so the connection goes.
            self._keep_alive = False
            call, self.call = self.call, None
            call.request.body.cancel()
            self.close()

    def _head_done(self) -> None:
        """The head of a HEAD request's response is read: a new parser for
        what comes next, and the connection is free again. Bytes after the
        head were not asked for: the connection is not trusted then."""
        data, self._head_bytes = self._head_bytes or b"", None
        self.parser = HttpResponseParser(self)
        end = -4
        for _ in range(self._interims + 1):   # each 1xx head ends the same way
            end = data.find(b"\r\n\r\n", end + 4)
            if end < 0:   # pragma: no cover - llhttp accepted a head ending otherwise
                self._keep_alive = False
                break
        if end < 0 or len(data) > end + 4:
            self._keep_alive = False
        if self.call is not None:
            self._finished()
        elif not self._keep_alive:
            self.close()

    def _finished(self) -> None:
        """Request and response are complete: back to the pool, or closed."""
        self.call = None
        if self._read_paused and not self.closed:
            # The response's reader paused it and then the body ended.
            self._read_paused = False
            self.transport.resumeProducing()
        if self._keep_alive and not self.closed and not self.eof:
            self.pool.release(self)
        else:
            self.close()

    def _protocol_error(self, reason: str, answer: str = "invalid response") -> None:
        call, self.call = self.call, None
        if call is not None and not self._response_started:
            call.fail(ProxyError.bad_gateway(answer))
        body, self._body = self._body, None
        if body is not None and not self._response_done:
            self._response_done = True
            body.fail(ConnectionLost(reason))
        self.abort()

    # -- the response body's source --

    def pause_body(self) -> None:
        if not self.closed and not self._read_paused:
            self._read_paused = True
            self.transport.pauseProducing()

    def resume_body(self) -> None:
        if not self.closed and self._read_paused:
            self._read_paused = False
            self.transport.resumeProducing()

    def stop_body(self) -> None:
        """The client does not want the rest of the response."""
        self._body = None
        self._response_done = True
        self.call = None
        self.abort()

    # -- IPushProducer: the endpoint's socket buffer pauses the request body --

    def pauseProducing(self) -> None:
        self._paused = True
        if self.tunnel is not None:
            self.tunnel.transport.pauseProducing()
        elif self.call is not None and not self._request_done:
            self.call.request.body.pause()

    def resumeProducing(self) -> None:
        self._paused = False
        if self.tunnel is not None:
            self.tunnel.transport.resumeProducing()
        elif self.call is not None and not self._request_done:
            self.call.request.body.resume()

    def stopProducing(self) -> None:
        pass

    # -- tunnel end (the server end drives it after a 101) --

    def tunnel_attach(self, server) -> None:
        self.tunnel = server
        self._tunnel_pending = False
        leftover, self._leftover = self._leftover, b""
        if leftover:
            server.tunnel_write(leftover)
        if self.eof:
            server.tunnel_close_write()
        elif self.closed:
            server.tunnel_close()

    def tunnel_write(self, data: bytes) -> None:
        self._write(data)

    def tunnel_close_write(self) -> None:
        if not self.closed:
            self.transport.loseWriteConnection()

    def tunnel_close(self) -> None:
        self.tunnel = None
        self.close()


__all__ = ["AttemptSide", "H1ClientConnection", "PoolSide"]
