"""Pure protocol sniffing of a client's first bytes.

The proxy must pick a protocol handler before it can forward anything, but
clients never announce their protocol out of band.  This module looks at the
bytes a client sends first and says whether they are an HTTP/2 prior-knowledge
preface, an HTTP/1.x request line, a TLS ClientHello (with its SNI), or
something opaque that should be relayed as plain TCP.

It is deliberately free of Twisted and of any I/O so that the decision is a
pure function of the bytes: the caller re-runs :func:`sniff` on the whole
accumulated buffer after every read, and the answer never depends on how the
bytes were split into reads.  Each candidate protocol is judged on its own
("could these bytes still become X?"); the h2 preface (``PRI * HTTP/2.0``)
starts like an HTTP/1 request, so h2 is waited for first.

HTTP/1 is decided on how a request *starts*, not on whether it is valid:
bytes that start like a request line (see :func:`starts_like_http1`) are
HTTP/1 from then on, and the HTTP/1 server end (llhttp and the ``[http]``
limits) judges the request, as it judges every later request on the
connection.  A sniffer that also validated the request line would be a
second parser: every request it saw differently (a line past
``peek_limit``, a lowercase method, a bare LF, an odd space) would skip
HTTP policy as opaque TCP, while the same bytes as the second request of a
connection got a 4xx.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

__all__ = ["H2_PREFACE", "Verdict", "ended", "sniff", "starts_like_http1", "timed_out"]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9110 tchar, spelled out so the pattern needs no escaping subtleties.
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"

# How an HTTP/1 request starts: optional empty lines (RFC 9112 2.2: a server
# ignores CRLFs before the request line; llhttp skips CR and LF there), a
# method token, then whitespace. RFC 9112 3 lets a recipient take HTAB, VT
# and FF as the separator, so an endpoint may read those as HTTP too; a bare
# CR is left out, as it ends lines of text protocols (Redis: "PING\r\n").
_HTTP1_START = re.compile(rb"[\r\n]*[" + _TCHAR + rb"]+[ \t\x0b\x0c]")
# What could still become such a start (including the empty buffer).
_HTTP1_START_PREFIX = re.compile(rb"[\r\n]*[" + _TCHAR + rb"]*")
# The SSH identification string (RFC 4253 4.2, "SSH-2.0-software comments")
# is a token and a space too; an SSH client sends it first.
_SSH = b"SSH-"

# TLS record layer constants (RFC 8446 section 5.1, RFC 5246 section 6.2).
_TLS_HANDSHAKE = 0x16
_TLS_CLIENT_HELLO = 0x01
_TLS_RECORD_HEADER = 5
_TLS_MAX_RECORD = 2**14 + 2048
_TLS_EXT_SERVER_NAME = 0
_TLS_SNI_HOST_NAME = 0
# Allowed (low, high) values of each byte of a record header (content type,
# legacy version major/minor, length high/low) plus the handshake type.
_TLS_HEADER_RANGES = (
    (_TLS_HANDSHAKE, _TLS_HANDSHAKE),
    (0x03, 0x03),
    (0x00, 0x04),
    (0x00, _TLS_MAX_RECORD >> 8),
    (0x00, 0xFF),
    (_TLS_CLIENT_HELLO, _TLS_CLIENT_HELLO),
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the proxy should treat a connection as, and why.

    ``reason`` is kept alongside ``protocol`` because "opaque" covers very
    different situations (clearly not HTTP vs. merely undecided) that the
    caller may want to log or count separately.
    """

    protocol: str  # "h2", "http1", "tls" or "opaque"
    # "preface", "request_line", "client_hello", "not_http", "peek_limit",
    # "timeout" or "eof" (http1 and tls as well as opaque: bytes that start
    # like an HTTP/1 request or a ClientHello record are http1 or tls however
    # detection ends)
    reason: str
    sni: str | None = None  # host_name from the ClientHello, if any


class _Chance(enum.Enum):
    """How a single candidate protocol fares against the bytes so far."""

    NO = enum.auto()
    MAYBE = enum.auto()
    YES = enum.auto()


_NOT_HTTP = Verdict("opaque", "not_http")
_PEEK_LIMIT = Verdict("opaque", "peek_limit")
_TIMEOUT = Verdict("opaque", "timeout")
_EOF = Verdict("opaque", "eof")
_H2 = Verdict("h2", "preface")
_HTTP1 = Verdict("http1", "request_line")


def sniff(data: bytes, peek_limit: int = 8192) -> Verdict | None:
    """Verdict for the client's first bytes, or None when more bytes are needed.

    Only the first ``peek_limit`` bytes are ever considered, so that a
    verdict never depends on whether extra bytes happened to arrive in the
    same read as the deciding ones.
    """
    if peek_limit < 0:
        raise ValueError(f"peek_limit must be >= 0, got {peek_limit}")
    data = bytes(data[:peek_limit])
    h2 = _h2_chance(data)
    if h2 is _Chance.YES:
        return _H2
    full = len(data) >= peek_limit
    if h2 is _Chance.MAYBE and not full:
        return None   # "PRI " starts like HTTP/1 too: the preface decides
    http1 = starts_like_http1(data)
    if http1 is True:
        return _HTTP1
    tls = _tls_chance(data)
    if tls is _Chance.YES:
        return Verdict("tls", "client_hello", _client_hello_sni(data))
    if http1 is False and _Chance.MAYBE not in (h2, tls):
        return _NOT_HTTP
    if not full:
        return None
    return _at_peek_limit(data, http1, tls)


def starts_like_http1(data: bytes) -> bool | None:
    """Whether ``data`` starts like an HTTP/1 request: True, False, or None
    while it could still (empty lines and a method token so far).

    The one rule deciding HTTP/1 on a detect listener: optional empty lines,
    a method token (RFC 9110 5.6.2 tchar), then SP (or HTAB, VT, FF, which
    RFC 9112 3 lets a recipient take as SP). Whether the request is valid is
    not decided here but by the HTTP/1 server end, the same way for the
    first request of a connection and every later one.
    """
    if data.startswith(_SSH):
        return False
    if _HTTP1_START.match(data):
        return True
    return None if _HTTP1_START_PREFIX.fullmatch(data) else False


def timed_out(data: bytes) -> Verdict:
    """The verdict when the detect timeout expires with ``data`` buffered.

    A client that stalls before completing a preface or ClientHello is
    either slow or waiting for the server to speak first; with no bytes (or
    bytes that are none of the below) the connection is opaque. Bytes that
    are, or could still be, the start of an HTTP/1 request go to the HTTP/1
    server end, whose request-header timeout answers them as it would any
    later request (a client that sends ``GET`` and waits is not let through
    as TCP). Bytes that are, or could still be, the start of a ClientHello
    record (``0x16``, a valid record header, part of the record) are
    ``tls``, as at the peek limit: a terminating listener answers them and
    its ``handshake_timeout`` applies (a ClientHello sent slowly is not let
    through as plaintext); a listener that does not terminate relays a
    ``tls`` verdict as opaque TCP all the same.
    """
    return _undecided(data, _TIMEOUT)


def ended(data: bytes) -> Verdict:
    """The verdict when the client half-closes before one was reached.

    As :func:`timed_out`: bytes that could start an HTTP/1 request are
    http1 (the server end drops a head cut short), bytes that could start a
    ClientHello are tls (a terminating listener's handshake fails on them),
    anything else is opaque.
    """
    return _undecided(data, _EOF)


def _undecided(data: bytes, opaque: Verdict) -> Verdict:
    """The verdict for ``data`` when no more bytes will decide it."""
    if not data:
        return opaque
    if starts_like_http1(data) is not False:
        return Verdict("http1", opaque.reason)
    if _tls_chance(data) is not _Chance.NO:
        return Verdict("tls", opaque.reason)
    return opaque


def _at_peek_limit(data: bytes, http1: bool | None, tls: _Chance) -> Verdict:
    """Decide a still-open buffer that has reached ``peek_limit``.

    A ClientHello with a valid record and handshake header is TLS with very
    high confidence even if its record is larger than the peek window, so it
    is reported as such (its SNI is unknown because the record is partial).
    Bytes that could still start an HTTP/1 request (a method token longer
    than the window, empty lines) are http1: the server end answers them.
    """
    if tls is _Chance.MAYBE and len(data) > _TLS_RECORD_HEADER:
        return Verdict("tls", "client_hello")
    if http1 is None and data:
        return Verdict("http1", "peek_limit")
    return _PEEK_LIMIT


def _h2_chance(data: bytes) -> _Chance:
    """Whether the bytes are, or could still become, the h2 preface."""
    if data.startswith(H2_PREFACE):
        return _Chance.YES
    if H2_PREFACE.startswith(data):
        return _Chance.MAYBE
    return _Chance.NO


def _tls_chance(data: bytes) -> _Chance:
    """Whether the bytes hold, or could still become, a ClientHello record.

    TLS is only decided once the whole first record is present, because the
    SNI lives inside it and the caller routes on the SNI.
    """
    if not _tls_header_prefix_ok(data):
        return _Chance.NO
    if len(data) < _TLS_RECORD_HEADER:
        return _Chance.MAYBE
    if len(data) < _TLS_RECORD_HEADER + _tls_record_length(data):
        return _Chance.MAYBE
    return _Chance.YES


def _tls_header_prefix_ok(data: bytes) -> bool:
    """Check every header byte present so far; missing bytes are fine."""
    pairs = zip(data, _TLS_HEADER_RANGES, strict=False)
    if not all(lo <= b <= hi for b, (lo, hi) in pairs):
        return False
    if len(data) < _TLS_RECORD_HEADER:
        return True
    return 1 <= _tls_record_length(data) <= _TLS_MAX_RECORD


def _tls_record_length(data: bytes) -> int:
    """The length field of the first TLS record header."""
    return int.from_bytes(data[3:5], "big")


class _TruncatedError(Exception):
    """A length field pointed past the end of the available bytes."""


class _Reader:
    """Bounds-checked cursor over a byte string.

    Every read past the end raises :class:`_TruncatedError`, so the parser can be
    written straight-line and malformed input is handled in one place.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, n: int) -> bytes:
        """Consume exactly ``n`` bytes."""
        end = self._pos + n
        if end > len(self._data):
            raise _TruncatedError
        chunk = self._data[self._pos : end]
        self._pos = end
        return chunk

    def uint(self, n: int) -> int:
        """Consume an ``n``-byte big-endian unsigned integer."""
        return int.from_bytes(self.take(n), "big")

    def vector(self, length_bytes: int) -> _Reader:
        """Consume a length-prefixed vector and return a reader over it."""
        return _Reader(self.take(self.uint(length_bytes)))

    def rest(self) -> bytes:
        """Consume and return every remaining byte."""
        return self.take(len(self._data) - self._pos)

    def done(self) -> bool:
        """Whether every byte has been consumed."""
        return self._pos >= len(self._data)


def _client_hello_sni(data: bytes) -> str | None:
    """The host_name SNI of the ClientHello in the first record, if any.

    Any malformation yields None rather than an error: the header already
    proved this is TLS, and a missing SNI merely limits routing options.
    """
    end = _TLS_RECORD_HEADER + _tls_record_length(data)
    record = data[_TLS_RECORD_HEADER:end]
    try:
        return _parse_client_hello(_Reader(record))
    except _TruncatedError:
        return None


def _parse_client_hello(handshake: _Reader) -> str | None:
    """Walk a ClientHello (RFC 8446 section 4.1.2) to its extensions."""
    handshake.take(1)  # msg_type, already checked to be client_hello
    body = _Reader(handshake.take(handshake.uint(3)))
    body.take(2 + 32)  # legacy_version, random
    body.vector(1)  # legacy_session_id
    body.vector(2)  # cipher_suites
    body.vector(1)  # legacy_compression_methods
    if body.done():
        return None  # pre-extension ClientHello
    extensions = body.vector(2)
    while not extensions.done():
        ext_type = extensions.uint(2)
        ext_data = extensions.vector(2)
        if ext_type == _TLS_EXT_SERVER_NAME:
            return _parse_server_name(ext_data)
    return None


def _parse_server_name(ext_data: _Reader) -> str | None:
    """First host_name entry of a server_name extension (RFC 6066 s. 3)."""
    names = ext_data.vector(2)
    while not names.done():
        name_type = names.uint(1)
        name = names.vector(2).rest()
        if name_type == _TLS_SNI_HOST_NAME:
            return _decode_host_name(name)
    return None


def _decode_host_name(name: bytes) -> str | None:
    """Accept only non-empty visible ASCII, the only sane routing keys."""
    if not name or not all(0x21 <= b <= 0x7E for b in name):
        return None
    return name.decode("ascii")
