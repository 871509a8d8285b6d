"""/stats.json: the dashboard's numbers (issue 15 part 1)."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody

from l5dproxy.app.stats import Stats, histogram_quantile
from l5dproxy.telemetry import LATENCY_MS_BUCKETS, Metrics
from tests import test_tap


class QuantileTests(SynchronousTestCase):
    def test_prometheus_interpolation(self):
        # 10 observations in (0, 10], 10 in (10, 20]: the median is the top of
        # the first bucket, p75 half-way through the second.
        buckets = {10.0: 10, 20.0: 20, float("inf"): 20}
        self.assertEqual(histogram_quantile(0.5, buckets), 10.0)
        self.assertEqual(histogram_quantile(0.75, buckets), 15.0)
        self.assertEqual(histogram_quantile(0.25, buckets), 5.0)
        self.assertIsNone(histogram_quantile(0.5, {10.0: 0, float("inf"): 0}))
        self.assertIsNone(histogram_quantile(0.5, {}))
        # Past the last finite bound: that bound, as Prometheus answers.
        self.assertEqual(histogram_quantile(0.99, {10.0: 1, float("inf"): 100}), 10.0)

    @settings(max_examples=200, derandomize=True, deadline=None)
    @given(st.lists(st.floats(0.01, 60000), min_size=1, max_size=200),
           st.sampled_from([0.5, 0.95, 0.99]))
    def test_within_the_bucket_of_the_true_quantile(self, values, q):
        """The estimate lies in the bucket that holds the exact quantile
        (the ceil(q * n)-th smallest value)."""
        bounds = [*map(float, LATENCY_MS_BUCKETS), float("inf")]
        cumulative = {b: sum(1 for v in values if v <= b) for b in bounds}
        estimate = histogram_quantile(q, cumulative)
        exact = sorted(values)[math.ceil(q * len(values)) - 1]
        i = next(i for i, b in enumerate(bounds) if exact <= b)
        lower = bounds[i - 1] if i else 0.0
        upper = bounds[i] if i < len(bounds) - 1 else bounds[-2]
        self.assertGreaterEqual(estimate, lower)
        self.assertLessEqual(estimate, upper)

    def test_window(self):
        """Rates and quantiles cover the calls of the last WINDOW seconds."""
        metrics = Metrics()
        clock = Clock()
        clock.advance(1000)
        stats = Stats(metrics.registry, clock, dict, lambda: [("in", "x:1", "app")])
        labels = ("inbound", "in", "app", "a", "http1", "no_identity", "", "no_tls_from_remote")
        requests = metrics.request_total.labels(*labels)
        ok = metrics.response_total.labels(*labels, "200", "", "success", "")
        bad = metrics.response_total.labels(*labels, "502", "", "failure", "refused")
        latency = metrics.response_latency_ms.labels(*labels, "200")
        requests.inc(10)
        ok.inc(10)
        for _ in range(10):
            latency.observe(3000)
        clock.advance(5)
        (first,) = stats.snapshot()["listeners"]
        self.assertEqual((first["requests_total"], first["requests_per_second"],
                          first["success_rate"]), (10, 2.0, 1.0))
        self.assertEqual(first["latency_ms"]["p50"], 2500.0)   # within (2000, 3000]
        requests.inc(20)
        bad.inc(10)
        ok.inc(10)
        for _ in range(20):
            latency.observe(4.5)
        clock.advance(2)
        (second,) = stats.snapshot()["listeners"]
        self.assertEqual(second["requests_total"], 30)
        # Against the first call: 20 requests in 2 s, half of them failed,
        # all fast; the slow ones before are out of the window.
        self.assertEqual((second["requests_per_second"], second["success_rate"]), (10.0, 0.5))
        self.assertEqual(second["latency_ms"]["p99"], 4.99)


class StatsJsonTests(TestCase):
    setUp = test_tap.TapTests.setUp
    send = test_tap.TapTests.send

    @defer.inlineCallbacks
    def get(self):
        response = yield Agent(reactor).request(
            b"GET", f"http://127.0.0.1:{self.admin}/stats.json".encode())
        body = yield readBody(response)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        return json.loads(body)

    @defer.inlineCallbacks
    def test_shape_and_counts(self):
        import l5dproxy

        for path in ("/a", "/b", "/fail"):
            yield self.send(path)
        stats = yield self.get()
        self.assertEqual(stats["version"], l5dproxy.__version__)
        (listener,) = stats["listeners"]
        self.assertEqual(listener["name"], "in")
        self.assertEqual(listener["address"], f"127.0.0.1:{self.service.port_of('in')}")
        self.assertEqual(listener["service"], "app")
        self.assertEqual(listener["detect"], {"http1": 3})
        self.assertEqual(listener["requests_total"], 3)
        (service,) = stats["services"]
        self.assertEqual(service["name"], "app")
        self.assertEqual(service["requests_total"], 3)
        self.assertAlmostEqual(service["success_rate"], 2 / 3, places=3)
        self.assertGreater(service["requests_per_second"], 0)
        for q in ("p50", "p95", "p99"):
            self.assertGreater(service["latency_ms"][q], 0)
        (endpoint,) = service["endpoints"]
        self.assertEqual(set(endpoint), {"address", "state", "ewma_ms", "in_flight", "weight",
                                         "ejections"})
        self.assertEqual((endpoint["state"], endpoint["in_flight"]), ("ready", 0))
        self.assertEqual(stats["opaque"], [])

    @defer.inlineCallbacks
    def test_ejected_endpoint(self):
        endpoint = self.service.backends["app"].endpoints[0]
        for _ in range(self.service.backends["app"].config.failure_accrual
                       .consecutive_failures):
            endpoint.begin()
            endpoint.end(None, False)
        stats = yield self.get()
        (e,) = stats["services"][0]["endpoints"]
        self.assertEqual((e["state"], e["ejections"]), ("ejected", 1))
