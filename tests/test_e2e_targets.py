"""Two services on one endpoint address, end to end (real twistd).

Service ``a`` (idle_timeout 1 s) and ``b`` (idle_timeout 30 s) both send to
one backend; the listener routes ``b.test`` to ``b``, anything else to ``a``.
The backend records what happens to each of its connections (accepted, a
request and its authority, a GOAWAY and its code, EOF) in a queue the test
reads with blocking, bounded waits: each service gets a connection of its
own, ``a``'s is closed after a second and ``b``'s is not, /metrics labels
each with its service, and a SIGHUP shortening ``b``'s idle_timeout closes
``b``'s connection that was already idle. The same over h2 (GOAWAY, then
EOF).
"""

from __future__ import annotations

import http.client
import itertools
import queue
import signal
import socket
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, RequestReceived
from twisted.trial.unittest import TestCase

from tests.support import ProxyProcess, ThreadedServer

CONFIG = """
[admin]
listen = "{listen}"

[[listener]]
name = "in"
listen = "{listen}"
service = "a"

[[listener.route]]
service = "b"
host = "b.test"

[service.a]
endpoints = ["{backend}"]
protocol = "{protocol}"
idle_timeout = 1
retry_limit = 0

[service.b]
endpoints = ["{backend}"]
protocol = "{protocol}"
idle_timeout = {b_idle}
retry_limit = 0
"""


class RecordingBackend:
    """An HTTP/1.1 or h2 (prior knowledge) endpoint answering ``200 ok`` to
    every GET, recording ``(connection, event, detail)`` in ``events``:
    ``accept``, ``request`` (its Host or :authority), ``goaway`` (its error
    code), ``eof``."""

    def __init__(self, testcase, h2: bool = False) -> None:
        self.events: queue.Queue[tuple[int, str, object]] = queue.Queue()
        self.ids = itertools.count()
        self.server = ThreadedServer(testcase, self.serve_h2 if h2 else self.serve_h1)

    @property
    def address(self) -> str:
        return self.server.address

    def serve_h1(self, conn: socket.socket) -> None:
        n = next(self.ids)
        self.events.put((n, "accept", None))
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                self.events.put((n, "eof", None))
                return
            data += chunk
            while b"\r\n\r\n" in data:
                head, _, data = data.partition(b"\r\n\r\n")
                host = b""
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"host":
                        host = value.strip()
                self.events.put((n, "request", host.decode()))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def serve_h2(self, conn: socket.socket) -> None:
        n = next(self.ids)
        self.events.put((n, "accept", None))
        h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        h2.initiate_connection()
        conn.sendall(h2.data_to_send())
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                self.events.put((n, "eof", None))
                return
            for event in h2.receive_data(chunk):
                if isinstance(event, RequestReceived):
                    authority = dict(event.headers).get(b":authority", b"")
                    self.events.put((n, "request", authority.decode()))
                    h2.send_headers(event.stream_id, [(b":status", b"200"),
                                                      (b"content-length", b"2")])
                    h2.send_data(event.stream_id, b"ok", end_stream=True)
                elif isinstance(event, ConnectionTerminated):
                    self.events.put((n, "goaway", int(event.error_code)))
            out = h2.data_to_send()
            if out:
                conn.sendall(out)


class SharedAddressTests(TestCase):
    """One backend address, two services: two upstream connections, each
    closed at its own service's idle_timeout, each labelled with its own
    service; a reload reaches the connection that exists."""

    protocol = "http1"

    def setUp(self) -> None:
        self.backend = RecordingBackend(self, h2=self.protocol == "h2")
        self.seen: list[tuple[int, str, object]] = []
        self.proxy = ProxyProcess(self, CONFIG, substitutions={
            "backend": self.backend.address, "protocol": self.protocol, "b_idle": 30})

    def get(self, host: str) -> None:
        c = http.client.HTTPConnection("127.0.0.1", self.proxy.port("in"), timeout=10)
        try:
            c.request("GET", "/", headers={"Host": host})
            response = c.getresponse()
            self.assertEqual((response.status, response.read()), (200, b"ok"))
        finally:
            c.close()

    def wait(self, want: tuple[int, str, object], timeout: float = 10.0) -> None:
        """Block until the backend records ``want`` (or fail after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while want not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.fail(f"backend never saw {want}; saw {self.seen}")
            try:
                self.seen.append(self.backend.events.get(timeout=remaining))
            except queue.Empty:
                self.fail(f"backend never saw {want}; saw {self.seen}")

    def drain(self) -> None:
        """Take what the backend has recorded so far, without waiting."""
        while True:
            try:
                self.seen.append(self.backend.events.get_nowait())
            except queue.Empty:
                return

    def connection_of(self, host: str) -> int:
        [n] = [n for n, what, detail in self.seen if what == "request" and detail == host]
        return n

    def test_two_services_one_address(self) -> None:
        self.get("a.test")
        self.get("b.test")
        self.wait((0, "request", "a.test"))
        self.wait((1, "request", "b.test"))   # b never rides a's connection
        a, b = self.connection_of("a.test"), self.connection_of("b.test")
        self.assertEqual((a, b), (0, 1))
        if self.protocol == "h2":
            self.wait((a, "goaway", 0))       # NO_ERROR
        self.wait((a, "eof", None), timeout=10)
        self.drain()
        self.assertNotIn((b, "eof", None), self.seen)
        self.assertNotIn((b, "goaway", 0), self.seen)
        for service in ("a", "b"):
            self.assertEqual(self.proxy.metric_value(
                "tcp_open_total", peer="dst", service=service, protocol=self.protocol,
                target_addr=self.backend.address), 1.0, service)

    def test_reload_reaches_the_idle_connection(self) -> None:
        self.get("b.test")
        self.wait((0, "request", "b.test"))
        with open(self.proxy.config_path) as f:
            text = f.read()
        with open(self.proxy.config_path, "w") as f:
            f.write(text.replace("idle_timeout = 30", "idle_timeout = 1"))
        self.proxy.send_signal(signal.SIGHUP)
        self.proxy.wait_log("config reloaded")
        if self.protocol == "h2":
            self.wait((0, "goaway", 0))
        self.wait((0, "eof", None), timeout=10)


class SharedAddressH2Tests(SharedAddressTests):
    """The same with ``protocol = "h2"``: idle connections get GOAWAY(NO_ERROR), then EOF."""

    protocol = "h2"
