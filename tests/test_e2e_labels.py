"""Values a client chooses never create unbounded state (issue 18), through
the real ``twistd l5dproxy``.

20,000 HTTP/1 requests on one keep-alive connection, each with a ``Host``
never seen before, and 20,000 h2 streams, each with its own ``:authority``,
to an h2 endpoint (tests/h2backend.py): the proxy's RSS stays within a few
MiB of where it was after warm-up and ``/metrics`` stays the size it was,
while the access log still shows every request's own authority. Before the
fix ``authority`` was a label of ``request_total``, ``response_total`` and
the 26-bucket ``response_latency_ms``: 20,000 Hosts grew the RSS by 209 MiB
and ``/metrics`` from 2.9 KB to 95 MB.
"""

from __future__ import annotations

import os
import re
import sys

import httptools
from h2.events import StreamEnded
from twisted.trial.unittest import TestCase

from tests.support import ProxyProcess, build_config, connect
from tests.test_e2e_h2 import H2SocketClient, rss_kib, start_h2_backend

#: Requests with distinct authorities per protocol, and per batch on the wire.
REQUESTS = int(os.environ.get("L5DPROXY_TEST_DISTINCT_AUTHORITIES", "20000"))
BATCH = 100
WARM_UP = 2000


def host(protocol: str, n: int) -> bytes:
    return b"%s%d.example" % (protocol.encode(), n)


class _Responses:
    """Counts the complete HTTP/1 responses read (httptools' parser, pipelined)."""

    def __init__(self) -> None:
        self.complete = 0
        self.statuses: set[int] = set()
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.complete += 1
        self.statuses.add(self.parser.get_status_code())


def http1_requests(port: int, first: int, count: int) -> None:
    """``count`` GETs on one keep-alive connection, ``BATCH`` pipelined at a time."""
    sock = connect(port)
    try:
        responses = _Responses()
        for start in range(first, first + count, BATCH):
            n = min(BATCH, first + count - start)
            sock.sendall(b"".join(b"GET /x HTTP/1.1\r\nHost: %s\r\n\r\n" % host("h1", i)
                                  for i in range(start, start + n)))
            want = responses.complete + n
            while responses.complete < want:
                data = sock.recv(65536)
                if not data:
                    raise AssertionError("the proxy closed the connection")
                responses.parser.feed_data(data)
        if responses.statuses != {200}:
            raise AssertionError(f"statuses {responses.statuses}")
    finally:
        sock.close()


def h2_requests(port: int, first: int, count: int) -> None:
    """``count`` streams on one connection, ``BATCH`` at a time, each with its
    own ``:authority``."""
    client = H2SocketClient(port)
    try:
        for start in range(first, first + count, BATCH):
            n = min(BATCH, first + count - start)
            for i in range(start, start + n):
                client.h2.send_headers(
                    client.h2.get_next_available_stream_id(),
                    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x"),
                     (b":authority", host("h2", i))], end_stream=True)
            client.flush()
            ended = 0
            while ended < n:
                for event in client.events():
                    if isinstance(event, StreamEnded):
                        ended += 1
    finally:
        client.close()


class DistinctAuthoritiesTests(TestCase):
    timeout = 600

    def setUp(self) -> None:
        backend_port, _ = start_h2_backend(self)
        config = build_config(
            [{"name": "in", "service": "app", "access_log": True}],
            {"app": {"endpoints": [f"127.0.0.1:{backend_port}"], "protocol": "h2"}},
            proxy={"log_connections": False})
        # A route whose host is the one configured authority label value.
        config = config.replace("access_log = true\n", "access_log = true\n\n"
                                '[[listener.route]]\nhost = "api.example"\nservice = "app"\n',
                                1)
        self.proxy = ProxyProcess(self, config)
        self.port = self.proxy.port("in")

    def check(self, protocol: str, send) -> None:
        proxy = self.proxy
        pid = proxy.process.pid
        send(self.port, 0, WARM_UP)
        before_rss = rss_kib(pid)
        before_metrics = len(proxy.metrics_text())
        send(self.port, WARM_UP, REQUESTS)
        after_rss = rss_kib(pid)
        after_metrics = len(proxy.metrics_text())
        print(f"\n{REQUESTS} distinct {protocol} authorities: RSS {before_rss / 1024:.1f} ->"
              f" {after_rss / 1024:.1f} MiB, /metrics {before_metrics} -> {after_metrics}"
              " bytes", file=sys.stderr)
        total = WARM_UP + REQUESTS
        self.assertEqual(proxy.metric_value("request_total", listener="in", authority="other",
                                            protocol="http1" if protocol == "HTTP/1" else "h2"),
                         total)
        self.assertLess((after_rss - before_rss) / 1024, 4)
        self.assertLess(after_metrics, 2 * before_metrics)
        # The access log (per request, no state) has each request's own authority.
        prefix = b"h1" if protocol == "HTTP/1" else b"h2"
        logged = set(re.findall(rf"GET ({prefix.decode()}\d+\.example) /x 200",
                                proxy.log_text()))
        self.assertEqual(len(logged), total)
        self.assertIn(host(prefix.decode(), total - 1).decode(), logged)

    def test_http1_distinct_hosts(self) -> None:
        self.check("HTTP/1", http1_requests)

    def test_h2_distinct_authorities(self) -> None:
        self.check("h2", h2_requests)

    def test_configured_host_is_its_own_label(self) -> None:
        """A request whose Host is a route's host is labelled with it."""
        sock = connect(self.port)
        try:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: API.example:4143\r\n\r\n")
            responses = _Responses()
            while not responses.complete:
                responses.parser.feed_data(sock.recv(65536))
        finally:
            sock.close()
        self.assertEqual(self.proxy.metric_value("request_total", authority="api.example"), 1)


