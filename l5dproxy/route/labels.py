"""The labelled HTTP metric children of one label set, and the rules that
keep every label value to the config or a small fixed set (issue 18).

A label value never comes straight from what a peer sent: ``authority`` is
a configured route host or ``other`` (``l5dproxy.route.dispatcher``'s route
table), ``status_code`` a valid status or ``other``, ``grpc_status`` a gRPC
code or ``other``. Linkerd labels its HTTP metrics by configured routes and
parents, Envoy and HAProxy by configured clusters and backends, for the
same reason: a client choosing its Host must not choose the proxy's memory
or the size of ``/metrics``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l5dproxy.telemetry import LATENCY_MS_BUCKETS, PendingCount, PendingHistogram

if TYPE_CHECKING:
    from l5dproxy.exchange.contracts import ClientConnection
    from l5dproxy.telemetry import Metrics

#: Response and latency children cached per label set, keyed by the raw
#: status and grpc-status an endpoint sent (many raw values may share one
#: label), before that cache starts over.
MAX_CACHED_CHILDREN = 256

#: The label value standing for every value not configured or not in the
#: fixed set of its label.
OTHER = "other"


#: The tls labels of a plaintext connection (Linkerd's names).
NO_TLS = ("no_identity", "", "no_tls_from_remote")


def tls_labels(connection: ClientConnection) -> tuple[str, str, str]:
    """``(tls, client_id, no_tls_reason)`` of a request's connection: TLS
    terminated by the proxy (``connection.tls``, l5dproxy.detect.terminate)
    gives ``("true", IDENTITY or "", "")``, anything else ``NO_TLS``. The
    identity is a verified certificate's, so its values are bounded by the
    identities a CA issued and ``allow`` admits."""
    if connection.tls is None:
        return NO_TLS
    return ("true", connection.client_id or "", "")


def status_label(status: int) -> str:
    """The ``status_code`` label: the status when it is a valid one
    (100-599, RFC 9110 15), else ``other``."""
    return str(status) if 100 <= status <= 599 else OTHER


#: gRPC status codes 0 (OK) to 16 (UNAUTHENTICATED), gRPC's status code list.
_GRPC_STATUSES = frozenset(str(code) for code in range(17))


def grpc_status_label(grpc_status: str) -> str:
    """The ``grpc_status`` label: ``""`` (none), a gRPC code 0-16, else ``other``."""
    return grpc_status if not grpc_status or grpc_status in _GRPC_STATUSES else OTHER


class Labels:
    """The labelled metric children of one (listener, service, authority,
    protocol, tls, client_id, no_tls_reason), counted in ints until the
    registry is collected (telemetry)."""

    __slots__ = ("_latency", "_responses", "labels", "metrics", "requests")

    def __init__(self, metrics: Metrics, labels: tuple[str, ...]) -> None:
        self.metrics = metrics
        self.labels = labels
        self.requests = PendingCount(metrics.request_total.labels(*labels))
        self._responses: dict[tuple[int, str, str, str], PendingCount] = {}
        self._latency: dict[int, PendingHistogram] = {}

    def response(self, status: int, grpc_status: str, classification: str,
                 error: str) -> PendingCount:
        key = (status, grpc_status, classification, error)
        child = self._responses.get(key)
        if child is None:
            if len(self._responses) >= MAX_CACHED_CHILDREN:
                self._drop(self._responses)
            child = self._responses[key] = PendingCount(self.metrics.response_total.labels(
                *self.labels, status_label(status), grpc_status_label(grpc_status),
                classification, error))
        return child

    def latency(self, status: int) -> PendingHistogram:
        child = self._latency.get(status)
        if child is None:
            if len(self._latency) >= MAX_CACHED_CHILDREN:
                self._drop(self._latency)
            child = self._latency[status] = PendingHistogram(
                self.metrics.response_latency_ms.labels(*self.labels, status_label(status)),
                LATENCY_MS_BUCKETS)
        return child

    @staticmethod
    def _drop(children: dict) -> None:
        """Start a cache of children over (their counts flushed first): its
        keys are raw statuses, of which a peer may send many that map to one
        label; the children, and the series, stay in the registry."""
        for child in children.values():
            child.flush()
        children.clear()

    def flush(self) -> None:
        self.requests.flush()
        for child in self._responses.values():
            child.flush()
        for histogram in self._latency.values():
            histogram.flush()
