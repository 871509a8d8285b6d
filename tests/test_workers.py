"""--workers N: SO_REUSEPORT listening, admin ports per worker, the merged
/metrics of worker 0 (gathered from the others over loopback), and the real
twistd with two workers (both serve, the admin port counts every request, a
killed worker comes back, SIGTERM stops them all)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from l5dproxy.app import workers
from tests.support import (
    HttpServer,
    ProxyProcess,
    build_config,
    connect,
    echo_server,
    metric_value,
    parse_metrics,
    read_response,
    refused_port,
    require_tool,
    reserved_port,
    wait_for,
)


class EndpointTests(SynchronousTestCase):
    def test_tcp_args(self) -> None:
        self.assertEqual(workers._tcp_args("tcp:4143:interface=127.0.0.1"),
                         {"port": "4143", "interface": "127.0.0.1"})
        self.assertEqual(workers._tcp_args("tcp:port=80:backlog=9"),
                         {"port": "80", "backlog": "9"})
        self.assertEqual(workers._tcp_args(r"tcp:4143:interface=\:\:1"),
                         {"port": "4143", "interface": "::1"})
        self.assertIsNone(workers._tcp_args("unix:/tmp/x"))
        self.assertIsNone(workers._tcp_args("systemd:domain=INET:index=0"))
        self.assertIsNone(workers._tcp_args("tcp:4143:bogus=1"))

    def test_admin_listen(self) -> None:
        self.assertEqual(workers.admin_listen("tcp:4191:interface=127.0.0.1", 0),
                         "tcp:4191:interface=127.0.0.1")
        self.assertEqual(workers.admin_listen("tcp:4191:interface=127.0.0.1", 3),
                         "tcp:4194:interface=127.0.0.1")
        self.assertEqual(workers.admin_listen("tcp:port=4191", 1), "tcp:port=4192")
        self.assertIsNone(workers.admin_listen("unix:/run/admin.sock", 1))
        self.assertEqual(workers.admin_listen("unix:/run/admin.sock", 0), "unix:/run/admin.sock")
        self.assertEqual(workers.admin_listen("tcp:0:interface=127.0.0.1", 2),
                         "tcp:0:interface=127.0.0.1")
        # Another kind: a socket of its own in worker 0's private directory.
        self.assertEqual(workers.admin_listen("systemd:domain=INET:index=1", 2, "/tmp/a:b"),
                         r"unix:/tmp/a\:b/worker-2.sock:lockfile=1")
        self.assertEqual(workers.admin_listen("unix:/run/admin.sock", 0, "/tmp/x"),
                         "unix:/run/admin.sock")

    def test_report_lines(self) -> None:
        from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
        for address in (IPv4Address("TCP", "127.0.0.1", 4192),
                        IPv6Address("TCP", "::1", 4193), UNIXAddress("/tmp/d/worker-1.sock")):
            line = workers.report_line(address)
            self.assertEqual(workers.parse_report(line.rstrip(b"\n")), address)
        self.assertIsNone(workers.report_line(UNIXAddress(None)))
        for line in (b"", b"admin", b"admin tcp 127.0.0.1", b"admin tcp 127.0.0.1 x",
                     b"admin tcp 127.0.0.1 70000", b"admin udp 1.2.3.4 5", b"tcp 1.2.3.4 5",
                     b"admin unix "):
            self.assertIsNone(workers.parse_report(line), line)


class ReusePortTests(TestCase):
    def test_two_listen_on_one_port(self):
        port = reserved_port(self)
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        description = f"tcp:{port}:interface=127.0.0.1"
        first = workers.listen_reuseport(reactor, description, factory)
        self.addCleanup(first.stopListening)
        second = workers.listen_reuseport(reactor, description, factory)
        self.addCleanup(second.stopListening)
        self.assertEqual(first.getHost().port, port)
        self.assertEqual(second.getHost().port, port)

    def test_port_held_without_reuseport(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            s.listen(1)
            port = s.getsockname()[1]
            factory = protocol.Factory.forProtocol(protocol.Protocol)
            self.assertRaises(error.CannotListenError, workers.listen_reuseport, reactor,
                              f"tcp:{port}:interface=127.0.0.1", factory)


class _Answer(Resource):
    """A worker's admin server as the gatherer sees it: counts requests,
    answers ``status`` with ``body``."""

    isLeaf = True

    def __init__(self, body: bytes, status: int = 200) -> None:
        super().__init__()
        self.body = body
        self.status = status
        self.requests: list[bytes] = []

    def render_GET(self, request) -> bytes:
        self.requests.append(request.uri)
        request.setResponseCode(self.status)
        return self.body


class _Silent(protocol.Protocol):
    """Accepts and never answers (a stuck worker)."""

    connections: list[protocol.Protocol] = []

    def connectionMade(self) -> None:
        self.connections.append(self)


WORKER_TEXT = b"""\
# HELP request_total HTTP requests received
# TYPE request_total counter
request_total{service="app"} 2.0
# HELP tcp_open_connections Connections currently open
# TYPE tcp_open_connections gauge
tcp_open_connections{peer="src"} 5.0
"""


class GatherTests(TestCase):
    """``MetricsGatherer`` against loopback servers standing in for workers:
    what answers is merged, what does not is left out and counted, and the
    gather ends within its timeout."""

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def setUp(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        Counter("request", "HTTP requests received", ("service",),
                registry=self.registry).labels("app").inc()
        Gauge("tcp_open_connections", "Connections currently open", ("peer",),
              registry=self.registry).labels("src").set(1)
        from prometheus_client.parser import text_string_to_metric_families

        from l5dproxy.telemetry import families_to_json

        # What a worker's /metrics?local&format=json answers.
        self.good = _Answer(families_to_json(text_string_to_metric_families(
            WORKER_TEXT.decode())))
        _Silent.connections = []
        self.addCleanup(lambda: [p.transport.abortConnection() for p in _Silent.connections])
        self.gatherer = workers.MetricsGatherer(reactor, 9, self.registry.collect,
                                                timeout=1.0, max_bytes=1000)
        servers = {
            1: Site(self.good),
            2: protocol.Factory.forProtocol(_Silent),
            4: Site(_Answer(b"oops", status=500)),
            5: Site(_Answer(b"# " + b"x" * 5000 + b"\n")),
            6: Site(_Answer(b"this is not { prometheus\n")),
            7: Site(self.good),
        }
        for index, factory in servers.items():
            self.gatherer.admin_bound(index, IPv4Address("TCP", "127.0.0.1",
                                                         self.listen(factory)))
        # 0.0.0.0 is asked on 127.0.0.1 (where nothing listens here).
        self.gatherer.admin_bound(3, IPv4Address("TCP", "0.0.0.0", refused_port()))
        # Worker 8: a UNIX socket (a non-tcp: admin endpoint).
        path = os.path.join(self.mktemp() + ".d", "worker-8.sock")
        os.makedirs(os.path.dirname(path))
        port = reactor.listenUNIX(path, Site(self.good))
        self.addCleanup(port.stopListening)
        self.gatherer.admin_bound(8, UNIXAddress(path))
        # Worker 7 went away after reporting.
        self.gatherer.worker_ended(7)

    @defer.inlineCallbacks
    def test_gather(self):
        from prometheus_client.exposition import generate_latest

        first, second = self.gatherer.gather(), self.gatherer.gather()
        families = yield first
        self.assertIs((yield second), families)  # one round for both scrapes
        self.assertEqual(self.good.requests, [b"/metrics?local&format=json"] * 2)  # 1 and 8
        samples = parse_metrics(generate_latest(_Collect(families)).decode())
        self.assertEqual(metric_value(samples, "request_total", service="app"), 5)
        self.assertEqual(metric_value(samples, "tcp_open_connections", peer="src"), 11)
        self.assertEqual(metric_value(samples, "workers_expected"), 9)
        self.assertEqual(metric_value(samples, "workers_scraped"), 3)
        failures = {dict(labels)["worker"]: dict(labels)["reason"]
                    for (name, labels), value in samples.items()
                    if name == "worker_scrape_failures_total" and value == 1}
        self.assertEqual(failures, {"2": "timeout", "3": "refused", "4": "status",
                                    "5": "too_large", "6": "invalid", "7": "down"})
        # The next scrape asks again, and counts again.
        families = yield self.gatherer.gather()
        samples = parse_metrics(generate_latest(_Collect(families)).decode())
        self.assertEqual(metric_value(samples, "worker_scrape_failures_total", worker="2"), 2)
        self.assertEqual(len(self.good.requests), 4)


class _Collect:
    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        return self.families


class TwoWorkersTests(SynchronousTestCase):
    """The real twistd l5dproxy --workers 2."""

    def test_two_workers(self) -> None:
        echo = echo_server(self)
        listen = reserved_port(self)
        config = build_config(
            [{"name": "in", "service": "echo", "opaque": True,
              "listen": f"tcp:{listen}:interface=127.0.0.1"}],
            {"echo": {"endpoints": [echo.address]}},
            proxy={"drain_timeout": 1, "log_connections": False},
            admin_listen="tcp:0:interface=127.0.0.1")
        proxy = ProxyProcess(self, config, extra_args=["--workers", "2"])
        worker_pid = int(proxy.wait_log(r"worker 1 started \(pid (\d+)\)")[1])
        second = _second_worker(proxy)

        # Connections are spread over both processes.
        for i in range(40):
            with socket.create_connection(("127.0.0.1", listen), timeout=10) as c:
                c.sendall(b"ping %d" % i)
                self.assertEqual(c.recv(100), b"ping %d" % i)
        opened = [_local(p, "tcp_open_total", peer="src") for p in (proxy, second)]
        self.assertEqual(sum(opened), 40)
        self.assertTrue(all(opened), f"both workers served: {opened}")
        wait_for(lambda: proxy.metric_value("workers_scraped") == 2, 30,
                 "worker 0 to gather worker 1")
        self.assertEqual(proxy.metric_value("tcp_open_total", peer="src"), 40)

        # A worker that dies is started again.
        os.kill(worker_pid, signal.SIGKILL)
        proxy.wait_log(r"worker 1 exited")
        match = wait_for(lambda: re.findall(r"worker 1 started \(pid (\d+)\)", proxy.log_text())
                         [1:], 30, "worker 1 to start again")
        new_pid = int(match[0])
        # The new worker 1 reports its admin server (a new port) to worker 0.
        wait_for(lambda: proxy.metric_value("workers_scraped") == 2, 30,
                 "worker 0 to gather worker 1 again")
        self.assertEqual(proxy.metric_value("tcp_open_total", peer="src"), opened[0])

        # SIGTERM stops them all.
        self.assertIn(proxy.stop(), (0, -signal.SIGTERM))
        wait_for(lambda: not _alive(new_pid), 15, "worker 1 to exit")


class MergedMetricsTests(SynchronousTestCase):
    """The real twistd l5dproxy --workers 2: the admin port's /metrics is
    the group's, each worker's own port (and ``?local``) its own."""

    def test_requests_over_both_workers_are_counted_once(self) -> None:
        app = HttpServer(self)
        listen = reserved_port(self)
        config = build_config(
            [{"name": "in", "service": "app",
              "listen": f"tcp:{listen}:interface=127.0.0.1"}],
            {"app": {"endpoints": [app.address]}},
            proxy={"drain_timeout": 1, "log_connections": False},
            admin_listen="tcp:0:interface=127.0.0.1")
        proxy = ProxyProcess(self, config, extra_args=["--workers", "2"])
        second = _second_worker(proxy)
        wait_for(lambda: proxy.metric_value("workers_scraped") == 2, 30,
                 "worker 0 to gather worker 1")

        sent = 60
        for _ in range(sent):  # a connection each: the kernel spreads connections
            with connect(listen) as c:
                c.sendall(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
                self.assertEqual(read_response(c)[0], 200)

        own = [_local(p, "request_total") for p in (proxy, second)]
        self.assertEqual(sum(own), sent)
        self.assertTrue(all(own), f"both workers served: {own}")
        self.assertEqual(_local(second, "request_total"),
                         metric_value(parse_metrics(second.metrics_text()), "request_total"))
        merged = proxy.metrics()
        self.assertEqual(metric_value(merged, "request_total"), sent)
        self.assertEqual(metric_value(merged, "response_total", status_code="200"), sent)
        self.assertEqual(metric_value(merged, "response_latency_ms_count"), sent)
        self.assertEqual(metric_value(merged, "response_latency_ms_bucket", le="+Inf"), sent)
        self.assertEqual(metric_value(merged, "tcp_open_total", peer="src"), sent)
        self.assertEqual(metric_value(merged, "workers_expected"), 2)
        self.assertEqual(metric_value(merged, "workers_scraped"), 2)
        self.assertEqual(metric_value(merged, "build_info"), 1)
        self.assertEqual({labels for (name, labels) in merged
                          if name == "process_resident_memory_bytes"},
                         {frozenset({("worker", "0")}), frozenset({("worker", "1")})})
        # The dashboard's numbers are the group's too.
        status, body = proxy.admin_get("/stats.json")
        self.assertEqual(status, 200)
        import json
        listener = json.loads(body)["listeners"][0]
        self.assertEqual(listener["requests_total"], sent)


class UnixAdminTests(SynchronousTestCase):
    """--workers 2 with a UNIX socket admin endpoint: worker 1 serves its
    admin on a socket in worker 0's private directory, and the configured
    socket's /metrics is the group's."""

    def test_unix_admin_gathers_every_worker(self) -> None:
        import tempfile

        app = HttpServer(self)
        listen = reserved_port(self)
        directory = tempfile.mkdtemp(prefix="l5d-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        admin = os.path.join(directory, "admin.sock")
        config = build_config(
            [{"name": "in", "service": "app",
              "listen": f"tcp:{listen}:interface=127.0.0.1"}],
            {"app": {"endpoints": [app.address]}},
            proxy={"drain_timeout": 1, "log_connections": False},
            admin_listen=f"unix:{admin}")
        proxy = ProxyProcess(self, config, extra_args=["--workers", "2"], start=False)
        proxy.start(wait=False)

        def merged() -> dict:
            try:
                return parse_metrics(_unix_get(admin, "/metrics").decode())
            except OSError:
                return {}

        wait_for(lambda: metric_value(merged(), "workers_scraped") == 2, 30,
                 "worker 0 to gather worker 1 over its socket")
        private = re.search(r"admin on .*?(/[^\s']*l5dproxy-admin-[^/\s']+)/worker-1\.sock",
                            proxy.log_text())
        self.assertIsNotNone(private, proxy.log_text())
        self.assertEqual(os.stat(private[1]).st_mode & 0o777, 0o700)
        for _ in range(20):
            with connect(listen) as c:
                c.sendall(b"GET / HTTP/1.1\r\nhost: app\r\n\r\n")
                self.assertEqual(read_response(c)[0], 200)
        samples = merged()
        self.assertEqual(metric_value(samples, "request_total"), 20)
        self.assertEqual(metric_value(samples, "workers_scraped"), 2)
        self.assertIn(proxy.stop(), (0, -signal.SIGTERM))
        self.assertFalse(os.path.exists(private[1]), "worker 0 removed its directory")


def _unix_get(path: str, target: str) -> bytes:
    """GET ``target`` over the UNIX socket ``path``: the body of a 200."""
    import http.client

    class Connection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(10)
            self.sock.connect(path)

    c = Connection("localhost")
    try:
        c.request("GET", target)
        response = c.getresponse()
        body = response.read()
        if response.status != 200:
            raise OSError(f"{target}: {response.status}")
        return body
    finally:
        c.close()


def _second_worker(proxy: ProxyProcess) -> ProxyProcess:
    """Worker 1's admin server (its own port: the second "admin on" line),
    once it answers /ready."""
    def found() -> ProxyProcess | None:
        ports = [int(p) for p in re.findall(r"admin on [^\s]+:(\d+)", proxy.log_text())]
        others = [p for p in ports if p != proxy.admin_port]
        if not others:
            return None
        second = ProxyProcess.__new__(ProxyProcess)
        second.admin_port = others[0]
        return second if _ready(second) else None

    return wait_for(found, 30, "worker 1's admin to answer")


def _local(proxy: ProxyProcess, name: str, **labels: str) -> float:
    """A metric of the process ``proxy`` stands for alone (``?local``)."""
    status, body = proxy.admin_get("/metrics?local")
    assert status == 200, status
    return metric_value(parse_metrics(body.decode()), name, **labels)


def _ready(proxy: ProxyProcess) -> bool:
    try:
        return proxy.admin_get("/ready", timeout=2)[0] == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


class ListenBacklogTests(SynchronousTestCase):
    """Listeners get a production-sized accept queue unless they name one."""

    def test_tcp_listeners_get_the_default_backlog(self) -> None:
        from l5dproxy.app.service import LISTEN_BACKLOG, with_listen_backlog
        self.assertEqual(with_listen_backlog("tcp:4143:interface=127.0.0.1"),
                         f"tcp:4143:interface=127.0.0.1:backlog={LISTEN_BACKLOG}")
        self.assertEqual(with_listen_backlog("tcp6:port=4143"),
                         f"tcp6:port=4143:backlog={LISTEN_BACKLOG}")

    def test_an_explicit_backlog_or_another_kind_is_left_alone(self) -> None:
        from l5dproxy.app.service import with_listen_backlog
        for description in ("tcp:4143:backlog=16", "unix:/tmp/s",
                            "systemd:domain=INET:name=inbound"):
            self.assertEqual(with_listen_backlog(description), description)

    def test_listening_sockets_have_it(self) -> None:
        """The kernel's view (``ss``: a listening socket's Send-Q is its
        backlog) for the plain endpoint and a worker's SO_REUSEPORT socket."""
        import subprocess

        from twisted.internet.endpoints import serverFromString

        from l5dproxy.app.service import LISTEN_BACKLOG, with_listen_backlog
        ss = require_tool("ss")
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        description = with_listen_backlog("tcp:0:interface=127.0.0.1")
        plain = self.successResultOf(serverFromString(reactor, description).listen(factory))
        shared = workers.listen_reuseport(reactor, description, factory)
        for port in (plain, shared):
            self.addCleanup(port.stopListening)
            number = port.getHost().port
            out = subprocess.run([ss, "-Hltn", f"sport = :{number}"], capture_output=True,
                                 text=True, timeout=10).stdout.split()
            self.assertEqual(out[2], str(LISTEN_BACKLOG), out)
