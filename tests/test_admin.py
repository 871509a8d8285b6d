"""The admin server: /metrics, /ready, /live (and readiness of the service)."""

from __future__ import annotations

from prometheus_client import Counter
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from l5dproxy.admin import admin_site
from l5dproxy.config import AdminConfig, Config, HostPort, ListenerConfig, ServiceConfig
from l5dproxy.service import ProxyService
from l5dproxy.telemetry import Metrics
from tests.support import metric_value, parse_metrics

LISTEN = "tcp:0:interface=127.0.0.1"


class AdminSiteTests(TestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()
        self.ready = False
        site = admin_site(self.metrics.registry, lambda: self.ready)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def get(self, path: str, method: bytes = b"GET"):
        response = yield self.agent.request(method, (self.base + path).encode())
        body = yield readBody(response)
        return response, body

    @defer.inlineCallbacks
    def test_live(self):
        response, body = yield self.get("/live")
        self.assertEqual((response.code, body), (200, b"live\n"))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/plain; charset=utf-8"])

    @defer.inlineCallbacks
    def test_ready_follows_readiness(self):
        response, body = yield self.get("/ready")
        self.assertEqual(response.code, 503)
        self.ready = True
        response, body = yield self.get("/ready")
        self.assertEqual((response.code, body), (200, b"ready\n"))

    @defer.inlineCallbacks
    def test_live_when_not_ready(self):
        response, _ = yield self.get("/live")
        self.assertEqual(response.code, 200)

    @defer.inlineCallbacks
    def test_metrics(self):
        self.metrics.tcp_side("src", "inbound", "app", "opaque", "127.0.0.1:4143").opened()
        self.metrics.protocol_detect_total.labels("inbound", "http1", "request_line").inc(3)
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        (content_type,) = response.headers.getRawHeaders(b"content-type")
        self.assertTrue(content_type.startswith(b"text/plain; version=0.0.4"), content_type)
        samples = parse_metrics(body.decode())
        self.assertEqual(metric_value(samples, "tcp_open_total", direction="inbound",
                                      peer="src", listener="inbound", service="app",
                                      protocol="opaque", target_addr="127.0.0.1:4143"), 1)
        self.assertEqual(metric_value(samples, "tcp_open_connections", peer="src"), 1)
        self.assertEqual(metric_value(samples, "protocol_detect_total", listener="inbound",
                                      protocol="http1", reason="request_line"), 3)
        self.assertNotIn(b"_created", body, "no *_created series, as Linkerd")

    @defer.inlineCallbacks
    def test_metrics_own_registry(self):
        """The service's registry, not prometheus-client's global one."""
        from prometheus_client import REGISTRY

        global_counter = Counter("l5dproxy_test_global_only", "x", registry=REGISTRY)
        self.addCleanup(REGISTRY.unregister, global_counter)
        _, body = yield self.get("/metrics")
        self.assertNotIn(b"l5dproxy_test_global_only", body)
        self.assertNotIn(b"python_gc", body)

    @defer.inlineCallbacks
    def test_head(self):
        response, body = yield self.get("/ready", b"HEAD")
        self.assertEqual((response.code, body), (503, b""))

    @defer.inlineCallbacks
    def test_unknown_path(self):
        response, _ = yield self.get("/nope")
        self.assertEqual(response.code, 404)


class ServiceReadinessTests(TestCase):
    """/ready is 503 until every listener is bound, and again while stopping."""

    def make_service(self) -> ProxyService:
        config = Config(
            source="test", admin=AdminConfig(listen=LISTEN),
            listeners=(ListenerConfig("a", LISTEN, "app"), ListenerConfig("b", LISTEN, "app")),
            services={"app": ServiceConfig("app", (HostPort("127.0.0.1", 1),))},
        )
        return ProxyService(config)

    @defer.inlineCallbacks
    def test_ready_after_bind(self):
        service = self.make_service()
        self.assertFalse(service.ready)
        service.privilegedStartService()
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        self.assertTrue(service.ready)
        self.assertEqual(set(service.ports), {"a", "b"})
        self.assertNotEqual(service.port_of("a"), service.port_of("b"))
        port = service.admin_port.getHost().port
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{port}/ready".encode())
        body = yield readBody(response)
        self.assertEqual((response.code, body), (200, b"ready\n"))
        yield service.stopService()
        self.assertFalse(service.ready)
        self.assertEqual(service.ports, {})
        self.assertIsNone(service.admin_port)

    def test_bind_failure_binds_nothing(self):
        """A listener that cannot bind: one StartupError line, nothing left bound."""
        import socket

        from l5dproxy.service import StartupError

        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        busy = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        config = Config(
            source="test", admin=AdminConfig(listen=LISTEN),
            listeners=(ListenerConfig("ok", LISTEN, "app"),
                       ListenerConfig("busy", busy, "app")),
            services={"app": ServiceConfig("app", (HostPort("127.0.0.1", 1),))},
        )
        service = ProxyService(config)
        with self.assertRaises(StartupError) as cm:
            service.privilegedStartService()
        message = str(cm.exception)
        self.assertEqual(message.count("\n"), 0)
        self.assertIn("listener 'busy'", message)
        self.assertIn("Address already in use", message)
        self.assertEqual(service.ports, {})
        self.assertIsNone(service.admin_port)
        self.assertFalse(service.ready)
