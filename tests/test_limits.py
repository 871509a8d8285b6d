"""Bounded cost per peer (issue 11, items 3 and 5): connection limits,
load shedding, per-endpoint connection bounds, h2 server timeouts.

Unit tests: a ``Clock``/``MemoryReactorClock`` and ``StringTransport``,
no sockets. The loopback tests through the real ``twistd`` are in
``tests/test_e2e_limits.py``.
"""

from __future__ import annotations

import tomllib

from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, RequestReceived
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.accept.listener import ConnectionLimits, Listener
from l5dproxy.app.listeners import build_listener
from l5dproxy.app.sites import http_site
from l5dproxy.balance.backends import BackendSet
from l5dproxy.balance.backends import Endpoint as BalancerEndpoint
from l5dproxy.config.model import (
    DetectConfig,
    FailureAccrualConfig,
    H2Config,
    HostPort,
    ListenerConfig,
    ServiceConfig,
)
from l5dproxy.config.parse import ConfigError, parse
from l5dproxy.detect.sniff import H2_PREFACE, Verdict
from l5dproxy.exchange.contracts import RequestContext
from l5dproxy.exchange.message import (
    Body,
    ProxyError,
    Request,
    RequestHead,
    error_response,
)
from l5dproxy.http.h1 import pool as h1pool
from l5dproxy.http.h1.pool import H1Client
from l5dproxy.http.h2 import pool as h2pool
from l5dproxy.http.h2.server import H2ServerProtocol
from l5dproxy.net.connection import InboundConnection
from l5dproxy.route.dispatcher import HttpProxy
from l5dproxy.telemetry import Metrics
from tests import fakes
from tests.fakes import FakeClient, FakeConnection, FakeListener, H2ClientRig, Transport, site
from tests.test_detect import SwitchableTransport
from tests.test_h2 import ServerHarness, raw_frames

MINIMAL = """
[[listener]]
name = "inbound"
listen = "tcp:4143:interface=127.0.0.1"
service = "app"

[service.app]
endpoints = ["127.0.0.1:8080"]
"""


def errors_of(text: str) -> list[str]:
    try:
        parse(tomllib.loads(text), "f.toml")
    except ConfigError as e:
        return e.errors
    raise AssertionError("the config was accepted")


class LimitConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        c = parse(tomllib.loads(MINIMAL), "f.toml")
        self.assertEqual(c.proxy.max_connections, 20000)
        self.assertEqual(c.listeners[0].max_connections, 0)
        self.assertEqual(c.services["app"].max_pending_requests, 10000)

    def test_set(self) -> None:
        text = MINIMAL.replace('service = "app"\n', 'service = "app"\nmax_connections = 5\n', 1)
        text += "max_pending_requests = 2\n[proxy]\nmax_connections = 0\n"
        c = parse(tomllib.loads(text), "f.toml")
        self.assertEqual((c.proxy.max_connections, c.listeners[0].max_connections,
                          c.services["app"].max_pending_requests), (0, 5, 2))

    def test_bad_values_name_file_and_key(self) -> None:
        text = MINIMAL.replace('service = "app"\n', 'service = "app"\nmax_connections = -1\n', 1)
        text += 'max_pending_requests = "many"\n[proxy]\nmax_connections = 1.5\n'
        self.assertEqual(sorted(errors_of(text)), [
            "f.toml: listener[0].max_connections: must not be negative",
            "f.toml: proxy.max_connections: expected an integer, got a number",
            "f.toml: service.app.max_pending_requests: expected an integer, got a string",
        ])


# -- [proxy] / [[listener]] max_connections ------------------------------------

class Refusing(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        self.proxy_max = 0
        self.all: list[Listener] = []
        self.limits = ConnectionLimits(lambda: self.proxy_max, lambda: self.all)
        self.backends = {"app": BackendSet(
            ServiceConfig("app", (HostPort("127.0.0.1", 8080),)), frozenset())}

    def listener(self, name: str, max_connections: int = 0) -> Listener:
        listener = build_listener(ListenerConfig(name, "tcp:0", "app",
                                                 max_connections=max_connections),
                                  DetectConfig(), self.backends, self.metrics, self.clock,
                                  log_connections=False, limits=self.limits)
        self.all.append(listener)
        return listener

    def accept(self, listener: Listener) -> SwitchableTransport:
        transport = SwitchableTransport()
        protocol = listener.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport

    def refused(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(
            "connection_limit_total", {"listener": name}) or 0.0


class ConnectionLimitTests(Refusing):
    def test_listener_limit_closes_the_connections_past_it(self) -> None:
        listener = self.listener("in", max_connections=3)
        kept = [self.accept(listener) for _ in range(3)]
        closed = [self.accept(listener) for _ in range(2)]
        self.assertEqual([t.disconnecting for t in kept], [False] * 3)
        self.assertEqual([t.disconnecting for t in closed], [True] * 2)
        self.assertEqual([t.value() for t in closed], [b"", b""])
        self.assertEqual(len(listener.connections), 3)
        self.assertEqual(self.refused("in"), 2)

    def test_a_closed_connection_makes_room(self) -> None:
        listener = self.listener("in", max_connections=1)
        first = self.accept(listener)
        self.assertTrue(self.accept(listener).disconnecting)
        first.deliver_lost()
        self.assertFalse(self.accept(listener).disconnecting)
        self.assertEqual(self.refused("in"), 1)

    def test_proxy_limit_counts_every_listener(self) -> None:
        self.proxy_max = 3
        a, b = self.listener("a"), self.listener("b")
        self.accept(a)
        self.accept(a)
        self.accept(b)
        self.assertTrue(self.accept(b).disconnecting)
        self.assertTrue(self.accept(a).disconnecting)
        self.assertEqual((self.refused("a"), self.refused("b")), (1, 1))

    def test_a_reloaded_listener_counts_its_predecessors_connections(self) -> None:
        old = self.listener("in", max_connections=2)
        self.accept(old)
        self.accept(old)
        new = self.listener("in", max_connections=2)   # a reload: same name
        self.assertTrue(self.accept(new).disconnecting)
        self.assertEqual(self.refused("in"), 1)

    def test_zero_means_no_limit(self) -> None:
        listener = self.listener("in")
        transports = [self.accept(listener) for _ in range(50)]
        self.assertFalse(any(t.disconnecting for t in transports))
        self.assertEqual(self.refused("in"), 0)

    def test_log_is_rate_limited(self) -> None:
        from twisted.logger import globalLogPublisher
        seen: list[dict] = []
        observer = seen.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        listener = self.listener("in", max_connections=1)
        self.accept(listener)
        for _ in range(100):
            self.accept(listener)
        self.clock.advance(10)
        self.accept(listener)
        lines = [e for e in seen if e.get("log_namespace") == "l5dproxy.accept.listener"]
        self.assertEqual([e["n"] for e in lines], [1, 100])
        self.assertEqual(self.refused("in"), 101)


# -- per service max_pending_requests -----------------------------------------

class LoadShedTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        self.client = FakeClient()
        self.backends = {"app": BackendSet(ServiceConfig(
            "app", (HostPort("127.0.0.1", 8080),), retry_limit=0, max_pending_requests=2),
            frozenset())}
        self.proxy = HttpProxy(self.backends, self.metrics, self.clock,
                               {"http1": self.client, "h2": self.client})
        self.listener = FakeListener(config=ListenerConfig("in", "tcp:0", "app"))

    def dispatch(self, grpc: bool = False):
        headers = [(b"content-type", b"application/grpc")] if grpc else []
        head = RequestHead(b"POST" if grpc else b"GET", b"/", b"app.test", headers)
        context = RequestContext(http_site(self.listener), FakeConnection(),
                                 "h2" if grpc else "http1")
        return fakes.dispatch(self.proxy, Request(head, Body.empty()), context)

    def shed(self) -> float:
        return self.metrics.registry.get_sample_value(
            "load_shed_total", {"service": "app"}) or 0.0

    def test_past_the_limit_requests_are_shed_at_once(self) -> None:
        self.dispatch()
        self.dispatch()
        d = self.dispatch()
        err = self.failureResultOf(d, ProxyError).value
        self.assertEqual((err.status, err.reason), (503, "service unavailable: load shed"))
        self.assertEqual(len(self.client.calls), 2)   # the third never left
        self.assertEqual(self.shed(), 1)
        self.assertEqual(self.backends["app"].pending, 2)

    def test_grpc_is_answered_unavailable_trailers_only(self) -> None:
        self.dispatch(grpc=True)
        self.dispatch(grpc=True)
        err = self.failureResultOf(self.dispatch(grpc=True), ProxyError).value
        response = error_response(err, grpc=True)
        headers = dict(response.head.headers)
        self.assertEqual(response.head.status, 200)
        self.assertEqual(headers[b"grpc-status"], b"14")
        self.assertEqual(headers[b"l5d-proxy-error"],
                         b"service app: service unavailable: load shed")

    def test_room_comes_back_when_a_response_ends_or_fails_or_is_cancelled(self) -> None:
        from l5dproxy.exchange.message import Response, ResponseHead
        first = self.dispatch()
        second = self.dispatch()
        self.failureResultOf(self.dispatch(), ProxyError)
        # A response whose body is still streaming still counts.
        body = Body()
        self.client.calls[0][2].callback(Response(ResponseHead(200, []), body))
        self.successResultOf(first)
        self.failureResultOf(self.dispatch(), ProxyError)
        body.finish()
        self.assertEqual(self.backends["app"].pending, 1)
        third = self.dispatch()            # the room the first left
        self.failureResultOf(self.dispatch(), ProxyError)
        second.cancel()                    # the client went away
        self.failureResultOf(second, defer.CancelledError)
        third_call = self.client.calls[2][2]
        third_call.errback(ProxyError.bad_gateway("connection refused"))
        self.failureResultOf(third, ProxyError)
        self.assertEqual(self.backends["app"].pending, 0)
        self.assertEqual(self.shed(), 3)

    def test_a_lowered_limit_applies_at_once(self) -> None:
        import dataclasses
        upstream = self.backends["app"]
        self.dispatch()
        upstream.reconfigure(dataclasses.replace(upstream.config, max_pending_requests=1),
                             frozenset())     # what a reload does
        self.failureResultOf(self.dispatch(), ProxyError)

    def test_zero_means_no_limit(self) -> None:
        import dataclasses
        upstream = self.backends["app"]
        upstream.config = dataclasses.replace(upstream.config, max_pending_requests=0)
        for _ in range(20):
            self.dispatch()
        self.assertEqual(len(self.client.calls), 20)
        self.assertEqual(self.shed(), 0)


# -- [h2] max_connections_per_endpoint, the waiting queue ---------------------

class H2PoolTests(H2ClientRig, SynchronousTestCase):
    """The h2 client end's per-endpoint pool against fake h2 servers
    (tests/fakes.py H2ClientRig), on a MemoryReactorClock."""

    settings = H2Config(initial_window_size=65535, connection_window_size=65535,
                          max_connections_per_endpoint=2)

    def dials(self) -> int:
        return len(self.reactor.tcpClients)

    def test_endpoint_that_accepts_no_streams_one_connection_then_503(self) -> None:
        """MAX_CONCURRENT_STREAMS = 0 and one request: one connection (not
        a dial loop), and a 503 naming why at the connect timeout."""
        d = self.send()
        self.connect(max_streams=0)
        for _ in range(100):       # reactor turns: nothing more is dialled
            self.reactor.advance(0.01)
            self.pump()
        self.assertEqual(self.dials(), 1)
        self.assertNoResult(d)
        self.reactor.advance(5.0 - 1.0)     # connect_timeout (5) after the request
        err = self.failureResultOf(d, ProxyError).value
        self.assertEqual((err.status, err.reason),
                         (503, "endpoint 127.0.0.1:9000 accepts no streams"))
        self.assertEqual(self.dials(), 1)
        self.assertEqual(list(self.client.pools[("", "127.0.0.1:9000")].waiting), [])

    def test_settings_that_open_streams_later_place_the_waiting_request(self) -> None:
        d = self.send()
        server, _, _ = self.connect(max_streams=0)
        server.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: 10})
        self.pump()
        server.send_headers(1, [(b":status", b"204")], end_stream=True)
        self.pump()
        self.assertEqual(self.successResultOf(d).head.status, 204)
        self.assertEqual(self.dials(), 1)

    def test_cancelled_waiter_leaves_the_queue_and_nothing_more_is_dialled(self) -> None:
        d = self.send()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        pool = self.client.pools[("", "127.0.0.1:9000")]
        self.assertEqual(list(pool.waiting), [])
        # The connection dialled for it comes up full: no new dial for nobody.
        self.connect(max_streams=0)
        self.reactor.advance(10)
        self.assertEqual(self.dials(), 1)
        # Nothing waits (no request timer); only the idle connection's deadline.
        self.assertEqual([c.func.__name__ for c in self.reactor.getDelayedCalls()],
                         ["_idle_check"])

    def test_connections_bounded_per_endpoint_and_waiters_served_in_order(self) -> None:
        ds = [self.send(RequestHead(b"GET", f"/{i}".encode(), b"svc.test"))
              for i in range(4)]
        first, _, _ = self.connect(max_streams=1)
        self.assertEqual(self.dials(), 2)
        second, _, _ = self.connect(max_streams=1)
        self.reactor.advance(1)
        self.assertEqual(self.dials(), 2)       # the limit: two, both full
        paths = [[dict(e.headers)[b":path"] for e in seen if isinstance(e, RequestReceived)]
                 for seen in self.seen]
        self.assertEqual(paths, [[b"/0"], [b"/1"]])
        first.send_headers(1, [(b":status", b"200")], end_stream=True)
        self.pump(0)
        second.send_headers(1, [(b":status", b"200")], end_stream=True)
        self.pump(1)
        paths = [[dict(e.headers)[b":path"] for e in seen if isinstance(e, RequestReceived)]
                 for seen in self.seen]
        self.assertEqual(paths, [[b"/0", b"/2"], [b"/1", b"/3"]])
        self.assertEqual([d.called for d in ds], [True, True, False, False])

    def test_waiting_past_the_connect_timeout_at_the_limit_is_503(self) -> None:
        self.send()
        self.send()
        d = self.send()
        self.connect(max_streams=1)
        self.connect(max_streams=1)
        self.reactor.advance(5)
        err = self.failureResultOf(d, ProxyError).value
        self.assertEqual((err.status, err.reason),
                         (503, "endpoint 127.0.0.1:9000: connection limit reached"))

    def test_the_waiting_queue_is_bounded(self) -> None:
        self.patch(h2pool, "WAITING_LIMIT", 3)
        ds = [self.send() for _ in range(5)]
        self.assertEqual([d.called for d in ds], [False] * 3 + [True] * 2)
        for d in ds[3:]:
            err = self.failureResultOf(d, ProxyError).value
            self.assertEqual((err.status, err.reason), (
                503, "endpoint 127.0.0.1:9000: connection limit reached (3 requests waiting)"))

    def test_connection_closed_after_settings_without_a_stream_is_not_redialled(self) -> None:
        d = self.send()
        _server, _, protocol = self.connect(max_streams=0)
        protocol.connectionLost(Failure(ConnectionDone()))
        err = self.failureResultOf(d, ProxyError).value
        self.assertEqual((err.status, err.reason),
                         (503, "endpoint 127.0.0.1:9000 accepts no streams"))
        self.assertEqual(self.dials(), 1)

    def test_goaway_before_any_stream_is_not_redialled(self) -> None:
        """An endpoint that answers every connection with SETTINGS and a
        GOAWAY that processed nothing: the request fails, no dial loop."""
        d = self.send()
        server, _, _ = self.connect(max_streams=100)   # the stream starts at once
        server.close_connection(last_stream_id=0)
        self.pump()
        err = self.failureResultOf(d, ProxyError).value
        self.assertEqual((err.status, err.reason),
                         (503, "endpoint 127.0.0.1:9000 accepts no streams"))
        self.assertEqual(self.dials(), 1)

    def test_refusals_count_for_failure_accrual(self) -> None:
        """Through the dispatcher: each request the endpoint cannot take is
        a failure for accrual, and enough of them eject the endpoint."""
        clock = self.reactor
        upstream = BackendSet(ServiceConfig(
            "app", (HostPort("127.0.0.1", 9000),), retry_limit=0,
            failure_accrual=FailureAccrualConfig(consecutive_failures=2)),
            frozenset(), clock=clock)
        proxy = HttpProxy({"app": upstream}, Metrics(), clock, {"h2": self.client})
        listener = FakeListener(config=ListenerConfig("in", "tcp:0", "app"))
        context = RequestContext(http_site(listener), FakeConnection(), "h2")

        def dispatch():
            head = RequestHead(b"GET", b"/", b"app.test")
            return fakes.dispatch(proxy, Request(head, Body.empty()), context)

        d1 = dispatch()
        self.connect(max_streams=0)
        d2 = dispatch()
        clock.advance(5)
        for d in (d1, d2):
            self.assertEqual(self.failureResultOf(d, ProxyError).value.reason,
                             "endpoint 127.0.0.1:9000 accepts no streams")
        [endpoint] = upstream.endpoints
        self.assertEqual((endpoint.state, endpoint.ejections), ("ejected", 1))
        err = self.failureResultOf(dispatch(), ProxyError).value
        self.assertEqual(err.reason, "endpoints ejected")   # not "no endpoints": one is there
        self.assertRegex(err.message, r"^service app: all 1 endpoints ejected by failure "
                                      r"accrual \(next probe in \d+\.\d s\)$")
        self.assertEqual(self.dials(), 1)


# -- [http] max_connections_per_endpoint, the waiting queue -------------------

class H1PoolTests(SynchronousTestCase):
    """The HTTP/1 client end's per-endpoint pool at its connection limit."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.config = ServiceConfig("app", (HostPort("127.0.0.1", 8080),))
        self.client = H1Client(self.reactor, Metrics(), max_connections=2)
        self.endpoint = BalancerEndpoint(HostPort("127.0.0.1", 8080), self.reactor)
        self.conns: list[tuple[object, StringTransport]] = []

    def request(self, path: bytes) -> defer.Deferred:
        return fakes.send(self.client, self.endpoint, Request(
            RequestHead(b"GET", path, b"app.test", []), Body.empty()), self.config.target)

    def accept(self):
        _host, _port, factory, _timeout, _ = self.reactor.tcpClients[len(self.conns)]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.conns.append((protocol, transport))
        return protocol, transport

    def pool(self):
        return self.client.pools[("app", self.endpoint.label)]

    def test_at_its_limit_the_pool_queues_then_serves_in_order(self) -> None:
        ds = [self.request(b"/%d" % i) for i in range(5)]
        self.assertEqual(len(self.reactor.tcpClients), 2)
        (p0, t0), (p1, t1) = self.accept(), self.accept()
        self.assertEqual(len(self.pool().waiting), 3)
        written = []
        for proto, transport in [(p0, t0), (p1, t1), (p0, t0), (p1, t1), (p0, t0)]:
            written.append(transport.value().split(b" ")[1])
            transport.clear()
            proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(written, [b"/0", b"/1", b"/2", b"/3", b"/4"])
        self.assertEqual([self.successResultOf(d).head.status for d in ds], [200] * 5)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(len(self.pool().idle), 2)

    def test_cancelled_waiters_are_dropped_at_once(self) -> None:
        self.request(b"/0")
        self.request(b"/1")
        gone = self.request(b"/gone")
        kept = self.request(b"/kept")
        p0, t0 = self.accept()
        self.accept()
        gone.cancel()
        self.failureResultOf(gone, defer.CancelledError)
        self.assertEqual([c.request.head.target for c in self.pool().waiting], [b"/kept"])
        t0.clear()
        p0.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(t0.value().split(b" ")[1], b"/kept")
        self.assertNoResult(kept)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_waiting_past_the_connect_timeout_is_503(self) -> None:
        self.request(b"/0")
        self.request(b"/1")
        d = self.request(b"/2")
        self.reactor.advance(4.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        err = self.failureResultOf(d, ProxyError).value
        self.assertEqual((err.status, err.reason),
                         (503, "endpoint 127.0.0.1:8080: connection limit reached"))
        self.assertEqual(list(self.pool().waiting), [])

    def test_a_closed_connection_makes_room_for_the_first_waiter(self) -> None:
        d0 = self.request(b"/0")
        self.request(b"/1")
        d = self.request(b"/2")
        p0, _ = self.accept()
        self.accept()
        self.assertEqual(len(self.reactor.tcpClients), 2)   # /2 waits
        p0.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d0, ConnectionDone)
        self.assertEqual(len(self.reactor.tcpClients), 3)   # room for /2
        _, t2 = self.accept()
        self.assertEqual(t2.value().split(b" ")[1], b"/2")
        self.assertNoResult(d)

    def test_a_failed_connect_makes_room(self) -> None:
        from twisted.internet.error import ConnectionRefusedError
        d0 = self.request(b"/0")
        self.request(b"/1")
        self.request(b"/2")
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.failureResultOf(d0, ConnectionRefusedError)
        self.assertEqual(len(self.reactor.tcpClients), 3)
        self.assertEqual(list(self.pool().waiting), [])

    def test_the_waiting_queue_is_bounded(self) -> None:
        self.patch(h1pool, "WAITING_LIMIT", 2)
        ds = [self.request(b"/%d" % i) for i in range(6)]
        self.assertEqual([d.called for d in ds], [False] * 4 + [True] * 2)
        for d in ds[4:]:
            self.assertEqual(self.failureResultOf(d, ProxyError).value.reason,
                             "endpoint 127.0.0.1:8080: connection limit reached"
                             " (2 requests waiting)")

    @settings(max_examples=150, deadline=None, derandomize=True)
    @given(st.lists(st.tuples(st.sampled_from(["request", "respond", "close", "cancel",
                                               "accept", "wait"]),
                              st.integers(0, 7)), max_size=40))
    def test_property_limit_order_and_no_lost_request(self, ops) -> None:
        """Whatever requests, responses, closes, cancels and waits come in:
        never more connections than the limit, waiters served in order, and
        every request answered, waiting, or on a connection."""
        self.setUp()
        requests: list[tuple[bytes, defer.Deferred]] = []
        served: list[bytes] = []
        n = 0
        for op, i in ops:
            live = [(p, t) for p, t in self.conns if not p.closed]
            if op == "request":
                d = self.request(b"/%d" % n)
                d.addErrback(lambda f: None)
                requests.append((b"/%d" % n, d))
                n += 1
            elif op == "accept" and len(self.conns) < len(self.reactor.tcpClients):
                self.accept()
            elif op in ("respond", "close") and live:
                proto, transport = live[i % len(live)]
                if proto.call is None:
                    continue
                served.append(proto.call.request.head.target)
                transport.clear()
                if op == "respond":
                    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                else:
                    proto.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\n"
                                       b"Content-Length: 0\r\n\r\n")
                    proto.connectionLost(Failure(ConnectionDone()))
            elif op == "cancel" and requests:
                requests[i % len(requests)][1].cancel()
            elif op == "wait":
                self.reactor.advance(1.0)
            pool = self.client.pools.get(("app", self.endpoint.label))
            if pool is None:
                continue
            self.assertLessEqual(pool.open, 2)
            self.assertLessEqual(len(self.reactor.tcpClients)
                                 - sum(1 for p, _ in self.conns if p.closed), 2)
            waiting = [c.request.head.target for c in pool.waiting]
            numbers = [int(t[1:]) for t in waiting]
            self.assertEqual(numbers, sorted(numbers))   # a queue, in order
            self.assertTrue(all(not c.done for c in pool.waiting))
        numbers = [int(t[1:]) for t in served]
        self.assertEqual(len(numbers), len(set(numbers)))   # each sent once
        # No request lost: each is answered, waiting, on a connection, or
        # on one being made.
        pool = self.client.pools.get(("app", self.endpoint.label))
        if pool is None:
            return
        somewhere = {c.request.head.target for c in pool.waiting}
        somewhere |= {p.call.request.head.target for p, _ in self.conns
                      if not p.closed and p.call is not None}
        somewhere |= {factory.call.request.head.target
                      for _, _, factory, _, _ in self.reactor.tcpClients[len(self.conns):]}
        for target, d in requests:
            if not d.called:
                self.assertIn(target, somewhere)


# -- [h2] preface_timeout and idle_timeout (server end) -----------------------

class H2ServerTimeoutTests(ServerHarness):
    """The h2 server end's timeouts on a MemoryReactorClock."""

    settings = H2Config(initial_window_size=65535, connection_window_size=65535,
                          preface_timeout=10.0, idle_timeout=60.0)

    def fresh_server(self) -> tuple[H2ServerProtocol, Transport]:
        transport = Transport()
        conn = InboundConnection(self.listener.site, transport, self.clock.seconds(), self.listener)
        conn.detected(Verdict("h2", "preface"))
        server = H2ServerProtocol(conn, self.dispatcher, self.settings, site(conn.listener))
        server.makeConnection(transport)
        return server, transport

    def test_preface_without_settings_is_closed_after_the_timeout(self) -> None:
        server, transport = self.fresh_server()
        server.dataReceived(H2_PREFACE)      # the magic, then nothing
        transport.clear()
        self.clock.advance(9.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        [goaway] = raw_frames(transport.value())
        self.assertIsInstance(goaway, GoAwayFrame)
        self.assertEqual(goaway.error_code, ErrorCodes.SETTINGS_TIMEOUT)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.listener.metrics.registry.get_sample_value(
            "http_errors_total", {"direction": "inbound", "listener": "inbound",
                                  "reason": "h2 preface timeout"}), 1)

    def test_a_partial_settings_frame_does_not_complete_the_preface(self) -> None:
        server, transport = self.fresh_server()
        server.dataReceived(H2_PREFACE + b"\x00\x00\x06\x04\x00")   # 5 of 9 header bytes
        self.clock.advance(10)
        self.assertTrue(transport.disconnecting)

    def test_settings_in_time_keep_the_connection(self) -> None:
        self.clock.advance(30)        # the harness's client sent its SETTINGS at once
        self.assertFalse(self.transport.disconnecting)

    def test_idle_connection_gets_goaway_and_is_closed(self) -> None:
        sid = self.request()
        self.respond(0)
        self.flush()
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        events = self.flush()
        [goaway] = self.of(ConnectionTerminated, events)
        self.assertEqual((goaway.error_code, goaway.last_stream_id), (ErrorCodes.NO_ERROR, sid))
        self.assertTrue(self.transport.disconnecting)

    def test_open_streams_keep_the_connection_and_idleness_counts_from_the_last(self) -> None:
        self.request()
        self.clock.advance(200)     # a long request: not idle
        self.assertFalse(self.transport.disconnecting)
        self.respond(0)
        self.flush()
        self.clock.advance(59)      # idle for 59 s since its end
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_zero_turns_both_off(self) -> None:
        self.settings = H2Config(preface_timeout=0, idle_timeout=0)
        server, transport = self.fresh_server()
        server.dataReceived(H2_PREFACE)
        self.clock.advance(10_000)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])
