"""The protocol-neutral HTTP exchange: what the h1 and h2 codec ends agree on.

A server end (h1 or h2, facing the client) turns a wire request into a
``Request``, hands it to the *dispatcher* (routing, balancing, timeouts,
retries, metrics) and gets a ``Response`` back; a client end (h1 pool or h2
connection, facing an endpoint) turns a ``Request`` into wire bytes and the
endpoint's answer into a ``Response``. Nothing in between knows which wire
protocol is on either side, which is what makes h1->h2 and h2->h1 free.

Bodies stream through a ``Body``: one side writes chunks into it, the other
consumes them, and backpressure crosses it both ways (the consumer pauses the
body, the body pauses its source), so no body is ever held whole. A body that
declares its length (``content-length``) holds its source to it: more data,
or an end short of it, raises ``BodyLengthError`` (RFC 9113 8.1.1, RFC 9112
6.3), so a sink never forwards a body that disagrees with its framing.

What a server end hands over is already checked, so that every client end
can write it on its own wire without checking again (see ``RequestHead``,
``ResponseHead``): a client end never repairs or re-validates a head, it only
translates it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.tls.errors import TlsError

_log = Logger()

Headers = list[tuple[bytes, bytes]]

#: Bytes a body holds before its consumer attaches, past which its source is paused.
BODY_HIGH_WATER = 64 * 1024


@dataclass(slots=True)
class RequestHead:
    """A request as both protocols can say it.

    ``headers`` are the end-to-end headers in the order received, names as
    the client wrote them (h2 names are lowercase), without hop-by-hop
    headers and without ``Host`` (which is ``authority``).

    The invariant every server end keeps (the h1 end through llhttp and its
    own checks, the h2 end in ``request_head_from_h2``), so that a client
    end writes a head as it is:

    * ``method`` is a token (RFC 9110 5.6.2);
    * ``target`` is origin-form (``/`` then visible ASCII but ``#``), ``*``
      for OPTIONS only, or the authority of a CONNECT;
    * ``authority`` is empty or an RFC 3986 ``host[:port]`` without userinfo;
    * field names are tokens, field values have no CTL but HTAB (so no CR,
      LF or NUL), h2 values no leading or trailing whitespace; no
      connection-specific field but ``te: trailers``;
    * at most one ``content-length``, digits only, and the request's body
      declares that length (``Body.length``) and holds its source to it.
    """

    method: bytes
    target: bytes                 # origin-form path and query, "*", or CONNECT's authority
    authority: bytes              # Host header / :authority ("" when the client sent none)
    headers: Headers = field(default_factory=list)
    scheme: bytes = b"http"
    version: str = "1.1"          # what the client spoke: "1.0", "1.1" or "2"

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header, by lowercase name."""
        return _first(self.headers, name)

    @property
    def is_grpc(self) -> bool:
        """The first ``content-type`` is ``application/grpc`` (any suffix, any case)."""
        for name, value in self.headers:   # per request: lengths first
            if len(name) == 12 and name.lower() == b"content-type":
                return value[:16].lower() == b"application/grpc"
        return False


#: ``http_errors_total`` reason for a request field dropped for its name.
UNDERSCORE_FIELD_REASON = "underscore in field name"


def drop_underscore_fields(head: RequestHead) -> int:
    """Drop every field whose name has an underscore from ``head.headers``;
    the number dropped (0: ``head`` untouched).

    Such a name is a valid token (RFC 9110 5.1), but CGI and WSGI gateways
    map both ``-`` and ``_`` to ``_`` (``HTTP_TRANSFER_ENCODING``), so an
    endpoint behind one may take ``Transfer_Encoding: chunked`` or
    ``Content_Length: 5`` for framing the proxy never saw, or
    ``X_Forwarded_For`` for a field a proxy set. nginx drops them by default
    (``underscores_in_headers off``); Envoy's
    ``headers_with_underscores_action: DROP_HEADER`` does the same. The
    dispatcher applies it to every request, HTTP/1 and h2 alike, and counts
    each field in ``http_errors_total{reason="underscore in field name"}``.
    """
    headers = head.headers
    for name, _ in headers:
        if b"_" in name:
            break
    else:
        return 0
    kept = [(name, value) for name, value in headers if b"_" not in name]
    head.headers = kept
    return len(headers) - len(kept)


@dataclass(slots=True)
class ResponseHead:
    """A response as both protocols can say it; the same invariant as
    ``RequestHead`` for its fields, and ``status`` is 100-599 (three digits,
    RFC 9110 15)."""

    status: int
    headers: Headers = field(default_factory=list)
    reason: bytes = b""
    #: ``headers`` already written as HTTP/1 header lines (``name: value\r\n``
    #: each), when the client end that read them made them so: the HTTP/1
    #: server end writes them as they are. Whoever changes ``headers`` sets
    #: this to None.
    lines: bytes | None = None
    #: With ``lines``: whether they hold a ``content-length``.
    lines_length: bool = False
    #: HTTP/1 transfer codings other than chunked the body still carries, in
    #: the order applied (``b"gzip"``): the body is sent with them, chunked
    #: last (RFC 9112 6.1). Only an HTTP/1.1 client gets such a response;
    #: the HTTP/1 client end answers 502 for any other.
    transfer_codings: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        return _first(self.headers, name)


class BodySink(Protocol):
    """Where a body's chunks go (a codec end writing them on the wire)."""

    def body_data(self, data: bytes) -> None: ...
    def body_end(self, trailers: Headers | None) -> None: ...
    def body_error(self, reason: Exception) -> None: ...


class BodySource(Protocol):
    """Where a body's chunks come from (a codec end reading them off the wire)."""

    def pause_body(self) -> None: ...
    def resume_body(self) -> None: ...
    def stop_body(self) -> None: ...


class BodyLengthError(ValueError):
    """A body's data does not add up to its declared length (content-length):
    more than declared, or an end short of it. The message is malformed
    (RFC 9113 8.1.1; RFC 9112 6.3 for HTTP/1)."""

    reason = "content-length mismatch"


class Body:
    """One message body in flight, from one source to one sink.

    The source side calls ``write``/``finish``/``fail``; the sink side calls
    ``consume`` once, then ``pause``/``resume`` for flow control and
    ``cancel`` when it no longer wants the rest. Until a sink is attached,
    chunks wait here, and past ``BODY_HIGH_WATER`` the source is paused.

    With a declared ``length``, ``write`` past it and ``finish`` short of it
    raise ``BodyLengthError`` and change nothing (no byte of the write goes
    on): the source then fails the body (``fail``), which its sink takes as
    a broken body (a client end aborts its upstream connection), and answers
    its own peer (h2: RST_STREAM PROTOCOL_ERROR).
    """

    __slots__ = (
        "_buffer", "_buffered", "_ended", "_error", "_on_end", "_on_first_data", "_paused",
        "_sink", "_source", "_source_paused", "_trailer_rule", "_trailers", "length",
        "received",
    )

    def __init__(self, length: int | None = None) -> None:
        self.length = length                   # declared length, when known
        self.received = 0                      # bytes written so far
        self._sink: BodySink | None = None
        self._source: BodySource | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._ended = False
        self._trailers: Headers | None = None
        self._trailer_rule: Callable[[Headers], Headers] | None = None
        self._error: Exception | None = None
        self._paused = False                   # the sink asked for a pause
        self._source_paused = False
        self._on_first_data: Callable[[], None] | None = None
        self._on_end: Callable[[Headers | None, Exception | None], None] | None = None

    @classmethod
    def empty(cls) -> Body:
        body = cls(length=0)
        body._ended = True
        return body

    # -- source side --

    def set_source(self, source: BodySource) -> None:
        self._source = source
        if self._source_paused or self._paused:
            source.pause_body()

    def write(self, data: bytes) -> None:
        """Add ``data``; BodyLengthError (nothing added) past the declared length."""
        if not data:
            return
        length = self.length
        if length is not None and self.received + len(data) > length:
            raise BodyLengthError(
                f"{self.received + len(data)} bytes of body, content-length {length}")
        self.received += len(data)
        if self._on_first_data is not None:
            hook, self._on_first_data = self._on_first_data, None
            hook()
        sink = self._sink
        if sink is not None:
            sink.body_data(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_HIGH_WATER and not self._source_paused:
            self._pause_source()

    def check_complete(self) -> None:
        """BodyLengthError if the data so far falls short of the declared length."""
        length = self.length
        if length is not None and self.received != length:
            raise BodyLengthError(f"body ended at {self.received} bytes, content-length {length}")

    def finish(self, trailers: Headers | None = None) -> None:
        """The body is whole; BodyLengthError (nothing changed) if it is
        short of its declared length."""
        length = self.length
        if length is not None and self.received != length:
            self.check_complete()   # raises
        self._ended = True
        # An ended body has no use for its source, and a source that points
        # back at its body would leave both to the cyclic GC (per request).
        self._source = None
        self._on_first_data = None   # no data is coming: no cycle through the hook
        if trailers and self._trailer_rule is not None:
            trailers = self._trailer_rule(trailers)
        self._trailers = trailers
        if self._sink is not None:
            self._sink.body_end(trailers)
        if self._on_end is not None:
            self._fire_end(trailers, None)

    def fail(self, reason: Exception) -> None:
        if self._ended:
            return
        self._ended = True
        self._source = None
        self._on_first_data = None
        self._error = reason
        if self._sink is not None:
            self._sink.body_error(reason)
        if self._on_end is not None:
            self._fire_end(None, reason)

    def rule_trailers(self, rule: Callable[[Headers], Headers]) -> None:
        """Apply ``rule`` (fields -> the fields to keep) to the trailer
        section before any consumer sees it: to one already received, else
        when it comes. For fields only the proxy may set (l5d-client-id)."""
        if self._ended:
            if self._trailers:
                self._trailers = rule(self._trailers)
        else:
            self._trailer_rule = rule

    # -- sink side --

    @property
    def ended(self) -> bool:
        """Everything has been written (or the body failed)."""
        return self._ended

    @property
    def error(self) -> Exception | None:
        """Why the body failed or was cancelled, if it did."""
        return self._error

    @property
    def trailers(self) -> Headers | None:
        """The trailer section, once the body has ended with one (as the
        trailer rule left it), else None."""
        return self._trailers

    @property
    def is_empty(self) -> bool:
        """Ended with nothing in it: no data, no trailer section, no error
        (an end with trailers must still be sent, e.g. as an HTTP/1 last
        chunk, so such a body is not empty)."""
        return self._ended and self.received == 0 and self._error is None and not self._trailers

    def on_first_data(self, hook: Callable[[], None]) -> None:
        """Call ``hook`` once, when the first byte is written (for latency)."""
        if self.received:
            hook()
        elif not self._ended:   # an ended, empty body has no first byte
            self._on_first_data = hook

    def on_end(self, hook: Callable[[Headers | None, Exception | None], None]) -> None:
        """Call ``hook(trailers, error)`` once, when the body has been written
        whole (error None) or failed or was cancelled (error set); at once if
        that already happened. For metrics and accounting, not flow."""
        if self._ended:
            hook(self._trailers, self._error)
        else:
            self._on_end = hook

    def _fire_end(self, trailers: Headers | None, error: Exception | None) -> None:
        hook, self._on_end = self._on_end, None
        if hook is not None:
            hook(trailers, error)

    def consume(self, sink: BodySink) -> None:
        """Attach the sink: buffered chunks are delivered at once, the rest as they come."""
        if self._sink is not None:
            raise RuntimeError("a body has one consumer")
        self._sink = sink
        buffered, self._buffer, self._buffered = self._buffer, [], 0
        for chunk in buffered:
            sink.body_data(chunk)
        if self._error is not None:
            sink.body_error(self._error)
        elif self._ended:
            sink.body_end(self._trailers)
        elif self._source_paused and not self._paused:
            self._resume_source()

    def pause(self) -> None:
        self._paused = True
        if not self._source_paused:
            self._pause_source()

    def resume(self) -> None:
        self._paused = False
        if self._source_paused:
            self._resume_source()

    def cancel(self) -> None:
        """The sink side is gone: stop the source, drop what is buffered."""
        self._buffer, self._buffered = [], 0
        self._on_first_data = None
        if not self._ended:
            self._ended = True
            self._error = ConnectionAbortedError("body cancelled")
            source, self._source = self._source, None
            if source is not None:
                source.stop_body()
            if self._on_end is not None:
                self._fire_end(None, self._error)

    def _pause_source(self) -> None:
        self._source_paused = True
        if self._source is not None:
            self._source.pause_body()

    def _resume_source(self) -> None:
        self._source_paused = False
        if self._source is not None:
            self._source.resume_body()


@dataclass(slots=True)
class Request:
    head: RequestHead
    body: Body
    #: Where informational (1xx) responses that arrive before the response go
    #: (the server end writes them to its client, as 103 Early Hints), if
    #: anywhere; the client end calls it with each 1xx head but 100 and 101.
    interim: Callable[[ResponseHead], None] | None = None
    #: ``Upgrade``'s value (``b"CONNECT"``: a CONNECT) of an h1 UpgradeRequest,
    #: else None; such a request is never retried and goes to an HTTP/1 client.
    upgrade: bytes | None = None


@dataclass(slots=True)
class Response:
    head: ResponseHead
    body: Body
    #: The error a proxy-made response answers (``error_response``), else None.
    error: ProxyError | None = None


class ProxyError(Exception):
    """An error the proxy answers itself, as Linkerd maps them.

    ``reason`` is the cause from a small fixed set (the ``error`` label of
    ``response_total``); ``where`` (``service app: 127.0.0.1:8080``) and
    ``detail`` (the cause with figures, instead of ``reason``) are added by
    the dispatcher for the operator: ``message`` joins them and goes into the
    ``l5d-proxy-error`` header (and the text body, see ``error_response``).
    gRPC requests get ``grpc_status`` in a trailers-only response instead.
    """

    def __init__(self, status: int, reason: str, grpc_status: int) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.grpc_status = grpc_status
        self.where = ""
        self.detail = ""

    @property
    def message(self) -> str:
        """``where: detail-or-reason``, e.g.
        ``service app: 127.0.0.1:8080: connection refused``."""
        cause = self.detail or self.reason
        return f"{self.where}: {cause}" if self.where else cause

    @classmethod
    def bad_gateway(cls, reason: str) -> ProxyError:
        return cls(502, reason, GRPC_UNAVAILABLE)

    @classmethod
    def unavailable(cls, reason: str) -> ProxyError:
        return cls(503, reason, GRPC_UNAVAILABLE)

    @classmethod
    def timeout(cls, reason: str) -> ProxyError:
        return cls(504, reason, GRPC_DEADLINE_EXCEEDED)

    @classmethod
    def not_placed(cls, reason: str) -> NotPlacedError:
        """503: a client end could not place the request on its endpoint
        (``NotPlacedError``)."""
        return NotPlacedError(503, reason, GRPC_UNAVAILABLE)

    @classmethod
    def bad_request(cls, reason: str, status: int = 400) -> ProxyError:
        return cls(status, reason, GRPC_INTERNAL)

    @classmethod
    def forbidden(cls, reason: str) -> ProxyError:
        """403, gRPC PERMISSION_DENIED (Linkerd's answer to a request its
        authorization policy refuses)."""
        return cls(403, reason, GRPC_PERMISSION_DENIED)


def as_proxy_error(failure: Failure) -> ProxyError:
    """What the client sees for an upstream failure, as Linkerd maps them."""
    exc = failure.value
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, TlsError):  # its reason is the label, its detail the header
        err = ProxyError(exc.status, exc.reason,
                         GRPC_DEADLINE_EXCEEDED if exc.status == 504 else GRPC_UNAVAILABLE)
        err.detail = exc.detail
        return err
    if isinstance(exc, error.TimeoutError | error.TCPTimedOutError):
        return ProxyError.timeout("connect timeout")
    if isinstance(exc, error.ConnectionRefusedError):
        return ProxyError.bad_gateway("connection refused")
    if isinstance(exc, error.DNSLookupError):
        return ProxyError.bad_gateway("dns lookup failed")
    if isinstance(exc, error.ConnectError):
        return ProxyError.bad_gateway("connect failed")
    if isinstance(exc, error.ConnectionDone | error.ConnectionLost | ConnectionError):
        return ProxyError.bad_gateway("connection closed by upstream")
    if isinstance(exc, defer.CancelledError):
        return ProxyError.bad_gateway("cancelled")
    _log.failure("unexpected upstream error", failure)
    return ProxyError.bad_gateway("upstream error")


class NotPlacedError(ProxyError):
    """The proxy itself could not place the request on the endpoint it was
    given: the endpoint accepts no streams, its connection limit is reached
    and the queue is full or the wait ran out. Nothing reached the
    endpoint, and trying the same endpoint again would meet the same
    refusal, so the dispatcher retries it only on another endpoint, within
    the request's placement time (``route.dispatcher``)."""


GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
PROXY_ERROR_HEADER = b"l5d-proxy-error"


def accepts_text(head: RequestHead) -> bool:
    """Whether a plain HTTP client would read a text error body: it sent no
    ``Accept``, or one that lists ``*/*``, ``text/*`` or ``text/plain``
    (RFC 9110 section 12.5.1; a q of 0 refuses). Never a gRPC request."""
    if head.is_grpc:
        return False
    values = [value for name, value in head.headers if name.lower() == b"accept"]
    if not values:
        return True
    for value in values:
        for item in value.split(b","):
            media, _, params = item.partition(b";")
            if media.strip().lower() not in (b"*/*", b"text/*", b"text/plain"):
                continue
            q = params.replace(b" ", b"").lower().partition(b"q=")[2]
            if q and q.strip(b"0.") == b"":
                continue   # q=0: "not acceptable"
            return True
    return False


def error_response(error: ProxyError, grpc: bool = False, text: bool = False) -> Response:
    """The response the proxy sends for ``error``: marked with
    ``l5d-proxy-error: <error.message>``, gRPC-aware (a trailers-only
    response), and with ``text`` a one-line ``text/plain`` body
    ``l5dproxy: <error.message>`` for a person at a terminal (``curl``
    prints nothing for an empty 502); see ``accepts_text``."""
    reason = error.message.encode("ascii", "replace")
    if grpc:
        head = ResponseHead(200, [
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(error.grpc_status).encode()),
            (b"grpc-message", reason),
            (PROXY_ERROR_HEADER, reason),
        ])
    else:
        if text:
            line = b"l5dproxy: " + reason + b"\n"
            head = ResponseHead(error.status, [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(line)).encode()),
                (PROXY_ERROR_HEADER, reason),
            ])
            body = Body(len(line))
            body.write(line)
            body.finish()
            return Response(head, body, error)
        head = ResponseHead(error.status, [
            (b"content-length", b"0"),
            (PROXY_ERROR_HEADER, reason),
        ])
    return Response(head, Body.empty(), error)


def _first(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None
