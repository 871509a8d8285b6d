"""HTTP/1 bytes (RFC 9112): status lines and reason phrases.

Pure functions shared by the server and client ends; they write what the
ends send and import no policy.
"""

from __future__ import annotations

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


__all__ = ["reason_phrase", "status_line"]
