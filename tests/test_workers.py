"""--workers N: SO_REUSEPORT listening, admin ports per worker, and the real
twistd with two workers (both serve, a killed worker comes back, SIGTERM
stops them all)."""

from __future__ import annotations

import os
import re
import signal
import socket

from twisted.internet import error, protocol, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from l5dproxy.app import workers
from tests.support import ProxyProcess, build_config, echo_server, require_tool, wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_ports() -> tuple[int, int]:
    """Two free ports, the first followed by a free one (worker 1's admin)."""
    while True:
        with socket.socket() as a, socket.socket() as b, socket.socket() as c:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            c.bind(("127.0.0.1", 0))
            return port, c.getsockname()[1]


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


class ReusePortTests(TestCase):
    def test_two_listen_on_one_port(self):
        port = _free_port()
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


class TwoWorkersTests(SynchronousTestCase):
    """The real twistd l5dproxy --workers 2."""

    def test_two_workers(self) -> None:
        echo = echo_server(self)
        admin, listen = _free_ports()
        config = build_config(
            [{"name": "in", "service": "echo", "opaque": True,
              "listen": f"tcp:{listen}:interface=127.0.0.1"}],
            {"echo": {"endpoints": [echo.address]}},
            proxy={"drain_timeout": 1, "log_connections": False},
            admin_listen=f"tcp:{admin}:interface=127.0.0.1")
        proxy = ProxyProcess(self, config, extra_args=["--workers", "2"])
        worker_pid = int(proxy.wait_log(r"worker 1 started \(pid (\d+)\)")[1])
        second = ProxyProcess.__new__(ProxyProcess)
        second.admin_port = admin + 1
        wait_for(lambda: _ready(second), 30, "worker 1's admin to answer")

        # Connections are spread over both processes.
        for i in range(40):
            with socket.create_connection(("127.0.0.1", listen), timeout=10) as c:
                c.sendall(b"ping %d" % i)
                self.assertEqual(c.recv(100), b"ping %d" % i)
        opened = [p.metric_value("tcp_open_total", peer="src") for p in (proxy, second)]
        self.assertEqual(sum(opened), 40)
        self.assertTrue(all(opened), f"both workers served: {opened}")

        # A worker that dies is started again.
        os.kill(worker_pid, signal.SIGKILL)
        proxy.wait_log(r"worker 1 exited")
        match = wait_for(lambda: re.findall(r"worker 1 started \(pid (\d+)\)", proxy.log_text())
                         [1:], 30, "worker 1 to start again")
        new_pid = int(match[0])
        wait_for(lambda: _ready(second), 30, "worker 1's admin to answer again")

        # SIGTERM stops them all.
        self.assertIn(proxy.stop(), (0, -signal.SIGTERM))
        wait_for(lambda: not _alive(new_pid), 15, "worker 1 to exit")


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
