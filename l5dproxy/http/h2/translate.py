"""Translation between h2 header blocks and the neutral heads, checked.

Pure functions: a received header block becomes a ``RequestHead``,
``ResponseHead`` or trailer section only if it is well formed (RFC 9113
8.1-8.3, RFC 9110 grammar for the pseudo-header values), else
``MalformedError``, a stream error the ends answer (validation *is*
translation: each block is checked where it is translated, not by h2). A
neutral head becomes the block the proxy sends: names lowercased,
connection-specific fields dropped (RFC 9113 8.2.2).
"""

from __future__ import annotations

import re

from h2.utilities import CONNECTION_HEADERS as _H2_CONNECTION_HEADERS

from l5dproxy.exchange.message import Headers, RequestHead, ResponseHead
from l5dproxy.http.headers import valid_authority

#: Headers that mean something to one HTTP/1 connection only: never in h2.
CONNECTION_HEADERS = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
    b"upgrade", b"host", b"http2-settings",
})


class MalformedError(ValueError):
    """A header block RFC 9113 8.1.1 calls malformed (or a request the
    proxy will not forward): a stream error, never forwarded.

    ``reason`` is one of a fixed set of phrases (the ``reason`` label of
    ``http_errors_total``, never the peer's bytes); ``status`` is what an
    HTTP answer would carry: 400 for malformed, 405 for h2 CONNECT.
    """

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


#: RFC 9110 5.6.2 token, and the lowercase token an h2 field name must be
#: (RFC 9113 8.2.1: no uppercase; RFC 9110 5.1: a field name is a token).
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+").fullmatch
#: A field value the proxy refuses: a CTL other than HTAB anywhere (RFC 9110
#: 5.5; so CR, LF and NUL, RFC 9113 8.2.1), SP or HTAB at either end
#: (``_bad_value``: the ends by index, the CTLs by one character class; one
#: regular expression with the anchored alternatives tried at every byte
#: cost about three times as much).
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
_SP_HTAB = (0x20, 0x09)
#: origin-form (RFC 9112 3.2.1), as nginx and h11 read it: "/" then visible
#: ASCII; no "#" (a fragment is never sent), no SP, CTL or 8-bit byte.
_ORIGIN_FORM = re.compile(rb"/[\x21\x22\x24-\x7e]*").fullmatch
#: RFC 3986 3.1 scheme.
_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+\-.]*").fullmatch
#: RFC 9110 15: three digits, 100-599.
_STATUS = re.compile(rb"[1-5][0-9][0-9]").fullmatch


#: Field names that passed every name rule of ``_check_field`` (a token in
#: lowercase, not connection-specific, not ``te``), so that a name seen before
#: costs one set lookup: the first ``_KNOWN_NAMES_MAX`` such names of at most
#: ``_KNOWN_NAME_LENGTH`` bytes (about 100 KiB at most; a peer sending many
#: distinct names only makes the checks of later names slower).
_known_names: set[bytes] = set()
_KNOWN_NAMES_MAX = 1024
_KNOWN_NAME_LENGTH = 64


def _bad_value(value: bytes) -> bool:
    return bool(value) and (value[0] in _SP_HTAB or value[-1] in _SP_HTAB
                            or _CTL(value) is not None)


def _check_field(name: bytes, value: bytes) -> None:
    """The rules every regular h2 field obeys, in any block (RFC 9113 8.2)."""
    if name in _known_names:   # _bad_value, inline
        if value and (value[0] in _SP_HTAB or value[-1] in _SP_HTAB
                      or _CTL(value) is not None):
            raise MalformedError("invalid field value")
        return
    if _FIELD_NAME(name) is None:
        raise MalformedError("invalid field name")
    if _bad_value(value):
        raise MalformedError("invalid field value")
    if name in _H2_CONNECTION_HEADERS:
        raise MalformedError("connection-specific field")
    if name == b"te":
        if value.lower() != b"trailers":
            raise MalformedError("te other than trailers")
    elif len(name) <= _KNOWN_NAME_LENGTH and len(_known_names) < _KNOWN_NAMES_MAX:
        _known_names.add(name)


def _content_length(value: bytes, seen: bytes | None) -> bytes:
    if seen is not None:
        raise MalformedError("more than one content-length")
    if not value.isdigit():   # ASCII digits only (bytes.isdigit)
        raise MalformedError("invalid content-length")
    return value


def request_head_from_h2(headers: Headers) -> RequestHead:
    """A RequestHead from a request header block, checked once for every
    client end (the invariant in ``RequestHead``); MalformedError if it is
    malformed (RFC 9113 8.2, 8.3; RFC 9110 grammar for the pseudo-header
    values), 405 for CONNECT (no tunnels over h2).

    Cookie crumbs are joined back into one header (RFC 9113 8.2.3), ``host``
    becomes the authority when ``:authority`` is missing (and must equal it
    when both are present), ``te: trailers`` is kept (lowercase).
    """
    method = path = authority = scheme = None
    regular: Headers = []
    cookies: list[bytes] = []
    host = length = None
    in_pseudo = True
    for name, value in headers:
        if name[:1] == b":":
            if not in_pseudo:
                raise MalformedError("pseudo-header after a regular field")
            if name == b":method":
                if method is not None:
                    raise MalformedError("repeated pseudo-header")
                method = value
            elif name == b":path":
                if path is not None:
                    raise MalformedError("repeated pseudo-header")
                path = value
            elif name == b":authority":
                if authority is not None:
                    raise MalformedError("repeated pseudo-header")
                authority = value
            elif name == b":scheme":
                if scheme is not None:
                    raise MalformedError("repeated pseudo-header")
                scheme = value
            else:   # :status, :protocol (extended CONNECT is not offered), others
                raise MalformedError("unknown pseudo-header")
            continue
        in_pseudo = False
        _check_field(name, value)
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            if host is not None:
                raise MalformedError("more than one host")
            host = value
            continue
        if name == b"content-length":
            length = _content_length(value, length)
        elif name == b"te":
            value = b"trailers"
        elif name == b"http2-settings":
            continue
        regular.append((name, value))
    if method is None:
        raise MalformedError("missing :method")
    if _TOKEN(method) is None:
        raise MalformedError("invalid :method")
    if authority is not None and not valid_authority(authority):
        raise MalformedError("invalid :authority")
    if host is not None:
        if not valid_authority(host):
            raise MalformedError("invalid host")
        if authority is not None and host != authority:
            raise MalformedError("host differs from :authority")
    authority = authority if authority is not None else host
    if method == b"CONNECT":
        if scheme is not None or path is not None or authority is None:
            raise MalformedError("malformed CONNECT")
        raise MalformedError("CONNECT not allowed", 405)
    if scheme is None or path is None:
        raise MalformedError("missing :scheme or :path")
    if _SCHEME(scheme) is None:
        raise MalformedError("invalid :scheme")
    if _ORIGIN_FORM(path) is None and not (path == b"*" and method == b"OPTIONS"):
        raise MalformedError("invalid :path")
    if authority is None:
        raise MalformedError("missing :authority")
    if cookies:   # empty crumbs dropped: "a=1; " would end in whitespace
        regular.append((b"cookie", b"; ".join(c for c in cookies if c)))
    return RequestHead(method=method, target=path, authority=authority,
                       headers=regular, scheme=scheme, version="2")


def _is_grpc(headers: Headers) -> bool:
    """A request block's content-type is gRPC (for the answer to a request
    the proxy refuses before it has a head)."""
    return RequestHead(b"", b"", b"", list(headers)).is_grpc


def h2_request_headers(head: RequestHead) -> Headers:
    """The request header block for a neutral head (lowercase, no hop-by-hop)."""
    out: Headers = [(b":method", head.method)]
    if head.method != b"CONNECT":
        out.append((b":scheme", head.scheme or b"http"))
        out.append((b":path", head.target or b"/"))
    if head.authority:
        out.append((b":authority", head.authority))
    has_te = False
    for name, value in head.headers:
        name = name.lower()
        if name in CONNECTION_HEADERS:
            continue
        if name == b"te":
            if value.strip().lower() != b"trailers":
                continue
            has_te = True
            value = b"trailers"
        out.append((name, value))
    if head.is_grpc and not has_te:
        out.append((b"te", b"trailers"))
    return out


def response_head_from_h2(headers: Headers) -> ResponseHead:
    """A ResponseHead from a response header block, checked once for every
    server end: ``:status`` alone and first, three digits 100-599, regular
    fields as in requests, at most one content-length; MalformedError else."""
    status = None
    regular: Headers = []
    length = None
    for name, value in headers:
        if name[:1] == b":":
            if name != b":status" or status is not None or regular:
                raise MalformedError("misplaced pseudo-header")
            if _STATUS(value) is None:
                raise MalformedError("invalid :status")
            status = int(value)
            continue
        _check_field(name, value)
        if name == b"content-length":
            length = _content_length(value, length)
        regular.append((name, value))
    if status is None:
        raise MalformedError("missing :status")
    return ResponseHead(status, regular)


def trailers_from_h2(headers: Headers) -> Headers:
    """A trailer section as received, checked: no pseudo-header (RFC 9113
    8.1), regular fields as in a header section; MalformedError else."""
    for name, value in headers:
        if name[:1] == b":":
            raise MalformedError("pseudo-header in trailers")
        _check_field(name, value)
    return list(headers)


def declared_length(head: RequestHead | ResponseHead) -> int | None:
    """The content-length of a head built by the functions above (digits)."""
    value = head.header(b"content-length")
    return int(value) if value is not None else None


def h2_response_headers(head: ResponseHead) -> Headers:
    out: Headers = [(b":status", str(head.status).encode())]
    out.extend(_regular(head.headers))
    return out


def h2_trailers(trailers: Headers) -> Headers:
    return list(_regular(trailers))


def _regular(headers: Headers):
    for name, value in headers:
        name = name.lower()
        if name[:1] == b":" or name in CONNECTION_HEADERS or name == b"te":
            continue
        yield name, value


def header_list_size(headers: Headers) -> int:
    """The RFC 9113 size of a header list: name + value + 32 per field."""
    return sum(len(n) + len(v) + 32 for n, v in headers)
