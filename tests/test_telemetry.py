"""Pending (batched) metric increments: every scrape and every close sees them."""

from hypothesis import given, settings
from hypothesis import strategies as st
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


WORKER_0 = """\
# HELP request_total HTTP requests received
# TYPE request_total counter
request_total{listener="in",service="app"} 3.0
# HELP response_latency_ms Request head to first byte of the response body
# TYPE response_latency_ms histogram
response_latency_ms_bucket{le="1.0",service="app"} 1.0
response_latency_ms_bucket{le="10.0",service="app"} 2.0
response_latency_ms_bucket{le="+Inf",service="app"} 3.0
response_latency_ms_sum{service="app"} 120.5
response_latency_ms_count{service="app"} 3.0
# HELP tcp_open_connections Connections currently open
# TYPE tcp_open_connections gauge
tcp_open_connections{peer="src"} 4.0
# HELP tls_certificate_expiry_timestamp_seconds When a loaded TLS certificate expires
# TYPE tls_certificate_expiry_timestamp_seconds gauge
tls_certificate_expiry_timestamp_seconds{name="a"} 2000.0
# HELP build_info The running l5dproxy: always 1
# TYPE build_info gauge
build_info{version="1.0"} 1.0
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1.5
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1000.0
"""

WORKER_1 = """\
# HELP request_total HTTP requests received
# TYPE request_total counter
request_total{listener="in",service="app"} 5.0
request_total{listener="in",service="other"} 2.0
# HELP response_latency_ms Request head to first byte of the response body
# TYPE response_latency_ms histogram
response_latency_ms_bucket{le="1.0",service="app"} 0.0
response_latency_ms_bucket{le="10.0",service="app"} 4.0
response_latency_ms_bucket{le="+Inf",service="app"} 5.0
response_latency_ms_sum{service="app"} 36.25
response_latency_ms_count{service="app"} 5.0
# HELP tcp_open_connections Connections currently open
# TYPE tcp_open_connections gauge
tcp_open_connections{peer="src"} 6.0
# HELP tls_certificate_expiry_timestamp_seconds When a loaded TLS certificate expires
# TYPE tls_certificate_expiry_timestamp_seconds gauge
tls_certificate_expiry_timestamp_seconds{name="a"} 1000.0
# HELP build_info The running l5dproxy: always 1
# TYPE build_info gauge
build_info{version="1.0"} 1.0
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 2.25
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 3000.0
"""

WORKER_2 = """\
# HELP request_total HTTP requests received
# TYPE request_total counter
request_total{listener="in",service="app"} 1.0
# HELP tcp_open_connections Connections currently open
# TYPE tcp_open_connections gauge
tcp_open_connections{peer="src"} 0.0
tcp_open_connections{peer="dst"} 2.0
# HELP endpoint_latency_ewma_ms Peak-EWMA response latency estimate
# TYPE endpoint_latency_ewma_ms gauge
endpoint_latency_ewma_ms{target_addr="10.0.0.1:80"} 7.5
"""

MERGED = """\
# HELP request_total HTTP requests received
# TYPE request_total counter
request_total{listener="in",service="app"} 9.0
request_total{listener="in",service="other"} 2.0
# HELP response_latency_ms Request head to first byte of the response body
# TYPE response_latency_ms histogram
response_latency_ms_bucket{le="1.0",service="app"} 1.0
response_latency_ms_bucket{le="10.0",service="app"} 6.0
response_latency_ms_bucket{le="+Inf",service="app"} 8.0
response_latency_ms_sum{service="app"} 156.75
response_latency_ms_count{service="app"} 8.0
# HELP tcp_open_connections Connections currently open
# TYPE tcp_open_connections gauge
tcp_open_connections{peer="src"} 10.0
tcp_open_connections{peer="dst"} 2.0
# HELP tls_certificate_expiry_timestamp_seconds When a loaded TLS certificate expires
# TYPE tls_certificate_expiry_timestamp_seconds gauge
tls_certificate_expiry_timestamp_seconds{name="a"} 1000.0
# HELP build_info The running l5dproxy: always 1
# TYPE build_info gauge
build_info{version="1.0"} 1.0
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total{worker="0"} 1.5
process_cpu_seconds_total{worker="1"} 2.25
# HELP process_resident_memory_bytes Resident memory size in bytes.
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes{worker="0"} 1000.0
process_resident_memory_bytes{worker="1"} 3000.0
# HELP endpoint_latency_ewma_ms Peak-EWMA response latency estimate
# TYPE endpoint_latency_ewma_ms gauge
endpoint_latency_ewma_ms{target_addr="10.0.0.1:80"} 7.5
"""


class _Families:
    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        return self.families


class MergeTests(SynchronousTestCase):
    """``merge_families``: the workers of --workers N as one process group."""

    def test_canned_expositions(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        from l5dproxy.telemetry import merge_families
        merged = merge_families(
            (str(i), text_string_to_metric_families(text))
            for i, text in enumerate((WORKER_0, WORKER_1, WORKER_2)))
        self.assertEqual(generate_latest(_Families(merged)).decode(), MERGED)

    def test_one_worker_is_itself(self) -> None:
        """A group of one: the same samples, process_* labelled worker 0."""
        from l5dproxy.telemetry import merge_families
        metrics = Metrics()
        metrics.request_total.labels("inbound", "in", "app", "a", "http1", "", "", "").inc(3)
        before = {(s.name, frozenset(s.labels.items())): s.value
                  for f in metrics.registry.collect() for s in f.samples
                  if not s.name.startswith("process_")}
        merged = merge_families([("0", metrics.registry.collect())])
        after = {(s.name, frozenset(s.labels.items())): s.value
                 for f in merged for s in f.samples}
        for key, value in before.items():
            self.assertEqual(after[key], value, key)
        process = [s for f in merged for s in f.samples if s.name.startswith("process_")]
        self.assertTrue(process)
        self.assertTrue(all(s.labels["worker"] == "0" for s in process))

    @settings(max_examples=60, derandomize=True, deadline=None)
    @given(st.lists(st.lists(st.floats(0, 60000, allow_nan=False), max_size=20),
                    min_size=1, max_size=4))
    def test_histograms_merge_as_one(self, observations) -> None:
        """Differential: each worker's histogram and counter, merged, equal
        one process's that saw every observation (through the exposition
        text and back, as the admin gathers them)."""
        from prometheus_client import Counter
        from prometheus_client.parser import text_string_to_metric_families

        from l5dproxy.telemetry import merge_families

        def registry(values):
            r = CollectorRegistry()
            h = Histogram("response_latency_ms", "latency", ("service",),
                          buckets=LATENCY_MS_BUCKETS, registry=r)
            c = Counter("request", "requests", ("service",), registry=r)
            for v in values:
                h.labels("app").observe(v)
                c.labels("app").inc()
            return r

        texts = [generate_latest(registry(values)).decode() for values in observations]
        merged = merge_families((str(i), text_string_to_metric_families(t))
                                for i, t in enumerate(texts))
        whole = registry([v for values in observations for v in values])
        expected = {(s.name, frozenset(s.labels.items())): s.value
                    for f in text_string_to_metric_families(generate_latest(whole).decode())
                    for s in f.samples}
        got = {(s.name, frozenset(s.labels.items())): s.value for f in merged for s in f.samples}
        self.assertEqual(got.keys(), expected.keys())
        for key, value in expected.items():
            self.assertAlmostEqual(got[key], value, places=6, msg=str(key))


class FamiliesJsonTests(SynchronousTestCase):
    """The JSON form worker 0 gathers the other workers' metrics in."""

    def test_round_trip_is_the_same_exposition(self) -> None:
        from l5dproxy.telemetry import families_from_json, families_to_json
        metrics = Metrics()
        metrics.request_total.labels("inbound", "in", "app", "a", "http1", "", "", "").inc(3)
        child = metrics.response_latency_ms.labels("inbound", "in", "app", "a", "http1", "",
                                                   "", "", "200")
        for value in (0.5, 7, 7000, 90000):
            child.observe(value)
        metrics.tcp_side("src", "in", "app", "http1", "127.0.0.1:1").opened()
        families = list(metrics.registry.collect())
        back = families_from_json(families_to_json(families))
        self.assertEqual(generate_latest(_Families(back)), generate_latest(_Families(families)))

    def test_not_families_is_a_value_error(self) -> None:
        from l5dproxy.telemetry import families_from_json
        for data in (b"", b"not json", b"[]", b'{"families": 1}',
                     b'{"families": [{"name": "x"}]}',
                     b'{"families": [{"name": "x", "help": "", "type": "nope", "unit": "",'
                     b' "samples": []}]}',
                     b'{"families": [{"name": "x", "help": "", "type": "gauge", "unit": "",'
                     b' "samples": [["x", [], 1]]}]}',
                     b'{"families": [{"name": "x", "help": "", "type": "gauge", "unit": "",'
                     b' "samples": [["x", {}, "one"]]}]}',
                     b'{"families": [{"name": "x", "help": "", "type": "gauge", "unit": "",'
                     b' "samples": [["x", {}]]}]}'):
            self.assertRaises(ValueError, families_from_json, data)
