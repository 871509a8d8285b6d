"""HTTP/1 upgrades (RFC 9110 7.8) and CONNECT (RFC 9110 9.3.6): which are
forwarded, the request and response types that carry a tunnel after a
``101`` (a ``2xx`` to CONNECT), when both connections become a byte relay,
and the server end's side of that relay (``ServerTunnel``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from httptools import HttpRequestParser

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

    __slots__ = ("connection",)

    def __init__(self, head: RequestHead, body: Body, upgrade: bytes,
                 connection: tuple[bytes, ...] = ()) -> None:
        super().__init__(head, body, upgrade=upgrade)
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


class HeldMessage(Protocol):
    """What ``ServerTunnel`` reads and writes of the server end's message."""

    request: Request | None
    leftover: bytes      # bytes read after its Upgrade/CONNECT head
    close_after: bool


class Tunnel(Protocol):
    """The upstream end of a tunnel (the HTTP/1 client end's connection)."""

    transport: Any

    def tunnel_attach(self, peer: Any) -> None: ...
    def tunnel_write(self, data: bytes) -> None: ...
    def tunnel_close_write(self) -> None: ...
    def tunnel_close(self) -> None: ...


class ServerTunnel:
    """The HTTP/1 server end's part in upgrades and tunnels, mixed into
    ``H1Server`` (methods, so relaying a read costs no extra call): what is
    read after an upgrade's head, the switch to relaying, and the writes
    the upstream end makes to the client (``tunnel_write``,
    ``tunnel_close_write``; ``tunnel_close`` is the server end's)."""

    # What it uses of H1Server (set there).
    conn: Any
    transport: Any
    parser: HttpRequestParser | None
    queue: deque[Any]
    tunnel: Tunnel | None
    _timeout: Any
    _ended_by: str
    _pauses: set[str]
    _stopped: bool
    _closed: bool
    _client_eof: bool
    _send: Callable[[bytes], None]

    def _pause_reading(self, why: str) -> None:
        raise NotImplementedError

    def _upgrade_read(self, leftover: bytes) -> bytes:
        """The parser stopped after an Upgrade or CONNECT head: hold what
        follows; after an upgrade that is not forwarded, a new parser reads
        on (the bytes to parse are returned)."""
        msg: HeldMessage | None = self.queue[-1] if self.queue else None
        if msg is not None and not isinstance(msg.request, UpgradeRequest):
            self.parser = HttpRequestParser(self)
            return leftover
        self._stopped = True
        self._pause_reading("upgrade")
        msg = self.queue[-1] if self.queue else None
        if msg is not None and isinstance(msg.request, UpgradeRequest):
            msg.leftover += leftover
            # Without a 101 what follows cannot be told from HTTP: close after.
            msg.close_after = True
        return b""

    def _start_tunnel(self, msg: HeldMessage, upstream: Tunnel) -> None:
        """From the next byte on, both connections are one byte relay."""
        self._timeout.wait = None   # a tunnel is not timed here
        self.queue.clear()
        self.tunnel = upstream
        self._ended_by = "tunnel closed"
        self.conn.protocol = f"{self.conn.protocol}+tunnel" if self.conn.protocol else "tunnel"
        upstream.tunnel_attach(self)
        if msg.leftover:
            upstream.tunnel_write(msg.leftover)
            msg.leftover = b""
        self._pauses.clear()
        self._stopped = False
        self.parser = None
        self.transport.resumeProducing()
        if self._client_eof:
            upstream.tunnel_close_write()

    def tunnel_write(self, data: bytes) -> None:
        self.conn.count_written(len(data))
        self._send(data)

    def tunnel_close_write(self) -> None:
        if not self._closed:
            self.transport.loseWriteConnection()


__all__ = [
    "HeldMessage", "ServerTunnel", "Tunnel", "TunnelResponse", "UpgradeRequest",
    "forwards_upgrade", "protocol_names",
]
