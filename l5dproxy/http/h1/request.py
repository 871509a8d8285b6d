"""The HTTP/1 server end's request: a request head read by llhttp, checked
and made neutral (pure), and the record of one request on a connection.

``read_request_head`` is where the server end's request checks live (RFC
9112 3 and 6, RFC 9110 7.2 and 7.6.1): version, Host, request target forms,
Transfer-Encoding, Connection options, Expect, Upgrade and CONNECT.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple

from httptools import HttpParserError, HttpRequestParser

from l5dproxy.exchange.message import (
    Body,
    Headers,
    ProxyError,
    Request,
    RequestHead,
    Response,
    ResponseHead,
)
from l5dproxy.http.h1.framing import connection_tokens
from l5dproxy.http.h1.upgrade import UpgradeRequest, forwards_upgrade
from l5dproxy.http.headers import HOP_BY_HOP, valid_authority

if TYPE_CHECKING:
    from l5dproxy.config.model import HttpConfig
    from l5dproxy.exchange.contracts import Dispatched, HttpSite

#: Request headers the server end looks at as it reads them.
_SPECIAL = HOP_BY_HOP | {b"host", b"expect"}


class _ContinueBody(Body):
    """A body behind ``Expect: 100-continue``: the first consumer sends the 100."""

    __slots__ = ("_hook",)

    def __init__(self, length: int | None, hook) -> None:
        super().__init__(length)
        self._hook = hook

    def consume(self, sink) -> None:
        hook, self._hook = self._hook, None
        if hook is not None:
            hook()
        super().consume(sink)


class _RejectError(Exception):
    """Malformed or refused input: answered with ``status`` and the connection closed."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _HaltError(Exception):
    """Stop parsing: nothing after a ``Connection: close`` request is read."""


class _Message:
    """One request on the connection, from its head to the end of its response."""

    __slots__ = (
        "body_done", "close_after", "continue_sent", "dispatched", "error", "exchange",
        "keep_alive", "leftover",
        "method", "raw_body", "request", "response", "version",
    )

    def __init__(self) -> None:
        self.request: Request | None = None
        self.method = b""
        self.version = "1.1"
        self.keep_alive = True
        self.body_done = False
        self.close_after = False
        self.continue_sent = False
        self.dispatched = False
        self.exchange: Dispatched | None = None   # in the middle; cancel() gives it up
        self.error: ProxyError | None = None      # answered without dispatching
        self.response: Response | None = None
        self.leftover = b""                       # bytes after an Upgrade/CONNECT head
        #: Body bytes still to read after a stripped upgrade's head (llhttp
        #: stops at the head of any upgrade request; its body is counted here).
        self.raw_body = 0


class RequestFacts(NamedTuple):
    """What ``read_request_head`` read: the neutral head and the framing facts."""

    head: RequestHead
    #: The Upgrade value forwarded (``b"CONNECT"`` for CONNECT), or None.
    upgrade: bytes | None
    #: Headers the client's Connection named (lowercase).
    named: tuple[bytes, ...]
    #: Content-Length, or None.
    length: int | None
    chunked: bool
    #: ``Expect: 100-continue`` on HTTP/1.1.
    expect: bool
    #: An Upgrade not forwarded: proxied as plain HTTP/1 (its body is read raw).
    stripped: bool


def read_request_head(parser: HttpRequestParser, url_parts: list[bytes],
                      fields: list[tuple[bytes, bytes]],
                      site: HttpSite) -> RequestFacts:
    """The request head llhttp just read (``parser``, the request target in
    ``url_parts``, the header fields in ``fields``) checked and made neutral
    (RFC 9112 3, 6; RFC 9110 7.2, 7.6.1, 7.8), with the framing facts the
    server end needs to read its body.

    Raises ``_RejectError(status, reason)`` for a head to refuse: 505 for
    HTTP/2.0, 400 for another version, a second Host, a transfer coding other
    than chunked, chunked on HTTP/1.0, a body on an upgrade request (any on
    a forwarded one, chunked on a stripped one), a bad request target, no
    Host on HTTP/1.1, a non-empty Host or an absolute-form authority that is
    not ``host[:port]`` (``invalid host``, ``headers.valid_authority``);
    405 for CONNECT unless ``site.allow_connect``; an Upgrade is forwarded
    only if ``site.upgrades`` lists every protocol it offers.
    """
    version = parser.get_http_version()
    if version != "1.1" and version != "1.0":
        raise _RejectError(505 if version.startswith("2") else 400,
                           f"unsupported HTTP version {version}")
    method = parser.get_method()
    url = b"".join(url_parts) if len(url_parts) != 1 else url_parts[0]
    headers: Headers = []
    authority: bytes | None = None
    named: list[bytes] | None = None
    length: int | None = None
    chunked = False
    expect = False
    upgrade: bytes | None = None
    for name, value in fields:
        lname = name.lower()
        if lname not in _SPECIAL:
            if lname == b"content-length":
                length = int(value)   # llhttp allows digits only, and one
            headers.append((name, value))
        elif lname == b"host":
            if authority is not None:
                raise _RejectError(400, "more than one Host header")
            authority = value.strip()
            # RFC 9112 3.2: 400 for a Host with an invalid value; RFC 9110
            # 4.2.4: userinfo is an error. An empty Host is allowed (3.2).
            if authority and not valid_authority(authority):
                raise _RejectError(400, "invalid host")
        elif lname == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise _RejectError(400, "unsupported transfer-encoding")
            chunked = True
        elif lname == b"connection":
            tokens = connection_tokens(value)
            if tokens:
                named = tokens if named is None else named + tokens
        elif lname == b"expect":
            if value.strip().lower() == b"100-continue":
                expect = True
            else:
                headers.append((name, value))
        elif lname == b"upgrade":
            upgrade = value
    if chunked and version == "1.0":
        raise _RejectError(400, "transfer-encoding in an HTTP/1.0 request")
    if version == "1.0":
        # No 1xx ever goes to an HTTP/1.0 client, so its 100-continue
        # expectation is ignored (RFC 9110 10.1.1, 15.2).
        expect = False
    is_upgrade = parser.should_upgrade() and method != b"CONNECT"
    stripped = is_upgrade and not forwards_upgrade(upgrade, version, site.upgrades)
    if is_upgrade and (chunked or (length and not stripped)):
        # One rule for a body the proxy cannot carry on an upgrade request:
        # llhttp stops at its head, so after a forwarded upgrade every byte
        # is tunnel data (a body would wait forever; WebSocket handshakes
        # are bodiless GETs, RFC 6455 4.1), and a stripped one's body is
        # only read raw by its Content-Length.
        raise _RejectError(400, "body on an upgrade request")
    if stripped:
        # Proxied as plain HTTP/1: the Upgrade header and the headers the
        # Connection header names are dropped (Envoy and nginx do the same).
        is_upgrade = False
    if named and not is_upgrade:
        headers = [(n, v) for n, v in headers if n.lower() not in named]
    target = url
    if url[:1] != b"/":
        lowered = url[:8].lower()
        if lowered.startswith((b"http://", b"https://")):
            rest = url[url.index(b"//") + 2:]
            cut = len(rest)
            for sep in (b"/", b"?"):
                at = rest.find(sep)
                if 0 <= at < cut:
                    cut = at
            authority, target = rest[:cut], rest[cut:] or b"/"
            if target[:1] == b"?":
                target = b"/" + target
            if not authority:
                raise _RejectError(400, "bad request target")
            if not valid_authority(authority):
                raise _RejectError(400, "invalid host")
        elif method == b"CONNECT":
            if authority is None:
                authority = url
        elif not (url == b"*" and method == b"OPTIONS"):
            raise _RejectError(400, "bad request target")
    if authority is None:
        if version == "1.1":
            raise _RejectError(400, "missing Host header")
        authority = b""
    if method == b"CONNECT":
        if not site.allow_connect:
            raise _RejectError(405, "CONNECT not allowed")
        upgrade = b"CONNECT"
    elif not is_upgrade:
        upgrade = None
    head = RequestHead(method, target, authority, headers, b"http", version)
    return RequestFacts(head, upgrade, tuple(named or ()), length, chunked, expect, stripped)


def _parser_reason(e: HttpParserError) -> str:
    text = str(e).strip() or "malformed request"
    return text[:80]


#: Pipelined requests read ahead of the one being answered before reading stops.
PIPELINE_DEPTH = 16


class _RequestBodySource:
    """A request body's flow control, tied to the message it belongs to."""

    __slots__ = ("msg", "server")

    def __init__(self, server: RequestReader, msg: _Message) -> None:
        self.server = server
        self.msg = msg

    def pause_body(self) -> None:
        if self.server._reading is self.msg:
            self.server._pause_reading("body")

    def resume_body(self) -> None:
        if self.server._reading is self.msg:
            self.server._resume_reading("body")

    def stop_body(self) -> None:
        """The upstream does not want the rest: discard it, close afterwards."""
        self.msg.close_after = True
        if self.server._reading is self.msg:
            self.server._discarding = True
            self.server._resume_reading("body")



class RequestReader:
    """The HTTP/1 server end's reading of requests, mixed into ``H1Server``:
    llhttp's callbacks (methods, so a header or a body chunk costs no extra
    call), each head checked by ``read_request_head``, and the ``_Message``
    queued for its turn, its body's source this connection."""

    # What it uses of H1Server (set there).
    limits: HttpConfig
    site: HttpSite
    parser: HttpRequestParser | None
    queue: deque[_Message]
    _reading: _Message | None
    _url: list[bytes]
    _url_len: int
    _headers: list[tuple[bytes, bytes]]
    _head_bytes: int
    _in_head: bool
    _trailers: list[tuple[bytes, bytes]] | None
    _reject: _RejectError | None
    _discarding: bool
    _stopped: bool
    _last: bool
    _timeout: Any

    def _pause_reading(self, why: str) -> None:
        raise NotImplementedError

    def _resume_reading(self, why: str) -> None:
        raise NotImplementedError

    def _send_continue(self, msg: _Message) -> None:
        raise NotImplementedError

    def _send_interim(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_message_begin(self) -> None:
        if self._last or self._stopped:
            raise _HaltError()
        self._in_head = True   # timed once this read is parsed, if still unfinished
        self._url = []
        self._url_len = 0
        self._headers = []
        self._head_bytes = 0
        self._trailers = None

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_len += len(url)
        if self._url_len > self.limits.max_request_line:
            raise self._rejecting(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers is not None:
            self._trailers.append((name, value))
            return
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.limits.max_header_bytes:
            raise self._rejecting(431, "request header fields too large")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._timeout.wait = None
        self._head_bytes = 0
        parser = self.parser
        assert parser is not None  # this is its callback: it is parsing
        try:
            head, upgrade, named, length, chunked, expect, stripped = read_request_head(
                parser, self._url, self._headers, self.site)
        except _RejectError as e:
            raise self._rejecting(e.status, e.reason) from None
        msg = _Message()
        msg.method = head.method
        msg.version = version = head.version
        msg.keep_alive = parser.should_keep_alive()
        if stripped and length:
            msg.raw_body = length   # llhttp leaves the body to us (see _parse)
        body: Body
        if chunked or length:
            if expect:
                body = _ContinueBody(length, lambda: self._send_continue(msg))
            else:
                body = Body(length)
            source = _RequestBodySource(self, msg)
            body.set_source(source)
            self._reading = msg
        else:
            body = Body.empty()
            msg.body_done = True
        if upgrade is not None:
            msg.request = UpgradeRequest(head, body, upgrade, named)
        else:   # no 1xx for HTTP/1.0 clients (RFC 9110 15.2)
            # The server's own method, not one of the message's: a message
            # that pointed at itself would be left to the cyclic GC.
            msg.request = Request(head, body, self._send_interim if version == "1.1" else None)
        self._trailers = []
        if not msg.keep_alive:
            self._last = True   # no request after this one is read
        self.queue.append(msg)   # dispatched once this read is parsed (see _kick)
        if len(self.queue) > PIPELINE_DEPTH:
            self._pause_reading("pipeline")

    def on_body(self, data: bytes) -> None:
        msg = self._reading
        if msg is not None and not self._discarding and msg.request is not None:
            msg.request.body.write(data)

    def on_message_complete(self) -> None:
        msg = self._reading
        if msg is None or msg.raw_body:
            return
        self._reading = None
        trailers, self._trailers = self._trailers, None
        if not msg.body_done:
            msg.body_done = True
            if not self._discarding and msg.request is not None:
                msg.request.body.finish(trailers or None)
        self._discarding = False
        self._resume_reading("body")

    def _rejecting(self, status: int, reason: str) -> _RejectError:
        self._reject = _RejectError(status, reason)
        return self._reject


__all__ = [
    "PIPELINE_DEPTH", "RequestFacts", "RequestReader", "read_request_head",
]
