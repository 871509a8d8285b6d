"""HTTP/1 upgrades (RFC 9110 7.8) and CONNECT (RFC 9110 9.3.6): which are
forwarded, and the request and response types that carry a tunnel after a
``101`` (a ``2xx`` to CONNECT), when both connections become a byte relay.
"""

from __future__ import annotations

from l5dproxy.exchange.message import Body, Request, RequestHead, Response


def protocol_names(upgrade: bytes) -> set[bytes]:
    """The protocol names (lowercase, without versions) in Upgrade values."""
    names = (p.strip().split(b"/", 1)[0].lower() for p in upgrade.split(b","))
    return {n for n in names if n}


def forwards_upgrade(upgrade: bytes | None, version: str, allowed: frozenset[bytes]) -> bool:
    """Whether an ``Upgrade`` request is forwarded: HTTP/1.1 (RFC 9110 7.8:
    a server ignores Upgrade in an HTTP/1.0 request) and every protocol
    it offers (``name[/version]``, case-insensitive) is in ``allowed`` (the
    listener's ``upgrades``). Anything else, ``h2c`` above all (h2c smuggling: after
    its 101 the client would speak h2 straight to the endpoint, past the
    routes), is stripped and the request proxied as plain HTTP/1."""
    if version != "1.1" or not upgrade:
        return False
    offered = [p.strip().split(b"/", 1)[0].lower() for p in upgrade.split(b",")]
    offered = [p for p in offered if p]
    return bool(offered) and all(p in allowed for p in offered)


class UpgradeRequest(Request):
    """A request asking to leave HTTP/1 (``Upgrade``) or to tunnel (``CONNECT``).

    ``upgrade`` is the ``Upgrade`` header's value (``b"CONNECT"`` for a
    CONNECT); the HTTP/1 client end forwards it and, on ``101`` (2xx for
    CONNECT), answers with a ``TunnelResponse``. Headers the client's
    ``Connection`` named stay in ``head.headers`` and in ``connection``.
    """

    __slots__ = ("connection", "upgrade")

    def __init__(self, head: RequestHead, body: Body, upgrade: bytes,
                 connection: tuple[bytes, ...] = ()) -> None:
        super().__init__(head, body)
        self.upgrade = upgrade
        #: Headers the client's Connection named (kept for the upgrade, as
        #: h2c's HTTP2-Settings): named again in the forwarded Connection.
        self.connection = connection


class TunnelResponse(Response):
    """A response after which its connection carries raw bytes: ``tunnel``
    is the upstream end (``tunnel_write``, ``tunnel_close_write``,
    ``tunnel_close``, ``tunnel_attach``)."""

    __slots__ = ("tunnel",)

    def __init__(self, head, body, tunnel) -> None:
        super().__init__(head, body)
        self.tunnel = tunnel


__all__ = ["TunnelResponse", "UpgradeRequest", "forwards_upgrade", "protocol_names"]
