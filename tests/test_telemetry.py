"""Pending (batched) metric increments: every scrape and every close sees them."""

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.exposition import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.telemetry import LATENCY_MS_BUCKETS, Metrics, PendingCount, PendingHistogram

LABELS = ("inbound", "src", "in", "app", "http1", "127.0.0.1:4143")


class PendingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics()

    def value(self, name: str, labels: dict) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)

    def test_tcp_bytes_flushed_at_scrape_and_close(self) -> None:
        side = self.metrics.tcp_side("src", "in", "app", "http1", "127.0.0.1:4143")
        side.opened()
        side.read_pending += 10
        side.write_pending += 7
        side.read_bytes.inc(1)   # direct increments still count
        labels = dict(zip(("direction", "peer", "listener", "service", "protocol",
                           "target_addr"), LABELS, strict=True))
        self.assertEqual(self.value("tcp_read_bytes_total", labels), 11)
        self.assertEqual(self.value("tcp_write_bytes_total", labels), 7)
        side.read_pending += 5
        side.closed("", 0.5)
        self.assertNotIn(side, self.metrics.live_sides)
        # Closed: flushed without a scrape, and no longer tracked.
        self.assertEqual(side.read_bytes._value.get(), 16)
        self.assertEqual(self.value("tcp_read_bytes_total", labels), 16)

    def test_scrape_text_sees_pending(self) -> None:
        child = PendingCount(self.metrics.request_total.labels(
            "inbound", "in", "app", "a", "http1", "true", "web", ""))
        self.metrics.flushers.add(child)
        child.inc()
        child.inc(2)
        self.assertIn(b'request_total{authority="a",client_id="web",direction="inbound",'
                      b'listener="in",no_tls_reason="",protocol="http1",service="app",'
                      b'tls="true"} 3.0',
                      generate_latest(self.metrics.registry))

    def test_histogram_matches_observe(self) -> None:
        values = [0, 0.5, 1, 1.0001, 2, 4.99, 5, 7, 50, 50.5, 999, 1000, 49999, 50000, 60000,
                  1e9]
        registry = CollectorRegistry()
        plain = Histogram("plain", "", buckets=LATENCY_MS_BUCKETS, registry=registry)
        batched = Histogram("batched", "", buckets=LATENCY_MS_BUCKETS, registry=registry)
        pending = PendingHistogram(batched, LATENCY_MS_BUCKETS)
        self.assertFalse(pending.direct)
        for v in values:
            plain.observe(v)
            pending.observe(v)
        pending.flush()
        pending.flush()   # nothing more to add
        for bound in [*LATENCY_MS_BUCKETS, float("inf")]:
            le = {"le": str(float(bound)) if bound != float("inf") else "+Inf"}
            self.assertEqual(registry.get_sample_value("batched_bucket", le),
                             registry.get_sample_value("plain_bucket", le), le)
        self.assertEqual(registry.get_sample_value("batched_sum"),
                         registry.get_sample_value("plain_sum"))
        self.assertEqual(registry.get_sample_value("batched_count"), len(values))

    def test_unknown_histogram_layout_observes_directly(self) -> None:
        class Child:
            def __init__(self) -> None:
                self.seen: list[float] = []

            def observe(self, v: float) -> None:
                self.seen.append(v)

        child = Child()
        pending = PendingHistogram(child, LATENCY_MS_BUCKETS)
        self.assertTrue(pending.direct)
        pending.observe(3.0)
        self.assertEqual(child.seen, [3.0])
