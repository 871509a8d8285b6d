"""Server-speaks-first protocols through the real ``twistd l5dproxy``, with no
configuration: real servers on ports that are not in ``opaque_ports``.

* SMTP: ``aiosmtpd``, driven by ``smtplib``.
* MySQL protocol: MariaDB from Debian (``mariadb-server``; skipped when it
  is not installed, a failure under ``CI=true``), driven by the ``mariadb``
  client; and, always, a protocol-faithful handshake-v10 banner server.

Each checks that the first connection's banner arrives within
``FIRST_BANNER_S`` of connecting (the client-silence window, not the 10 s
detect timeout), that later connections (learned: no window at all) are
within ``LATER_SLACK_S`` of a direct connection, that the destination shows
in ``/opaque`` and in ``protocol_detect_total``, and that HTTP clients on a
listener with the feature on are detected and proxied as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import smtplib
import socket
import statistics
import struct
import subprocess
import tempfile
import time
from email.message import EmailMessage

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from l5dproxy.config.model import DEFAULT_OPAQUE_PORTS
from tests.support import (
    HttpServer,
    ProxyProcess,
    ThreadedServer,
    recv_exactly,
    recv_until_eof,
    require_tool,
    wait_for,
)

#: The issue's figures: the first banner within 250 ms of connect, later ones
#: within 20 ms of a direct connection (medians of ``SAMPLES`` connections).
FIRST_BANNER_S = 0.250
LATER_SLACK_S = 0.020
SAMPLES = 15
#: Connections through the proxy that assertBannerTimes makes.
BANNER_CONNECTIONS = 1 + SAMPLES
DETECT_TIMEOUT = 10.0


def free_port() -> int:
    """A free loopback port that is not one of the opaque ports."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in DEFAULT_OPAQUE_PORTS:
            return port


def time_to_first_bytes(port: int, n: int = 1) -> tuple[float, bytes]:
    """Seconds from just before connect() until ``n`` bytes arrived, and them."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=DETECT_TIMEOUT * 2) as s:
        data = recv_exactly(s, n)
        return time.perf_counter() - start, data


def median_first_bytes(port: int, n: int) -> float:
    return statistics.median(time_to_first_bytes(port, n)[0] for _ in range(SAMPLES))


def start_proxy(testcase, services: dict, http: HttpServer | None = None,
                detect: dict | None = None) -> ProxyProcess:
    """A proxy with a listener per service (named after it), plus ``web`` for
    ``http`` when given; detection as shipped (client_silence default)."""
    listeners = [{"name": name, "service": name} for name in services]
    services = {name: {"endpoints": [address]} for name, address in services.items()}
    if http is not None:
        listeners.append({"name": "web", "service": "web"})
        services["web"] = {"endpoints": [http.address]}
    return ProxyProcess(testcase, listeners=listeners, services=services,
                        detect={"timeout": DETECT_TIMEOUT, **(detect or {})},
                        proxy={"log_connections": False})


class ServerFirstChecks:
    """Assertions shared by the protocol tests."""

    def assertLearned(self, proxy: ProxyProcess, listener: str, service: str,
                      endpoint: str, later: int) -> None:
        status, body = proxy.admin_get("/opaque")
        self.assertEqual(status, 200)
        learned = json.loads(body)["learned"]
        self.assertIn((service, endpoint), [(e["service"], e["endpoint"]) for e in learned])
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener=listener,
                                            protocol="opaque", reason="server_first"), 1)
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener=listener,
                                            protocol="opaque", reason="learned_opaque"), later)
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener=listener,
                                            reason="timeout"), 0)

    def assertBannerTimes(self, proxy: ProxyProcess, listener: str, direct_port: int,
                          n: int) -> tuple[float, float, float]:
        """First banner through the proxy, then later ones against direct ones."""
        first, _ = time_to_first_bytes(proxy.port(listener), n)
        self.assertLess(first, FIRST_BANNER_S)
        direct = median_first_bytes(direct_port, n)
        later = median_first_bytes(proxy.port(listener), n)
        self.assertLess(later, direct + LATER_SLACK_S)
        return first, later, direct


class SmtpTests(ServerFirstChecks, SynchronousTestCase):
    """aiosmtpd behind the proxy, on a port that is not 25 or 587."""

    def setUp(self) -> None:
        try:
            from aiosmtpd.controller import Controller
        except ImportError as e:  # a test extra: pip install -e '.[test]'
            raise SkipTest(f"aiosmtpd is not installed: {e}") from None
        self.messages: list[bytes] = []
        messages = self.messages

        class Handler:
            async def handle_DATA(self, server, session, envelope):
                messages.append(envelope.content)
                return "250 OK"

        self.smtp_port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.smtp_port)
        self.controller.start()
        self.addCleanup(self.controller.stop)
        self.http = HttpServer(self)
        self.proxy = start_proxy(self, {"mail": f"127.0.0.1:{self.smtp_port}"}, self.http)

    def send(self, port: int, subject: str) -> float:
        """One mail through ``port`` with smtplib; seconds until the 220 banner."""
        smtp = smtplib.SMTP(timeout=DETECT_TIMEOUT * 2)
        start = time.perf_counter()
        code, _ = smtp.connect("127.0.0.1", port)
        banner_s = time.perf_counter() - start
        self.assertEqual(code, 220)
        message = EmailMessage()
        message["From"], message["To"] = "a@example.test", "b@example.test"
        message["Subject"] = subject
        message.set_content("hello through the proxy\n")
        smtp.send_message(message)
        smtp.quit()
        return banner_s

    def test_smtp_banner_first_and_learned(self) -> None:
        port = self.proxy.port("mail")
        first = self.send(port, "first")
        self.assertLess(first, FIRST_BANNER_S)
        later = [self.send(port, f"later {i}") for i in range(5)]
        self.assertLess(max(later), FIRST_BANNER_S)
        self.assertEqual(len(self.messages), 6)
        self.assertIn(b"Subject: later 4", self.messages[-1])
        _, later_median, direct_median = self.assertBannerTimes(
            self.proxy, "mail", self.smtp_port, len(b"220 "))
        self.assertLearned(self.proxy, "mail", "mail", f"127.0.0.1:{self.smtp_port}",
                           later=5 + BANNER_CONNECTIONS)
        self.assertLess(later_median, direct_median + LATER_SLACK_S)

    def test_http_clients_unaffected(self) -> None:
        curl = require_tool("curl")
        url = f"http://127.0.0.1:{self.proxy.port('web')}/hello"
        for _ in range(10):
            out = subprocess.run(
                [curl, "-sS", "-o", "-", "-w", "\n%{http_code} %{time_total}", url],
                capture_output=True, timeout=DETECT_TIMEOUT, check=True).stdout
            body, _, tail = out.rpartition(b"\n")
            code, total = tail.split()
            self.assertEqual((code, body), (b"200", HttpServer.body))
            self.assertLess(float(total), 0.2)  # nowhere near the silence window's cost
        self.assertEqual(self.proxy.metric_value("protocol_detect_total", listener="web",
                                                 protocol="http1"), 10)
        self.assertEqual(self.proxy.metric_value("protocol_detect_total", listener="web",
                                                 protocol="opaque"), 0)
        learned = json.loads(self.proxy.admin_get("/opaque")[1])["learned"]
        self.assertNotIn("web", [e["service"] for e in learned])

    def test_slow_http_client_still_detected(self) -> None:
        """A client that says nothing for longer than the window: the early
        connection is made, then the request line wins and HTTP is proxied."""
        port = self.proxy.port("web")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            time.sleep(0.2)
            s.sendall(b"GET /hello HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
            response = recv_until_eof(s)
        self.assertTrue(response.startswith(b"HTTP/1.1 200"), response[:100])
        self.assertTrue(response.endswith(HttpServer.body), response[-100:])
        self.assertEqual(self.proxy.metric_value("protocol_detect_total", listener="web",
                                                 protocol="http1"), 1)
        self.assertEqual(self.proxy.metric_value("protocol_detect_total", listener="web",
                                                 protocol="opaque"), 0)


# -- MySQL protocol ---------------------------------------------------------------

def mysql_packet(seq: int, payload: bytes) -> bytes:
    return struct.pack("<I", len(payload))[:3] + bytes([seq]) + payload


def handshake_v10(connection_id: int = 7) -> bytes:
    """A MySQL protocol HandshakeV10 packet, as a server sends on connect."""
    capabilities = 0x81FFF7FF & ~0x0800  # CLIENT_SSL off: no TLS upgrade here
    scramble = b"abcdefghijklmnopqrst"
    payload = (
        b"\x0a" + b"5.7.99-l5dproxy-test\x00" + struct.pack("<I", connection_id)
        + scramble[:8] + b"\x00" + struct.pack("<H", capabilities & 0xFFFF)
        + b"\x21" + struct.pack("<H", 0x0002) + struct.pack("<H", capabilities >> 16)
        + bytes([len(scramble) + 1]) + b"\x00" * 10 + scramble[8:] + b"\x00"
        + b"mysql_native_password\x00")
    return mysql_packet(0, payload)


def read_mysql_packet(sock: socket.socket) -> tuple[int, bytes]:
    header = recv_exactly(sock, 4)
    length = int.from_bytes(header[:3], "little")
    return header[3], recv_exactly(sock, length)


def parse_handshake(packet: bytes) -> str:
    """The server version of a HandshakeV10 packet (header included)."""
    length = int.from_bytes(packet[:3], "little")
    payload = packet[4:4 + length]
    if payload[:1] != b"\x0a":
        raise AssertionError(f"not a HandshakeV10 packet: {packet[:16]!r}")
    return payload[1:payload.index(b"\x00", 1)].decode()


def mysql_banner_server(conn: socket.socket) -> None:
    """Handshake, read the client's HandshakeResponse, answer OK, serve COM_PING
    and COM_QUIT: enough of the protocol for a real client library to log in."""
    conn.sendall(handshake_v10())
    ok = b"\x00\x00\x00" + struct.pack("<HH", 0x0002, 0)
    with contextlib.suppress(AssertionError):  # the client closed: done
        seq, _ = read_mysql_packet(conn)
        conn.sendall(mysql_packet(seq + 1, ok))
        while True:
            _, command = read_mysql_packet(conn)
            if command[:1] == b"\x01":  # COM_QUIT
                return
            conn.sendall(mysql_packet(1, ok))


def handshake_response() -> bytes:
    """A minimal HandshakeResponse41 (user root, no password)."""
    capabilities = 0x000FA685
    payload = (struct.pack("<IIB", capabilities, 1 << 24, 0x21) + b"\x00" * 23
               + b"root\x00" + b"\x00" + b"mysql_native_password\x00")
    return mysql_packet(1, payload)


def first_packet(port: int) -> tuple[float, bytes]:
    """Seconds until the first whole MySQL packet arrived, and it."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=DETECT_TIMEOUT * 2) as s:
        seq, payload = read_mysql_packet(s)
        return time.perf_counter() - start, mysql_packet(seq, payload)


class MysqlBannerTests(ServerFirstChecks, SynchronousTestCase):
    """A protocol-faithful handshake-v10 server (always available)."""

    def test_handshake_first_and_learned(self) -> None:
        server = ThreadedServer(self, mysql_banner_server)
        self.assertNotIn(server.port, DEFAULT_OPAQUE_PORTS)
        proxy = start_proxy(self, {"db": server.address})
        first, packet = first_packet(proxy.port("db"))
        self.assertLess(first, FIRST_BANNER_S)
        self.assertEqual(parse_handshake(packet), "5.7.99-l5dproxy-test")
        # A login and a ping over a learned (no window) connection.
        with socket.create_connection(("127.0.0.1", proxy.port("db")), timeout=10) as s:
            read_mysql_packet(s)
            s.sendall(handshake_response())
            self.assertEqual(read_mysql_packet(s), (2, b"\x00\x00\x00\x02\x00\x00\x00"))
            s.sendall(mysql_packet(0, b"\x0e"))  # COM_PING
            self.assertEqual(read_mysql_packet(s)[1][:1], b"\x00")
            s.sendall(mysql_packet(0, b"\x01"))  # COM_QUIT
        self.assertBannerTimes(proxy, "db", server.port, 4)
        self.assertLearned(proxy, "db", "db", server.address, later=1 + BANNER_CONNECTIONS)
        self.assertEqual(server.errors, [])

    def test_banner_then_close(self) -> None:
        """A server that only speaks ("too many connections") and hangs up."""
        busy = b"\x17\x00\x00\x00\xff\x10\x04Too many connections"
        server = ThreadedServer(self, lambda conn: conn.sendall(busy))
        proxy = start_proxy(self, {"db": server.address})
        for _ in range(3):  # learning, then learned
            start = time.perf_counter()
            with socket.create_connection(("127.0.0.1", proxy.port("db")), timeout=10) as s:
                self.assertEqual(recv_until_eof(s), busy)
            self.assertLess(time.perf_counter() - start, FIRST_BANNER_S)

    def test_learned_destination_expires(self) -> None:
        server = ThreadedServer(self, mysql_banner_server)
        proxy = start_proxy(self, {"db": server.address}, detect={"learned_ttl": 1})
        first_packet(proxy.port("db"))
        learned = json.loads(proxy.admin_get("/opaque")[1])["learned"]
        self.assertEqual([e["endpoint"] for e in learned], [server.address])
        wait_for(lambda: not json.loads(proxy.admin_get("/opaque")[1])["learned"],
                 timeout=5, message="the learned entry to expire", interval=0.1)
        first_packet(proxy.port("db"))  # learned again, through the window
        self.assertEqual(proxy.metric_value("protocol_detect_total", listener="db",
                                            reason="server_first"), 2)


def _find_mariadb() -> tuple[str, str] | None:
    """``mariadbd`` and ``mariadb-install-db``, or None when not installed."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    server = shutil.which("mariadbd", path=path)
    install = shutil.which("mariadb-install-db", path=path)
    return (server, install) if server and install else None


class MariaDB:
    """A throwaway MariaDB server: its own datadir and a free port, stopped
    and removed at cleanup."""

    def __init__(self, testcase) -> None:
        found = _find_mariadb()
        if found is None:
            if os.environ.get("CI") == "true":
                raise AssertionError("mariadb-server is required under CI")
            raise SkipTest("mariadb-server is not installed")
        server, install = found
        self.directory = tempfile.mkdtemp(prefix="l5dproxy-mariadb-")
        testcase.addCleanup(shutil.rmtree, self.directory, True)
        datadir = os.path.join(self.directory, "data")
        user = ["--user=root"] if os.geteuid() == 0 else []
        subprocess.run(
            [install, "--no-defaults", f"--datadir={datadir}", "--skip-test-db",
             "--auth-root-authentication-method=normal", *user],
            check=True, capture_output=True, timeout=120)
        self.port = free_port()
        self.log_path = os.path.join(self.directory, "server.log")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [server, "--no-defaults", f"--datadir={datadir}", f"--port={self.port}",
                 "--bind-address=127.0.0.1", "--skip-name-resolve", "--skip-log-bin",
                 f"--socket={os.path.join(self.directory, 'mysqld.sock')}",
                 f"--pid-file={os.path.join(self.directory, 'mysqld.pid')}",
                 "--innodb-buffer-pool-size=8M", *user],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        testcase.addCleanup(self.stop)
        wait_for(self._ready, timeout=60, message="mariadbd to accept connections",
                 interval=0.05)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        if self.process.poll() is not None:
            with open(self.log_path, errors="replace") as f:
                raise AssertionError(f"mariadbd exited with {self.process.returncode}:\n"
                                     + f.read()[-3000:])
        try:
            first_packet(self.port)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class MariaDBTests(ServerFirstChecks, SynchronousTestCase):
    """The real thing: MariaDB from Debian (mariadb-server), on a port that is not 3306."""

    def test_mariadb_through_the_proxy(self) -> None:
        db = MariaDB(self)
        proxy = start_proxy(self, {"db": db.address})
        first, packet = first_packet(proxy.port("db"))
        self.assertLess(first, FIRST_BANNER_S)
        self.assertIn("MariaDB", parse_handshake(packet))
        client = shutil.which("mariadb") or shutil.which("mysql")
        queries = 0
        if client is not None:  # the real client, logging in and querying
            out = subprocess.run(
                [client, "--no-defaults", "-h127.0.0.1", f"-P{proxy.port('db')}", "-uroot",
                 "--skip-ssl", "-N", "-B", "-e", "select 6*7"],
                capture_output=True, text=True, timeout=DETECT_TIMEOUT)
            self.assertEqual((out.returncode, out.stdout.strip()), (0, "42"), out.stderr)
            queries = 1
        self.assertBannerTimes(proxy, "db", db.port, 4)
        self.assertLearned(proxy, "db", "db", db.address, later=queries + BANNER_CONNECTIONS)
