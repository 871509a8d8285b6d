"""Retries end to end: the real ``twistd l5dproxy``, raw client sockets, h11 endpoints.

Issue 10, item 8: a PUT whose 2,000-byte body arrives as 1,000 bytes, a
pause, 1,000 bytes, to an endpoint that answers 503 at once (or resets). The
rest of the body was given up with the first attempt, so no retry can carry
it whole: the client gets the first attempt's answer at once, and no endpoint
is ever sent part of the PUT as a retry.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

import h11
from twisted.trial.unittest import TestCase

from tests.support import ProxyProcess, ThreadedServer, connect, wait_for

BODY = bytes(range(250)) * 8     # 2,000 bytes
HEAD = b"PUT /object HTTP/1.1\r\nHost: app\r\nContent-Length: 2000\r\n\r\n"


class Endpoints:
    """Two endpoints sharing one script: the first connection either of them
    accepts answers ``first`` ("503" or "reset") once it has the head and some
    of the body; every other connection is an h11 server answering 200 after
    the whole request, recording each request (method, target, body)."""

    def __init__(self, testcase, first: str) -> None:
        self.first = first
        self.lock = threading.Lock()
        self.connections = 0
        self.first_done = threading.Event()
        self.first_bytes = b""
        self.requests: list[tuple[bytes, bytes, bytes]] = []
        self.partial: list[bytes] = []   # bytes of requests that never completed
        self.servers = [ThreadedServer(testcase, self.serve) for _ in range(2)]

    def serve(self, sock: socket.socket) -> None:
        with self.lock:
            self.connections += 1
            first = self.connections == 1
        if first:
            data = b""
            while len(data) < len(HEAD) + 500:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
            self.first_bytes = data
            if self.first == "503":
                sock.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            else:   # a reset: RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            self.first_done.set()
            return
        conn = h11.Connection(h11.SERVER)
        request, body = None, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                if not data and request is not None:
                    self.partial.append(body)
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.requests.append((request.method, request.target, body))
                request = None
                sock.sendall(conn.send(h11.Response(status_code=200, headers=[
                    ("Content-Length", "2")])) + conn.send(h11.Data(b"ok"))
                    + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()


class RetryWithHalfABodyTests(TestCase):

    def run_case(self, first: str) -> bytes:
        endpoints = Endpoints(self, first)
        # forwarded off: the endpoint sees the head exactly as sent (no X-Forwarded-For)
        proxy = ProxyProcess(self, listeners=[{"name": "in", "service": "app",
                                               "forwarded": "off"}], services={
            "app": {"endpoints": [s.address for s in endpoints.servers], "protocol": "http1",
                    "retry_limit": 2}})
        sock = connect(proxy.port("in"))
        self.addCleanup(sock.close)
        sock.sendall(HEAD + BODY[:1000])
        wait_for(endpoints.first_done.is_set, message="the first attempt's answer")
        sock.settimeout(10)
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)   # before the fix: nothing ever comes
            if not data:
                break
            answer += data
        with contextlib.suppress(OSError):   # the proxy may have closed already
            sock.sendall(BODY[1000:])
        # The first attempt got the head and the first half, nothing else.
        self.assertTrue(endpoints.first_bytes.startswith(HEAD))
        self.assertEqual(endpoints.first_bytes[len(HEAD):], BODY[:len(endpoints.first_bytes)
                                                                   - len(HEAD)])
        # No retry went out with half a body; none went out at all.
        self.assertEqual((endpoints.requests, endpoints.partial), ([], []))
        self.assertEqual(endpoints.connections, 1)
        self.assertEqual(proxy.metric_value(
            "response_total", direction="inbound", listener="in", service="app",
            authority="other", protocol="http1", status_code=answer[9:12].decode(),
            grpc_status="", classification="failure",
            error="" if first == "503" else "connection closed by upstream"), 1)
        return answer

    def test_endpoint_answers_503_at_once(self) -> None:
        answer = self.run_case("503")
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)

    def test_endpoint_resets_at_once(self) -> None:
        answer = self.run_case("reset")
        self.assertTrue(answer.startswith(b"HTTP/1.1 502 "), answer)
        self.assertIn(b"\r\nl5d-proxy-error: ", answer.lower())
