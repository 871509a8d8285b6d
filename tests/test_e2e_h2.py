"""HTTP/2 and gRPC end to end, through the real ``twistd l5dproxy``.

Real clients (h2load, curl, grpcio, a raw h2 socket client) against real
servers (tests/h2backend.py, a grpcio server, a plain HTTP/1 server), the
proxy in between as a subprocess.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import HttpServer, ProxyProcess, require_tool, wait_for

GIB = 1 << 30
MIB = 1 << 20


def start_h2_backend(testcase) -> tuple[int, str]:
    """tests/h2backend.py in a subprocess: (port, path of its stdout)."""
    directory = tempfile.mkdtemp(prefix="l5dproxy-h2backend-")
    portfile = os.path.join(directory, "port")
    log_path = os.path.join(directory, "out.log")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(log_path, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "tests.h2backend", portfile],
                                   stdout=out, stderr=subprocess.STDOUT, cwd=root)

    def stop() -> None:
        process.kill()
        process.wait()
    testcase.addCleanup(stop)
    wait_for(lambda: os.path.exists(portfile), 20, "the h2 backend's port")
    with open(portfile) as f:
        return int(f.read()), log_path


def proxy_to(testcase, endpoint: str, protocol: str | None = None, **h2) -> ProxyProcess:
    service = {"endpoints": [endpoint]}
    if protocol:
        service["protocol"] = protocol
    config = None
    if h2:
        from tests.support import build_config, toml_value
        config = build_config([{"name": "in", "service": "app"}], {"app": service},
                              proxy={"log_connections": False})
        config += "\n[h2]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in h2.items())
        return ProxyProcess(testcase, config)
    return ProxyProcess(testcase, listeners=[{"name": "in", "service": "app"}],
                        services={"app": service}, proxy={"log_connections": False})


class H2SocketClient:
    """A blocking h2 client on a plain socket, for what curl cannot do."""

    def __init__(self, port: int, window: int | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.h2.initiate_connection()
        if window:
            self.h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: window})
            self.h2.increment_flow_control_window(window)
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def get(self, path: bytes) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                   (b":path", path), (b":authority", b"app.test")],
                             end_stream=True)
        self.flush()
        return sid

    def events(self, size: int = 65536) -> list:
        data = self.sock.recv(size)
        if not data:
            raise ConnectionError("proxy closed the connection")
        events = self.h2.receive_data(data)
        self.flush()
        return events

    def close(self) -> None:
        self.sock.close()


def read_data_frames(sock: socket.socket, sid: int, stall_every: int, first_stall: float,
                     stall: float, kinds: set[int] | None = None) -> int:
    """Read raw frames until END_STREAM on ``sid``; the DATA bytes received.

    The reader sleeps ``first_stall`` before reading anything and ``stall``
    after every ``stall_every`` bytes; consumed DATA is given back to the
    connection and stream windows in WINDOW_UPDATE frames.
    """
    buffer = bytearray()
    received = 0
    unacked = 0
    next_stall = stall_every
    time.sleep(first_stall)
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise AssertionError(f"connection closed after {received} bytes")
        buffer += chunk
        offset = 0
        ended = False
        while len(buffer) - offset >= 9:
            length = int.from_bytes(buffer[offset:offset + 3], "big")
            if len(buffer) - offset < 9 + length:
                break
            kind, flags = buffer[offset + 3], buffer[offset + 4]
            if kinds is not None:
                kinds.add(kind)
            stream = int.from_bytes(buffer[offset + 5:offset + 9], "big") & 0x7FFFFFFF
            if kind == 0x3 and stream == sid:  # RST_STREAM
                raise AssertionError(f"stream reset after {received} bytes")
            if kind == 0x0 and stream == sid:  # DATA
                pad = buffer[offset + 9] + 1 if flags & 0x8 else 0
                received += length - pad
                unacked += length
                ended = bool(flags & 0x1)
            offset += 9 + length
        del buffer[:offset]
        if unacked >= 32768:
            increment = unacked.to_bytes(4, "big")
            sock.sendall(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + increment
                         + b"\x00\x00\x04\x08\x00" + sid.to_bytes(4, "big") + increment)
            unacked = 0
        if ended:
            return received
        if received >= next_stall:
            time.sleep(stall)
            next_stall += stall_every


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


class H2EndToEndTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.backend_port, self.backend_log = start_h2_backend(self)
        self.proxy = proxy_to(self, f"127.0.0.1:{self.backend_port}")
        self.port = self.proxy.port("in")

    def test_h2load_multiplexed(self) -> None:
        h2load = require_tool("h2load")
        out = subprocess.run(
            [h2load, "-n", "2000", "-c", "4", "-m", "16", f"http://127.0.0.1:{self.port}/"],
            capture_output=True, text=True, timeout=60).stdout
        match = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded", out)
        self.assertIsNotNone(match, out)
        self.assertEqual((match.group(1), match.group(2)), ("2000", "2000"), out)
        self.assertEqual(self.proxy.metric_value("response_total", protocol="h2",
                                                 status_code="200", classification="success"),
                         2000)
        # Four client connections, and far fewer upstream connections than streams.
        self.assertLessEqual(self.proxy.metric_value("tcp_open_total", peer="dst"), 4)

    def test_clients_leaving_mid_flight_break_nothing(self) -> None:
        """Clients that leave with streams in flight (GOAWAY, then close, as
        h2load does at the end of every run) never break the upstream
        connection the other clients share: two h2load runs in a row, each
        ending mid-flight, and the second has no failure either; nothing in
        the proxy's log is an unhandled error or a traceback."""
        h2load = require_tool("h2load")
        get = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
               (b":authority", b"app.test")]
        goaway = GoAwayFrame(0, last_stream_id=0).serialize()
        for _ in range(3):
            # Requests with the GOAWAY right behind them: every answer comes after it.
            client = H2SocketClient(self.port)
            for _ in range(20):
                client.h2.send_headers(client.h2.get_next_available_stream_id(), get,
                                       end_stream=True)
            client.sock.sendall(client.h2.data_to_send() + goaway)
            time.sleep(0.3)
            client.close()
        for _ in range(2):
            out = subprocess.run(
                [h2load, "-c", "10", "-m", "10", "-D", "2", f"http://127.0.0.1:{self.port}/"],
                capture_output=True, text=True, timeout=60).stdout
            match = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, "
                              r"(\d+) failed, (\d+) errored", out)
            self.assertIsNotNone(match, out)
            total, succeeded, failed, errored = map(int, match.groups())
            self.assertGreater(succeeded, 0, out)
            with open(self.backend_log) as f:
                backend = [line for line in f if not line.startswith("RESET")]
            self.assertEqual((succeeded, failed, errored), (total, 0, 0),
                             f"{out}\nproxy log:\n{self.proxy.log_text()[-4000:]}"
                             f"\nbackend log:\n{''.join(backend[-40:])}")
        with open(self.backend_log) as f:
            self.assertNotIn("ERROR", f.read())   # the backend kept its connections
        log = self.proxy.log_text()
        self.assertNotIn("Unhandled error", log)
        self.assertNotIn("Traceback", log)
        for status in ("502", "503"):
            self.assertEqual(self.proxy.metric_value("response_total", status_code=status), 0,
                             status)

    def test_curl_prior_knowledge(self) -> None:
        curl = require_tool("curl")
        out = subprocess.run(
            [curl, "-s", "--http2-prior-knowledge", "-D", "-",
             f"http://127.0.0.1:{self.port}/hello"],
            capture_output=True, timeout=30).stdout
        self.assertTrue(out.startswith(b"HTTP/2 200"), out)
        self.assertTrue(out.endswith(b"\r\n\r\nok\n"), out)

    def test_curl_request_body_echoed_with_trailers(self) -> None:
        curl = require_tool("curl")
        body = os.urandom(300_000)
        with tempfile.NamedTemporaryFile() as f:
            f.write(body)
            f.flush()
            out = subprocess.run(
                [curl, "-s", "--http2-prior-knowledge", "--data-binary", f"@{f.name}",
                 f"http://127.0.0.1:{self.port}/echo"],
                capture_output=True, timeout=30).stdout
        self.assertEqual(out, body)

    def test_cancelled_stream_reaches_upstream_as_reset(self) -> None:
        client = H2SocketClient(self.port)
        self.addCleanup(client.close)
        sid = client.get(b"/hang")
        wait_for(lambda: any(isinstance(e, ResponseReceived) for e in client.events()),
                 10, "response headers")
        client.h2.reset_stream(sid, 8)  # CANCEL
        client.flush()

        def reset_seen():
            with open(self.backend_log) as f:
                return re.search(r"RESET \d+ 8", f.read())
        wait_for(reset_seen, 10, "the backend to see RST_STREAM(CANCEL)")

    def test_sigterm_drains_with_goaway(self) -> None:
        """SIGTERM: GOAWAY to the client, the in-flight stream still completes."""
        client = H2SocketClient(self.port, window=16 * MIB)
        self.addCleanup(client.close)
        sid = client.get(b"/bytes/20000000")
        wait_for(lambda: self.proxy.metric_value("request_total", protocol="h2"), 10,
                 "the request to reach the proxy")
        self.proxy.send_signal()
        kinds: set[int] = set()
        received = read_data_frames(client.sock, sid, stall_every=1 << 40, first_stall=0.5,
                                    stall=0, kinds=kinds)
        self.assertEqual(received, 20_000_000)
        self.assertIn(0x7, kinds)  # GOAWAY
        self.assertIn(self.proxy.wait_exit(), (0, -signal.SIGTERM))

    def test_slow_reader_memory_stays_flat(self) -> None:
        """1 GiB to a reader that stalls: the proxy's RSS stays within 32 MiB of idle."""
        pid = self.proxy.process.pid
        warm = H2SocketClient(self.port)
        warm.get(b"/bytes/10000000")
        got = 0
        while got < 10_000_000:
            for e in warm.events():
                if isinstance(e, DataReceived):
                    got += len(e.data)
                    warm.h2.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            warm.flush()
        warm.close()
        time.sleep(0.3)
        idle = rss_kib(pid)
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_kib(pid))
                time.sleep(0.05)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # A window as large as curl's: the reader's stalls, not its window,
        # are what must hold the proxy back.
        client = H2SocketClient(self.port, window=16 * MIB)
        self.addCleanup(client.close)
        sock = client.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        sid = client.get(f"/bytes/{GIB}".encode())
        started = time.monotonic()
        try:
            # Frames are parsed by hand from here on (h2 would make the
            # reader, not the proxy, the bottleneck): count DATA, give the
            # window back in WINDOW_UPDATEs, stall now and then.
            received = read_data_frames(sock, sid, stall_every=256 * MIB, first_stall=1.0,
                                        stall=0.25)
        finally:
            done.set()
            sampler.join()
        elapsed = time.monotonic() - started
        self.assertEqual(received, GIB)
        growth_mib = (peak[0] - idle) / 1024
        print(f"\n1 GiB slow reader: idle RSS {idle / 1024:.1f} MiB, peak {peak[0] / 1024:.1f}"
              f" MiB, growth {growth_mib:.1f} MiB, {elapsed:.1f} s", file=sys.stderr)
        self.assertLess(growth_mib, 32)


#: Streams the long-lived connection of the memory test carries (issue 17).
LONG_LIVED_STREAMS = int(os.environ.get("L5DPROXY_TEST_LONG_LIVED_STREAMS", "30000"))


class H2LongLivedConnectionMemoryTests(TestCase):
    """One client connection carrying many streams (as a gRPC client's does
    over hours), proxied over one upstream connection: the proxy's RSS stays
    within 4 MiB of where it was after warm-up (issue 17: h2 remembered up
    to 65,536 closed streams per connection, ~120 bytes each, on both ends).

    30,000 streams by default, not the issue's 100,000: on the shared
    2-core test machine the proxy and the Python backend manage ~300-1,000
    streams/s, and 30,000 already grew the RSS by ~7 MiB before the fix
    (``L5DPROXY_TEST_LONG_LIVED_STREAMS`` sets another count)."""

    timeout = 600

    def test_many_streams_on_one_connection_leave_rss_flat(self) -> None:
        h2load = require_tool("h2load")
        backend_port, _ = start_h2_backend(self)
        proxy = proxy_to(self, f"127.0.0.1:{backend_port}")
        url = f"http://127.0.0.1:{proxy.port('in')}/"
        pid = proxy.process.pid

        def run(n: int) -> str:
            out = subprocess.run([h2load, "-n", str(n), "-c", "1", "-m", "50", url],
                                 capture_output=True, text=True, timeout=500).stdout
            match = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded",
                              out)
            self.assertIsNotNone(match, out)
            self.assertEqual((match.group(1), match.group(2)), (str(n), str(n)), out)
            return out

        run(5000)   # warm-up: the upstream connection is open, the allocator warm
        start = rss_kib(pid)
        peak = [start]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_kib(pid))
                time.sleep(0.1)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.monotonic()
        try:
            run(LONG_LIVED_STREAMS)
        finally:
            done.set()
            sampler.join()
        elapsed = time.monotonic() - started
        end = rss_kib(pid)
        # Still one upstream connection, so its client end carried them all too.
        self.assertEqual(proxy.metric_value("tcp_open_total", peer="dst"), 1)
        self.assertEqual(proxy.metric_value("response_total", protocol="h2", status_code="200",
                                            classification="success"),
                         5000 + LONG_LIVED_STREAMS)
        print(f"\n{LONG_LIVED_STREAMS} streams on one h2 connection: RSS after warm-up"
              f" {start / 1024:.1f} MiB, peak {peak[0] / 1024:.1f} MiB, end {end / 1024:.1f}"
              f" MiB, {elapsed:.1f} s", file=sys.stderr)
        self.assertLess((peak[0] - start) / 1024, 4)
        self.assertLess((end - start) / 1024, 4)


class GrpcEndToEndTests(TestCase):
    """All four gRPC call shapes, grpcio to grpcio through the proxy."""

    timeout = 120

    def setUp(self) -> None:
        try:
            import grpc
        except ImportError:  # pragma: no cover
            raise SkipTest("grpcio is not installed") from None
        self.grpc = grpc
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))

        def unary(request, context):
            if request == b"fail":
                context.abort(grpc.StatusCode.INTERNAL, "asked to fail")
            if request == b"denied":
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "no")
            return b"unary:" + request

        def client_stream(requests, context):
            return b"+".join(requests)

        def server_stream(request, context):
            for i in range(int(request)):
                yield f"item {i}".encode()

        def bidi(requests, context):
            for request in requests:
                yield b"echo:" + request

        handler = grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        })
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        self.proxy = proxy_to(self, f"127.0.0.1:{port}")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.proxy.port('in')}")
        self.addCleanup(self.channel.close)

    def method(self, kind: str, name: str):
        return getattr(self.channel, kind)(f"/test.Echo/{name}")

    def test_four_call_shapes(self) -> None:
        unary = self.method("unary_unary", "Unary")
        self.assertEqual(unary(b"hi", timeout=10), b"unary:hi")
        client_stream = self.method("stream_unary", "ClientStream")
        self.assertEqual(client_stream(iter([b"a", b"b", b"c"]), timeout=10), b"a+b+c")
        server_stream = self.method("unary_stream", "ServerStream")
        self.assertEqual(list(server_stream(b"3", timeout=10)),
                         [b"item 0", b"item 1", b"item 2"])
        bidi = self.method("stream_stream", "Bidi")
        self.assertEqual(list(bidi(iter([b"x", b"y"]), timeout=10)), [b"echo:x", b"echo:y"])
        big = os.urandom(3 * MIB)
        self.assertEqual(unary(big, timeout=30), b"unary:" + big)

    def test_grpc_status_in_metrics(self) -> None:
        unary = self.method("unary_unary", "Unary")
        unary(b"ok", timeout=10)
        with self.assertRaises(self.grpc.RpcError) as caught:
            unary(b"fail", timeout=10)
        self.assertEqual(caught.exception.code(), self.grpc.StatusCode.INTERNAL)
        with self.assertRaises(self.grpc.RpcError):
            unary(b"denied", timeout=10)
        labels = {"protocol": "h2", "status_code": "200"}
        wait_for(lambda: self.proxy.metric_value("response_total", grpc_status="13", **labels),
                 10, "the failed call in /metrics")
        self.assertEqual(self.proxy.metric_value("response_total", grpc_status="0",
                                                 classification="success", **labels), 1)
        self.assertEqual(self.proxy.metric_value("response_total", grpc_status="13",
                                                 classification="failure", **labels), 1)
        self.assertEqual(self.proxy.metric_value("response_total", grpc_status="7",
                                                 classification="failure", **labels), 1)


class GrpcDeadlineTests(TestCase):
    """The proxy enforces ``grpc-timeout`` itself. The backend
    (tests/h2backend.py's ``/silent``) never answers and keeps no deadline
    of its own: a gRPC server would answer DEADLINE_EXCEEDED itself at the
    same moment, and on a loaded machine its answer could come first."""

    timeout = 60

    def setUp(self) -> None:
        self.backend_port, self.backend_log = start_h2_backend(self)
        self.proxy = proxy_to(self, f"127.0.0.1:{self.backend_port}")

    def test_deadline_is_enforced_by_the_proxy(self) -> None:
        """``grpc-timeout`` passes before the server answers: the proxy answers
        DEADLINE_EXCEEDED, trailers-only, not before the deadline, and cancels
        the upstream stream. (A raw client, so that no client-side deadline
        races the proxy's.)"""
        client = H2SocketClient(self.proxy.port("in"))
        self.addCleanup(client.close)
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(sid, [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/silent"),
            (b":authority", b"app.test"), (b"content-type", b"application/grpc"),
            (b"te", b"trailers"), (b"grpc-timeout", b"300m")])
        client.h2.send_data(sid, b"\x00\x00\x00\x00\x04slow", end_stream=True)
        started = time.monotonic()  # before the proxy can have the request
        client.flush()
        response = wait_for(lambda: [e for e in client.events() if isinstance(
            e, ResponseReceived)], 10, "the response")[0]
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        headers = dict(response.headers)
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual(headers[b"grpc-status"], b"4")
        self.assertIn(b"l5d-proxy-error", headers)
        self.assertIsNotNone(response.stream_ended)
        self.assertEqual(self.proxy.metric_value("response_total", grpc_status="4",
                                                 classification="failure"), 1)

        def reset_seen():
            with open(self.backend_log) as f:
                log = f.read()
            silent = re.search(r"SILENT (\d+)\n", log)
            return silent and re.search(rf"RESET {silent[1]} 8\b", log)
        wait_for(reset_seen, 10, "the backend to see the request, then RST_STREAM(CANCEL)")


class GrpcUnavailableTests(TestCase):
    timeout = 60

    def test_unreachable_endpoint_is_unavailable(self) -> None:
        import grpc
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens there now
        proxy = proxy_to(self, f"127.0.0.1:{port}")
        channel = grpc.insecure_channel(f"127.0.0.1:{proxy.port('in')}")
        self.addCleanup(channel.close)
        with self.assertRaises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Echo/Unary")(b"x", timeout=10)
        self.assertEqual(caught.exception.code(), grpc.StatusCode.UNAVAILABLE)
        metadata = dict(caught.exception.trailing_metadata() or ())
        self.assertIn("l5d-proxy-error", metadata)


class H1H2TranslationTests(TestCase):
    """h1 client to an h2 service, and h2 client to an h1 service."""

    timeout = 60

    def test_h2_to_an_endpoint_that_does_not_speak_h2(self) -> None:
        """With no ``protocol`` the proxy speaks h2 upstream to an h2 client;
        an HTTP/1-only endpoint refuses the preface and closes. The request
        gets a 502 with l5d-proxy-error after that one connection, not a
        reconnect storm while the client waits."""
        curl = require_tool("curl")
        backend = HttpServer(self)
        proxy = proxy_to(self, backend.address)
        out = subprocess.run(
            [curl, "-s", "--http2-prior-knowledge", "--max-time", "20", "-D", "-", "-o",
             os.devnull, f"http://127.0.0.1:{proxy.port('in')}/"],
            capture_output=True, timeout=30).stdout
        self.assertTrue(out.startswith(b"HTTP/2 502"), out)
        self.assertIn(b"l5d-proxy-error: service app: 127.0.0.1:", out)
        # One try and the service's default retry_limit (2) of retries.
        self.assertLessEqual(proxy.metric_value("tcp_open_total", peer="dst", protocol="h2"), 3)

    def test_h1_client_to_h2_service(self) -> None:
        curl = require_tool("curl")
        backend_port, _ = start_h2_backend(self)
        proxy = proxy_to(self, f"127.0.0.1:{backend_port}", protocol="h2")
        port = proxy.port("in")
        out = subprocess.run([curl, "-s", "--http1.1", "-D", "-", f"http://127.0.0.1:{port}/x"],
                             capture_output=True, timeout=30).stdout
        self.assertTrue(out.startswith(b"HTTP/1.1 200"), out)
        self.assertTrue(out.endswith(b"ok\n"), out)
        body = os.urandom(200_000)
        with tempfile.NamedTemporaryFile() as f:
            f.write(body)
            f.flush()
            out = subprocess.run(
                [curl, "-s", "--http1.1", "-H", "Transfer-Encoding: chunked", "--data-binary",
                 f"@{f.name}", "-D", "-", f"http://127.0.0.1:{port}/echo"],
                capture_output=True, timeout=30).stdout
        head, _, rest = out.partition(b"\r\n\r\n")
        self.assertIn(b"HTTP/1.1 200", head)
        self.assertTrue(rest.startswith(body), rest[:100])
        self.assertEqual(proxy.metric_value("response_total", protocol="http1",
                                            status_code="200"), 2)

    def test_h2_client_to_h1_service(self) -> None:
        curl = require_tool("curl")
        seen = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                seen.append((self.request_version, self.headers.get("Host"),
                             self.headers.get("Connection")))
                body = b"from h1\n"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "keep-alive")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        proxy = proxy_to(self, f"127.0.0.1:{server.server_address[1]}", protocol="http1")
        out = subprocess.run(
            [curl, "-s", "--http2-prior-knowledge", "-D", "-",
             f"http://127.0.0.1:{proxy.port('in')}/y"],
            capture_output=True, timeout=30).stdout
        self.assertTrue(out.startswith(b"HTTP/2 200"), out)
        self.assertNotIn(b"connection:", out.lower())
        self.assertTrue(out.endswith(b"from h1\n"), out)
        self.assertEqual(seen[0][0], "HTTP/1.1")
        self.assertTrue(seen[0][1].startswith("127.0.0.1:"), seen)


class GrpcThroughHttp1Tests(TestCase):
    """gRPC over an HTTP/1 hop: grpcio -> proxy A (service protocol "http1")
    -> proxy B (detects HTTP/1; service protocol "h2") -> grpcio server. The
    hop keeps ``TE: trailers`` (with ``Connection: TE``) and carries the
    trailers as chunked trailers, so status and metadata arrive whole."""

    timeout = 120

    def setUp(self) -> None:
        import grpc

        self.grpc = grpc
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))

        def unary(request, context):
            context.set_trailing_metadata((("x-trailer", "unary"),))
            if request == b"fail":
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "asked to fail")
            return b"unary:" + request

        def server_stream(request, context):
            context.set_trailing_metadata((("x-trailer", "stream"),))
            for i in range(int(request)):
                yield f"item {i}".encode()

        def bidi(requests, context):
            for request in requests:
                yield b"echo:" + request

        handler = grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        })
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.addCleanup(server.stop, None)
        self.inner = proxy_to(self, f"127.0.0.1:{port}", protocol="h2")
        self.outer = proxy_to(self, f"127.0.0.1:{self.inner.port('in')}", protocol="http1")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.outer.port('in')}")
        self.addCleanup(self.channel.close)

    def test_unary_and_streaming_calls(self) -> None:
        unary = self.channel.unary_unary("/test.Echo/Unary")
        reply, call = unary.with_call(b"hi", timeout=20)
        self.assertEqual(reply, b"unary:hi")
        self.assertEqual(call.code(), self.grpc.StatusCode.OK)
        self.assertIn(("x-trailer", "unary"), tuple(call.trailing_metadata()))
        with self.assertRaises(self.grpc.RpcError) as caught:
            unary(b"fail", timeout=20)
        self.assertEqual(caught.exception.code(), self.grpc.StatusCode.PERMISSION_DENIED)
        self.assertEqual(caught.exception.details(), "asked to fail")
        stream = self.channel.unary_stream("/test.Echo/ServerStream")(b"3", timeout=20)
        self.assertEqual(list(stream), [b"item 0", b"item 1", b"item 2"])
        self.assertEqual(stream.code(), self.grpc.StatusCode.OK)
        self.assertIn(("x-trailer", "stream"), tuple(stream.trailing_metadata()))
        bidi = self.channel.stream_stream("/test.Echo/Bidi")
        self.assertEqual(list(bidi(iter([b"x", b"y"]), timeout=20)), [b"echo:x", b"echo:y"])
        # The middle hop was HTTP/1 on both proxies.
        self.assertEqual(self.outer.metric_value("tcp_open_total", peer="dst",
                                                 protocol="http1"), 1)
        self.assertEqual(self.inner.metric_value("response_total", protocol="http1",
                                                 grpc_status="7"), 1)


class H2BackendTests(TestCase):
    """tests/h2backend.py itself: a strict peer that must never end a
    connection for what a proxy may rightly send, or the e2e tests above
    fail on the harness (the flake of test_clients_leaving_mid_flight_break_nothing:
    ``StreamIDTooLowError`` answering a request the proxy had reset)."""

    def backend(self):
        from tests.h2backend import Connection

        class Writer:
            def get_extra_info(self, name):
                return ("127.0.0.1", 1)

        backend = Connection(None, Writer())   # type: ignore[arg-type]
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        backend.h2.initiate_connection()
        backend.received(client.data_to_send())
        client.receive_data(backend.h2.data_to_send())
        backend.received(client.data_to_send())
        return backend, client

    def answered(self, backend, client) -> dict:
        out: dict = {}
        for event in client.receive_data(backend.h2.data_to_send()):
            if isinstance(event, ResponseReceived):
                out[event.stream_id] = dict(event.headers)[b":status"]
        return out

    def test_request_reset_in_the_same_read_is_not_answered(self) -> None:
        """A request, its RST_STREAM and a later request in one read (the
        proxy cancels an upstream stream as its client leaves, and opens
        the next): the reset one gets nothing, the next its answer, and the
        connection carries on. h2 forgets the reset stream when the later
        one opens, so answering it raised StreamIDTooLowError and the
        backend closed the connection, failing every stream on it."""
        from hyperframe.frame import RstStreamFrame

        for later in (False, True):
            backend, client = self.backend()
            get = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                   (b":authority", b"app.test")]
            client.send_headers(1, get, end_stream=True)
            if later:
                client.send_headers(3, get, end_stream=True)
                data = client.data_to_send()
                # RST_STREAM(1) between the two HEADERS, as the proxy writes them
                # when the reset comes before the next request.
                first = 9 + int.from_bytes(data[:3], "big")
                data = data[:first] + RstStreamFrame(1, error_code=8).serialize() + data[first:]
            else:
                client.reset_stream(1, 8)
                data = client.data_to_send()
            backend.received(data)
            self.assertEqual(self.answered(backend, client), {3: b"200"} if later else {})
            client.send_headers(5, get, end_stream=True)
            backend.received(client.data_to_send())
            self.assertEqual(self.answered(backend, client), {5: b"200"})

    def test_request_with_goaway_in_the_same_read_is_not_answered(self) -> None:
        """A request and the proxy's GOAWAY in one read (the proxy drains
        the connection as it stops): h2 refuses to send after a GOAWAY, so
        the request goes unanswered rather than failing the connection."""
        backend, client = self.backend()
        client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"),
                                (b":path", b"/"), (b":authority", b"app.test")],
                            end_stream=True)
        backend.received(client.data_to_send() + GoAwayFrame(0, last_stream_id=0).serialize())
        self.assertEqual(self.answered(backend, client), {})
