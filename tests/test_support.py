"""The test helpers themselves: require_tool, config building, metric parsing,
reading responses off a socket."""

from __future__ import annotations

import os
import socket
import threading
import tomllib
from unittest import SkipTest, mock

from twisted.trial.unittest import SynchronousTestCase

from tests.support import (
    build_config,
    metric_value,
    parse_metrics,
    read_response,
    require_tool,
)

MISSING = "l5dproxy-no-such-tool"


class RequireToolTests(SynchronousTestCase):
    def test_found(self) -> None:
        self.assertTrue(os.path.isabs(require_tool("sh")))

    def test_missing_skips(self) -> None:
        with mock.patch.dict(os.environ, {"CI": ""}), self.assertRaises(SkipTest):
            require_tool(MISSING)

    def test_missing_fails_under_ci(self) -> None:
        with mock.patch.dict(os.environ, {"CI": "true"}), \
                self.assertRaisesRegex(AssertionError, f"{MISSING} is required under CI"):
            require_tool(MISSING)


class BuildConfigTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        text = build_config([{"name": "in", "service": "app", "opaque": True}],
                            {"app": {"endpoints": ["127.0.0.1:1", "[::1]:2"]}},
                            detect={"timeout": 0.3, "opaque_ports": [1]},
                            proxy={"drain_timeout": 1})
        data = tomllib.loads(text)
        self.assertEqual(data["listener"], [{"name": "in", "service": "app", "opaque": True,
                                             "listen": "tcp:0:interface=127.0.0.1"}])
        self.assertEqual(data["service"]["app"]["endpoints"], ["127.0.0.1:1", "[::1]:2"])
        self.assertEqual(data["detect"], {"timeout": 0.3, "opaque_ports": [1]})


class MetricsParsingTests(SynchronousTestCase):
    def test_sum_over_matching_labels(self) -> None:
        samples = parse_metrics(
            '# TYPE tcp_open counter\n'
            'tcp_open_total{peer="src",listener="a"} 2.0\n'
            'tcp_open_total{peer="dst",listener="a"} 3.0\n'
            'tcp_open_total{peer="src",listener="b"} 5.0\n')
        self.assertEqual(metric_value(samples, "tcp_open_total"), 10)
        self.assertEqual(metric_value(samples, "tcp_open_total", peer="src"), 7)
        self.assertEqual(metric_value(samples, "tcp_open_total", peer="src", listener="b"), 5)
        self.assertEqual(metric_value(samples, "tcp_open_total", peer="nope"), 0)
        self.assertEqual(samples[("tcp_open_total",
                                  frozenset({"peer": "dst", "listener": "a"}.items()))], 3)


#: Three pipelined answers as a proxy writes them: by the time the client
#: reads, any number of them may sit in its socket buffer together.
PIPELINED_ANSWERS = (
    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-n: 1\r\n\r\nhello"
    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nping"
    b"HTTP/1.1 204 No Content\r\nx-n: 3\r\n\r\n"
)


class ReadResponseTests(SynchronousTestCase):
    """``read_response`` takes one response's bytes and leaves the next one's.

    Its former version read whatever ``recv`` gave and kept the first
    response: when a loaded machine let two pipelined responses reach the
    client's socket buffer before it read, the second was thrown away and
    the next call waited for a response already received
    (``test_e2e_http1.Http1EndToEnd.test_pipelined_and_http10`` timing out
    about one run in four; the proxy had written all three).
    """

    def pair(self) -> tuple[socket.socket, socket.socket]:
        reader, writer = socket.socketpair()
        reader.settimeout(10)
        self.addCleanup(reader.close)
        self.addCleanup(writer.close)
        return reader, writer

    def read_three(self, reader: socket.socket) -> list[tuple[int, dict, bytes]]:
        got = [read_response(reader) for _ in range(3)]
        self.assertEqual(reader.recv(1), b"")   # nothing left over, nothing more read
        return got

    def assert_three(self, got: list[tuple[int, dict, bytes]]) -> None:
        self.assertEqual([(status, body) for status, _, body in got],
                         [(200, b"hello"), (200, b"ping"), (204, b"")])
        self.assertEqual(got[0][1], {b"content-length": b"5", b"x-n": b"1"})
        self.assertEqual(got[2][1], {b"x-n": b"3"})

    def test_responses_read_together(self) -> None:
        reader, writer = self.pair()
        writer.sendall(PIPELINED_ANSWERS)   # all in the buffer before the first read
        writer.shutdown(socket.SHUT_WR)
        self.assert_three(self.read_three(reader))

    def test_responses_split_anywhere(self) -> None:
        # One byte a write from another thread: heads and bodies split at
        # every point, whatever the scheduling; each call still gets its own.
        reader, writer = self.pair()

        def write() -> None:
            for i in range(len(PIPELINED_ANSWERS)):
                writer.sendall(PIPELINED_ANSWERS[i:i + 1])
            writer.shutdown(socket.SHUT_WR)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        self.addCleanup(thread.join, 10)
        self.assert_three(self.read_three(reader))

    def test_eof_in_head(self) -> None:
        reader, writer = self.pair()
        writer.sendall(b"HTTP/1.1 200 OK\r\n")
        writer.shutdown(socket.SHUT_WR)
        with self.assertRaisesRegex(AssertionError, "EOF in head"):
            read_response(reader)
