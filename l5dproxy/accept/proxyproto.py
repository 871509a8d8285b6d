"""PROXY protocol in: the client's address from a load balancer's header.

A load balancer in TCP mode (HAProxy ``send-proxy``/``send-proxy-v2``, AWS
NLB, GCP, nginx ``proxy_protocol on``) starts each connection with a header
naming the client's address and the one it connected to (the PROXY
protocol, https://www.haproxy.org/download/3.0/doc/proxy-protocol.txt).
``ProxyHeaderProtocol`` reads it before anything else sees the connection,
puts the addresses on the connection record (``InboundConnection.set_client``),
and hands the transport, with every byte after the header, to the protocol
that comes next (detection, or the relay on an opaque listener), exactly as
detection hands over to the protocol it finds.

Modes (``[[listener]] proxy_protocol``):

* ``required``: the connection must start with a v1 or v2 header; anything
  else (a byte that cannot begin one, an invalid or oversized header, EOF or
  ``proxy_protocol_timeout`` seconds before the header is whole) closes it.
* ``optional``: a header is taken when the first bytes are one (the v2
  signature or ``PROXY``); other bytes go on to detection as they came, as
  does a connection silent for ``proxy_protocol_timeout`` seconds.

Each outcome is counted in ``proxy_protocol_total{listener, result}``:
``v1``, ``v2``, ``local`` (a v2 ``LOCAL`` command, as HAProxy's health
checks send, a v1 ``UNKNOWN``, or a family other than TCP over IPv4/IPv6:
the connection keeps its own addresses, as the specification requires),
``absent`` (optional, no header), and the failures ``missing``, ``invalid``,
``timeout``, ``closed``.

Parsing is Twisted's (``twisted.protocols.haproxy``). Its only public name,
``proxyEndpoint``, wraps the whole listening endpoint: it closes any
connection without a header (no ``optional``), has no timeout, closes a
connection whose first read is shorter than 16 bytes, and leaves a
``ProtocolWrapper`` between the socket and every protocol (no transport
switching, no splice). So this module uses its two parsers' ``parse``
class methods (private modules, named once here; canaries in
``tests/test_library_internals.py``) and does the framing, the bounds and
the address checks itself: Twisted's v1 parser takes any text for an
address (``PROXY TCP4 evil.example ...``) and any number for a port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.python.failure import Failure
from zope.interface import implementer

from l5dproxy.net.transport import forward_read_closed, forward_write_closed, switch_protocol

log = Logger()

MODES = ("off", "required", "optional")

#: The v2 signature (12 bytes), then version/command, family, length (2).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
#: The longest v1 header, CRLF included (the specification, 2.1).
V1_MAX = 107
V1_PREFIX = b"PROXY "
#: The most address and TLV bytes a v2 header may declare: the addresses take
#: at most 216 (AF_UNIX), HAProxy's TLVs (ALPN, authority, unique ID up to
#: 128, SSL) a few hundred more; past this the header is refused rather than
#: buffered (the length field would allow 64 KiB).
V2_MAX_PAYLOAD = 2048


class ClientRecord(Protocol):
    """What this module uses of the connection record
    (``l5dproxy.net.connection.InboundConnection``)."""

    peer: str

    def set_client(self, client: IAddress, destination: IAddress | None) -> None: ...
    def closed(self, reason: Failure | None, how: str) -> None: ...


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed header: ``source`` and ``destination`` are None when the
    connection keeps its own addresses (v2 ``LOCAL``, v1 ``UNKNOWN``, a
    family other than TCP/IPv4 or TCP/IPv6)."""

    version: int
    source: IPv4Address | IPv6Address | None
    destination: IPv4Address | IPv6Address | None


def parse(data: bytes) -> tuple[ProxyHeader, int] | None:
    """The header at the start of ``data`` and its length in bytes, or None
    while ``data`` is a proper prefix of one.

    Raises ``ProxyHeaderError`` when ``data`` cannot start a header, or its
    header is invalid: a v1 line longer than 107 bytes, a v2 header
    declaring more than ``V2_MAX_PAYLOAD`` bytes or not of version 2, an
    address that is not an IP address of the family named, a port past
    65535.
    """
    if data[:12] == V2_SIGNATURE[:len(data[:12])]:
        return _parse_v2(data)
    if data[:6] == V1_PREFIX[:len(data[:6])]:
        return _parse_v1(data)
    raise ProxyHeaderError("not a PROXY protocol header")


def starts_like_header(data: bytes) -> bool:
    """Whether ``data`` (at least one byte) may begin a v1 or v2 header."""
    head = data[:12]
    return (head == V2_SIGNATURE[:len(head)]
            or data[:6] == V1_PREFIX[:len(data[:6])])


def _parse_v1(data: bytes) -> tuple[ProxyHeader, int] | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("v1 header longer than 107 bytes")
        return None
    line = data[:end]
    fields = line.split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        # The specification's 2.1: "PROXY UNKNOWN" may stand alone (what
        # encode() sends for a unix: client), and the receiver ignores the
        # rest of the line; Twisted's V1Parser refuses the bare form.
        return ProxyHeader(1, None, None), end + 2
    if len(fields) == 6 and not (fields[4].isdigit() and fields[5].isdigit()):
        # Ports are decimal digits (2.1); int() would also take "+1", "1_0".
        raise ProxyHeaderError("v1 port is not decimal digits")
    try:
        info = V1Parser.parse(line)
    except (InvalidProxyHeader, ValueError) as e:
        raise ProxyHeaderError(f"invalid v1 header ({type(e).__name__})") from None
    family = line.split(b" ", 2)[1]
    source = _checked(info.source, 4 if family == b"TCP4" else 6)
    destination = _checked(info.destination, 4 if family == b"TCP4" else 6)
    return ProxyHeader(1, source, destination), end + 2


def _parse_v2(data: bytes) -> tuple[ProxyHeader, int] | None:
    if len(data) < V2_FIXED:
        return None
    if data[12] >> 4 != 2:
        raise ProxyHeaderError("v2 header of an unknown version")
    length = V2_FIXED + int.from_bytes(data[14:16], "big")
    if length - V2_FIXED > V2_MAX_PAYLOAD:
        raise ProxyHeaderError(f"v2 header declares {length - V2_FIXED} bytes"
                               f" (at most {V2_MAX_PAYLOAD})")
    if len(data) < length:
        return None
    try:
        info = V2Parser.parse(data[:length])
    except (InvalidProxyHeader, ValueError) as e:
        raise ProxyHeaderError(f"invalid v2 header ({type(e).__name__})") from None
    if data[13] not in (0x11, 0x21):   # TCP over IPv4, TCP over IPv6
        return ProxyHeader(2, None, None), length
    version = 4 if data[13] == 0x11 else 6
    return ProxyHeader(2, _checked(info.source, version),
                       _checked(info.destination, version)), length


def _checked(addr: IAddress | None, version: int) -> IPv4Address | IPv6Address | None:
    if addr is None:
        return None
    if not isinstance(addr, IPv4Address | IPv6Address):
        raise ProxyHeaderError("not a TCP address")
    try:
        ip = ipaddress.ip_address(addr.host)
    except ValueError:
        raise ProxyHeaderError(f"{addr.host!r} is not an IP address") from None
    if ip.version != version:
        raise ProxyHeaderError(f"{addr.host!r} is not an IPv{version} address")
    if not 0 <= addr.port <= 65535:
        raise ProxyHeaderError(f"port {addr.port} out of range")
    # One canonical text for every address: logs, labels and headers agree.
    cls = IPv4Address if version == 4 else IPv6Address
    return cls("TCP", str(ip), addr.port)


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(TwistedProtocol):
    """Reads one connection's PROXY protocol header, then hands over.

    ``then()`` builds the protocol that takes the connection after the
    header (called once, after the addresses are on ``conn``); ``count``
    is called once with the outcome (``proxy_protocol_total``'s result).
    """

    def __init__(self, conn: ClientRecord, mode: str, timeout: float,
                 clock: IReactorTime, then: Callable[[], IProtocol],
                 count: Callable[[str], None]) -> None:
        assert mode in ("required", "optional"), mode
        self.conn = conn
        self.required = mode == "required"
        self.clock = clock
        self.then = then
        self.count = count
        self.buffer = b""
        self.next_protocol: IProtocol | None = None
        self._ended: str | None = None
        self._timer: IDelayedCall | None = (
            clock.callLater(timeout, self._timed_out) if timeout else None)

    def dataReceived(self, data: bytes) -> None:
        if self.next_protocol is not None:
            self.next_protocol.dataReceived(data)
            return
        if self._ended is not None:
            return
        self.buffer += data
        buffer = self.buffer
        try:
            parsed = parse(buffer)
        except ProxyHeaderError as e:
            if not self.required and not starts_like_header(buffer):
                self._hand_over("absent", None, 0)
            else:
                self._refuse("missing" if not starts_like_header(buffer) else "invalid",
                             str(e))
            return
        if parsed is not None:
            header, length = parsed
            result = f"v{header.version}" if header.source is not None else "local"
            self._hand_over(result, header, length)

    def readConnectionLost(self) -> None:
        if self.next_protocol is None:
            # EOF before the header was whole: nothing to proxy.
            if self._ended is None:
                self._end("closed")
            assert self.transport is not None
            self.transport.loseConnection()
            return
        forward_read_closed(self.next_protocol, self.transport)

    def writeConnectionLost(self) -> None:
        forward_write_closed(self.next_protocol)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.next_protocol is not None:
            self.next_protocol.connectionLost(reason)
            return
        if self._ended is None:
            self._end("closed")
        self.conn.closed(reason, f"proxy protocol {self._ended}")

    def _timed_out(self) -> None:
        self._timer = None
        if self.next_protocol is not None or self._ended is not None:
            return
        if not self.required and not self.buffer:
            self._hand_over("absent", None, 0)   # a quiet client without a header
            return
        self._refuse("timeout", "header not complete in time")

    def _end(self, result: str) -> None:
        self._ended = result
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.count(result)

    def _refuse(self, result: str, why: str) -> None:
        self._end(result)
        self.buffer = b""
        log.debug("closing {peer}: PROXY protocol header {result}: {why}",
                  peer=self.conn.peer, result=result, why=why)
        assert self.transport is not None
        self.transport.loseConnection()

    def _hand_over(self, result: str, header: ProxyHeader | None, length: int) -> None:
        """The header (if any) is read: addresses on the record, then the
        next protocol gets the transport and the bytes after the header."""
        self._end(result)
        self._ended = None
        if header is not None and header.source is not None:
            self.conn.set_client(header.source, header.destination)
        rest, self.buffer = self.buffer[length:], b""
        protocol = self.then()
        transport = self.transport
        assert transport is not None
        switch_protocol(transport, self, protocol)  # else: forward (dataReceived)
        self.next_protocol = protocol
        protocol.makeConnection(transport)
        if rest:
            protocol.dataReceived(rest)
