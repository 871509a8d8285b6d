"""HTTP/1 backpressure end to end, through the real ``twistd l5dproxy``: big
bodies to fast, slow, closing and vanishing readers, each followed by small
requests on the same and on a new connection; nothing may be left stuck
(no unanswered request, no client connection left open, no SIGTERM waiting
for drain_timeout). The origin keeps its connections alive, so the pooled
upstream connection that carried a big body is the one the next request gets."""

from __future__ import annotations

import signal
import socket
import time

from twisted.trial.unittest import TestCase

from tests.support import ProxyProcess, ThreadedServer, wait_for

SIZE = 64 << 20
HELLO = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"


def keep_alive_origin(sock: socket.socket) -> None:
    """``GET /big/N``: N bytes; anything else: ``hello``; keep-alive throughout."""
    buffered = b""
    block = memoryview(b"\xab" * (1 << 20))
    while True:
        while b"\r\n\r\n" not in buffered:
            data = sock.recv(65536)
            if not data:
                return
            buffered += data
        head, _, buffered = buffered.partition(b"\r\n\r\n")
        target = head.split(b" ", 2)[1]
        if target.startswith(b"/big/"):
            size = int(target[5:])
            sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            sent = 0
            while sent < size:
                n = min(len(block), size - sent)
                sock.sendall(block[:n])
                sent += n
        else:
            sock.sendall(HELLO)


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    buffered = b""
    while b"\r\n\r\n" not in buffered:
        data = sock.recv(65536)
        if not data:
            raise AssertionError(f"EOF in the head: {buffered!r}")
        buffered += data
    head, _, rest = buffered.partition(b"\r\n\r\n")
    return head, rest


def read_body(sock: socket.socket, have: int, size: int, slow: bool = False) -> None:
    """Read the rest of a ``size``-byte body; ``slow``: stall, trickle, then fast."""
    if slow:
        time.sleep(0.3)                  # the proxy's buffers fill: it pauses the upstream
        for _ in range(40):              # a trickle, pausing and resuming it over and over
            have += len(sock.recv(16384))
            time.sleep(0.002)
    buffer = bytearray(1 << 20)
    while have < size:
        n = sock.recv_into(buffer)
        if not n:
            raise AssertionError(f"EOF after {have} of {size} body bytes")
        have += n
    if have != size:
        raise AssertionError(f"{have} body bytes, not {size}")


def hello_on(sock: socket.socket) -> None:
    sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
    got = b""
    while len(got) < len(HELLO) + 40:
        data = sock.recv(65536)
        if not data:
            break
        got += data
        if got.endswith(b"\r\n\r\nhello"):
            return
    raise AssertionError(f"no answer to a small GET: {got!r}")


class Http1Backpressure(TestCase):
    timeout = 240

    def setUp(self) -> None:
        self.origin = ThreadedServer(self, keep_alive_origin)
        self.proxy = ProxyProcess(
            self, listeners=[{"name": "in", "service": "app"}],
            services={"app": {"endpoints": [self.origin.address]}},
            proxy={"log_connections": True, "drain_timeout": 30})
        self.port = self.proxy.port("in")

    def client(self, rcvbuf: bool = True) -> socket.socket:
        sock = socket.socket()
        if rcvbuf:   # small, so that a reader that stops makes the proxy pause soon
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", self.port))
        self.addCleanup(sock.close)
        return sock

    def hello_on_new(self) -> None:
        sock = self.client()
        hello_on(sock)
        sock.close()

    def big(self, sock: socket.socket, extra: bytes = b"", slow: bool = False) -> None:
        sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: a\r\n%s\r\n" % (SIZE, extra))
        head, rest = read_head(sock)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        read_body(sock, len(rest), SIZE, slow)

    def test_big_bodies_then_small_requests_leave_nothing_stuck(self) -> None:
        for round_ in range(3):
            with self.subTest(round=round_):
                # a fast and a slow reader, each then a small GET on the same
                # connection and on a new one
                for slow in (False, True):
                    sock = self.client()
                    self.big(sock, slow=slow)
                    hello_on(sock)
                    self.hello_on_new()
                    sock.close()
                # a slow reader that asked for the close: closed right after the body
                sock = self.client()
                self.big(sock, b"Connection: close\r\n", slow=True)
                self.assertEqual(sock.recv(1), b"", "no close after the body")
                self.hello_on_new()
                # a reader that vanishes while the proxy is paused for it
                sock = self.client()
                sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: a\r\n\r\n" % SIZE)
                read_head(sock)
                time.sleep(0.3)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                sock.close()                     # a reset
                self.hello_on_new()
                # and one that shuts its side and leaves mid-body
                sock = self.client()
                sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: a\r\n\r\n" % SIZE)
                read_head(sock)
                time.sleep(0.3)
                sock.shutdown(socket.SHUT_WR)
                sock.close()
                self.hello_on_new()
        # Every client connection is closed and logged, the upstream connections
        # that carried an abandoned body are gone, the others pooled.
        wait_for(lambda: self.proxy.metric_value(
            "tcp_open_connections", peer="src") == 0, 10, "client connections closed")
        self.assertLessEqual(self.proxy.metric_value("tcp_open_connections", peer="dst"), 2)
        self.assertNotIn("Traceback", self.proxy.log_text())
        started = time.monotonic()
        self.assertIn(self.proxy.stop(), (0, -signal.SIGTERM))
        self.assertLess(time.monotonic() - started, 10)   # not drain_timeout (30 s)

    def test_sigterm_during_a_slow_download_closes_after_it(self) -> None:
        sock = self.client()
        sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: a\r\n\r\n" % SIZE)
        _head, rest = read_head(sock)
        time.sleep(0.3)                          # paused
        started = time.monotonic()
        self.proxy.send_signal()
        read_body(sock, len(rest), SIZE, slow=True)
        self.assertEqual(sock.recv(1), b"", "no close after the body")   # drained
        self.assertIn(self.proxy.wait_exit(10), (0, -signal.SIGTERM))
        self.assertLess(time.monotonic() - started, 10)
