"""Metrics, named and labelled as Linkerd's proxy names them, so Linkerd
dashboards and alerts carry over.

The registry belongs to the running service, never prometheus-client's global
one, so tests (and a reload) get a clean slate. Labelled children are looked
up once per connection or request target and kept: a label lookup per read or
per request would be the most expensive thing on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

# Linkerd exports no *_created series; they only double the scrape size.
disable_created_metrics()

DIRECTION = "inbound"

#: Linkerd's response_latency_ms buckets.
LATENCY_MS_BUCKETS = (
    1, 2, 3, 4, 5, 10, 20, 30, 40, 50, 100, 200, 300, 400, 500,
    1000, 2000, 3000, 4000, 5000, 10000, 20000, 30000, 40000, 50000,
)
DETECT_SECONDS_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30)

TCP_LABELS = ("direction", "peer", "listener", "service", "protocol", "target_addr")
HTTP_LABELS = ("direction", "listener", "service", "authority", "protocol")


class Metrics:
    """Every metric family the proxy exports, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tcp_open_total = Counter(
            "tcp_open", "Connections opened", TCP_LABELS, registry=r)
        self.tcp_close_total = Counter(
            "tcp_close", "Connections closed", (*TCP_LABELS, "errno"), registry=r)
        self.tcp_open_connections = Gauge(
            "tcp_open_connections", "Connections currently open", TCP_LABELS, registry=r)
        self.tcp_read_bytes_total = Counter(
            "tcp_read_bytes", "Bytes read from the peer", TCP_LABELS, registry=r)
        self.tcp_write_bytes_total = Counter(
            "tcp_write_bytes", "Bytes written to the peer", TCP_LABELS, registry=r)
        self.tcp_connection_duration_ms = Histogram(
            "tcp_connection_duration_ms", "Connection lifetimes", TCP_LABELS,
            buckets=LATENCY_MS_BUCKETS, registry=r)
        self.protocol_detect_total = Counter(
            "protocol_detect", "Protocol detection results",
            ("listener", "protocol", "reason"), registry=r)
        self.protocol_detect_duration_seconds = Histogram(
            "protocol_detect_duration_seconds", "Time from accept to a detection verdict",
            ("listener", "protocol"), buckets=DETECT_SECONDS_BUCKETS, registry=r)
        self.connect_errors_total = Counter(
            "endpoint_connect_errors", "Failed connection attempts to endpoints",
            ("service", "target_addr", "reason"), registry=r)
        self.request_total = Counter(
            "request", "HTTP requests received", HTTP_LABELS, registry=r)
        self.response_total = Counter(
            "response", "HTTP responses sent",
            (*HTTP_LABELS, "status_code", "grpc_status", "classification", "error"),
            registry=r)
        self.response_latency_ms = Histogram(
            "response_latency_ms", "Request head to first byte of the response body",
            (*HTTP_LABELS, "status_code"), buckets=LATENCY_MS_BUCKETS, registry=r)
        self.http_errors_total = Counter(
            "http_errors", "Requests refused or failed by the proxy itself",
            ("direction", "listener", "reason"), registry=r)

    def tcp_side(self, peer: str, listener: str, service: str, protocol: str,
                 target_addr: str) -> TcpSideMetrics:
        """The labelled children for one side (``src`` or ``dst``) of a connection."""
        labels = (DIRECTION, peer, listener, service, protocol, target_addr)
        return TcpSideMetrics(
            labels=labels,
            open_total=self.tcp_open_total.labels(*labels),
            open_connections=self.tcp_open_connections.labels(*labels),
            read_bytes=self.tcp_read_bytes_total.labels(*labels),
            write_bytes=self.tcp_write_bytes_total.labels(*labels),
            duration_ms=self.tcp_connection_duration_ms.labels(*labels),
            close_total=self.tcp_close_total,
        )


@dataclass(slots=True)
class TcpSideMetrics:
    """Cached children for one side of one connection."""

    labels: tuple[str, ...]
    open_total: Counter
    open_connections: Gauge
    read_bytes: Counter
    write_bytes: Counter
    duration_ms: Histogram
    close_total: Counter

    def opened(self) -> None:
        self.open_total.inc()
        self.open_connections.inc()

    def closed(self, errno: str, duration_s: float) -> None:
        self.open_connections.dec()
        self.close_total.labels(*self.labels, errno).inc()
        self.duration_ms.observe(duration_s * 1000.0)
