"""The HTTP/1 server end's request: a request head read by llhttp, checked
and made neutral (pure), and the record of one request on a connection.

``read_request_head`` is where the server end's request checks live (RFC
9112 3 and 6, RFC 9110 7.2 and 7.6.1): version, Host, request target forms,
Transfer-Encoding, Connection options, Expect, Upgrade and CONNECT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from httptools import HttpParserError, HttpRequestParser

from l5dproxy.exchange.message import Body, Headers, ProxyError, Request, RequestHead, Response
from l5dproxy.http.h1.framing import connection_tokens
from l5dproxy.http.h1.upgrade import forwards_upgrade
from l5dproxy.http.headers import HOP_BY_HOP, valid_authority

if TYPE_CHECKING:
    from l5dproxy.exchange.contracts import Dispatched

#: Request headers the server end looks at as it reads them.
_SPECIAL = HOP_BY_HOP | {b"host", b"expect"}


@dataclass(frozen=True, slots=True)
class H1Limits:
    """Per-listener limits of the HTTP/1 server end."""

    max_request_line: int = 8192      # request target bytes, else 414
    max_header_bytes: int = 65536     # header block bytes, else 431
    allow_connect: bool = False       # CONNECT is refused with 405 unless set
    request_header_timeout: float = 10.0   # a request head read within, else 408 (0: none)
    idle_timeout: float = 60.0        # a keep-alive connection idle longer is closed (0: none)
    #: Upgrade protocol names forwarded (lowercase); any other is stripped.
    upgrades: frozenset[bytes] = frozenset({b"websocket"})


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
                      limits: H1Limits) -> RequestFacts:
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
    405 for CONNECT unless ``limits.allow_connect``.
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
    stripped = is_upgrade and not forwards_upgrade(upgrade, version, limits.upgrades)
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
        if not limits.allow_connect:
            raise _RejectError(405, "CONNECT not allowed")
        upgrade = b"CONNECT"
    elif not is_upgrade:
        upgrade = None
    head = RequestHead(method, target, authority, headers, b"http", version)
    return RequestFacts(head, upgrade, tuple(named or ()), length, chunked, expect, stripped)


def _parser_reason(e: HttpParserError) -> str:
    text = str(e).strip() or "malformed request"
    return text[:80]


__all__ = ["H1Limits", "RequestFacts", "read_request_head"]
