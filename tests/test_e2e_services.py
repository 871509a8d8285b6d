"""Services end to end: the real ``twistd l5dproxy``, a real DNS server
(``tests/dnsserver.py``, twisted.names, in a subprocess on port 0), real TCP
servers, and a loop of client connections running while things change.

Each connection of the loop sends a line and expects it back prefixed with
the tag of the server that answered, so the test knows who served what and
that nothing failed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from tests.support import ProxyProcess, build_config, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TaggedServer:
    """Echoes each read prefixed with ``tag``; one thread per connection.
    ``kill()`` closes the listening socket and every connection (an endpoint
    that died: connects are refused from then on)."""

    def __init__(self, testcase, tag: bytes, host: str = "127.0.0.1", port: int = 0) -> None:
        self.tag = tag
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(256)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()
        testcase.addCleanup(self.kill)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.accepted += 1
                self.conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                conn.sendall(self.tag + data)
        except OSError:
            pass
        finally:
            with self.lock:
                self.conns.discard(conn)
            conn.close()

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with self.lock:
            conns = list(self.conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)


class Traffic:
    """A loop of short connections through the proxy, in a thread. ``served``
    and ``failures`` hold (when the connection was opened, tag or error)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.served: list[tuple[float, bytes]] = []
        self.failures: list[tuple[float, str]] = []
        self.running = True
        self.go = threading.Event()     # cleared by pause()
        self.go.set()
        self.idle = threading.Event()   # set while paused, between connections
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        while self.running:
            if not self.go.is_set():
                self.idle.set()
                self.go.wait()
                continue
            n += 1
            line = b"ping %d\n" % n
            opened = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(line)
                    got = b""
                    while not got.endswith(line):
                        data = s.recv(4096)
                        if not data:
                            break
                        got += data
                if got.endswith(line) and got[:-len(line)]:
                    self.served.append((opened, got[:-len(line)]))
                else:
                    self.failures.append((opened, f"got {got!r}"))
            except OSError as e:
                self.failures.append((opened, repr(e)))
            time.sleep(0.005)

    def pause(self) -> None:
        """Return once the loop is between connections and holds there:
        nothing is in flight through the proxy until ``resume()``."""
        self.go.clear()
        if not self.idle.wait(10):
            raise AssertionError("the traffic loop did not pause within 10 s")

    def resume(self) -> None:
        self.idle.clear()
        self.go.set()

    def stop(self) -> None:
        self.running = False
        self.go.set()
        self.thread.join(10)

    def tags(self, since: float = 0.0) -> Counter:
        """The tags of the connections opened at ``since`` or later."""
        return Counter(tag for t, tag in self.served if t >= since)

    def wait_served(self, n: int, timeout: float = 10.0) -> None:
        start = len(self.served)
        wait_for(lambda: len(self.served) >= start + n, timeout, f"{n} more connections")


class DnsProcess:
    """``python -m tests.dnsserver RECORDS.json``: records rewritten by ``set``."""

    def __init__(self, testcase, records: dict) -> None:
        self.path = os.path.abspath(testcase.mktemp() + "-records.json")
        self.set(records)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.dnsserver", self.path], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        testcase.addCleanup(self.process.kill)
        line = self.process.stdout.readline()
        self.port = int(line.split()[1])

    def set(self, records: dict) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(records, f)
        os.replace(tmp, self.path)


def listener_config(services: dict, discovery: dict | None = None, **extra: dict) -> str:
    text = build_config([{"name": "in", "service": "app", "opaque": True}], services,
                        proxy={"log_connections": False}, **extra)
    if discovery:
        text += "\n[discovery]\n" + "\n".join(
            f"{k} = {json.dumps(v)}" for k, v in discovery.items()) + "\n"
    return text


class DnsChangeTests(SynchronousTestCase):

    def test_records_changed_under_traffic(self):
        """Endpoints added and removed by DNS while connections flow: none fails,
        and a connection to an endpoint that left is not cut."""
        s1 = TaggedServer(self, b"1:", "127.0.0.1")
        s2 = TaggedServer(self, b"2:", "127.0.0.2", s1.port)
        s3 = TaggedServer(self, b"3:", "127.0.0.3", s1.port)
        dns = DnsProcess(self, {"app.test": [["A", "127.0.0.1", 1], ["A", "127.0.0.2", 1]]})
        proxy = ProxyProcess(self, listener_config(
            {"app": {"dns": f"app.test:{s1.port}"}},
            {"resolvers": [f"127.0.0.1:{dns.port}"], "min_ttl": 0.2, "max_ttl": 1,
             "retry_interval": 0.2, "timeout": 1}))
        try:
            wait_for(lambda: proxy.metric_value("balancer_endpoints", service="app",
                                                state="ready") == 2, 10, "two endpoints")
        except AssertionError:
            print(proxy.log_text())
            raise
        # A long-lived connection to 127.0.0.1, which is about to leave.
        long_lived = None
        for _ in range(20):
            s = socket.create_connection(("127.0.0.1", proxy.port("in")), timeout=5)
            s.sendall(b"hello\n")
            if s.recv(100) == b"1:hello\n":
                long_lived = s
                break
            s.close()
        self.assertIsNotNone(long_lived)
        self.addCleanup(long_lived.close)

        traffic = Traffic(proxy.port("in"))
        self.addCleanup(traffic.stop)
        traffic.wait_served(100)
        dns.set({"app.test": [["A", "127.0.0.2", 1], ["A", "127.0.0.3", 1]]})
        wait_for(lambda: traffic.tags().get(b"3:"), 10, "the added endpoint to serve")
        changed = time.monotonic()
        accepted_by_s1 = s1.accepted
        traffic.wait_served(200)
        # The endpoint that left is picked no more (allow one that was being
        # picked as the set changed).
        self.assertLessEqual(s1.accepted - accepted_by_s1, 1)
        long_lived.sendall(b"still\n")
        self.assertEqual(long_lived.recv(100), b"1:still\n")
        # Back to one endpoint, then two again.
        dns.set({"app.test": [["A", "127.0.0.2", 1]]})
        wait_for(lambda: proxy.metric_value("balancer_endpoints", service="app",
                                            state="ready") == 1, 10, "one endpoint")
        traffic.wait_served(100)
        dns.set({"app.test": [["A", "127.0.0.1", 1], ["A", "127.0.0.3", 1]]})
        wait_for(lambda: proxy.metric_value("balancer_endpoints", service="app",
                                            state="ready") == 2, 10, "two endpoints")
        traffic.wait_served(100)
        traffic.stop()
        print(f"\nDNS changes: {len(traffic.served)} connections, served by "
              f"{dict(traffic.tags())}, after the first change {dict(traffic.tags(changed))}, "
              f"failures {len(traffic.failures)}")
        self.assertEqual(traffic.failures, [])
        self.assertTrue({b"1:", b"2:", b"3:"} <= set(traffic.tags()))
        self.assertTrue(s2.accepted and s3.accepted)


class KilledEndpointTests(SynchronousTestCase):

    def run_kill(self, services_extra: dict) -> tuple[Traffic, ProxyProcess, TaggedServer]:
        servers = [TaggedServer(self, b"%d:" % i) for i in range(3)]
        proxy = ProxyProcess(self, listener_config(
            {"app": {"endpoints": [s.address for s in servers], **services_extra}}))
        traffic = Traffic(proxy.port("in"))
        self.addCleanup(traffic.stop)
        traffic.wait_served(200)
        victim = servers[1]
        # Killed between two connections: a connection in flight to the
        # victim at that moment would be cut after its connect succeeded (no
        # retry can save it, and a connect the victim's backlog had taken
        # would even count as a success for failure accrual). Every failure
        # below is then a connect the dead endpoint refused.
        traffic.pause()
        victim.kill()
        self.killed_at = time.monotonic()
        traffic.resume()
        traffic.wait_served(600, timeout=30)
        traffic.stop()
        return traffic, proxy, victim

    def test_killed_endpoint_with_connect_retries(self):
        """Connects refused by the dead endpoint are retried on another: no
        client sees a failure; the endpoint is ejected after 7 failures."""
        traffic, proxy, victim = self.run_kill({})
        refused = proxy.metric_value("endpoint_connect_errors_total",
                                     target_addr=victim.address)
        ejections = proxy.metric_value("endpoint_ejections_total", target_addr=victim.address)
        print(f"\nkilled endpoint, connect retries on: {len(traffic.served)} connections, "
              f"{len(traffic.failures)} failed; {refused:.0f} connects refused by the dead "
              f"endpoint, ejected {ejections:.0f} times")
        self.assertEqual(traffic.failures, [])
        self.assertGreaterEqual(ejections, 1)
        self.assertEqual(proxy.metric_value("balancer_endpoints", service="app",
                                            state="ready"), 2)
        # 7 to eject, then one probe per backoff (1 s, 2 s, 4 s, ... with jitter).
        elapsed = time.monotonic() - self.killed_at
        self.assertLessEqual(refused, 7 + max(1, int(elapsed).bit_length() + 1))

    def test_killed_endpoint_without_retries(self):
        """No retry budget: failures are bounded by the accrual threshold,
        then only the probes (one per backoff) fail."""
        traffic, proxy, victim = self.run_kill(
            {"retry_budget_ratio": 0, "retry_budget_min_per_second": 0})
        ejections = proxy.metric_value("endpoint_ejections_total", target_addr=victim.address)
        refused = proxy.metric_value("endpoint_connect_errors_total",
                                     target_addr=victim.address)
        print(f"\nkilled endpoint, no retries: {len(traffic.served)} connections, "
              f"{len(traffic.failures)} failed (7 before the ejection, the rest probes), "
              f"ejected {ejections:.0f} times")
        self.assertGreaterEqual(ejections, 1)
        # Each failure is a connect the dead endpoint refused; the first 7
        # eject it, every later one is a probe, and each probe that fails is
        # one more ejection.
        self.assertEqual(len(traffic.failures), refused)
        self.assertEqual(len(traffic.failures), 7 + ejections - 1)
        # One probe per backoff (at least 1 s, 2 s, 4 s, ...): probe k comes
        # 2**k - 1 s or more after the first ejection.
        elapsed = time.monotonic() - self.killed_at
        self.assertLessEqual(ejections, (int(elapsed) + 1).bit_length())


class ReloadTests(SynchronousTestCase):

    def test_sighup_good_and_bad_config_under_traffic(self):
        a, b = TaggedServer(self, b"a:"), TaggedServer(self, b"b:")
        proxy = ProxyProcess(self, listener_config({"app": {"endpoints": [a.address]}}))
        port = proxy.port("in")
        traffic = Traffic(port)
        self.addCleanup(traffic.stop)
        long_lived = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(long_lived.close)
        long_lived.sendall(b"x\n")
        self.assertEqual(long_lived.recv(100), b"a:x\n")
        traffic.wait_served(100)

        # A good config: the service moves to b, a second listener appears.
        with open(proxy.config_path, "w") as f:
            f.write(build_config(
                [{"name": "in", "service": "app", "opaque": True},
                 {"name": "second", "service": "app", "opaque": True}],
                {"app": {"endpoints": [b.address]}}, proxy={"log_connections": False}))
        proxy.send_signal(signal.SIGHUP)
        wait_for(lambda: proxy.metric_value("config_reload_total", result="success") == 1,
                 10, "the reload")
        reloaded = time.monotonic()
        traffic.wait_served(100)
        # Every connection opened once the reload was seen done goes to b
        # (by when a connection was opened, not when it was answered: one
        # opened before and answered after, later on a loaded machine, is a's).
        self.assertEqual(set(traffic.tags(reloaded)), {b"b:"})
        proxy.wait_started()
        second = socket.create_connection(("127.0.0.1", proxy.port("second")), timeout=5)
        second.sendall(b"y\n")
        self.assertEqual(second.recv(100), b"b:y\n")
        second.close()
        long_lived.sendall(b"z\n")
        self.assertEqual(long_lived.recv(100), b"a:z\n")  # not cut

        # A bad config: logged as at start, the running one stays.
        with open(proxy.config_path, "w") as f:
            f.write('[service.app]\nendpoints = ["nope"]\n')
        proxy.send_signal(signal.SIGHUP)
        wait_for(lambda: proxy.metric_value("config_reload_total", result="failure") == 1,
                 10, "the failed reload")
        proxy.wait_log(r"l5dproxy\.toml: service\.app\.endpoints\[0\]: 'nope': expected "
                       r"host:port")
        traffic.wait_served(100)
        traffic.stop()
        print(f"\nSIGHUP under traffic: {len(traffic.served)} connections, "
              f"{len(traffic.failures)} failed")
        self.assertEqual(traffic.failures, [])
        self.assertEqual(port, proxy.port("in"))
        self.assertTrue(proxy.running())


# -- HTTP ------------------------------------------------------------------------


class Backend:
    """An HTTP/1.1 server answering ``GET`` with its tag in ``x-backend``,
    after ``delay`` seconds; ``status`` (a callable) picks each status."""

    def __init__(self, testcase, tag: str, delay: float = 0.0, status=lambda: 200) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                if backend.dead:  # killed: reset, no response
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                                   b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    return
                backend.requests += 1
                time.sleep(backend.delay)
                body = tag.encode()
                self.send_response(backend.status())
                self.send_header("x-backend", tag)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.delay = delay
        self.status = status
        self.requests = 0
        self.dead = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # resets are expected
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        testcase.addCleanup(self.kill)

    def kill(self) -> None:
        """Refuse new connections and reset the open ones at their next request."""
        self.dead = True
        self.server.shutdown()
        self.server.server_close()


class HttpLoad:
    """``threads`` clients, each sending GETs on one keep-alive connection."""

    def __init__(self, port: int, threads: int = 4) -> None:
        self.port = port
        self.results: list[tuple[float, int, str, str]] = []  # (time, status, backend, error)
        self.running = True
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self.threads:
            t.start()

    def _run(self) -> None:
        import http.client

        conn = None
        while self.running:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                conn.request("GET", "/", headers={"host": "app"})
                r = conn.getresponse()
                r.read()
                self.results.append((time.monotonic(), r.status, r.getheader("x-backend") or "",
                                     r.getheader("l5d-proxy-error") or ""))
                if r.getheader("connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException) as e:
                self.results.append((time.monotonic(), 0, "", repr(e)))
                conn.close()
                conn = None

    def stop(self) -> None:
        self.running = False
        for t in self.threads:
            t.join(15)

    def wait(self, n: int, timeout: float = 30.0) -> None:
        start = len(self.results)
        wait_for(lambda: len(self.results) >= start + n, timeout, f"{n} more responses")

    def failures(self) -> list:
        return [r for r in self.results if r[1] != 200]


def http_config(endpoints: list[str], **service) -> str:
    return build_config([{"name": "in", "service": "app"}],
                        {"app": {"endpoints": endpoints, "protocol": "http1", **service}},
                        proxy={"log_connections": False})


class HttpServicesTests(SynchronousTestCase):

    def test_slow_endpoint_gets_a_small_share(self):
        backends = [Backend(self, f"fast{i}", 0.010) for i in range(3)]
        backends.append(Backend(self, "slow", 0.100))
        proxy = ProxyProcess(self, http_config([b.address for b in backends]))
        load = HttpLoad(proxy.port("in"), threads=4)
        self.addCleanup(load.stop)
        load.wait(2000, timeout=60)
        load.stop()
        share = Counter(r[2] for r in load.results)
        slow = share["slow"] / len(load.results)
        print(f"\nHTTP, one endpoint 10x slower (100 ms vs 10 ms), 4 clients: slow share "
              f"{slow:.1%} of {len(load.results)} requests ({dict(share)})")
        self.assertEqual(load.failures(), [])
        self.assertLess(slow, 0.12)  # 25% if it were round robin; ~1-7% seen (load-dependent)

    def test_retries_hide_a_flaky_endpoint(self):
        import itertools
        flips = itertools.cycle([503, 200, 200, 200])
        flaky = Backend(self, "flaky", status=lambda: next(flips))
        good = Backend(self, "good")
        proxy = ProxyProcess(self, http_config([flaky.address, good.address]))
        load = HttpLoad(proxy.port("in"), threads=2)
        self.addCleanup(load.stop)
        load.wait(500)
        load.stop()
        retries = proxy.metric_value("retry_requests_total", service="app")
        print(f"\nHTTP, an endpoint answering 503 to one request in 4: {len(load.results)} "
              f"requests, {len(load.failures())} failed, {retries:.0f} retries")
        self.assertEqual(load.failures(), [])
        self.assertGreater(retries, 0)

    def test_retries_stop_at_the_budget(self):
        """Every endpoint fails: retries stay within the budget (0.2 of the
        requests plus 10/s over 10 s), they never multiply the load."""
        backends = [Backend(self, f"b{i}", status=lambda: 503) for i in range(2)]
        config = http_config([b.address for b in backends], retry_budget_min_per_second=1)
        # Without accrual: with it, both would be ejected and answered 503 at once.
        config += "\n[service.app.failure_accrual]\nconsecutive_failures = 0\n"
        proxy = ProxyProcess(self, config)
        load = HttpLoad(proxy.port("in"), threads=2)
        self.addCleanup(load.stop)
        load.wait(400)
        load.stop()
        n = len(load.results)
        retries = proxy.metric_value("retry_requests_total", service="app")
        overflow = proxy.metric_value("retry_overflow_total", service="app")
        print(f"\nHTTP, every endpoint answering 503: {n} requests, {retries:.0f} retries, "
              f"{overflow:.0f} refused by the budget")
        self.assertLessEqual(retries, 0.2 * n + 10 + 2)
        self.assertGreater(overflow, 0)

    def test_killed_http_endpoint(self):
        backends = [Backend(self, f"b{i}") for i in range(3)]
        proxy = ProxyProcess(self, http_config([b.address for b in backends]))
        load = HttpLoad(proxy.port("in"), threads=4)
        self.addCleanup(load.stop)
        load.wait(300)
        backends[1].kill()
        load.wait(1500, timeout=60)
        load.stop()
        ejections = proxy.metric_value("endpoint_ejections_total",
                                       target_addr=backends[1].address)
        print(f"\nHTTP, one of three endpoints killed mid-run: {len(load.results)} requests, "
              f"{len(load.failures())} failed, ejected {ejections:.0f} times, "
              f"{proxy.metric_value('retry_requests_total', service='app'):.0f} retries")
        self.assertEqual(load.failures(), [])
        self.assertGreaterEqual(ejections, 1)

    def test_response_timeout(self):
        slow = Backend(self, "slow", delay=2.0)
        proxy = ProxyProcess(self, http_config([slow.address], response_timeout=0.3,
                                               retry_limit=0))
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port("in"), timeout=10)
        started = time.monotonic()
        conn.request("GET", "/", headers={"host": "app"})
        r = conn.getresponse()
        r.read()
        elapsed = time.monotonic() - started
        self.assertEqual(r.status, 504)
        self.assertRegex(r.getheader("l5d-proxy-error"),
                         r"^service app: 127\.0\.0\.1:\d+: response timeout$")
        self.assertLess(elapsed, 1.5)
