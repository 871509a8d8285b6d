"""Header fields that belong to one connection (RFC 9110 7.6.1), shared by
the HTTP ends."""

from __future__ import annotations

#: Headers that belong to one connection, never forwarded (RFC 9110 7.6.1;
#: ``HTTP2-Settings`` is h2c's upgrade payload, RFC 7540 3.2.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"http2-settings",
})

__all__ = ["HOP_BY_HOP"]
