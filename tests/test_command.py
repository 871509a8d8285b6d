"""The ``l5dproxy`` command, run as a subprocess (``python -m l5dproxy``)
against the real proxy (issue 15 part 3)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from threading import Thread

from twisted.trial.unittest import SynchronousTestCase, TestCase

from l5dproxy.app.command import Top, format_event, tcp_address
from tests.support import (
    START_TIMEOUT,
    ProxyProcess,
    build_config,
    write_config,
)

L5DPROXY = [sys.executable, "-m", "l5dproxy"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": REPO + (os.pathsep + path if path else "")}


def run_cli(*args: str, timeout: float = START_TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([*L5DPROXY, *args], capture_output=True, text=True,
                          timeout=timeout, env=env())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        status = 503 if self.path.startswith("/fail") else 200
        body = b"ok\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass   # the proxy closing a pooled connection is not news


def backend(testcase) -> int:
    server = _Server(("127.0.0.1", 0), _Handler)
    Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    testcase.addCleanup(server.server_close)
    testcase.addCleanup(server.shutdown)
    return server.server_address[1]


def get(port: int, path: str) -> int:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path)
        response = c.getresponse()
        response.read()
        return response.status
    finally:
        c.close()


class VersionTests(SynchronousTestCase):
    def test_version(self):
        import l5dproxy

        result = run_cli("version")
        self.assertEqual((result.returncode, result.stdout),
                         (0, f"l5dproxy {l5dproxy.__version__}\n"))

    def test_no_command_is_usage(self):
        result = run_cli()
        self.assertEqual(result.returncode, 2)
        self.assertIn("usage: l5dproxy", result.stderr)


class CheckTests(TestCase):
    def test_ok(self):
        path = write_config(self, build_config(
            [{"name": "in", "service": "app"}], {"app": {"endpoints": ["127.0.0.1:8080"]}}))
        result = run_cli("check", path)
        self.assertEqual((result.returncode, result.stdout, result.stderr),
                         (0, f"{path}: ok\n", ""))

    def test_errors_as_twistd_check(self):
        path = write_config(self, "[[listener]]\nname = 1\n")
        result = run_cli("check", path)
        self.assertEqual(result.returncode, 2)
        self.assertIn(f"{path}: listener[0].name: expected a string", result.stderr)

    def test_warnings(self):
        """No listener, a port already taken, a resolver that never answers
        (and not one that does): warnings, exit 0."""
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        busy = taken.getsockname()[1]
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)   # reads, never answers
        silent.bind(("127.0.0.1", 0))
        self.addCleanup(silent.close)
        records = write_config(self, "{}", "records.json")
        dns = subprocess.Popen([sys.executable, "-m", "tests.dnsserver", records],
                               stdout=subprocess.PIPE, text=True, env=env(), cwd=REPO)
        self.addCleanup(dns.wait, 10)
        self.addCleanup(dns.kill)
        dns_port = int(dns.stdout.readline().split()[1])
        text = (f'[admin]\nlisten = "tcp:{busy}:interface=127.0.0.1"\n'
                f'[discovery]\nresolvers = ["127.0.0.1:{silent.getsockname()[1]}", '
                f'"127.0.0.1:{dns_port}"]\n')
        path = write_config(self, text)
        started = time.monotonic()
        result = run_cli("check", path)
        self.assertLess(time.monotonic() - started, START_TIMEOUT)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"{path}: ok (3 warnings)\n")
        self.assertEqual(result.stderr.splitlines(), [
            f"{path}: warning: no [[listener]]: the proxy would accept no connection",
            f"{path}: warning: admin: 127.0.0.1:{busy} is taken (Address already in use)",
            f"{path}: warning: [discovery] resolver 127.0.0.1:{silent.getsockname()[1]}: "
            f"no answer within 2 s",
        ])


class _RunProcess(ProxyProcess):
    @property
    def argv(self) -> list[str]:
        return [*L5DPROXY, "run", "--config", os.path.basename(self.config_path)]


class RunTests(TestCase):
    def test_run_relative_config_and_sigterm(self):
        port = backend(self)
        proxy = _RunProcess(self, listeners=[{"name": "in", "service": "app"}],
                            services={"app": {"endpoints": [f"127.0.0.1:{port}"]}})
        self.assertEqual(get(proxy.port("in"), "/"), 200)
        # The relative --config is made absolute (a reload reads it again).
        _, body = proxy.admin_get("/config.json")
        self.assertEqual(json.loads(body)["source"], proxy.config_path)
        # As twistd: stopped by SIGTERM, it ends by that signal, after draining.
        self.assertEqual(proxy.stop(signal.SIGTERM), -signal.SIGTERM)
        self.assertIn("Server Shut Down.", proxy.log_text())
        self.assertFalse(os.path.exists(os.path.join(proxy.directory, "twistd.pid")))


class TapCommandTests(TestCase):
    def setUp(self) -> None:
        port = backend(self)
        self.proxy = ProxyProcess(self, listeners=[{"name": "in", "service": "app"}],
                                  services={"app": {"endpoints": [f"127.0.0.1:{port}"]}})
        self.admin = f"127.0.0.1:{self.proxy.admin_port}"

    def drive(self, process: subprocess.Popen, paths: list[str]) -> None:
        """Send requests (cycling ``paths``) until ``process`` exits; bounded."""
        port = self.proxy.port("in")
        for i in range(1000):
            if process.poll() is not None:
                return
            get(port, paths[i % len(paths)])
            time.sleep(0.01)
        raise AssertionError("the command did not end")

    def test_tap_filters_and_limit(self):
        process = subprocess.Popen(
            [*L5DPROXY, "tap", "--admin", self.admin, "--path-prefix", "/a", "--limit", "2"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.drive(process, ["/b", "/a1", "/fail"])
        out, err = process.communicate(timeout=10)
        self.assertEqual(process.returncode, 0, err)
        lines = out.splitlines()
        self.assertEqual(len(lines), 2, out)
        port = self.proxy.port("in")
        for line in lines:
            self.assertRegex(line, rf"^end  GET 127\.0\.0\.1:{port}/a1 service=app "
                                   rf"endpoint=127\.0\.0\.1:\d+ client=127\.0\.0\.1:\d+ http1 "
                                   rf"status=200 latency=\d+\.\dms bytes=0/3$")

    def test_tap_json(self):
        process = subprocess.Popen(
            [*L5DPROXY, "tap", "--admin", self.admin, "--status", "5xx", "--limit", "1",
             "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.drive(process, ["/ok", "/fail"])
        out, _ = process.communicate(timeout=10)
        (event,) = [json.loads(line) for line in out.splitlines()]
        self.assertEqual((event["path"], event["status"], event["service"]), ("/fail", 503, "app"))

    def test_unreachable_admin(self):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        result = run_cli("tap", "--admin", f"127.0.0.1:{port}")
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"cannot reach the admin port at 127.0.0.1:{port}", result.stderr)
        result = run_cli("tap", "--admin", self.admin, "--status", "7xx")
        self.assertEqual(result.returncode, 2)
        self.assertIn("400", result.stderr)

    def test_top_once(self):
        process = subprocess.Popen(
            [*L5DPROXY, "top", "--admin", self.admin, "--once", "--seconds", "1.5"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.drive(process, ["/x?1", "/x?2", "/fail"])
        out, err = process.communicate(timeout=10)
        self.assertEqual(process.returncode, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["AUTHORITY", "METHOD", "PATH", "COUNT", "BEST",
                                            "WORST", "LAST", "SUCCESS"])
        rows = {line.split()[2]: line.split() for line in lines[1:]}
        self.assertEqual(set(rows), {"/x", "/fail"})
        self.assertEqual(rows["/x"][7], "100.00%")
        self.assertEqual(rows["/fail"][7], "0.00%")
        self.assertGreater(int(rows["/x"][3]), int(rows["/fail"][3]) - 2)
        self.assertRegex(rows["/x"][4], r"^\d+\.\dms$")


class TopTests(SynchronousTestCase):
    def event(self, path, status=200, latency=1.0, error="", grpc_status=""):
        return {"type": "end", "authority": "a:1", "method": "GET", "path": path,
                "status": status, "latency_ms": latency, "error": error,
                "grpc_status": grpc_status, "service": "app", "endpoint": "e:1",
                "client": "c:1", "protocol": "http1", "request_bytes": 0,
                "response_bytes": 2}

    def test_aggregates(self):
        top = Top()
        top.add(self.event("/x?q=1", latency=3.0))
        top.add(self.event("/x", latency=1.0))
        top.add(self.event("/x", latency=2.0, status=503))
        top.add(self.event("/g", grpc_status="14"))
        top.add({**self.event("/x"), "type": "start"})
        rows = [line.split() for line in top.table().splitlines()]
        self.assertEqual(rows[1], ["a:1", "GET", "/x", "3", "1.0ms", "3.0ms", "2.0ms", "66.67%"])
        self.assertEqual(rows[2][2:4] + rows[2][-1:], ["/g", "1", "0.00%"])

    def test_format_event(self):
        line = format_event(self.event("/p", status=502, error="connection refused"))
        self.assertEqual(line, "end  GET a:1/p service=app endpoint=e:1 client=c:1 http1 "
                               "status=502 latency=1.0ms bytes=0/2 error=connection refused")
        self.assertEqual(format_event({"type": "dropped", "dropped": 3}),
                         "(3 events lost: this watcher was too slow)")

    def test_tcp_address(self):
        self.assertEqual(tcp_address("tcp:4143:interface=127.0.0.1"), ("127.0.0.1", 4143))
        self.assertEqual(tcp_address("tcp6:port=80:interface=\\:\\:1"), ("::1", 80))
        self.assertIsNone(tcp_address("unix:/run/l5d.sock"))
        self.assertIsNone(tcp_address("systemd:domain=INET:index=0"))
