"""End to end: the real ``twistd -n l5dproxy`` with real clients and servers.

Everything on loopback, port 0; waiting polls a condition with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import time

from twisted.trial.unittest import TestCase

from tests import support
from tests.support import (
    BANNER,
    HttpServer,
    ProxyProcess,
    banner_server,
    build_config,
    connect,
    echo_server,
    half_close_server,
    recv_exactly,
    recv_until_eof,
    refused_port,
    require_tool,
    run_l5dproxy,
    wait_for,
    write_config,
)
from tests.test_sniff import real_client_hello

#: ``FILE: key.path: reason``
ERROR_LINE = re.compile(r"^(?P<file>\S+): (?P<key>[^\s:]+): (?P<reason>.+)$")


def opaque_listener(name: str = "in", service: str = "app") -> dict:
    return {"name": name, "service": service, "opaque": True}


def detect_listener(name: str = "in", service: str = "app") -> dict:
    return {"name": name, "service": service}


class DetectListenerTests(TestCase):
    def test_curl(self) -> None:
        curl = require_tool("curl")
        http = HttpServer(self)
        proxy = ProxyProcess(self, listeners=[detect_listener()],
                             services={"app": {"endpoints": [http.address]}})
        url = f"http://127.0.0.1:{proxy.port('in')}/some/path"
        result = subprocess.run([curl, "-sS", "--max-time", "10", url],
                                capture_output=True, timeout=20)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, HttpServer.body)
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener="in",
                                            protocol="http1", reason="request_line"), 1)

    def test_banner_after_detect_timeout(self) -> None:
        """A server-speaks-first server behind a detect listener still works:
        its banner arrives once the detect timeout gives up on the silent
        client (``client_silence = 0`` turns the early connect off)."""
        server = banner_server(self)
        proxy = ProxyProcess(self, listeners=[detect_listener()],
                             services={"app": {"endpoints": [server.address]}},
                             detect={"timeout": 0.3, "client_silence": 0})
        start = time.monotonic()
        with connect(proxy.port("in")) as s:
            self.assertEqual(recv_exactly(s, len(BANNER)), BANNER)
            elapsed = time.monotonic() - start
            s.sendall(b"EHLO test\r\n")
            self.assertEqual(recv_exactly(s, 11), b"EHLO test\r\n")
        self.assertGreaterEqual(elapsed, 0.29)
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener="in",
                                            protocol="opaque", reason="timeout"), 1)

    def test_not_http_relayed_at_once(self) -> None:
        """Bytes that cannot be any known protocol are relayed without waiting."""
        server = echo_server(self)
        proxy = ProxyProcess(self, listeners=[detect_listener()],
                             services={"app": {"endpoints": [server.address]}},
                             detect={"timeout": 30})
        with connect(proxy.port("in"), timeout=10) as s:
            s.sendall(b"\x00\x01binary")
            self.assertEqual(recv_exactly(s, 8), b"\x00\x01binary")
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener="in",
                                            protocol="opaque", reason="not_http"), 1)

    def test_tls_relayed_with_its_server_name(self) -> None:
        """A real ClientHello is detected as tls, relayed byte for byte, and
        its SNI name is in the connection's log line."""
        server = echo_server(self)
        proxy = ProxyProcess(self, listeners=[detect_listener()],
                             services={"app": {"endpoints": [server.address]}},
                             detect={"timeout": 30})
        hello = real_client_hello("api.example.test")
        with connect(proxy.port("in"), timeout=10) as s:
            s.sendall(hello)
            self.assertEqual(recv_exactly(s, len(hello)), hello)
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener="in",
                                            protocol="tls", reason="client_hello"), 1)
        proxy.wait_log("sni=api.example.test")

    def test_half_close_during_detection(self) -> None:
        """The client sends a little and half-closes before a verdict: the
        bytes and the EOF reach the server, and its answer comes back."""
        server = half_close_server(self)
        proxy = ProxyProcess(self, listeners=[detect_listener()],
                             services={"app": {"endpoints": [server.address]}},
                             detect={"timeout": 30})
        with connect(proxy.port("in")) as s:
            s.sendall(b"\x16\x03")   # could still become a ClientHello
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_until_eof(s), b"received 2 bytes\n\x16\x03")
        # tls (a ClientHello's start), relayed: this listener does not terminate
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener="in",
                                            protocol="tls", reason="eof"), 1)


class OpaqueTests(TestCase):
    def test_banner_through_opaque_listener(self) -> None:
        """No peeking: the banner arrives at once, not after the detect timeout."""
        server = banner_server(self)
        proxy = ProxyProcess(self, listeners=[opaque_listener()],
                             services={"app": {"endpoints": [server.address]}},
                             detect={"timeout": 20})
        start = time.monotonic()
        with connect(proxy.port("in")) as s:
            self.assertEqual(recv_exactly(s, len(BANNER)), BANNER)
            self.assertLess(time.monotonic() - start, 5.0)
            s.sendall(b"QUIT\r\n")
            self.assertEqual(recv_exactly(s, 6), b"QUIT\r\n")
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener="in",
                                            protocol="opaque", reason="opaque_listener"), 1)

    def test_banner_through_opaque_port(self) -> None:
        """A service whose endpoints are all on opaque_ports skips detection too."""
        server = banner_server(self)
        proxy = ProxyProcess(self, listeners=[detect_listener()],
                             services={"app": {"endpoints": [server.address]}},
                             detect={"timeout": 20, "opaque_ports": [server.port]})
        start = time.monotonic()
        with connect(proxy.port("in")) as s:
            self.assertEqual(recv_exactly(s, len(BANNER)), BANNER)
            self.assertLess(time.monotonic() - start, 5.0)
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener="in",
                                            reason="opaque_port"), 1)

    def test_half_close_raw_socket(self) -> None:
        """The client's shutdown(SHUT_WR) reaches the server as EOF; the server
        still answers, and its EOF comes back."""
        server = half_close_server(self)
        proxy = ProxyProcess(self, listeners=[opaque_listener()],
                             services={"app": {"endpoints": [server.address]}})
        payload = os.urandom(300_000)
        with connect(proxy.port("in")) as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_until_eof(s), b"received 300000 bytes\n" + payload)

    def test_half_close_socat(self) -> None:
        socat = require_tool("socat")
        server = half_close_server(self)
        proxy = ProxyProcess(self, listeners=[opaque_listener()],
                             services={"app": {"endpoints": [server.address]}})
        result = subprocess.run([socat, "-t", "10", "-", f"TCP:127.0.0.1:{proxy.port('in')}"],
                                input=b"hello over socat\n", capture_output=True, timeout=20)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, b"received 17 bytes\nhello over socat\n")

    def test_refused_endpoint(self) -> None:
        """An endpoint that refuses: the client is closed promptly, and it is counted."""
        port = refused_port()
        proxy = ProxyProcess(self, listeners=[opaque_listener()],
                             services={"app": {"endpoints": [f"127.0.0.1:{port}"]}})
        start = time.monotonic()
        with connect(proxy.port("in")) as s:
            s.sendall(b"anyone there?")
            with contextlib.suppress(ConnectionResetError):
                self.assertEqual(recv_until_eof(s), b"")
        self.assertLess(time.monotonic() - start, 5.0)
        wait_for(lambda: proxy.metric_value("endpoint_connect_errors_total", service="app",
                                            target_addr=f"127.0.0.1:{port}",
                                            reason="ECONNREFUSED") == 1,
                 message="the connect error to be counted")
        proxy.wait_log(r"end=connect failed")

    def test_spread_over_endpoints(self) -> None:
        servers = [echo_server(self) for _ in range(2)]
        proxy = ProxyProcess(self, listeners=[opaque_listener()],
                             services={"app": {"endpoints": [s.address for s in servers]}})
        sockets = []
        for i in range(4):
            s = connect(proxy.port("in"))
            self.addCleanup(s.close)
            s.sendall(b"%d" % i)
            self.assertEqual(recv_exactly(s, 1), b"%d" % i)
            sockets.append(s)
        self.assertEqual([s.accepted for s in servers], [2, 2])


class MetricsTests(TestCase):
    def test_bytes_and_connections_counted(self) -> None:
        server = echo_server(self)
        proxy = ProxyProcess(self, listeners=[opaque_listener()],
                             services={"app": {"endpoints": [server.address]}})
        payload = os.urandom(100_000)
        with connect(proxy.port("in")) as s:
            s.sendall(payload)
            self.assertEqual(recv_exactly(s, len(payload)), payload)
            s.shutdown(socket.SHUT_WR)
            self.assertEqual(recv_until_eof(s), b"")
        wait_for(lambda: proxy.metric_value("tcp_close_total", peer="src") == 1
                 and proxy.metric_value("tcp_close_total", peer="dst") == 1,
                 message="both sides to be closed")
        m = proxy.metrics()
        value = support.metric_value
        common = {"direction": "inbound", "listener": "in", "service": "app",
                  "protocol": "opaque"}
        n = len(payload)
        self.assertEqual(value(m, "tcp_read_bytes_total", peer="src", **common), n)
        self.assertEqual(value(m, "tcp_write_bytes_total", peer="src", **common), n)
        self.assertEqual(value(m, "tcp_write_bytes_total", peer="dst",
                               target_addr=server.address, **common), n)
        self.assertEqual(value(m, "tcp_read_bytes_total", peer="dst",
                               target_addr=server.address, **common), n)
        self.assertEqual(value(m, "tcp_open_total", peer="src", **common), 1)
        self.assertEqual(value(m, "tcp_open_total", peer="dst", **common), 1)
        self.assertEqual(value(m, "tcp_open_connections"), 0)
        self.assertEqual(value(m, "tcp_close_total", peer="src", errno=""), 1)
        self.assertEqual(value(m, "protocol_detect_total", listener="in", protocol="opaque",
                               reason="opaque_listener"), 1)
        self.assertEqual(value(m, "protocol_detect_duration_seconds_count", listener="in"), 1)
        log = proxy.log_text()
        self.assertRegex(log, rf"closed listener=in peer=127\.0\.0\.1:\d+ protocol=opaque "
                              rf"sni=- service=app endpoint={re.escape(server.address)} "
                              rf"bytes_in={n} bytes_out={n} duration_ms=[\d.]+ end=")

    def test_detection_reasons(self) -> None:
        server = echo_server(self)
        proxy = ProxyProcess(self, listeners=[detect_listener()],
                             services={"app": {"endpoints": [server.address]}},
                             detect={"timeout": 30, "peek_limit": 64})
        for data in (b"\x16\x03\x01\x00\x05\x02xxxx", b"\xff"):
            with connect(proxy.port("in")) as s:
                s.sendall(data)
                self.assertEqual(recv_exactly(s, len(data)), data)
        with connect(proxy.port("in")) as s:
            # A method token filling the window is HTTP/1's to answer, not relayed.
            s.sendall(b"G" * 100 + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
            self.assertTrue(recv_until_eof(s).startswith(b"HTTP/1.1 400 "))
        with connect(proxy.port("in")) as s:
            pass  # gone before any verdict
        wait_for(lambda: proxy.metric_value("protocol_detect_total", listener="in") == 4,
                 message="four verdicts")
        value = proxy.metric_value
        self.assertEqual(value("protocol_detect_total", protocol="opaque", reason="not_http"), 2)
        self.assertEqual(value("protocol_detect_total", protocol="http1",
                               reason="peek_limit"), 1)
        self.assertEqual(value("protocol_detect_total", protocol="none", reason="closed") +
                         value("protocol_detect_total", protocol="opaque", reason="eof"), 1)


class ConfigErrorTests(TestCase):
    BROKEN = """
typo = 1
[admin]
listen = "{admin}"
[detect]
timeout = -1
[[listener]]
name = "in"
listen = "tcp:{port}:interface=127.0.0.1"
service = "ap"
[[listener]]
name = "in"
listen = "tcp:nope"
service = "app"
[service.app]
endpoints = ["::1:80"]
"""

    def broken_config(self) -> tuple[str, int]:
        port = refused_port()
        text = self.BROKEN.replace("{admin}", support.LISTEN_ANY).replace("{port}", str(port))
        return write_config(self, text), port

    def assert_error_lines(self, path: str, stderr: str) -> None:
        lines = stderr.strip().splitlines()
        for line in lines:
            self.assertRegex(line, ERROR_LINE)
            self.assertTrue(line.startswith(f"{path}: "), line)
        keys = [ERROR_LINE.match(line)["key"] for line in lines]
        self.assertEqual(sorted(keys), sorted([
            "typo", "detect.timeout", "listener[0].service", "listener[1].name",
            "listener[1].listen", "service.app.endpoints[0]"]))

    def test_errors_at_start(self) -> None:
        path, port = self.broken_config()
        result = run_l5dproxy("--config", path)
        self.assertNotEqual(result.returncode, 0)
        self.assert_error_lines(path, result.stderr)
        self.assertNotIn("Traceback", result.stdout + result.stderr)
        self.assertNotIn("listener in on", result.stdout, "nothing bound")
        self.assertNotIn("admin on", result.stdout)
        with self.assertRaises(ConnectionRefusedError):
            connect(port).close()

    def test_check_failing(self) -> None:
        path, _ = self.broken_config()
        result = run_l5dproxy("--config", path, "--check")
        self.assertEqual(result.returncode, 2)
        self.assert_error_lines(path, result.stderr)

    def test_check_ok(self) -> None:
        path = write_config(self, build_config([detect_listener()],
                                               {"app": {"endpoints": ["127.0.0.1:8080"]}}))
        result = run_l5dproxy("--config", path, "--check")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"{path}: ok\n")

    def test_check_bundled_default(self) -> None:
        result = run_l5dproxy("--check")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.endswith("l5dproxy.toml: ok\n"), result.stdout)

    def test_missing_file(self) -> None:
        path = os.path.join(self.mktemp(), "none.toml")
        result = run_l5dproxy("--config", path)
        self.assertNotEqual(result.returncode, 0)
        self.assertEqual(result.stderr, f"{path}: cannot read: No such file or directory\n")

    def test_port_in_use(self) -> None:
        """One clear line, a non-zero exit, no traceback, nothing left bound."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        admin_port = refused_port()
        text = build_config(
            [{"name": "first", "service": "app"},
             {"name": "busy", "service": "app",
              "listen": f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"}],
            {"app": {"endpoints": ["127.0.0.1:8080"]}},
            admin_listen=f"tcp:{admin_port}:interface=127.0.0.1")
        result = run_l5dproxy("--config", write_config(self, text))
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        lines = [line for line in output.splitlines() if "cannot listen" in line]
        self.assertEqual(len(lines), 1, output)
        self.assertIn("l5dproxy: listener 'busy'", lines[0])
        self.assertIn("Address already in use", lines[0])
        self.assertNotIn("admin on", output)


class DrainTests(TestCase):
    def start(self, drain_timeout: float) -> tuple[ProxyProcess, socket.socket]:
        server = echo_server(self)
        proxy = ProxyProcess(self, listeners=[opaque_listener()],
                             services={"app": {"endpoints": [server.address]}},
                             proxy={"drain_timeout": drain_timeout})
        s = connect(proxy.port("in"))
        self.addCleanup(s.close)
        s.sendall(b"before")
        self.assertEqual(recv_exactly(s, 6), b"before")
        return proxy, s

    def refused(self, port: int) -> bool:
        try:
            connect(port, timeout=2).close()
        except ConnectionRefusedError:
            return True
        return False

    def test_open_connection_keeps_working(self) -> None:
        """SIGTERM: no new connections; the open one goes on; the process
        exits once it closes, well before the drain timeout."""
        proxy, s = self.start(drain_timeout=60)
        port = proxy.port("in")
        proxy.send_signal(signal.SIGTERM)
        proxy.wait_log(r"draining 1 connections")
        wait_for(lambda: self.refused(port), message="new connections to be refused")
        s.sendall(b"during")
        self.assertEqual(recv_exactly(s, 6), b"during")
        self.assertEqual(proxy.admin_get("/ready")[0], 503)
        self.assertTrue(proxy.running())
        start = time.monotonic()
        s.shutdown(socket.SHUT_WR)
        self.assertEqual(recv_until_eof(s), b"")
        code = proxy.wait_exit(30)
        self.assertLess(time.monotonic() - start, 20)
        self.assertIn(code, (0, -signal.SIGTERM))
        self.assertNotIn("Traceback", proxy.log_text())

    def test_drain_timeout_closes_the_rest(self) -> None:
        proxy, s = self.start(drain_timeout=0.5)
        proxy.send_signal(signal.SIGTERM)
        start = time.monotonic()
        with contextlib.suppress(ConnectionResetError):  # aborted: as good as closed
            self.assertEqual(recv_until_eof(s), b"")
        elapsed = time.monotonic() - start
        self.assertGreaterEqual(elapsed, 0.3)
        self.assertLess(elapsed, 15)
        self.assertIn(proxy.wait_exit(30), (0, -signal.SIGTERM))
        self.assertIn("drain timeout: closing 1 connections", proxy.log_text())

    def test_second_signal_exits_at_once(self) -> None:
        """A second SIGTERM or SIGINT (Ctrl-C) during the drain closes the
        open connection and exits at once, with no ReactorNotRunning
        traceback (issue 15 part 5)."""
        for second in (signal.SIGTERM, signal.SIGINT):
            proxy, s = self.start(drain_timeout=30)
            proxy.send_signal(signal.SIGTERM)
            proxy.wait_log(r"draining 1 connections")
            start = time.monotonic()
            proxy.send_signal(second)
            code = proxy.wait_exit(10)
            self.assertLess(time.monotonic() - start, 2)
            self.assertIn(code, (0, -signal.SIGTERM))
            with contextlib.suppress(ConnectionResetError):  # aborted: as good as closed
                self.assertEqual(recv_until_eof(s), b"")
            s.close()
            self.assertIn("second signal: closing 1 connections", proxy.log_text())
            for text in (proxy.log_text(), proxy.stderr_text()):
                self.assertNotIn("Traceback", text)
                self.assertNotIn("ReactorNotRunning", text)

    def test_idle_exit_is_prompt(self) -> None:
        server = echo_server(self)
        proxy = ProxyProcess(self, listeners=[opaque_listener()],
                             services={"app": {"endpoints": [server.address]}},
                             proxy={"drain_timeout": 60})
        start = time.monotonic()
        self.assertIn(proxy.stop(), (0, -signal.SIGTERM))
        self.assertLess(time.monotonic() - start, 15)
