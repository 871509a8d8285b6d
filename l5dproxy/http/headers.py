"""Header fields that belong to one connection (RFC 9110 7.6.1), and the
authority check, shared by the HTTP ends."""

from __future__ import annotations

import re

#: Headers that belong to one connection, never forwarded (RFC 9110 7.6.1;
#: ``HTTP2-Settings`` is h2c's upgrade payload, RFC 7540 3.2.1).
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"http2-settings",
})

#: RFC 3986 3.2 authority without userinfo (RFC 9110 4.2.4, RFC 9113 8.3.1):
#: an IP literal or a non-empty reg-name (RFC 9110 4.2.1: no empty host),
#: then ":" port.
_AUTHORITY = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})+)(?::[0-9]*)?"
).fullmatch


def valid_authority(value: bytes) -> bool:
    """Whether ``value`` (the bytes of a ``Host`` field, an h2 ``:authority``
    or an absolute-form request target's authority) is an RFC 3986
    ``host[:port]``: an IP literal or a non-empty reg-name, no userinfo
    (RFC 9110 4.2.4 calls a sender's userinfo an error), no path, ``/``,
    ``@``, whitespace or control byte. An empty value is not valid (the
    HTTP/1 end allows an empty ``Host`` before calling this, RFC 9112 3.2).

    A client sends the same Host on every request of a connection: values
    up to ``_SEEN_LENGTH`` bytes are remembered (at most ``_SEEN_LIMIT``,
    then the memory starts over), so the pattern runs once per value.
    """
    seen = _seen.get(value)
    if seen is None:
        seen = _AUTHORITY(value) is not None
        if len(value) <= _SEEN_LENGTH:
            if len(_seen) >= _SEEN_LIMIT:
                _seen.clear()
            _seen[value] = seen
    return seen


#: ``valid_authority``'s memory of values checked: at most this many, each
#: at most ``_SEEN_LENGTH`` bytes (a DNS name is at most 253), ~0.3 MiB.
_SEEN_LIMIT = 1024
_SEEN_LENGTH = 262
_seen: dict[bytes, bool] = {}


__all__ = ["HOP_BY_HOP", "valid_authority"]
