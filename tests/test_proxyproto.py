"""l5dproxy.accept.proxyproto: reading the PROXY protocol header (v1, v2)."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.accept.proxyproto import (
    V2_MAX_PAYLOAD,
    ProxyHeaderError,
    ProxyHeaderProtocol,
    parse,
)
from l5dproxy.net.connection import InboundConnection, ListenerSite
from l5dproxy.net.proxyheader import encode
from l5dproxy.telemetry import Metrics

BOUNDED = settings(max_examples=150, deadline=None, derandomize=True)

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(src: str, dst: str, sport: int, dport: int, command: int = 1, tlvs: bytes = b"") -> bytes:
    """A v2 header as the specification (2.2) lays it out, built here
    independently of the code under test."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    family = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport) + tlvs
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_local() -> bytes:
    return SIG + bytes([0x20, 0x00]) + struct.pack("!H", 0)


class ParseTests(SynchronousTestCase):
    def test_v1_tcp4(self) -> None:
        header, n = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nGET")
        self.assertEqual(n, len(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"))
        self.assertEqual((header.version, header.source, header.destination),
                         (1, IPv4Address("TCP", "192.0.2.1", 56324),
                          IPv4Address("TCP", "198.51.100.2", 443)))

    def test_v1_tcp6_canonical(self) -> None:
        header, _ = parse(b"PROXY TCP6 2001:DB8:0::1 ::1 1 2\r\n")
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::1", 1))

    def test_v1_unknown_keeps_own_address(self) -> None:
        header, n = parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\nx")
        self.assertEqual((header.source, header.destination, n), (None, None, 35))

    def test_v1_bare_unknown_keeps_own_address(self) -> None:
        # Red-team finding: "PROXY UNKNOWN\r\n" (the spec's own example, and
        # what encode() sends for a unix: client) was refused as invalid.
        unix = UNIXAddress(b"/run/l5d.sock")
        for line in (b"PROXY UNKNOWN\r\n", encode("v1", unix, unix),
                     b"PROXY UNKNOWN anything at all\r\n"):
            header, n = parse(line + b"GET")
            self.assertEqual((header.version, header.source, header.destination, n),
                             (1, None, None, len(line)))

    def test_v1_ports_are_decimal_digits(self) -> None:
        for port in (b"+80", b"8_0", b" 80", b"-0", b"0x50"):
            with self.assertRaises(ProxyHeaderError, msg=port):
                parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 " + port + b" 443\r\n")
            with self.assertRaises(ProxyHeaderError, msg=port):
                parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 443 " + port + b"\r\n")

    def test_v2_tcp4_with_tlvs(self) -> None:
        tlv = b"\x05\x00\x04abcd"   # PP2_TYPE_UNIQUE_ID
        data = v2("203.0.113.9", "10.0.0.1", 40000, 80, tlvs=tlv)
        header, n = parse(data + b"rest")
        self.assertEqual(n, len(data))
        self.assertEqual(header.source, IPv4Address("TCP", "203.0.113.9", 40000))
        self.assertEqual(header.destination, IPv4Address("TCP", "10.0.0.1", 80))

    def test_v2_tcp6(self) -> None:
        header, _ = parse(v2("2001:db8::7", "2001:db8::1", 1234, 443))
        self.assertEqual(header.source, IPv6Address("TCP", "2001:db8::7", 1234))

    def test_v2_local_keeps_own_address(self) -> None:
        header, n = parse(v2_local() + b"x")
        self.assertEqual((header.version, header.source, n), (2, None, 16))

    def test_prefixes_wait(self) -> None:
        for whole in (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", v2("1.2.3.4", "5.6.7.8", 1, 2)):
            for i in range(len(whole)):
                self.assertIsNone(parse(whole[:i]), whole[:i])

    def test_invalid(self) -> None:
        for bad in (
            b"PROXY TCP4 evil.example 1.2.3.4 1 2\r\n",     # Twisted's parser takes any text
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",      # port out of range
            b"PROXY TCP4 1.2.3.4 5.6.7.8 x 2\r\n",          # ValueError inside Twisted's parser
            b"PROXY TCP4 ::1 ::1 1 2\r\n",                  # family mismatch
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4\r\n",
            b"PROXY " + b"A" * 120,                         # no CRLF within 107 bytes
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 80 + b"\r\n",  # CRLF past 107
            SIG + b"\x10\x11\x00\x0c" + b"\x00" * 12,       # version 1 in a v2 header
            SIG + b"\x21\x11" + struct.pack("!H", V2_MAX_PAYLOAD + 1),
            SIG + b"\x21\x11\x00\x04" + b"\x00" * 4,        # addresses cut short
            SIG + b"\x23\x11\x00\x0c" + b"\x00" * 12,       # unknown command
            b"GET / HTTP/1.1\r\n",
        ):
            with self.assertRaises(ProxyHeaderError, msg=bad):
                parse(bad)


class Next(Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class RecordedConnection(InboundConnection):
    """The record, with how it was closed kept instead of logged."""

    ends: list[str]

    def closed(self, reason, how: str) -> None:
        self.ends.append(how)


class Rig:
    """A ProxyHeaderProtocol on a StringTransport whose peer is 127.0.0.1:5000."""

    def __init__(self, mode: str, timeout: float = 5.0) -> None:
        self.clock = Clock()
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 5000),
                                         hostAddress=IPv4Address("TCP", "127.0.0.1", 4143))
        self.closed: list[str] = []
        site = ListenerSite("in", "app", self.clock, Metrics(), log_connections=False)
        self.conn = RecordedConnection(site, self.transport, 0.0)
        self.conn.ends = self.closed
        self.counted: list[str] = []
        self.next = Next()
        self.seen_peer: str | None = None

        def then() -> Protocol:
            self.seen_peer = self.conn.peer
            return self.next

        self.protocol = ProxyHeaderProtocol(self.conn, mode, timeout, self.clock, then,
                                            self.counted.append)
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)


class ProtocolTests(SynchronousTestCase):
    def test_header_names_the_client_everywhere(self) -> None:
        rig = Rig("required")
        rig.protocol.dataReceived(b"PROXY TCP4 203.0.113.5 192.0.2.80 41000 443\r\nGET / HT")
        rig.protocol.dataReceived(b"TP/1.1\r\n")
        self.assertEqual(rig.seen_peer, "203.0.113.5:41000")   # before the next protocol
        self.assertEqual((rig.conn.peer, rig.conn.client_host, rig.conn.via, rig.conn.local),
                         ("203.0.113.5:41000", "203.0.113.5", "127.0.0.1:5000",
                          "192.0.2.80:443"))
        self.assertEqual(rig.next.received, b"GET / HTTP/1.1\r\n")
        self.assertIs(rig.transport.protocol, rig.next)   # switched: nothing left in between
        self.assertEqual(rig.counted, ["v1"])

    def test_v2_local_keeps_the_connection_address(self) -> None:
        rig = Rig("required")
        rig.protocol.dataReceived(v2_local() + b"ping")
        self.assertEqual((rig.conn.peer, rig.conn.via), ("127.0.0.1:5000", ""))
        self.assertEqual((rig.next.received, rig.counted), (b"ping", ["local"]))

    def test_required_without_header_is_closed(self) -> None:
        rig = Rig("required")
        rig.protocol.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertTrue(rig.transport.disconnecting)
        self.assertEqual((rig.next.received, rig.counted), (b"", ["missing"]))
        rig.protocol.connectionLost(Failure(Exception("closed")))
        self.assertEqual(rig.closed, ["proxy protocol missing"])
        self.assertIsNone(rig.seen_peer)

    def test_invalid_header_is_closed_in_either_mode(self) -> None:
        for mode in ("required", "optional"):
            rig = Rig(mode)
            rig.protocol.dataReceived(b"PROXY TCP4 evil.example 1.2.3.4 1 2\r\nGET /")
            self.assertTrue(rig.transport.disconnecting)
            self.assertEqual((rig.next.received, rig.counted), (b"", ["invalid"]))

    def test_optional_without_header_goes_on(self) -> None:
        rig = Rig("optional")
        rig.protocol.dataReceived(b"P")
        self.assertEqual(rig.next.received, b"")    # may still be "PROXY "
        rig.protocol.dataReceived(b"RI * HTTP/2.0\r\n")
        self.assertEqual(rig.next.received, b"PRI * HTTP/2.0\r\n")
        self.assertEqual((rig.conn.peer, rig.counted), ("127.0.0.1:5000", ["absent"]))

    def test_optional_quiet_client_goes_on_after_the_timeout(self) -> None:
        rig = Rig("optional", timeout=2.0)
        rig.clock.advance(1.9)
        self.assertIsNone(rig.seen_peer)
        rig.clock.advance(0.1)
        self.assertEqual((rig.seen_peer, rig.counted), ("127.0.0.1:5000", ["absent"]))
        self.assertFalse(rig.transport.disconnecting)

    def test_required_timeout(self) -> None:
        rig = Rig("required", timeout=2.0)
        rig.protocol.dataReceived(b"PROXY TCP4 1.2.3.4")   # a slowloris header
        rig.clock.advance(2.0)
        self.assertTrue(rig.transport.disconnecting)
        self.assertEqual(rig.counted, ["timeout"])
        self.assertFalse(rig.clock.getDelayedCalls())

    def test_header_in_time_cancels_the_timer(self) -> None:
        rig = Rig("required", timeout=2.0)
        rig.protocol.dataReceived(v2("1.2.3.4", "5.6.7.8", 1, 2))
        self.assertFalse(rig.clock.getDelayedCalls())
        self.assertEqual(rig.counted, ["v2"])

    def test_eof_before_header(self) -> None:
        rig = Rig("required")
        rig.protocol.dataReceived(b"PROX")
        rig.protocol.readConnectionLost()
        self.assertTrue(rig.transport.disconnecting)
        rig.protocol.connectionLost(Failure(Exception("done")))
        self.assertEqual((rig.counted, rig.closed), (["closed"], ["proxy protocol closed"]))

    def test_lost_after_hand_over_goes_to_next(self) -> None:
        rig = Rig("required")
        rig.protocol.dataReceived(v2_local())
        reason = Failure(Exception("gone"))
        rig.protocol.connectionLost(reason)
        self.assertIs(rig.next.lost, reason)
        self.assertEqual(rig.closed, [])

    @BOUNDED
    @given(st.sampled_from([
        b"PROXY TCP4 198.51.100.22 203.0.113.7 35646 80\r\n",
        b"PROXY TCP6 2001:db8::2 2001:db8::1 1 65535\r\n",
        v2("198.51.100.22", "203.0.113.7", 35646, 80),
        v2("2001:db8::2", "2001:db8::1", 1, 65535, tlvs=b"\x01\x00\x02h2"),
    ]), st.binary(max_size=64), st.data())
    def test_any_split_gives_the_same_client_and_every_byte_once(self, header, payload,
                                                                  data) -> None:
        """However the header and what follows are cut into reads, the
        client is the header's and the next protocol gets exactly the bytes
        after the header, in order."""
        whole = header + payload
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(whole) - 1)), max_size=8)))
        rig = Rig("required")
        start = 0
        for cut in [*cuts, len(whole)]:
            if cut > start:
                rig.protocol.dataReceived(whole[start:cut])
                start = cut
        self.assertIn(rig.conn.client_host, ("198.51.100.22", "2001:db8::2"))
        self.assertEqual(rig.next.received, payload)
        self.assertEqual(len(rig.counted), 1)


class EncodeTests(SynchronousTestCase):
    """l5dproxy.net.proxyheader: what the proxy sends, read back by the
    parser above and checked against the specification's examples."""

    def test_v1(self) -> None:
        self.assertEqual(encode("v1", IPv4Address("TCP", "192.0.2.1", 56324),
                                IPv4Address("TCP", "198.51.100.2", 443)),
                         b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n")

    def test_v2_matches_an_independent_layout(self) -> None:
        self.assertEqual(encode("v2", IPv6Address("TCP", "2001:db8::7", 1234),
                                IPv6Address("TCP", "2001:db8::1", 443)),
                         v2("2001:db8::7", "2001:db8::1", 1234, 443))

    def test_mixed_families_become_ipv6(self) -> None:
        header, _ = parse(encode("v1", IPv4Address("TCP", "10.0.0.1", 1),
                                 IPv6Address("TCP", "::1", 2)))
        self.assertEqual(header.source, IPv6Address("TCP", "::ffff:a00:1", 1))

    def test_no_ip_address(self) -> None:
        from twisted.internet.address import UNIXAddress
        unix = UNIXAddress(b"/run/l5d.sock")
        self.assertEqual(encode("v1", unix, unix), b"PROXY UNKNOWN\r\n")
        header, n = parse(encode("v2", unix, None))
        self.assertEqual((header.source, n), (None, 16))

    @BOUNDED
    @given(st.ip_addresses(v=4) | st.ip_addresses(v=6), st.integers(0, 65535),
           st.integers(0, 65535), st.sampled_from(["v1", "v2"]))
    def test_round_trip(self, ip, sport, dport, version) -> None:
        cls = IPv4Address if ip.version == 4 else IPv6Address
        dst = "127.0.0.1" if ip.version == 4 else "::1"
        header, _ = parse(encode(version, cls("TCP", str(ip), sport), cls("TCP", dst, dport)))
        self.assertEqual((header.source, header.destination, header.version),
                         (cls("TCP", str(ip), sport), cls("TCP", dst, dport),
                          int(version[1])))
