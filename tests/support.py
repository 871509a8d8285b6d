"""Shared helpers for the end-to-end tests: the real proxy in a subprocess,
small real servers on loopback, and the tools the tests drive.

Everything listens on port 0 on 127.0.0.1 and is cleaned up with the
test's ``addCleanup``; waiting always polls a condition against a deadline.
The tests that use these are plain synchronous trial TestCases: they block
on sockets and subprocesses, never on the test reactor.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import signal as signals
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import SkipTest

from prometheus_client.parser import text_string_to_metric_families

#: A listen string that binds a free loopback port.
LISTEN_ANY = "tcp:0:interface=127.0.0.1"

#: How long a subprocess may take to start (the machine may be busy).
START_TIMEOUT = 30.0

#: twistd, run by the interpreter running the tests (works in any venv).
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def require_tool(name: str) -> str:
    """The path of a command-line tool, or skip the test without it.

    Under ``CI=true`` a missing tool is a failure, not a skip: CI must run
    every test.
    """
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI") == "true":
            raise AssertionError(f"{name} is required under CI")
        raise SkipTest(f"{name} is not installed")
    return path


def wait_for(condition: Callable[[], Any], timeout: float = 10.0,
             message: str = "condition", interval: float = 0.01) -> Any:
    """Poll ``condition`` until it returns something true; return that.

    Raises AssertionError naming ``message`` when ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


# -- config -------------------------------------------------------------------

def toml_value(value: Any) -> str:
    """A Python value as a TOML value (strings, bools, numbers, arrays, tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple, set, frozenset)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):   # an inline table: [service.x.failure_accrual] and such
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def build_config(listeners: Iterable[dict[str, Any]] = (),
                 services: dict[str, dict[str, Any]] | None = None,
                 detect: dict[str, Any] | None = None,
                 proxy: dict[str, Any] | None = None,
                 admin_listen: str = LISTEN_ANY) -> str:
    """A config file's text. Listeners default to ``listen = LISTEN_ANY``.

    ``build_config([{"name": "in", "service": "app"}],
    {"app": {"endpoints": ["127.0.0.1:8080"]}}, detect={"timeout": 0.3})``
    """
    lines = ["[admin]", f"listen = {toml_value(admin_listen)}", ""]
    for table, values in (("detect", detect), ("proxy", proxy)):
        if values:
            lines.append(f"[{table}]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
            lines.append("")
    for listener in listeners:
        listener = {"listen": LISTEN_ANY, **listener}
        lines.append("[[listener]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in listener.items())
        lines.append("")
    for name, values in (services or {}).items():
        lines.append(f"[service.{name}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
        lines.append("")
    return "\n".join(lines)


def write_config(testcase, text: str, name: str = "l5dproxy.toml") -> str:
    """Write ``text`` to a new temporary directory; the path, removed at cleanup."""
    directory = tempfile.mkdtemp(prefix="l5dproxy-test-")
    testcase.addCleanup(shutil.rmtree, directory, True)
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def run_l5dproxy(*args: str, timeout: float = START_TIMEOUT,
                 cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run ``twistd -n --pidfile= l5dproxy ARGS`` to completion (``--check``,
    a config that must be refused, ...) and return what it did."""
    return subprocess.run(
        [*TWISTD, "-n", "--pidfile=", "l5dproxy", *args],
        capture_output=True, text=True, timeout=timeout, cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})


# -- the proxy in a subprocess --------------------------------------------------

_LISTENER_LINE = re.compile(
    r"listener (?P<name>\S+) on (?P<host>\[[^\]]*\]|[^\s:]+):(?P<port>\d+) -> service")
_ADMIN_LINE = re.compile(r"admin on (?P<host>\[[^\]]*\]|[^\s:]+):(?P<port>\d+)")


class ProxyProcess:
    """The real ``twistd -n l5dproxy --config PATH`` in a subprocess.

    ``config`` is a config file's text; ``{listen}`` in it stands for a
    free loopback port (``LISTEN_ANY``) and ``substitutions`` may name more
    placeholders. Without ``config`` the file is built by ``build_config``
    from the keyword arguments. The process is started at once (unless
    ``start=False``), its bound ports are read back from its log, and it is
    ready when ``/ready`` answers 200. It is always stopped at cleanup.
    """

    def __init__(self, testcase, config: str | None = None, *,
                 substitutions: dict[str, Any] | None = None,
                 listeners: Iterable[dict[str, Any]] = (),
                 services: dict[str, dict[str, Any]] | None = None,
                 detect: dict[str, Any] | None = None,
                 proxy: dict[str, Any] | None = None,
                 start: bool = True, extra_args: Iterable[str] = ()) -> None:
        if config is None:
            config = build_config(listeners, services, detect, proxy)
        for key, value in {"listen": LISTEN_ANY, **(substitutions or {})}.items():
            config = config.replace("{" + key + "}", str(value))
        self.testcase = testcase
        self.config_text = config
        self.config_path = write_config(testcase, config)
        self.directory = os.path.dirname(self.config_path)
        self.stdout_path = os.path.join(self.directory, "stdout.log")
        self.stderr_path = os.path.join(self.directory, "stderr.log")
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.admin_port: int | None = None
        testcase.addCleanup(self._cleanup)
        if start:
            self.start()

    @property
    def argv(self) -> list[str]:
        return [*TWISTD, "-n", "--pidfile=", "l5dproxy", "--config", self.config_path,
                *self.extra_args]

    def start(self, wait: bool = True) -> None:
        """Start the process; with ``wait``, until its ports are known and it is ready."""
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(
                self.argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                cwd=self.directory, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if wait:
            self.wait_started()
            self.wait_ready()

    def _expected_listeners(self) -> set[str]:
        import tomllib

        try:
            data = tomllib.loads(self.config_text)
        except tomllib.TOMLDecodeError:
            return set()
        return {str(lc.get("name")) for lc in data.get("listener", []) if isinstance(lc, dict)}

    def wait_started(self, timeout: float = START_TIMEOUT) -> None:
        """Wait until the log names the port of every listener and the admin."""
        expected = self._expected_listeners()

        def started() -> bool:
            self._read_ports()
            if self.admin_port is not None and expected <= set(self.ports):
                return True
            if self.process.poll() is not None:
                raise AssertionError(
                    f"l5dproxy exited with {self.process.returncode} before it started;\n"
                    f"stdout:\n{self.log_text()}\nstderr:\n{self.stderr_text()}")
            return False

        wait_for(started, timeout, "l5dproxy to bind its ports", interval=0.02)

    def _read_ports(self) -> None:
        text = self.log_text()
        for m in _LISTENER_LINE.finditer(text):
            self.ports[m["name"]] = int(m["port"])
        m = _ADMIN_LINE.search(text)
        if m:
            self.admin_port = int(m["port"])

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"l5dproxy exited with {self.process.returncode};\n{self.log_text()}"
                    f"\n{self.stderr_text()}")
            try:
                return self.admin_get("/ready")[0] == 200
            except OSError:
                return False

        wait_for(ready, timeout, "/ready to answer 200", interval=0.02)

    def port(self, listener_name: str) -> int:
        return self.ports[listener_name]

    def admin_get(self, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
        """GET ``path`` from the admin server: (status, body)."""
        c = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=timeout)
        try:
            c.request("GET", path)
            response = c.getresponse()
            return response.status, response.read()
        finally:
            c.close()

    def metrics_text(self) -> str:
        status, body = self.admin_get("/metrics")
        if status != 200:
            raise AssertionError(f"/metrics answered {status}")
        return body.decode()

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of ``/metrics``: (sample name, labels) -> value."""
        return parse_metrics(self.metrics_text())

    def metric_value(self, name: str, **labels: str) -> float:
        """The sum of the samples called ``name`` whose labels include ``labels``."""
        return metric_value(self.metrics(), name, **labels)

    def log_text(self) -> str:
        return _read(self.stdout_path)

    def stderr_text(self) -> str:
        return _read(self.stderr_path)

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """Wait for a log line matching the regular expression ``pattern``."""
        regex = re.compile(pattern)
        return wait_for(lambda: regex.search(self.log_text()), timeout,
                        f"log line {pattern!r}")

    def send_signal(self, sig: int = signals.SIGTERM) -> None:
        self.process.send_signal(sig)

    def wait_exit(self, timeout: float = START_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"l5dproxy did not exit within {timeout} s;\n{self.log_text()}") from None

    def stop(self, sig: int = signals.SIGTERM, timeout: float = START_TIMEOUT) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.process.poll() is None:
            self.send_signal(sig)
        return self.wait_exit(timeout)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _cleanup(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(START_TIMEOUT)


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text to {(sample name, frozenset(labels.items())): value}."""
    samples: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric_value(samples: dict[tuple[str, frozenset], float], name: str,
                 **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(value for (sample_name, sample_labels), value in samples.items()
               if sample_name == name and wanted <= sample_labels)


# -- small real servers -----------------------------------------------------------

class ThreadedServer:
    """A TCP server on 127.0.0.1 port 0 with one plain thread per connection.

    ``handle(sock)`` serves one accepted connection; the socket is closed
    after it returns. ``accepted`` counts connections; ``port`` is the bound
    port. Stopped at the test's cleanup (or with ``close()``).
    """

    def __init__(self, testcase, handle: Callable[[socket.socket], None],
                 host: str = "127.0.0.1") -> None:
        self.handle = handle
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.host = host
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()
        if testcase is not None:
            testcase.addCleanup(self.close)

    @property
    def address(self) -> str:
        """``host:port`` as a config endpoint."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.accepted += 1
                self._connections.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(60)
            self.handle(conn)
        except OSError:
            pass  # the peer went away: fine for a test server
        except BaseException as e:
            self.errors.append(e)
        finally:
            with self._lock:
                self._connections.discard(conn)
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections = list(self._connections)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)


def echo(conn: socket.socket) -> None:
    """Echo every byte; on the client's EOF, send EOF back."""
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


BANNER = b"220 test ESMTP ready\r\n"


def banner(conn: socket.socket, text: bytes = BANNER) -> None:
    """Server-speaks-first: send a banner on connect, then echo."""
    conn.sendall(text)
    echo(conn)


def answer_after_eof(conn: socket.socket) -> None:
    """Read until the client's EOF (its half-close), then answer with
    ``received N bytes\\n`` followed by what was received, and close."""
    chunks = []
    while True:
        data = conn.recv(65536)
        if not data:
            break
        chunks.append(data)
    body = b"".join(chunks)
    conn.sendall(b"received %d bytes\n" % len(body) + body)
    conn.shutdown(socket.SHUT_WR)


def echo_server(testcase) -> ThreadedServer:
    return ThreadedServer(testcase, echo)


def banner_server(testcase, text: bytes = BANNER) -> ThreadedServer:
    return ThreadedServer(testcase, lambda conn: banner(conn, text))


def half_close_server(testcase) -> ThreadedServer:
    return ThreadedServer(testcase, answer_after_eof)


class _HelloHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    body = b"hello from the test server\n"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpServer:
    """A real HTTP/1.1 server (http.server) on 127.0.0.1 port 0, in a thread.

    ``GET`` anything answers 200 with ``HttpServer.body``.
    """

    body = _HelloHandler.body

    def __init__(self, testcase) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _HelloHandler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        testcase.addCleanup(self.close)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


# -- clients ----------------------------------------------------------------------

def connect(port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Read exactly ``n`` bytes (AssertionError on an early EOF)."""
    chunks, got = [], 0
    while got < n:
        data = sock.recv(min(65536, n - got))
        if not data:
            raise AssertionError(f"EOF after {got} of {n} bytes")
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def read_response(sock: socket.socket) -> tuple[int, dict[bytes, bytes], bytes]:
    """One response with a content-length body (none without one) from a
    keep-alive socket: ``(status, headers by lower-cased name, body)``.

    Reads exactly that response's bytes and not one more: whatever follows
    (the next pipelined response, which a proxy may well have sent by the
    time this one is read) stays in the socket for the next call. The head
    is found by peeking (``MSG_PEEK``) and only its own bytes are taken.
    AssertionError on an EOF before the response is whole.
    """
    head = b""
    while True:
        peeked = sock.recv(65536, socket.MSG_PEEK)
        if not peeked:
            raise AssertionError(f"EOF in head: {head!r}")
        end = (head + peeked).find(b"\r\n\r\n")
        if end >= 0:
            head += recv_exactly(sock, end + 4 - len(head))
            break
        head += recv_exactly(sock, len(peeked))
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get(b"content-length", b"0"))
    return status, headers, recv_exactly(sock, length)


def recv_until_eof(sock: socket.socket) -> bytes:
    """Read until the peer's EOF."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def refused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def reserved_port(testcase, host: str = "127.0.0.1") -> int:
    """A port on ``host`` held for the test: bound (not listening) with
    ``SO_REUSEPORT`` until the test's cleanup. Sockets of this user that set
    ``SO_REUSEPORT`` too (``--workers``' listeners) may bind and listen on
    it; nothing else can take it meanwhile, not even as the ephemeral port of
    some process's outgoing connection (Linux skips a port with a bound
    socket when it picks one), which is the race a port bound and released
    at once (``refused_port``) loses on a busy machine. Connections go only to
    the listening sockets."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((host, 0))
    testcase.addCleanup(s.close)
    return s.getsockname()[1]
