"""Transparent listeners: l5dproxy.net.origdst and l5dproxy.accept.transparent
(the network-namespace test with a real iptables REDIRECT is in
tests/test_e2e_transparent.py)."""

from __future__ import annotations

import socket
import struct
import sys

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.accept import transparent
from l5dproxy.accept.transparent import OriginalDestinations
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import HostPort, ServiceConfig
from l5dproxy.net import origdst


def sockaddr_in(host: str, port: int) -> bytes:
    """As the kernel fills it: family in host byte order, the rest in network order."""
    return (socket.AF_INET.to_bytes(2, sys.byteorder) + struct.pack("!H", port)
            + socket.inet_pton(socket.AF_INET, host) + b"\0" * 8)


def sockaddr_in6(host: str, port: int) -> bytes:
    return (socket.AF_INET6.to_bytes(2, sys.byteorder) + struct.pack("!HI", port, 0)
            + socket.inet_pton(socket.AF_INET6, host) + struct.pack("I", 0))


class OrigDstTests(SynchronousTestCase):
    def test_decode(self) -> None:
        self.assertEqual(origdst.decode_sockaddr(sockaddr_in("10.1.2.3", 8080)),
                         IPv4Address("TCP", "10.1.2.3", 8080))
        self.assertEqual(origdst.decode_sockaddr(sockaddr_in6("2001:db8::1", 443)),
                         IPv6Address("TCP", "2001:db8::1", 443))
        self.assertIsNone(origdst.decode_sockaddr(b"\x01\x00\x00\x00"))  # AF_UNIX
        self.assertIsNone(origdst.decode_sockaddr(b""))

    def test_a_socket_that_was_not_redirected(self) -> None:
        """No NAT: the kernel has no original destination (None) or gives
        the socket's own address, which is_own_address recognises."""
        server = socket.socket()
        self.addCleanup(server.close)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client = socket.create_connection(server.getsockname())
        self.addCleanup(client.close)
        accepted, _ = server.accept()
        self.addCleanup(accepted.close)
        found = origdst.original_destination(accepted)
        own = IPv4Address("TCP", *accepted.getsockname())
        self.assertTrue(found is None or origdst.is_own_address(found, own), found)

    def test_is_own_address(self) -> None:
        own = IPv4Address("TCP", "127.0.0.1", 4143)
        self.assertTrue(origdst.is_own_address(IPv4Address("TCP", "127.0.0.1", 4143), own))
        # another loopback address, same port: a listener on 0.0.0.0 takes it
        self.assertTrue(origdst.is_own_address(IPv4Address("TCP", "127.0.0.9", 4143), own))
        self.assertTrue(origdst.is_own_address(IPv6Address("TCP", "::ffff:127.0.0.1", 4143),
                                               own))
        self.assertFalse(origdst.is_own_address(IPv4Address("TCP", "192.0.2.1", 4143), own))
        self.assertFalse(origdst.is_own_address(IPv4Address("TCP", "127.0.0.1", 80), own))


class Record:
    def __init__(self) -> None:
        self.pinned = None
        self.destination = None
        self.ends: list[str] = []

    def set_original_destination(self, destination) -> None:
        self.destination = destination

    def closed(self, reason, how: str) -> None:
        self.ends.append(how)


class Transport:
    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 4143)


class OriginalDestinationsTests(SynchronousTestCase):
    def make(self, dst, connect_there: bool = True) -> tuple[OriginalDestinations, list[str]]:
        counted: list[str] = []
        upstream = BackendSet(ServiceConfig("original_dst", ()), frozenset(), clock=Clock())
        return OriginalDestinations(upstream, connect_there, counted.append,
                                    read=lambda transport: dst), counted

    def test_pins_the_original_destination(self) -> None:
        dst = IPv4Address("TCP", "192.0.2.7", 8080)
        od, counted = self.make(dst)
        conn = Record()
        self.assertIsNone(od.accepted(conn, Transport()))
        self.assertEqual((conn.destination, conn.pinned.address, counted),
                         (dst, HostPort("192.0.2.7", 8080), []))
        other = Record()
        od.accepted(other, Transport())
        self.assertIs(other.pinned, conn.pinned)   # one Endpoint per destination

    def test_loop_refused(self) -> None:
        od, counted = self.make(IPv4Address("TCP", "127.0.0.1", 4143))
        conn = Record()
        self.assertEqual(od.accepted(conn, Transport()),
                         "refused: original destination is the proxy itself")
        self.assertEqual((conn.pinned, counted), (None, ["loop"]))

    def test_unknown_refused_only_when_connecting_there(self) -> None:
        od, counted = self.make(None)
        self.assertEqual(od.accepted(Record(), Transport()),
                         "refused: no original destination")
        self.assertEqual(counted, ["unknown"])
        od, counted = self.make(None, connect_there=False)
        self.assertIsNone(od.accepted(Record(), Transport()))
        self.assertEqual(counted, [])

    def test_a_fixed_service_records_but_does_not_pin(self) -> None:
        dst = IPv4Address("TCP", "127.0.0.1", 4143)   # would be a loop, but not connected to
        od, counted = self.make(dst, connect_there=False)
        conn = Record()
        self.assertIsNone(od.accepted(conn, Transport()))
        self.assertEqual((conn.destination, conn.pinned, counted), (dst, None, []))

    def test_destinations_kept_are_bounded(self) -> None:
        self.patch(transparent, "MAX_DESTINATIONS", 3)
        od, _ = self.make(None)
        first = od.endpoint_for(HostPort("10.0.0.1", 1))
        for port in range(2, 6):
            od.endpoint_for(HostPort("10.0.0.1", port))
        self.assertEqual(len(od._endpoints), 3)
        self.assertIsNot(od.endpoint_for(HostPort("10.0.0.1", 1)), first)

    def test_refused_protocol_closes_and_logs(self) -> None:
        from twisted.internet.testing import StringTransport
        conn = Record()
        protocol = transparent.Refused(conn, "refused: no original destination")
        t = StringTransport()
        protocol.makeConnection(t)
        self.assertTrue(t.disconnecting)
        protocol.connectionLost(None)
        self.assertEqual(conn.ends, ["refused: no original destination"])
