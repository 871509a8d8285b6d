"""HTTP/1 smuggling and framing end to end (issue 10, items 1, 4, 5, 7): the
real ``twistd l5dproxy``, raw-socket clients and raw-socket endpoints that
record every byte they get and answer exactly the bytes a test needs."""

from __future__ import annotations

import gzip
import socket
import subprocess
import threading

from twisted.trial.unittest import TestCase

from tests.support import (
    LISTEN_ANY,
    ProxyProcess,
    ThreadedServer,
    connect,
    recv_until_eof,
    require_tool,
)

PAYLOAD = b"the quick brown fox jumps over the lazy dog\n" * 50
GZ = gzip.compress(PAYLOAD, mtime=0)
#: An empty SETTINGS frame: what an h2c endpoint sends after its 101.
H2_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def chunked(data: bytes, size: int = 100) -> bytes:
    out = b"".join(b"%x\r\n%b\r\n" % (len(data[i:i + size]), data[i:i + size])
                   for i in range(0, len(data), size))
    return out + b"0\r\n\r\n"


def dechunk(data: bytes) -> tuple[bytes, bytes]:
    """A chunked body's data and what follows its last chunk."""
    out = b""
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            assert data.startswith(b"\r\n"), data[:20]
            return out, data[2:]
        out += data[:size]
        assert data[size:size + 2] == b"\r\n"
        data = data[size + 2:]


class RawEndpoint:
    """An HTTP/1 endpoint on raw sockets: records each request's raw head
    and body, answers by path (see ``answer``)."""

    def __init__(self, testcase) -> None:
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.raw: list[bytes] = []     # every byte read, per connection
        self.lock = threading.Lock()
        self.server = ThreadedServer(testcase, self.serve)
        self.address = self.server.address

    def serve(self, sock: socket.socket) -> None:
        with self.lock:
            index = len(self.raw)
            self.raw.append(b"")
        buffered = b""

        def more() -> bool:
            nonlocal buffered
            data = sock.recv(65536)
            with self.lock:
                self.raw[index] += data
            buffered += data
            return bool(data)

        while True:
            while b"\r\n\r\n" not in buffered:
                if not more():
                    return
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(buffered) < length:
                if not more():
                    return
            body, buffered = buffered[:length], buffered[length:]
            with self.lock:
                self.heads.append(head)
                self.bodies.append(body)
            if not self.answer(sock, head, buffered):
                return

    def answer(self, sock: socket.socket, head: bytes, buffered: bytes) -> bool:
        """Answer one request; False ends the connection."""
        target = head.split(b" ")[1]
        lower = head.lower()
        if b"\r\nupgrade: h2c" in lower:   # an h2c endpoint: switches at once
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: h2c\r\n\r\n" + H2_SETTINGS)
            sock.recv(65536)
            return False
        if target == b"/ws" and b"\r\nupgrade: websocket" in lower:
            sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n\r\n")
            data = buffered
            while True:   # echo the raw bytes after the 101
                if data:
                    sock.sendall(data)
                data = sock.recv(65536)
                if not data:
                    return False
        if target == b"/gzip-close":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n" + GZ)
            return False
        if target == b"/gzip-chunked":
            sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                         + chunked(GZ))
            return True
        if target == b"/hints":
            sock.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            return True
        body = b"plain:" + target
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
        return True


def routes_config(upgrades: list[str] | None = None) -> str:
    """A detect listener whose ``/search`` and ``/admin`` go to their own services."""
    names = ", ".join(f'"{u}"' for u in upgrades or ())
    extra = "" if upgrades is None else f"upgrades = [{names}]\n"
    return f"""
[admin]
listen = "{LISTEN_ANY}"

[proxy]
log_connections = false

[[listener]]
name = "in"
listen = "{LISTEN_ANY}"
service = "app"
# the endpoints must see the heads exactly as sent (no X-Forwarded-For)
forwarded = "off"
{extra}
[[listener.route]]
path_prefix = "/search"
service = "search"

[[listener.route]]
path_prefix = "/admin"
service = "admin"

[service.app]
endpoints = ["{{app}}"]
protocol = "http1"

[service.search]
endpoints = ["{{search}}"]
protocol = "http1"

[service.admin]
endpoints = ["{{admin}}"]
protocol = "http1"
"""


def split_response(data: bytes) -> tuple[bytes, bytes]:
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data[:200]
    return head + b"\r\n", rest


class SmuggleEndToEnd(TestCase):
    timeout = 120

    def start(self, upgrades: list[str] | None = None) -> None:
        self.app = RawEndpoint(self)
        self.search = RawEndpoint(self)
        self.admin = RawEndpoint(self)
        self.proxy = ProxyProcess(self, routes_config(upgrades), substitutions={
            "app": self.app.address, "search": self.search.address,
            "admin": self.admin.address})
        self.port = self.proxy.port("in")

    def exchange(self, data: bytes, shutdown: bool = False) -> bytes:
        with connect(self.port) as sock:
            sock.sendall(data)
            if shutdown:
                sock.shutdown(socket.SHUT_WR)
            return recv_until_eof(sock)

    def errors(self, reason: str) -> float:
        return self.proxy.metric_value("http_errors_total", reason=reason)

    # -- item 1: detection and the HTTP/1 parser --

    def test_request_line_past_peek_limit(self) -> None:
        """The issue's input: 414 from the proxy, first or second on the
        connection; no endpoint (route or default) sees a byte of it."""
        self.start()
        line = b"GET /search?q=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: app\r\n\r\n"
        first = self.exchange(line)
        second = self.exchange(b"GET /hello HTTP/1.1\r\nHost: app\r\n\r\n" + line)
        answer = (b"HTTP/1.1 414 Request-URI Too Long\r\ncontent-length: 0\r\n"
                  b"l5d-proxy-error: request target too long\r\nconnection: close\r\n\r\n")
        self.assertEqual(first, answer)
        self.assertTrue(second.endswith(answer), second)
        self.assertEqual(second[:-len(answer)],
                         b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nplain:/hello")
        self.assertEqual(self.search.raw, [])
        self.assertEqual([h.split(b"\r\n")[0] for h in self.app.heads],
                         [b"GET /hello HTTP/1.1"])
        self.assertEqual(self.errors("request target too long"), 2)
        self.assertEqual(self.proxy.metric_value("protocol_detect_total", protocol="opaque"), 0)

    def test_lowercase_method_to_a_denied_route(self) -> None:
        """A lowercase method, a bare LF, a tab after the method: answered
        400 by the proxy, never relayed as TCP to the default endpoint."""
        self.start()
        for data in (b"get /admin HTTP/1.1\r\nHost: app\r\n\r\n",
                     b"GET /admin HTTP/1.1\nHost: app\n\n",
                     b"GET\t/admin HTTP/1.1\r\nHost: app\r\n\r\n"):
            out = self.exchange(data)
            self.assertTrue(out.startswith(b"HTTP/1.1 400 Bad Request\r\n"), (data, out))
        self.assertEqual((self.app.raw, self.admin.raw), ([], []))

    # -- item 4: Upgrade: h2c --

    H2C = (b"GET /admin HTTP/1.1\r\nHost: app\r\nUpgrade: h2c\r\n"
           b"HTTP2-Settings: AAMAAABkAAQAAP__\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n")

    def test_h2c_upgrade_is_stripped(self) -> None:
        """h2c smuggling: the endpoint (which would switch to h2 on the
        upgrade) never sees Upgrade or HTTP2-Settings, and the client gets an
        ordinary response; the connection stays HTTP/1 and routed."""
        self.start()
        with connect(self.port) as sock:
            sock.sendall(self.H2C + b"GET /search HTTP/1.1\r\nHost: app\r\n"
                         b"Connection: close\r\n\r\n")
            out = recv_until_eof(sock)
        self.assertEqual(out, b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nplain:/admin"
                              b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nconnection: close\r\n"
                              b"\r\nplain:/search")
        self.assertEqual(self.admin.heads, [b"GET /admin HTTP/1.1\r\nHost: app"])
        self.assertEqual(len(self.search.heads), 1)
        for head in self.admin.heads + self.search.heads:
            self.assertNotIn(b"upgrade", head.lower())
            self.assertNotIn(b"http2-settings", head.lower())
        self.assertEqual(self.app.raw, [])

    def test_websocket_still_relayed(self) -> None:
        self.start()
        with connect(self.port) as sock:
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Key: k\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
            sock.sendall(b"raw bytes both ways")
            sock.shutdown(socket.SHUT_WR)
            rest = head.partition(b"\r\n\r\n")[2] + recv_until_eof(sock)
        self.assertEqual(rest, b"raw bytes both ways")
        self.assertIn(b"\r\nupgrade: websocket", self.app.heads[0].lower())

    def test_no_upgrades_strips_websocket(self) -> None:
        self.start(upgrades=[])
        out = self.exchange(b"GET /ws HTTP/1.1\r\nHost: app\r\nUpgrade: websocket\r\n"
                            b"Connection: Upgrade\r\nSec-WebSocket-Key: k\r\n\r\n", shutdown=True)
        self.assertEqual(out, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nconnection: close\r\n"
                              b"\r\nplain:/ws")
        self.assertEqual(self.app.heads, [b"GET /ws HTTP/1.1\r\nHost: app\r\n"
                                          b"Sec-WebSocket-Key: k"])

    # -- item 5: transfer codings other than chunked --

    def test_gzip_until_close_to_http11(self) -> None:
        """``Transfer-Encoding: gzip`` read until the close reaches an HTTP/1.1
        client with its coding kept and chunked applied last."""
        self.start()
        out = self.exchange(b"GET /gzip-close HTTP/1.1\r\nHost: app\r\n\r\n", shutdown=True)
        head, rest = split_response(out)
        self.assertEqual(head, b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n"
                               b"connection: close\r\n")
        body, after = dechunk(rest)
        self.assertEqual((body, after), (GZ, b""))
        self.assertEqual(gzip.decompress(body), PAYLOAD)

    def test_gzip_chunked_to_http11(self) -> None:
        """``gzip, chunked``: the gzip coding is not dropped, and the
        connection (framed by chunked) stays usable."""
        self.start()
        out = self.exchange(b"GET /gzip-chunked HTTP/1.1\r\nHost: app\r\n\r\n"
                            b"GET /next HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        head, rest = split_response(out)
        self.assertEqual(head, b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n")
        body, after = dechunk(rest)
        self.assertEqual(gzip.decompress(body), PAYLOAD)
        self.assertEqual(after, b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nconnection: close\r\n"
                                b"\r\nplain:/next")

    def test_transfer_coding_to_http10_and_h2_is_502(self) -> None:
        """HTTP/1.0 (RFC 9112 6.1) and HTTP/2 clients cannot be sent transfer
        codings: 502 with l5d-proxy-error, never a mislabelled body."""
        self.start()
        for target in (b"/gzip-close", b"/gzip-chunked"):
            out = self.exchange(b"GET " + target + b" HTTP/1.0\r\nAccept: text/html\r\n\r\n")
            self.assertRegex(out, rb"^HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n"
                                  rb"l5d-proxy-error: service [a-z]+: 127\.0\.0\.1:\d+: "
                                  rb"response transfer-encoding gzip cannot be "
                                  rb"sent to an HTTP/1\.0 client\r\nconnection: close\r\n\r\n$")
        curl = require_tool("curl")
        result = subprocess.run(
            [curl, "-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null",
             f"http://127.0.0.1:{self.port}/gzip-close"], capture_output=True, timeout=30)
        self.assertTrue(result.stdout.startswith(b"HTTP/2 502"), result)
        self.assertRegex(result.stdout, rb"l5d-proxy-error: service [a-z]+: 127\.0\.0\.1:\d+: "
                                        rb"response transfer-encoding gzip cannot be sent to an "
                                        rb"HTTP/2 client\r\n")

    # -- item 7: no 1xx to an HTTP/1.0 client --

    def test_no_100_continue_to_http10(self) -> None:
        self.start()
        out = self.exchange(b"POST /upload HTTP/1.0\r\nExpect: 100-continue\r\n"
                            b"Content-Length: 5\r\n\r\nhello")
        self.assertEqual(out, b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nconnection: close\r\n"
                              b"\r\nplain:/upload")
        self.assertEqual(self.app.bodies, [b"hello"])

    def test_no_103_to_http10(self) -> None:
        self.start()
        self.assertEqual(self.exchange(b"GET /hints HTTP/1.0\r\n\r\n"),
                         b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nconnection: close\r\n\r\nok")
        with connect(self.port) as sock:   # an HTTP/1.1 client still gets it
            sock.sendall(b"GET /hints HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
            self.assertTrue(recv_until_eof(sock).startswith(b"HTTP/1.1 103 Early Hints\r\n"))
