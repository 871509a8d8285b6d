"""The admin server: /metrics, /ready, /live (and readiness of the service)."""

from __future__ import annotations

import json

from prometheus_client import Counter
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from l5dproxy.app.admin import admin_site
from l5dproxy.app.service import ProxyService
from l5dproxy.config.model import AdminConfig, Config, HostPort, ListenerConfig, ServiceConfig
from l5dproxy.telemetry import Metrics
from tests.support import metric_value, parse_metrics

LISTEN = "tcp:0:interface=127.0.0.1"


class _ServedSite(TestCase):
    """An admin site on a loopback port picked by the kernel, and ``get``."""

    def serve(self, site) -> None:
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.base = f"http://127.0.0.1:{port.getHost().port}"
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def get(self, path: str, method: bytes = b"GET"):
        response = yield self.agent.request(method, (self.base + path).encode())
        body = yield readBody(response)
        return response, body


class AdminSiteTests(_ServedSite):
    def setUp(self) -> None:
        self.metrics = Metrics()
        self.ready = False
        self.serve(admin_site(self.metrics.registry, lambda: self.ready))

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

        from l5dproxy.app.service import StartupError

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


class OperatorEndpointTests(TestCase):
    """The operator's admin endpoints on a running ProxyService (issue 15 part 4)."""

    def setUp(self) -> None:
        from l5dproxy.app import logs
        self.addCleanup(logs.set_level, logs.level())
        config = Config(
            source="/etc/l5dproxy/test.toml", admin=AdminConfig(listen=LISTEN),
            listeners=(ListenerConfig("in", LISTEN, "app"),),
            services={"app": ServiceConfig("app", (HostPort("127.0.0.1", 1),
                                                   HostPort("::1", 2)))},
        )
        self.service = ProxyService(config)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        self.base = f"http://127.0.0.1:{self.service.admin_port.getHost().port}"
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def call(self, path: str, method: bytes = b"GET", body: bytes | None = None,
             headers: dict[bytes, list[bytes]] | None = None):
        from twisted.web.client import FileBodyProducer
        from twisted.web.http_headers import Headers

        producer = FileBodyProducer(__import__("io").BytesIO(body)) if body is not None else None
        response = yield self.agent.request(method, (self.base + path).encode(),
                                            Headers(headers or {}), producer)
        data = yield readBody(response)
        return response, data

    @defer.inlineCallbacks
    def test_index_lists_every_endpoint_and_each_answers(self):
        from l5dproxy.app.admin import ENDPOINTS

        response, body = yield self.call("/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/html; charset=utf-8"])
        paths = [p for p, _, _ in ENDPOINTS]
        for path in ("/metrics", "/ready", "/live", "/opaque", "/dashboard", "/stats.json",
                     "/tap", "/config.json", "/version", "/log-level"):
            self.assertIn(path, paths)
            self.assertIn(f'<a href="{path}">'.encode(), body)
        for path in paths:
            response, _ = yield self.call(path, b"HEAD")
            self.assertIn(response.code, (200, 302), path)
        response, body = yield self.call("/", headers={b"accept": [b"application/json"]})
        self.assertEqual([e["path"] for e in json.loads(body)], paths)

    @defer.inlineCallbacks
    def test_head_is_get_without_body_and_logs_nothing(self):
        """HEAD on every resource: GET's status and headers, no body, and not
        Twisted's 'HEAD request ... is returning a message body' warning."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        for path in ("/", "/metrics", "/ready", "/live", "/version", "/config.json",
                     "/log-level", "/stats.json", "/opaque", "/dashboard/", "/dashboard/app.js",
                     "/tap?limit=0"):
            get, get_body = yield self.call(path)
            head, head_body = yield self.call(path, b"HEAD")
            self.assertEqual(head_body, b"", path)
            self.assertEqual(head.code, get.code, path)
            self.assertEqual(head.headers.getRawHeaders(b"content-type"),
                             get.headers.getRawHeaders(b"content-type"), path)
            if path in ("/", "/live", "/version", "/config.json", "/log-level",
                        "/dashboard/app.js"):
                self.assertEqual(head.headers.getRawHeaders(b"content-length"),
                                 [str(len(get_body)).encode()], path)
        from twisted.logger import formatEvent

        noise = [formatEvent(e) for e in events if "HEAD" in formatEvent(e)]
        self.assertEqual(noise, [])

    @defer.inlineCallbacks
    def test_version_and_build_info_and_process_metrics(self):
        import l5dproxy

        response, body = yield self.call("/version")
        self.assertEqual(response.code, 200)
        info = json.loads(body)
        self.assertEqual(info["version"], l5dproxy.__version__)
        self.assertRegex(info["twisted"], r"^\d+\.\d+")
        _, text = yield self.call("/metrics")
        samples = parse_metrics(text.decode())
        self.assertEqual(metric_value(samples, "build_info", version=l5dproxy.__version__), 1)
        self.assertGreater(metric_value(samples, "process_resident_memory_bytes"), 1 << 20)
        self.assertGreater(metric_value(samples, "process_open_fds"), 2)
        self.assertGreater(metric_value(samples, "process_cpu_seconds_total"), 0)

    @defer.inlineCallbacks
    def test_config_json_is_the_effective_config(self):
        response, body = yield self.call("/config.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        doc = json.loads(body)
        self.assertEqual(doc["source"], "/etc/l5dproxy/test.toml")
        self.assertEqual(doc["services"]["app"]["endpoints"], ["127.0.0.1:1", "[::1]:2"])
        self.assertEqual(doc["services"]["app"]["retry_statuses"], [502, 503, 504])
        self.assertEqual(doc["listeners"][0]["name"], "in")
        self.assertEqual(doc["detect"]["opaque_ports"], sorted(doc["detect"]["opaque_ports"]))
        self.assertEqual(doc["proxy"]["log_level"], "info")
        self.assertEqual(doc["proxy"]["log_format"], "text")

    @defer.inlineCallbacks
    def test_log_level_get_put_post(self):
        from l5dproxy.app import logs
        logs.set_level("info")
        response, body = yield self.call("/log-level")
        self.assertEqual((response.code, body), (200, b"info\n"))
        response, body = yield self.call("/log-level", b"PUT", b"debug\n")
        self.assertEqual((response.code, body), (200, b"debug\n"))
        self.assertEqual(logs.level(), "debug")
        response, body = yield self.call("/log-level", b"POST", b"WARNING")
        self.assertEqual((response.code, body), (200, b"warn\n"))
        response, body = yield self.call("/log-level?level=error", b"PUT", b"")
        self.assertEqual((response.code, body), (200, b"error\n"))
        response, body = yield self.call("/log-level", b"PUT", b"loud")
        self.assertEqual(response.code, 400)
        self.assertIn(b"expected one of debug, info, warn, error, critical", body)
        self.assertEqual(logs.level(), "error")
        response, _ = yield self.call("/log-level", b"DELETE")
        self.assertIn(response.code, (405, 501))   # Twisted: not allowed / not implemented

    @defer.inlineCallbacks
    def test_dashboard_files(self):
        import re

        response, _ = yield self.call("/dashboard")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/dashboard/"])
        response, page = yield self.call("/dashboard/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"),
                         [b"text/html; charset=utf-8"])
        linked = re.findall(rb'(?:src|href)="([a-z.]+)"', page)
        self.assertEqual(sorted(linked), [b"app.js", b"style.css"])
        self.assertNotIn(b"http://", page)
        self.assertNotIn(b"https://", page)   # no CDN
        for name, kind in ((b"app.js", b"text/javascript"), (b"style.css", b"text/css")):
            response, body = yield self.call("/dashboard/" + name.decode())
            self.assertEqual(response.code, 200)
            self.assertTrue(response.headers.getRawHeaders(b"content-type")[0].startswith(kind))
            self.assertGreater(len(body), 100)
        response, _ = yield self.call("/dashboard/nope.js")
        self.assertEqual(response.code, 404)


class GatheredAdminTests(_ServedSite):
    """admin_site with ``gather`` (worker 0 of --workers N): /metrics and
    /stats.json answer when the group's families arrive; ``?local`` at once
    from this process; HEAD as GET without the body."""

    def setUp(self) -> None:
        from prometheus_client.core import CounterMetricFamily
        from twisted.internet.task import Clock

        from l5dproxy.app.stats import Stats

        self.metrics = Metrics()
        self.metrics.request_total.labels("inbound", "in", "app", "a", "http1", "", "",
                                          "").inc(2)
        group = CounterMetricFamily("request", "HTTP requests received",
                                    labels=("listener", "service"))
        group.add_metric(("in", "app"), 7)
        self.group = [group]
        self.gathered = 0

        def gather() -> defer.Deferred:
            self.gathered += 1
            return deferLater(reactor, 0, lambda: self.group)  # later, as over the wire

        stats = Stats(self.metrics.registry, Clock(), dict,
                      lambda: [("in", "127.0.0.1:4143", "app")])
        self.serve(admin_site(self.metrics.registry, lambda: True, stats=stats,
                              gather=gather))

    @defer.inlineCallbacks
    def test_metrics_are_the_groups(self):
        response, body = yield self.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.gathered, 1)
        self.assertEqual(body, b'# HELP request_total HTTP requests received\n'
                               b'# TYPE request_total counter\n'
                               b'request_total{listener="in",service="app"} 7.0\n')

    @defer.inlineCallbacks
    def test_local_is_this_process(self):
        response, body = yield self.get("/metrics?local")
        self.assertEqual(response.code, 200)
        self.assertEqual(metric_value(parse_metrics(body.decode()), "request_total"), 2)
        self.assertEqual(self.gathered, 0)

    @defer.inlineCallbacks
    def test_stats_json_reads_the_group(self):
        response, body = yield self.get("/stats.json")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["listeners"][0]["requests_total"], 7)
        _, body = yield self.get("/stats.json?local")
        self.assertEqual(json.loads(body)["listeners"][0]["requests_total"], 2)

    @defer.inlineCallbacks
    def test_head(self):
        _, body = yield self.get("/metrics")
        response, empty = yield self.get("/metrics", method=b"HEAD")
        self.assertEqual((response.code, empty), (200, b""))
        self.assertEqual(response.headers.getRawHeaders(b"content-length"),
                         [str(len(body)).encode()])

    @defer.inlineCallbacks
    def test_metrics_as_json(self):
        from l5dproxy.telemetry import families_from_json
        response, body = yield self.get("/metrics?format=json")
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        [family] = families_from_json(body)
        self.assertEqual([(s.name, s.value) for s in family.samples], [("request_total", 7)])
        _, body = yield self.get("/metrics?local&format=json")
        samples = [s for f in families_from_json(body) for s in f.samples
                   if s.name == "request_total"]
        self.assertEqual([s.value for s in samples], [2])
        self.assertEqual(self.gathered, 1)
