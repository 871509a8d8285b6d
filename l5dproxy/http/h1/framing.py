"""HTTP/1 bytes (RFC 9112): status lines and reason phrases, chunks, the
last chunk and its trailer section, ``Connection`` tokens, request and
response heads (written, and a response head read).

Pure functions shared by the server and client ends; they write what the
ends send and import no policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus
from typing import NamedTuple

from l5dproxy.exchange.message import PROXY_ERROR_HEADER, Body, Headers, Request, ResponseHead
from l5dproxy.http.h1.upgrade import UpgradeRequest
from l5dproxy.http.headers import HOP_BY_HOP

#: Methods whose request carries ``content-length: 0`` when it has no body.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of ``status`` (RFC 9110 15), ``b"Unknown"``
    for a code it does not name."""
    return _REASONS.get(status, b"Unknown")


_REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}


_status_lines: dict[tuple[int, bytes], bytes] = {}


def status_line(status: int, reason: bytes) -> bytes:
    """The status line (the standard phrase when ``reason`` is empty), the
    usual ones made once."""
    line = _status_lines.get((status, reason))
    if line is None:
        line = b"HTTP/1.1 %d %b\r\n" % (status, reason or reason_phrase(status))
        if len(_status_lines) < 256:   # reasons are the upstream's: bounded
            _status_lines[(status, reason)] = line
    return line


#: A chunk smaller than this is framed in one new bytes object (one small
#: write beats a sequence); a larger one is written as head, data, CRLF so
#: its data is not copied.
SMALL_CHUNK = 16384

#: The last chunk of a chunked body without a trailer section.
LAST_CHUNK = b"0\r\n\r\n"


def chunk_head(n: int) -> bytes:
    """The chunk-size line of a chunk of ``n`` > 0 bytes (RFC 9112 7.1): the
    data and ``b"\\r\\n"`` follow it."""
    return b"%x\r\n" % n


def frame_chunk(data: bytes) -> bytes:
    """``data`` (non-empty, best under ``SMALL_CHUNK`` bytes: it is copied)
    as one whole chunk (RFC 9112 7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Iterable[tuple[bytes, bytes]] | None,
               drop: frozenset[bytes]) -> bytes:
    """The last chunk and the trailer section (RFC 9112 7.1.2): each
    ``(name, value)`` of ``trailers`` whose lowercased name is not in
    ``drop``, as received. The server end drops ``HOP_BY_HOP``; the client
    end passes ``frozenset()`` (it forwards request trailers as they came)."""
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for name, value in trailers:
        if name.lower() not in drop:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def connection_tokens(value: bytes) -> list[bytes]:
    """The connection options a ``Connection`` field value names (RFC 9110
    7.6.1), lowercased, in order, without empty list elements and without
    ``close``, ``keep-alive`` and ``upgrade`` (read by the ends themselves):
    the header fields a proxy must remove before forwarding."""
    tokens = []
    for token in value.lower().split(b","):
        token = token.strip()
        if token and token not in (b"close", b"keep-alive", b"upgrade"):
            tokens.append(token)
    return tokens


def request_head(request: Request, upgrade: bytes | None) -> tuple[bytes, bool]:
    """The request line and header section the client end writes for
    ``request`` (RFC 9112 3, 5), and whether its body goes chunked.

    Hop-by-hop fields and Host are not forwarded (Host is written from the
    authority first); ``te: trailers`` is kept and named in Connection;
    a body of unknown length goes ``transfer-encoding: chunked``; POST, PUT
    and PATCH without a body get ``content-length: 0``. ``upgrade`` (not
    ``b"CONNECT"``) is offered with ``connection: upgrade`` plus the fields
    the client's Connection named.
    """
    head = request.head
    body = request.body
    method = head.method
    parts = [method, b" ", head.target, b" HTTP/1.1\r\nHost: ", head.authority, b"\r\n"]
    has_length = False
    te = False
    for name, value in head.headers:
        lname = name.lower()
        if lname in HOP_BY_HOP or lname == b"host":
            if lname == b"te" and not te and value.lower() == b"trailers":
                # An h2 client's "te: trailers" (gRPC): TE is hop-by-hop,
                # so it goes on named in Connection (RFC 9110 7.6.1,
                # 10.1.4); the endpoint may then send trailers.
                te = True
                parts.append(b"te: trailers\r\n")
            continue
        if lname == b"content-length":
            has_length = True
        parts += (name, b": ", value, b"\r\n")
    chunked = False
    if has_length:
        pass
    elif body.length is not None:
        if body.length or method in _BODY_METHODS:
            parts += (b"content-length: ", str(body.length).encode(), b"\r\n")
    elif body.is_empty:
        if method in _BODY_METHODS:
            parts.append(b"content-length: 0\r\n")
    else:
        parts.append(b"transfer-encoding: chunked\r\n")
        chunked = True
    if upgrade is not None and upgrade != b"CONNECT":
        named = request.connection if isinstance(request, UpgradeRequest) else ()
        tokens = b"".join(b", " + t for t in named)
        if te:
            tokens += b", te"
        parts += (b"connection: upgrade", tokens, b"\r\nupgrade: ", upgrade, b"\r\n")
    elif te:
        parts.append(b"connection: te\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), chunked


def response_head(head: ResponseHead, status: int, version: str, close: bool, body: Body,
                  bodyless: bool = False, upgrade: bytes | None = None
                  ) -> tuple[bytes, bool, bool]:
    """The status line and header section the server end writes for
    ``head`` to an HTTP/``version`` client (RFC 9112 4, 6), with whether
    the body then goes chunked and whether the connection closes after it.

    Hop-by-hop fields are not forwarded (the client end's ``head.lines`` hold
    end-to-end ones only). ``close`` (the request or the proxy wants it) is
    announced ``connection: close``; HTTP/1.0 keep-alive is announced.
    Without a Content-Length ``body`` is framed: remaining transfer codings
    and chunked (HTTP/1.1), its known length, or the close (HTTP/1.0);
    ``bodyless`` (HEAD, 1xx, 204, 304) frames none. ``upgrade`` (a 101 or a
    CONNECT's 2xx) answers the tunnel's head only.
    """
    lines = head.lines
    if lines is not None:   # the client end's lines, end-to-end headers only
        parts = [status_line(status, head.reason), lines]
        has_length = head.lines_length
    else:
        parts = [status_line(status, head.reason)]
        has_length = False
        for name, value in head.headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                continue
            if lname == b"content-length":
                has_length = True
            parts += (name, b": ", value, b"\r\n")
    chunked = False
    if upgrade is not None:
        if upgrade != b"CONNECT":
            parts += (b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts), False, False
    if not bodyless and not has_length:
        if head.transfer_codings and version == "1.1":
            # Codings the body still carries (the client end passes
            # them to HTTP/1.1 clients only): kept, chunked applied last.
            parts += (b"transfer-encoding: ", head.transfer_codings, b", chunked\r\n")
            chunked = True
        elif body.length is not None:
            parts += (b"content-length: ", str(body.length).encode(), b"\r\n")
        elif body.is_empty:
            parts.append(b"content-length: 0\r\n")
        elif version == "1.1":
            parts.append(b"transfer-encoding: chunked\r\n")
            chunked = True
        else:
            close = True   # an HTTP/1.0 client: the end of the body is the close
    if close:
        parts.append(b"connection: close\r\n")
    elif version == "1.0":
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts), chunked, close


def error_head(status: int, reason: bytes, close: bool, version: str) -> bytes:
    """The head of the proxy's own bodiless answer ``status`` with
    ``l5d-proxy-error: reason`` (Linkerd's header), ``connection: close``
    when ``close``, keep-alive announced to an HTTP/1.0 client."""
    parts = [status_line(status, b""),
             b"content-length: 0\r\n", PROXY_ERROR_HEADER, b": ", reason, b"\r\n"]
    if close:
        parts.append(b"connection: close\r\n")
    elif version == "1.0":
        parts.append(b"connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def interim_head(head: ResponseHead) -> bytes:
    """A 1xx response (RFC 9110 15.2, e.g. 103 Early Hints) as forwarded:
    its status line and its end-to-end fields."""
    parts = [status_line(head.status, head.reason)]
    for name, value in head.headers:
        if name.lower() not in HOP_BY_HOP:
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def transfer_codings_problem(codings: list[bytes], client_version: str) -> str | None:
    """Why a response whose body still carries ``codings`` (transfer codings
    other than a final chunked, in order) cannot reach the client, or None.

    Only HTTP/1.1 carries transfer codings: HTTP/2 has none (RFC 9113 8.2.2)
    and a server must not send Transfer-Encoding to an HTTP/1.0 client (RFC
    9112 6.1), so they get a 502 rather than a body mislabelled as plain.
    chunked anywhere but last is refused too: applied again for the client it
    would be chunked twice (RFC 9112 6.1).
    """
    names = b", ".join(codings).decode("ascii", "replace")[:64]
    if b"chunked" in codings:
        return f"invalid response: transfer-encoding {names} (chunked not last)"
    if client_version != "1.1":
        client = "HTTP/2" if client_version == "2" else f"HTTP/{client_version}"
        return f"response transfer-encoding {names} cannot be sent to an {client} client"
    return None


class ResponseRefusedError(Exception):
    """A response the client cannot be given: 502 with this reason, and the
    connection (whose framing is then unknown) is closed."""


class ResponseFacts(NamedTuple):
    """What ``read_response_head`` read: the neutral head and the framing facts."""

    head: ResponseHead
    length: int | None     # Content-Length, if given
    chunked: bool          # the final transfer coding is chunked (llhttp dechunks it)
    switched_to: bytes     # the Upgrade values (each after a comma), for a 101


def read_response_head(status: int, raw: Headers, reason: bytes,
                       client_version: str) -> ResponseFacts:
    """An endpoint's response head, as llhttp read it (``raw``: the fields
    in order), made neutral for the client: hop-by-hop fields (RFC 9110
    7.6.1) and those its ``Connection`` names dropped; the head's wire
    lines kept when nothing was dropped, so the server end writes them as
    they came. Transfer codings other than a final chunked stay on the
    head (``transfer_codings``) if ``client_version`` can be sent them.

    Raises ``ResponseRefusedError`` (see ``transfer_codings_problem``).
    """
    headers: Headers = []
    lines: list[bytes] = []   # the same headers as the server end writes them
    named: list[bytes] | None = None
    length: int | None = None
    codings: list[bytes] = []
    switched_to = b""
    for name, value in raw:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                tokens = connection_tokens(value)
                if tokens:
                    named = tokens if named is None else named + tokens
            elif lname == b"transfer-encoding":
                codings += (c.strip().lower() for c in value.split(b","))
            elif lname == b"upgrade":
                switched_to += b"," + value
            continue
        if lname == b"content-length":
            length = int(value)
        headers.append((name, value))
        lines += (name, b": ", value, b"\r\n")
    chunked = False
    if codings:
        codings = [c for c in codings if c]
        # llhttp dechunks a final chunked coding; a body whose final
        # coding is another is read until the close (RFC 9112 6.3).
        chunked = bool(codings) and codings[-1] == b"chunked"
        if chunked:
            codings.pop()
        if codings:
            problem = transfer_codings_problem(codings, client_version)
            if problem is not None:
                raise ResponseRefusedError(problem)
    if named:
        headers = [(n, v) for n, v in headers if n.lower() not in named]
        head = ResponseHead(status, headers, reason)
    else:
        head = ResponseHead(status, headers, reason, b"".join(lines), length is not None)
    if codings:
        head.transfer_codings = b", ".join(codings)
    return ResponseFacts(head, length, chunked, switched_to)


__all__ = [
    "LAST_CHUNK",
    "SMALL_CHUNK",
    "ResponseFacts",
    "ResponseRefusedError",
    "chunk_head",
    "connection_tokens",
    "error_head",
    "frame_chunk",
    "interim_head",
    "last_chunk",
    "read_response_head",
    "reason_phrase",
    "request_head",
    "response_head",
    "status_line",
    "transfer_codings_problem",
]
