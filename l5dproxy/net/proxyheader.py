"""PROXY protocol out: the header an upstream connection starts with.

``[service.NAME] send_proxy_protocol = "v1" | "v2"``: every connection the
TCP relay makes to the service (and the early connection of a client that
is silent, l5dproxy.detect.early) first sends a header naming the
client's address (the one a PROXY protocol header in gave, when there was
one) and the address it connected to, so that an endpoint behind
(HAProxy ``accept-proxy``, nginx ``listen ... proxy_protocol``, Postfix,
...) sees the real client. Twisted parses the protocol but has no encoder;
the layout is the specification's
(https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt, 2.1 and 2.2).
"""

from __future__ import annotations

import ipaddress
import struct

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress

VERSIONS = ("v1", "v2")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21          # version 2, command PROXY
_TCP4, _TCP6, _UNSPEC = 0x11, 0x21, 0x00


def encode(version: str, source: IAddress | None, destination: IAddress | None) -> bytes:
    """The header for a connection from ``source`` to ``destination``
    (``version`` ``"v1"`` or ``"v2"``).

    When either is not an IP address (a ``unix:`` listener) the header says
    so (v1 ``PROXY UNKNOWN``, v2 ``AF_UNSPEC``) and the receiver keeps the
    connection's own addresses. An IPv4 address paired with an IPv6 one (a
    dual-stack listener) is sent as its IPv4-mapped IPv6 address, since
    both must be of one family.
    """
    if version not in VERSIONS:
        raise ValueError(f"PROXY protocol version must be v1 or v2, not {version!r}")
    pair = _ip_pair(source, destination)
    if version == "v1":
        if pair is None:
            return b"PROXY UNKNOWN\r\n"
        (src, sport), (dst, dport) = pair
        family = "TCP4" if src.version == 4 else "TCP6"
        return f"PROXY {family} {src} {dst} {sport} {dport}\r\n".encode("ascii")
    if pair is None:
        return V2_SIGNATURE + bytes([_V2_PROXY, _UNSPEC]) + b"\x00\x00"
    (src, sport), (dst, dport) = pair
    body = src.packed + dst.packed + struct.pack("!HH", sport, dport)
    family_byte = _TCP4 if src.version == 4 else _TCP6
    return V2_SIGNATURE + bytes([_V2_PROXY, family_byte]) + struct.pack("!H", len(body)) + body


_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip_pair(source: IAddress | None, destination: IAddress | None,
             ) -> tuple[tuple[_IP, int], tuple[_IP, int]] | None:
    ends: list[tuple[_IP, int]] = []
    for addr in (source, destination):
        if not isinstance(addr, IPv4Address | IPv6Address):
            return None
        try:
            ip = ipaddress.ip_address(addr.host.partition("%")[0])  # no zone index
        except ValueError:
            return None
        ends.append((ip, addr.port))
    (src, sport), (dst, dport) = ends
    if src.version != dst.version:
        src, dst = _as_v6(src), _as_v6(dst)
    return (src, sport), (dst, dport)


def _as_v6(ip: _IP) -> ipaddress.IPv6Address:
    if isinstance(ip, ipaddress.IPv6Address):
        return ip
    return ipaddress.IPv6Address(b"\x00" * 10 + b"\xff\xff" + ip.packed)
