"""A connection's original destination, after an iptables ``REDIRECT``.

When netfilter NAT redirects a connection to the proxy (``iptables -t nat
... -j REDIRECT --to-ports 4143``, as a sidecar takes a pod's outbound
traffic), the socket's local address is the proxy's; the address the client
asked for is kept by conntrack and read with ``getsockopt(SOL_IP,
SO_ORIGINAL_DST)`` (IPv4, ``linux/netfilter_ipv4.h``) or
``getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`` (IPv6,
``linux/netfilter_ipv6/ip6_tables.h``), both option 80, as Envoy's
``original_dst`` listener filter and Linkerd's proxy read it. Linux only;
elsewhere (or without conntrack, or for a connection that was not NATed)
there is none.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import sys

from twisted.internet.address import IPv4Address, IPv6Address

SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


def decode_sockaddr(raw: bytes) -> IPv4Address | IPv6Address | None:
    """A ``struct sockaddr_in`` or ``sockaddr_in6`` as the kernel fills it
    (family in host byte order, port and address in network order), or None
    for anything else."""
    if len(raw) < 4:
        return None
    family = int.from_bytes(raw[:2], sys.byteorder)
    (port,) = struct.unpack_from("!H", raw, 2)
    if family == socket.AF_INET and len(raw) >= 8:
        return IPv4Address("TCP", str(ipaddress.IPv4Address(raw[4:8])), port)
    if family == socket.AF_INET6 and len(raw) >= 24:
        ip = ipaddress.IPv6Address(raw[8:24])
        return IPv6Address("TCP", str(ip), port)
    return None


def original_destination(sock: socket.socket) -> IPv4Address | IPv6Address | None:
    """The address ``sock``'s client connected to before NAT redirected it,
    or None when the kernel has none for it (not redirected: then the
    kernel gives the socket's own address, which ``is_own_address`` tells)."""
    attempts = [(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)]
    if sock.family == socket.AF_INET6:   # an IPv6 socket may carry IPv4 (mapped) too
        attempts.insert(0, (SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6))
    for level, option, size in attempts:
        try:
            raw = sock.getsockopt(level, option, size)
        except OSError:
            continue
        found = decode_sockaddr(raw)
        if found is not None:
            return found
    return None


def is_local_address(host: str) -> bool:
    """Whether ``host`` (an IP address) is one of this machine's (it can be
    bound: the kernel's own answer, interfaces and loopback ranges alike)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def is_own_address(dst: IPv4Address | IPv6Address, own: IPv4Address | IPv6Address) -> bool:
    """Whether connecting to ``dst`` would reach the listener whose socket
    address is ``own``: the same port on the same address, or on any
    address of this machine (the listener may be bound to all of them, and
    any other listener of the proxy on that port is the proxy too)."""
    if dst.port != own.port:
        return False
    if _same_ip(dst.host, own.host):
        return True
    return is_local_address(dst.host)


def _same_ip(a: str, b: str) -> bool:
    try:
        x, y = ipaddress.ip_address(a), ipaddress.ip_address(b)
    except ValueError:
        return a == b
    if isinstance(x, ipaddress.IPv6Address) and x.ipv4_mapped is not None:
        x = x.ipv4_mapped
    if isinstance(y, ipaddress.IPv6Address) and y.ipv4_mapped is not None:
        y = y.ipv4_mapped
    return x == y
