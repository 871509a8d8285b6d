"""tests/peers.py's own behaviour: a peer that cannot bind a port picked
free for it is started again on other ports, not failed."""

from __future__ import annotations

import socket

from twisted.trial.unittest import TestCase

from tests.peers import HAProxy, PortTakenError, _Peer, free_port, on_free_ports


class _Shell(_Peer):
    name = "sh"


class OnFreePortsTests(TestCase):
    timeout = 60

    def test_a_taken_port_is_told_apart(self) -> None:
        """A peer that exits saying "Address already in use" (HAProxy's and
        nginx's words for a port another process took) is a PortTakenError;
        any other exit stays a plain AssertionError."""
        port = free_port()
        with self.assertRaises(PortTakenError):
            _Shell(self, ["sh", "-c", "echo 'cannot bind socket (Address already in use)' >&2;"
                                      " exit 1"], [port], "unused", "")
        with self.assertRaises(AssertionError) as caught:
            _Shell(self, ["sh", "-c", "echo 'bad config' >&2; exit 1"], [port], "unused", "")
        self.assertNotIsInstance(caught.exception, PortTakenError)

    def test_picked_again_after_a_taken_port(self) -> None:
        """The first start finds its port taken; the second pick starts HAProxy,
        which then accepts connections there."""
        tries: list[list[int]] = []

        def start(ports: list[int]) -> HAProxy:
            tries.append(ports)
            if len(tries) == 1:
                raise PortTakenError("taken")
            return HAProxy(self, f"listen x\n  mode tcp\n  bind 127.0.0.1:{ports[0]}\n"
                                 "  server s 127.0.0.1:1\n", ports)

        peer, ports = on_free_ports(start, 1)
        self.assertEqual(len(tries), 2)
        self.assertEqual(ports, tries[1])
        self.assertIsNone(peer.process.poll())
        socket.create_connection(("127.0.0.1", ports[0]), timeout=5).close()

    def test_gives_up_after_its_attempts(self) -> None:
        calls: list[list[int]] = []

        def start(ports: list[int]) -> None:
            calls.append(ports)
            raise PortTakenError("taken")

        with self.assertRaises(PortTakenError):
            on_free_ports(start, 2, attempts=3)
        self.assertEqual(len(calls), 3)
