"""HTTP/1.1 proxying end to end: the real ``twistd l5dproxy``, real clients
(curl, wrk, raw sockets) and a real backend (h11, one thread per connection)."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import socket
import subprocess
import threading
import time

import h11
from twisted.trial.unittest import TestCase

from tests.support import (
    ProxyProcess,
    ThreadedServer,
    build_config,
    connect,
    read_response,
    recv_until_eof,
    refused_port,
    require_tool,
)

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Backend:
    """An HTTP/1.1 origin that records what reaches it.

    ``/source/N``: N bytes, as fast as they are taken.
    ``/hello``: 200 ``hello``; ``/echo``: the request body back (chunked when
    the request was); ``/chunked``: a chunked body of 3 parts; ``/slow``:
    never answers; ``/ws``: a WebSocket echo; ``/sink``: reads the body slowly
    for ``slow_start`` seconds, then fast, answers its length.
    """

    def __init__(self, testcase, slow_start: float = 1.0) -> None:
        self.requests: list[tuple[bytes, bytes, list]] = []
        self.slow_start = slow_start
        self.server = ThreadedServer(testcase, self.serve)
        self.address = self.server.address

    @property
    def connections(self) -> int:
        return self.server.accepted

    def serve(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            event = self._next(conn, sock)
            if event is None or isinstance(event, h11.ConnectionClosed):
                return
            assert isinstance(event, h11.Request), event
            target = event.target
            self.requests.append((event.method, target, list(event.headers)))
            if target == b"/ws":
                self._websocket(conn, sock, event)
                return
            if target == b"/sink":
                self._sink(conn, sock)
            elif target.startswith(b"/source/"):
                size = int(target.rsplit(b"/", 1)[1])
                sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
                block = memoryview(b"\xab" * (1 << 20))
                sent = 0
                while sent < size:
                    n = min(len(block), size - sent)
                    sock.sendall(block[:n])
                    sent += n
            elif target == b"/slow":
                time.sleep(30)
                return
            elif event.method == b"HEAD":   # a length, and no body
                assert isinstance(self._next(conn, sock), h11.EndOfMessage)
                sock.sendall(conn.send(h11.Response(status_code=200, headers=[
                    ("content-length", "5")])))
                sock.sendall(conn.send(h11.EndOfMessage()))
            elif target == b"/hints":
                assert isinstance(self._next(conn, sock), h11.EndOfMessage)
                sock.sendall(conn.send(h11.InformationalResponse(status_code=103, headers=[
                    ("link", "</a.css>; rel=preload")])))
                sock.sendall(conn.send(h11.Response(status_code=200, headers=[
                    ("content-length", "5")])))
                sock.sendall(conn.send(h11.Data(data=b"hello")))
                sock.sendall(conn.send(h11.EndOfMessage()))
            else:
                body = b""
                while True:
                    e = self._next(conn, sock)
                    if isinstance(e, h11.Data):
                        body += e.data
                    elif isinstance(e, h11.EndOfMessage):
                        break
                    else:
                        return
                if target == b"/echo":
                    chunked = any(n == b"transfer-encoding" for n, _ in event.headers)
                    headers = [] if chunked else [("content-length", str(len(body)))]
                    sock.sendall(conn.send(h11.Response(status_code=200, headers=headers)))
                    sock.sendall(conn.send(h11.Data(data=body)))
                    sock.sendall(conn.send(h11.EndOfMessage(
                        headers=[("x-echo-length", str(len(body)))] if chunked else [])))
                elif target == b"/chunked":
                    sock.sendall(conn.send(h11.Response(status_code=200, headers=[])))
                    for part in (b"one,", b"two,", b"three"):
                        sock.sendall(conn.send(h11.Data(data=part)))
                    sock.sendall(conn.send(h11.EndOfMessage()))
                else:
                    data = b"hello"
                    sock.sendall(conn.send(h11.Response(status_code=200, headers=[
                        ("content-length", str(len(data))), ("x-backend", "1"),
                        ("set-cookie", "a=1"), ("set-cookie", "b=2")])))
                    sock.sendall(conn.send(h11.Data(data=data)))
                    sock.sendall(conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE or target == b"/hello-then-close":
                return   # /hello-then-close: a keep-alive answer, then a silent close
            conn.start_next_cycle()

    def _next(self, conn: h11.Connection, sock: socket.socket):
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = sock.recv(65536)
                conn.receive_data(data)
                continue
            return event

    def _sink(self, conn: h11.Connection, sock: socket.socket) -> None:
        time.sleep(self.slow_start)   # a slow reader, at first
        total = 0
        trailing, _ = conn.trailing_data
        if trailing:
            total = len(trailing)
        # Past the head, read raw bytes fast (counting, not parsing).
        length = int(dict(self.requests[-1][2])[b"content-length"])
        buffer = bytearray(1 << 20)
        while total < length:
            n = sock.recv_into(buffer)
            if not n:
                return
            total += n
        answer = b"%d" % total
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                     % (len(answer), answer))

    def _websocket(self, conn, sock, request) -> None:
        key = dict(request.headers)[b"sec-websocket-key"]
        accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        sock.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        buffered, _ = conn.trailing_data
        buffered = bytes(buffered)
        while True:
            frame, buffered = _read_frame(sock, buffered)
            if frame is None:
                return
            opcode, payload = frame
            if opcode == 8:   # close
                sock.sendall(_frame(8, payload))
                return
            sock.sendall(_frame(opcode, payload))


def _frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    head = bytes([0x80 | opcode])
    n = len(payload)
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def _read_frame(sock: socket.socket, buffered: bytes):
    def need(n: int) -> bool:
        nonlocal buffered
        while len(buffered) < n:
            data = sock.recv(65536)
            if not data:
                return False
            buffered += data
        return True

    if not need(2):
        return None, buffered
    opcode = buffered[0] & 0x0F
    masked = buffered[1] & 0x80
    n = buffered[1] & 0x7F
    at = 2
    if n == 126:
        need(4)
        n, at = int.from_bytes(buffered[2:4], "big"), 4
    elif n == 127:
        need(10)
        n, at = int.from_bytes(buffered[2:10], "big"), 10
    mask = b""
    if masked:
        need(at + 4)
        mask, at = buffered[at:at + 4], at + 4
    need(at + n)
    payload, buffered = buffered[at:at + n], buffered[at + n:]
    if mask:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return (opcode, payload), buffered


def vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def http_exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the proxy closes."""
    with connect(port, timeout=timeout) as sock:
        sock.sendall(data)
        return recv_until_eof(sock)


class Http1EndToEnd(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.backend = Backend(self)
        self.proxy = ProxyProcess(
            self,
            listeners=[{"name": "in", "service": "app", "access_log": True}],
            services={
                "app": {"endpoints": [self.backend.address], "response_timeout": 1.0},
                "down": {"endpoints": [f"127.0.0.1:{refused_port()}"]},
            },
            proxy={"log_connections": False},
        )
        self.port = self.proxy.port("in")
        self.url = f"http://127.0.0.1:{self.port}"

    def curl(self, *args: str) -> subprocess.CompletedProcess:
        curl = require_tool("curl")
        return subprocess.run([curl, "-sS", *args], capture_output=True, timeout=60)

    def test_curl_keep_alive_one_upstream_connection(self) -> None:
        n = 20
        result = self.curl(*[f"{self.url}/hello"] * n)
        self.assertEqual(result.stdout, b"hello" * n, result.stderr)
        self.assertEqual(len(self.backend.requests), n)
        self.assertEqual(self.backend.connections, 1)
        # the Host header is preserved, repeated headers kept in order
        result = self.curl("-i", "-H", "Host: app.example", f"{self.url}/hello")
        self.assertIn(b"set-cookie: a=1\r\nset-cookie: b=2\r\n", result.stdout.lower())
        headers = dict(self.backend.requests[-1][2])
        self.assertEqual(headers[b"host"], b"app.example")
        self.assertEqual(self.backend.connections, 1)   # pooled across client connections

    def test_chunked_upload_and_download(self) -> None:
        payload = os.urandom(300_000)
        curl = require_tool("curl")
        result = subprocess.run(
            [curl, "-sS", "-D", "/dev/stderr", "-H", "Transfer-Encoding: chunked",
             "--data-binary", "@-", f"{self.url}/echo"],
            input=payload, capture_output=True, timeout=60)
        self.assertEqual(result.stdout, payload)
        self.assertIn(b"transfer-encoding: chunked", result.stderr.lower())
        headers = self.backend.requests[-1][2]
        self.assertIn((b"transfer-encoding", b"chunked"), headers)
        result = self.curl("-v", f"{self.url}/chunked")
        self.assertEqual(result.stdout, b"one,two,three", result.stderr)

    def test_trailers_pass_through(self) -> None:
        with connect(self.port) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                         b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\nX-Client-T: 1\r\n\r\n")
            out = recv_until_eof(sock)
        self.assertIn(b"\r\n3\r\nabc\r\n0\r\nx-echo-length: 3\r\n\r\n", out)

    def test_websocket_echo(self) -> None:
        with connect(self.port) as sock:
            key = base64.b64encode(os.urandom(16))
            sock.sendall(b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                         b"Sec-WebSocket-Key: " + key + b"\r\n\r\n")
            buffered = b""
            while b"\r\n\r\n" not in buffered:
                buffered += sock.recv(4096)
            head, _, rest = buffered.partition(b"\r\n\r\n")
            self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
            expected = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            self.assertIn(b"sec-websocket-accept: " + expected, head.lower().replace(
                expected.lower(), expected))
            for message in (b"hello", os.urandom(70_000)):
                sock.sendall(_frame(2, message, mask=os.urandom(4)))
                frame, rest = _read_frame(sock, rest)
                self.assertEqual(frame, (2, message))
            sock.sendall(_frame(8, b"", mask=os.urandom(4)))
            frame, rest = _read_frame(sock, rest)
            self.assertEqual(frame[0], 8)

    def test_smuggling_vectors_are_400_and_never_upstream(self) -> None:
        from tests.test_h1 import ServerTests
        good = b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n"
        for name, data in ServerTests.SMUGGLING.items():
            # After a good request, so the connection is HTTP whatever the
            # vector does to detection (a bad first line is opaque TCP).
            with connect(self.port) as sock:
                sock.sendall(good)
                self.assertEqual(read_response(sock)[0], 200)
                sock.sendall(data)
                out = recv_until_eof(sock)
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), f"{name}: {out!r}")
            self.assertIn(b"l5d-proxy-error: ", out)
        self.assertEqual({target for _, target, _ in self.backend.requests}, {b"/hello"})
        self.assertEqual(len(self.backend.requests), len(ServerTests.SMUGGLING))

    def test_proxy_errors(self) -> None:
        config = self.proxy.config_text
        self.assertIn("response_timeout", config)
        # 504: the backend never answers within response_timeout
        with connect(self.port) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: a\r\nAccept: application/json\r\n\r\n")
            status, headers, body = read_response(sock)
            self.assertEqual(status, 504)
            self.assertRegex(headers[b"l5d-proxy-error"],
                             rb"^service [a-z]+: 127\.0\.0\.1:\d+: response timeout$")
            self.assertEqual((headers[b"content-length"], body), (b"0", b""))  # no text wanted
            # the client connection is kept
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            self.assertEqual(read_response(sock)[2], b"hello")

    def test_502_and_503(self) -> None:
        port = refused_port()
        down = ProxyProcess(
            self,
            listeners=[{"name": "down", "service": "down"},
                       {"name": "none", "service": "none"}],
            services={"down": {"endpoints": [f"127.0.0.1:{port}"], "retry_limit": 0,
                               "failure_accrual": {"consecutive_failures": 3,
                                                   "min_backoff": 30, "jitter": 0}},
                      "none": {"endpoints": []}},
        )
        # curl-like clients (no Accept, */*, text/plain) get the cause as one line of text
        for accept in (b"", b"Accept: */*\r\n", b"Accept: text/plain\r\n"):
            with connect(down.port("down")) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n" + accept + b"\r\n")
                status, headers, body = read_response(sock)
            line = f"service down: 127.0.0.1:{port}: connection refused".encode()
            self.assertEqual((status, headers[b"l5d-proxy-error"]), (502, line), accept)
            self.assertEqual(body, b"l5dproxy: " + line + b"\n")
            self.assertEqual(headers[b"content-type"], b"text/plain; charset=utf-8")
            self.assertEqual(headers[b"content-length"], str(len(body)).encode())
        # ejected by failure accrual (after 3 failures): not "no endpoints"
        with connect(down.port("down")) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nAccept: text/html\r\n\r\n")
            status, headers, body = read_response(sock)
        self.assertEqual(status, 503)
        self.assertRegex(headers[b"l5d-proxy-error"],
                         rb"^service down: all 1 endpoints ejected by failure accrual "
                         rb"\(next probe in (2\d|30)\.\d s\)$")
        self.assertEqual(body, b"")   # text/html only: no text body
        with connect(down.port("none")) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            status, headers, body = read_response(sock)
            self.assertEqual((status, headers[b"l5d-proxy-error"], body),
                             (503, b"service none: no endpoints",
                              b"l5dproxy: service none: no endpoints\n"))
        # one warn line when "down" started failing (rate-limited: not one per request)
        down.wait_log(r"service down is failing: service down: 127\.0\.0\.1:\d+: "
                      r"connection refused")
        self.assertEqual(down.log_text().count("service down is failing"), 1)
        self.assertEqual(down.log_text().count("service none is failing"), 1)

    def test_metrics_after_known_sequence(self) -> None:
        with connect(self.port) as sock:
            for target in (b"/hello", b"/hello", b"/hello", b"/slow"):
                sock.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: m.example\r\n\r\n")
                read_response(sock)
        labels = {"direction": "inbound", "listener": "in", "service": "app",
                  "authority": "other", "protocol": "http1"}
        self.assertEqual(self.proxy.metric_value("request_total", **labels), 4)
        self.assertEqual(self.proxy.metric_value(
            "response_total", **labels, status_code="200", classification="success"), 3)
        self.assertEqual(self.proxy.metric_value(
            "response_total", **labels, status_code="504", classification="failure",
            error="response timeout"), 1)
        self.assertEqual(self.proxy.metric_value(
            "response_latency_ms_count", **labels, status_code="200"), 3)
        self.assertEqual(self.proxy.metric_value(
            "response_latency_ms_bucket", **labels, status_code="504", le="500.0"), 0)
        self.assertEqual(self.proxy.metric_value(
            "response_latency_ms_bucket", **labels, status_code="504", le="2000.0"), 1)
        self.assertGreater(self.proxy.metric_value(
            "tcp_open_total", peer="src", listener="in", protocol="http1"), 0)
        self.proxy.wait_log(r"GET m\.example /hello 200")

    def test_pipelined_and_http10(self) -> None:
        with connect(self.port) as sock:
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n"
                         b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nping"
                         b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            bodies = [read_response(sock)[2] for _ in range(3)]
        self.assertEqual(bodies, [b"hello", b"ping", b"hello"])
        with connect(self.port) as sock:
            sock.sendall(b"GET /chunked HTTP/1.0\r\n\r\n")
            out = recv_until_eof(sock)   # unknown length to 1.0: ends with the close
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertTrue(out.endswith(b"\r\n\r\none,two,three"), out)

    def test_pipelined_then_half_close_all_answered(self) -> None:
        # Three requests, then shutdown(SHUT_WR): three answers in order, the
        # last with connection: close, then the proxy's close (as nginx and
        # HAProxy answer it).
        with connect(self.port) as sock:
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n"
                         b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nping"
                         b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            answers = [read_response(sock) for _ in range(3)]
            self.assertEqual(recv_until_eof(sock), b"")
        self.assertEqual([(status, body) for status, _, body in answers],
                         [(200, b"hello"), (200, b"ping"), (200, b"hello")])
        self.assertEqual([headers.get(b"connection") for _, headers, _ in answers],
                         [None, None, b"close"])
        self.assertEqual([(m, t) for m, t, _ in self.backend.requests],
                         [(b"GET", b"/hello"), (b"POST", b"/echo"), (b"GET", b"/hello")])

    def test_underscore_field_names_dropped(self) -> None:
        with connect(self.port) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                         b"Transfer_Encoding: chunked\r\nX_Forwarded_For: 10.0.0.1\r\n\r\nping")
            status, _, body = read_response(sock)
        self.assertEqual((status, body), (200, b"ping"))
        # The forged X_Forwarded_For is gone; the proxy's own names the client.
        self.assertEqual(self.backend.requests[-1][2],
                         [(b"host", b"a"), (b"content-length", b"4"),
                          (b"x-forwarded-for", b"127.0.0.1"), (b"x-forwarded-proto", b"http")])
        self.assertEqual(self.proxy.metric_value(
            "http_errors_total", reason="underscore in field name"), 2)

    def test_expect_100_continue(self) -> None:
        payload = os.urandom(2_000_000)
        curl = require_tool("curl")
        started = time.monotonic()
        result = subprocess.run(
            [curl, "-sS", "-H", "Expect: 100-continue", "--data-binary", "@-",
             f"{self.url}/echo"], input=payload, capture_output=True, timeout=60)
        self.assertEqual(result.stdout, payload)
        self.assertLess(time.monotonic() - started, 0.9)   # curl waits 1 s without a 100
        self.assertNotIn(b"expect", {n for n, _ in self.backend.requests[-1][2]})

    def test_endpoint_closing_pooled_connections(self) -> None:
        # The backend answers keep-alive, then closes the connection: the
        # pool must never fail a request on such a connection.
        with connect(self.port) as sock:
            for i in range(30):
                sock.sendall(b"GET /hello-then-close HTTP/1.1\r\nHost: a\r\n\r\n")
                status, headers, body = read_response(sock)
                self.assertEqual((status, body), (200, b"hello"), (i, headers))
                if i % 2:
                    time.sleep(0.05)   # half of them after the close is read
        self.assertEqual(len(self.backend.requests), 30)

    def test_sigterm_closes_idle_keep_alive(self) -> None:
        with connect(self.port) as sock:
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            read_response(sock)
            started = time.monotonic()
            self.proxy.send_signal()
            self.assertEqual(recv_until_eof(sock), b"")
            self.assertLess(time.monotonic() - started, 5)
        # twistd re-raises SIGTERM once stopped: 0 or -SIGTERM are both clean
        self.assertIn(self.proxy.wait_exit(), (0, -signal.SIGTERM))
        self.assertLess(time.monotonic() - started, 5)   # not the 30 s drain_timeout

    def test_wrk_no_errors(self) -> None:
        wrk = require_tool("wrk")
        result = subprocess.run([wrk, "-t1", "-c8", "-d2s", f"{self.url}/hello"],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("Non-2xx", result.stdout)
        self.assertNotIn("Socket errors", result.stdout)
        self.assertIn("Requests/sec", result.stdout)


class Http1Memory(TestCase):
    timeout = 300

    def test_1gib_upload_to_slow_reader_keeps_rss_flat(self) -> None:
        backend = Backend(self, slow_start=1.5)
        proxy = ProxyProcess(self, listeners=[{"name": "in", "service": "app"}],
                             services={"app": {"endpoints": [backend.address]}},
                             proxy={"log_connections": False})
        pid = proxy.process.pid
        # warm up the paths the transfer uses, then take the idle figure
        with connect(proxy.port("in")) as sock:
            sock.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc")
            read_response(sock)
        idle = vm_rss_kib(pid)
        size = 1 << 30
        block = b"\0" * (1 << 20)
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], vm_rss_kib(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        with connect(proxy.port("in"), timeout=120) as sock:
            sock.sendall(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(size // len(block)):
                sock.sendall(block)
            status, _, body = read_response(sock)
        done.set()
        sampler.join()
        self.assertEqual((status, body), (200, b"%d" % size))
        grown_mib = (peak[0] - idle) / 1024
        print(f"\nRSS idle {idle / 1024:.1f} MiB, peak {peak[0] / 1024:.1f} MiB during a "
              f"1 GiB upload (+{grown_mib:.1f} MiB)")
        self.assertLess(grown_mib, 32)

    def test_1gib_download_to_slow_client_keeps_rss_flat(self) -> None:
        backend = Backend(self)
        proxy = ProxyProcess(self, listeners=[{"name": "in", "service": "app"}],
                             services={"app": {"endpoints": [backend.address]}},
                             proxy={"log_connections": False})
        pid = proxy.process.pid
        with connect(proxy.port("in")) as sock:
            sock.sendall(b"GET /source/10 HTTP/1.1\r\nHost: a\r\n\r\n")
            read_response(sock)
        idle = vm_rss_kib(pid)
        size = 1 << 30
        with connect(proxy.port("in"), timeout=120) as sock:
            sock.sendall(b"GET /source/%d HTTP/1.1\r\nHost: a\r\n\r\n" % size)
            time.sleep(1.5)          # a slow reader, at first
            stalled = vm_rss_kib(pid)
            buffer = bytearray(1 << 20)
            got = 0
            peak = stalled
            while got < size + 40:   # the head, then the body
                n = sock.recv_into(buffer)
                if not n:
                    break
                got += n
                if got & ((64 << 20) - 1) < n:
                    peak = max(peak, vm_rss_kib(pid))
        self.assertGreaterEqual(got, size)
        grown_mib = (max(peak, stalled) - idle) / 1024
        print(f"\nRSS idle {idle / 1024:.1f} MiB, stalled reader {stalled / 1024:.1f} MiB, "
              f"peak {peak / 1024:.1f} MiB during a 1 GiB download (+{grown_mib:.1f} MiB)")
        self.assertLess(grown_mib, 32)


def read_head(sock: socket.socket) -> bytes:
    """A response head (through the blank line), nothing after it."""
    buffered = b""
    while not buffered.endswith(b"\r\n\r\n"):
        data = sock.recv(1)
        if not data:
            raise AssertionError(f"EOF in head: {buffered!r}")
        buffered += data
    return buffered


class Http1TimeoutsEndToEnd(TestCase):
    """Short [http] timeouts, 1xx forwarding and HEAD on pooled connections."""

    timeout = 60

    def setUp(self) -> None:
        self.backend = Backend(self)
        config = build_config(
            listeners=[{"name": "in", "service": "app"}],
            services={"app": {"endpoints": [self.backend.address]}},
            proxy={"log_connections": False},
        ) + "\n[http]\nrequest_header_timeout = 0.5\nidle_timeout = 1.0\n"
        self.proxy = ProxyProcess(self, config)
        self.port = self.proxy.port("in")

    def test_slow_request_head_is_408(self) -> None:
        with connect(self.port) as sock:
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n")
            started = time.monotonic()
            for _ in range(3):   # trickling bytes does not help
                time.sleep(0.1)
                sock.sendall(b"X")
            out = recv_until_eof(sock)
        self.assertTrue(out.startswith(b"HTTP/1.1 408 "), out)
        self.assertIn(b"l5d-proxy-error: request header timeout", out)
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual(self.backend.requests, [])

    def test_idle_keep_alive_closed(self) -> None:
        with connect(self.port) as sock:
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            self.assertEqual(read_response(sock)[2], b"hello")
            started = time.monotonic()
            self.assertEqual(recv_until_eof(sock), b"")
            self.assertGreater(time.monotonic() - started, 0.8)
            self.assertLess(time.monotonic() - started, 3)

    def test_head_keeps_the_upstream_connection(self) -> None:
        with connect(self.port) as sock:
            for _ in range(3):
                sock.sendall(b"HEAD /hello HTTP/1.1\r\nHost: a\r\n\r\n")
                head = read_head(sock)
                self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
                self.assertIn(b"content-length: 5\r\n", head.lower())
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
            self.assertEqual(read_response(sock)[2], b"hello")
        self.assertEqual(self.backend.connections, 1)
        self.assertEqual(len(self.backend.requests), 4)

    def test_early_hints_forwarded(self) -> None:
        with connect(self.port) as sock:
            sock.sendall(b"GET /hints HTTP/1.1\r\nHost: a\r\n\r\n")
            hints = read_head(sock)
            self.assertTrue(hints.startswith(b"HTTP/1.1 103 "), hints)
            self.assertIn(b"link: </a.css>; rel=preload\r\n", hints.lower())
            status, _headers, body = read_response(sock)
        self.assertEqual((status, body), (200, b"hello"))

