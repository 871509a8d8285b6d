"""The HTTP dispatcher: routing, endpoint choice, error mapping, metrics, timeouts."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.app.sites import http_site
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import HostPort, ListenerConfig, RouteConfig, ServiceConfig
from l5dproxy.exchange.contracts import RequestContext
from l5dproxy.exchange.message import (
    Body,
    ProxyError,
    Request,
    RequestHead,
    Response,
    ResponseHead,
    as_proxy_error,
)
from l5dproxy.route import dispatcher
from l5dproxy.route.dispatcher import HttpProxy
from l5dproxy.route.labels import MAX_CACHED_CHILDREN, NO_TLS
from l5dproxy.telemetry import Metrics
from tests.fakes import FakeClient, FakeConnection, FakeListener, dispatch


def sample(registry: CollectorRegistry, name: str, **labels) -> float | None:
    return registry.get_sample_value(name, labels)


def service(name, *endpoints, **kw) -> ServiceConfig:
    kw.setdefault("retry_limit", 0)  # retries: tests/test_retry.py
    return ServiceConfig(name, tuple(HostPort("127.0.0.1", p) for p in endpoints), **kw)


class DispatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.services = {
            "app": service("app", 8080),
            "api": service("api", 9090, protocol="h2"),
            "empty": service("empty"),
            "slow": service("slow", 7070, response_timeout=2.0)
            if "response_timeout" in ServiceConfig.__dataclass_fields__ else service("slow", 7070),
        }
        self.backends = {n: BackendSet(c, frozenset()) for n, c in self.services.items()}
        self.h1 = FakeClient()
        self.h2 = FakeClient()
        self.proxy = HttpProxy(self.backends, self.metrics, self.clock,
                               {"http1": self.h1, "h2": self.h2})
        self.listener = FakeListener(config=ListenerConfig(
            "in", "tcp:0", "app", routes=(
                RouteConfig("api", host="api.example"),
                RouteConfig("empty", path_prefix="/empty"),
                RouteConfig("slow", host="slow.example", path_prefix="/s"),
            )))

    def dispatch(self, authority=b"web.example", target=b"/", method=b"GET", headers=()):
        request = Request(RequestHead(method, target, authority, list(headers)), Body.empty())
        context = RequestContext(http_site(self.listener), FakeConnection(), "http1")
        return request, dispatch(self.proxy, request, context)

    def value(self, name, **labels):
        base = {"direction": "inbound", "listener": "in", "protocol": "http1",
                "tls": "no_identity", "client_id": "", "no_tls_reason": "no_tls_from_remote"}
        return sample(self.metrics.registry, name, **{**base, **labels})

    def test_default_service(self) -> None:
        request, _d = self.dispatch()
        [(endpoint, sent, _, _)] = self.h1.calls
        self.assertIs(sent, request)
        self.assertEqual(endpoint.address, HostPort("127.0.0.1", 8080))
        self.assertEqual(endpoint.active, 1)

    def test_underscore_field_names_dropped_and_counted(self) -> None:
        fields = [(b"Transfer_Encoding", b"chunked"), (b"x-a", b"1"), (b"Content_Length", b"5"),
                  (b"_", b"x"), (b"X-A", b"2"), (b"x_forwarded_for", b"10.0.0.1")]
        self.dispatch(headers=fields)
        [(_, sent, _, _)] = self.h1.calls
        forwarding = [(b"x-forwarded-for", b"192.0.2.10"), (b"x-forwarded-proto", b"http")]
        self.assertEqual(sent.head.headers, [(b"x-a", b"1"), (b"X-A", b"2"), *forwarding])
        self.assertEqual(sample(self.metrics.registry, "http_errors_total",
                                direction="inbound", listener="in",
                                reason="underscore in field name"), 4)
        clean = [(b"x-a", b"1")]
        self.dispatch(headers=clean)
        self.assertEqual(self.h1.calls[1][1].head.headers, [*clean, *forwarding])
        self.assertEqual(sample(self.metrics.registry, "http_errors_total",
                                direction="inbound", listener="in",
                                reason="underscore in field name"), 4)

    def test_route_by_host_ignores_port_and_case(self) -> None:
        self.dispatch(authority=b"API.example:80")
        self.assertEqual(len(self.h2.calls), 1)  # service "api" speaks h2
        self.assertEqual(self.h2.calls[0][0].address.port, 9090)

    def test_route_by_host_and_prefix(self) -> None:
        self.dispatch(authority=b"slow.example", target=b"/other")
        self.dispatch(authority=b"slow.example", target=b"/s/1")
        self.assertEqual([c[0].address.port for c in self.h1.calls], [8080, 7070])

    def test_no_endpoints_is_503(self) -> None:
        _, d = self.dispatch(target=b"/empty/x")
        err = self.failureResultOf(d, ProxyError).value
        self.assertEqual((err.status, err.reason), (503, "no endpoints"))
        self.assertEqual(self.value("response_total", service="empty", authority="other",
                                    status_code="503", grpc_status="",
                                    classification="failure", error="no endpoints"), 1)

    def test_connect_errors_are_mapped(self) -> None:
        cases = [
            (error.ConnectionRefusedError(), 502),
            (error.TimeoutError(), 504),
            (error.ConnectionLost(), 502),
            (ProxyError.timeout("x"), 504),
        ]
        for exc, status in cases:
            _, d = self.dispatch()
            self.h1.calls[-1][2].errback(exc)
            self.assertEqual(self.failureResultOf(d, ProxyError).value.status, status)
        endpoint = self.h1.calls[0][0]
        self.assertEqual(endpoint.active, 0)

    def test_metrics_and_latency(self) -> None:
        _, d = self.dispatch()
        self.clock.advance(0.0035)
        body = Body()
        self.h1.calls[0][2].callback(Response(ResponseHead(200), body))
        response = self.successResultOf(d)
        self.assertIs(response.body, body)
        self.clock.advance(0.010)
        body.write(b"hello")        # first byte: 13.5 ms
        self.clock.advance(1.0)
        body.finish()
        labels = {"service": "app", "authority": "other"}
        self.assertEqual(self.value("request_total", **labels), 1)
        self.assertEqual(self.value("response_total", **labels, status_code="200",
                                    grpc_status="", classification="success", error=""), 1)
        self.assertEqual(self.value("response_latency_ms_bucket", **labels, status_code="200",
                                    le="20.0"), 1)
        self.assertEqual(self.value("response_latency_ms_bucket", **labels, status_code="200",
                                    le="10.0"), 0)
        self.assertEqual(self.h1.calls[0][0].active, 0)

    def test_bodiless_latency_is_at_head(self) -> None:
        _, d = self.dispatch()
        self.clock.advance(0.002)
        self.h1.calls[0][2].callback(Response(ResponseHead(503), Body.empty()))
        self.successResultOf(d)
        labels = {"service": "app", "authority": "other", "status_code": "503"}
        self.assertEqual(self.value("response_latency_ms_bucket", **labels, le="2.0"), 1)
        self.assertEqual(self.value("response_total", **labels, grpc_status="",
                                    classification="failure", error=""), 1)

    def test_body_dies_midway_counts_failure(self) -> None:
        _, _d = self.dispatch()
        body = Body()
        self.h1.calls[0][2].callback(Response(ResponseHead(200), body))
        body.write(b"x")
        body.fail(ConnectionResetError())
        self.assertEqual(self.value("response_total", service="app", authority="other",
                                    status_code="200", grpc_status="",
                                    classification="failure", error="stream"), 1)

    def test_grpc_status_in_trailers(self) -> None:
        _, _d = self.dispatch()
        body = Body()
        self.h1.calls[0][2].callback(Response(ResponseHead(200), body))
        body.finish([(b"grpc-status", b"14")])
        self.assertEqual(self.value("response_total", service="app", authority="other",
                                    status_code="200", grpc_status="14",
                                    classification="failure", error=""), 1)

    def test_cancel_cancels_upstream(self) -> None:
        _, d = self.dispatch()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(self.h1.cancelled, 1)
        self.assertEqual(self.h1.calls[0][0].active, 0)

    def test_response_timeout(self) -> None:
        if "response_timeout" not in ServiceConfig.__dataclass_fields__:
            raise self.skipTest("no response_timeout in ServiceConfig")
        _, d = self.dispatch(authority=b"slow.example", target=b"/s")
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        err = self.failureResultOf(d, ProxyError).value
        self.assertEqual((err.status, err.reason), (504, "response timeout"))
        self.assertEqual(self.h1.cancelled, 1)
        self.assertEqual(self.h1.calls[0][0].active, 0)

    def test_missing_client_is_502(self) -> None:
        del self.proxy.clients["h2"]
        _, d = self.dispatch(authority=b"api.example")
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 502)

    def test_each_send_carries_the_services_target(self) -> None:
        """The client end is handed the routed service's target with every
        attempt (no map keyed by endpoint address): its timeouts and name."""
        self.dispatch()
        self.dispatch(authority=b"slow.example", target=b"/s/1")
        self.assertEqual(self.h1.targets,
                         [self.services["app"].target, self.services["slow"].target])
        self.assertIs(self.h1.targets[0], self.services["app"].target)
        self.assertIs(self.h1.targets[1], self.services["slow"].target)

    def test_unknown_exception_is_502(self) -> None:
        from twisted.python.failure import Failure
        err = as_proxy_error(Failure(RuntimeError("boom")))
        self.assertEqual(err.status, 502)
        self.flushLoggedErrors(RuntimeError)


def series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name`` in the registry."""
    return [sample.labels for metric in registry.collect() for sample in metric.samples
            if sample.name == name]


class LabelBoundTests(SynchronousTestCase):
    """Values a client (or an endpoint) picks never become label values
    (issue 18): ``authority`` is a configured route host or ``other``,
    ``status_code`` a valid status or ``other``, ``grpc_status`` a gRPC code
    or ``other``; so no sequence of requests adds series or label sets."""

    setUp = DispatcherTests.setUp
    dispatch = DispatcherTests.dispatch
    value = DispatcherTests.value

    def answer(self, status: int = 200, trailers=None) -> None:
        body = Body()
        self.h1.calls[-1][2].callback(Response(ResponseHead(status), body))
        body.finish(trailers)

    def test_authority_is_a_configured_host_or_other(self) -> None:
        for authority in (b"API.example:80", b"api.example", b"slow.example:8080",
                          b"web.example", b"random.example:1", b""):
            self.dispatch(authority=authority)
        seen = sorted({labels["authority"]
                       for labels in series(self.metrics.registry, "request_total")})
        self.assertEqual(seen, ["api.example", "other", "slow.example"])
        self.assertEqual(self.value("request_total", service="api", authority="api.example"),
                         2)
        self.assertEqual(self.value("request_total", service="app", authority="other"), 3)

    @settings(max_examples=200, derandomize=True, database=None, deadline=None)
    @given(st.lists(st.binary(max_size=40), min_size=1, max_size=30))
    def test_any_authorities_add_no_label_values(self, authorities) -> None:
        """Whatever authorities clients send, the label values are the
        listener's route hosts plus ``other``, and the label sets cached are
        at most one per (service, value)."""
        for authority in authorities:
            self.dispatch(authority=authority)
        values = {labels["authority"] for labels in series(self.metrics.registry,
                                                           "request_total")}
        self.assertLessEqual(values, {"api.example", "slow.example", "other"})
        self.assertLessEqual(len(self.proxy._labels), 4 * 3)

    def test_label_set_cache_starts_over_past_its_bound(self) -> None:
        """Past ``MAX_CACHED_LABEL_SETS`` (a safety net: the keys come from
        the config, so only reloads add sets) the cache starts over, and the
        counts of the sets it drops are flushed first, not lost."""
        self.patch(dispatcher, "MAX_CACHED_LABEL_SETS", 2)
        for protocol in ("http1", "h2", "grpc"):
            labels = self.proxy.labels("in", "app", "other", protocol)
            labels.requests.inc()
        self.assertLessEqual(len(self.proxy._labels), 2)
        self.assertIn(("in", "app", "other", "grpc", *NO_TLS), self.proxy._labels)
        for protocol in ("http1", "h2", "grpc"):
            self.assertEqual(self.value("request_total", listener="in", service="app",
                                        authority="other", protocol=protocol), 1)

    def test_connections_keep_their_label_sets_across_a_cache_start_over(self) -> None:
        """The dispatcher keeps a connection's last label set with the
        connection; when the proxy's cache starts over (here at every new
        set), what each connection counts afterwards still reaches the
        registry: two connections, each with its own service, taking turns."""
        self.patch(dispatcher, "MAX_CACHED_LABEL_SETS", 1)
        site = http_site(self.listener)
        contexts = [RequestContext(site, FakeConnection(), "http1") for _ in range(2)]
        for _ in range(3):
            for context, authority in zip(contexts, (b"web.example", b"api.example"),
                                          strict=True):
                request = Request(RequestHead(b"GET", b"/", authority, []), Body.empty())
                dispatch(self.proxy, request, context)
        self.assertEqual(self.value("request_total", service="app", authority="other"), 3)
        self.assertEqual(self.value("request_total", service="api", authority="api.example"),
                         3)

    def test_20000_hosts_leave_one_label_set(self) -> None:
        for n in range(20000):
            self.dispatch(authority=b"h%d.example" % n)
            self.answer()
        self.assertEqual(len(self.proxy._labels), 1)
        self.assertEqual(len(series(self.metrics.registry, "request_total")), 1)
        self.assertEqual(self.value("response_total", service="app", authority="other",
                                    status_code="200", grpc_status="",
                                    classification="success", error=""), 20000)

    def test_status_and_grpc_status_labels_are_bounded(self) -> None:
        """An endpoint's status outside 100-599 and any grpc-status that is
        not a gRPC code are ``other``; the cache of children keyed by the
        raw values starts over past ``MAX_CACHED_CHILDREN`` and every
        response is still counted."""
        n = MAX_CACHED_CHILDREN + 50
        for i in range(n):
            self.dispatch()
            self.answer(200, [(b"grpc-status", b"%d" % (1000 + i))])
        self.dispatch()
        self.answer(999)
        self.dispatch()
        self.answer(200, [(b"grpc-status", b"16")])
        [labels] = self.proxy._labels.values()
        self.assertLessEqual(len(labels._responses), MAX_CACHED_CHILDREN)
        statuses = {(s["status_code"], s["grpc_status"])
                    for s in series(self.metrics.registry, "response_total")}
        self.assertEqual(statuses, {("200", "other"), ("other", ""), ("200", "16")})
        self.assertEqual(sum(sample.value for metric in self.metrics.registry.collect()
                             for sample in metric.samples if sample.name == "response_total"
                             and sample.labels["grpc_status"] == "other"), n)
        self.assertEqual({s["status_code"] for s in series(
            self.metrics.registry, "response_latency_ms_count")}, {"200", "other"})


class IsGrpcTests(SynchronousTestCase):
    """RequestHead.is_grpc: the first content-type, application/grpc with any suffix or case."""

    def test_is_grpc(self) -> None:
        for headers, expected in [
            ([], False),
            ([(b"Content-Type", b"application/grpc")], True),
            ([(b"content-type", b"Application/GRPC+proto")], True),
            ([(b"content-type", b"text/plain"), (b"content-type", b"application/grpc")], False),
            ([(b"x-content-typ", b"application/grpc")], False),
            ([(b"content-type", b"application/grp")], False),
        ]:
            self.assertIs(RequestHead(b"POST", b"/", b"a", headers).is_grpc, expected, headers)
