"""HTTP/1 bytes (RFC 9112): status lines and reason phrases, chunks, the
last chunk and its trailer section, ``Connection`` tokens.

Pure functions shared by the server and client ends; they write what the
ends send and import no policy.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus


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


__all__ = [
    "LAST_CHUNK", "SMALL_CHUNK", "chunk_head", "connection_tokens", "frame_chunk", "last_chunk",
    "reason_phrase", "status_line",
]
