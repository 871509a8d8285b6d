"""``/stats.json``: what the dashboard shows, per listener and per service.

The numbers are the registry's (the same ``/metrics`` exports, collected
once per call) plus the balancer's live endpoint state and the learned
server-first destinations. Rates and latency quantiles are over a recent
window: the difference between this call's counters and those of the
oldest call kept (calls up to ``WINDOW`` seconds back; the first call after
a quiet spell compares against the process start, whose counters are 0).

Shape (every rate per second, every latency in milliseconds, ``null`` when
there is nothing to compute it from)::

    {"time": 1733000000.1, "window_seconds": 9.8, "version": "0.1.0",
     "listeners": [{"name", "address", "service", "open_connections",
                    "detect": {"http1": 12, "h2": 0, "opaque": 1, ...},
                    "requests_total", "requests_per_second", "success_rate",
                    "latency_ms": {"p50", "p95", "p99"}}],
     "services": [{"name", "pending", "open_connections", "requests_total",
                   "requests_per_second", "success_rate", "latency_ms": {...},
                   "endpoints": [{"address", "state", "ewma_ms", "in_flight",
                                  "weight", "ejections"}]}],
     "opaque": [{"service", "endpoint", "age_seconds", "expires_in_seconds", "hits"}]}

``state`` is ready, ejected or probation (failure accrual); ``ewma_ms`` is
the balancer's peak-EWMA estimate; ``open_connections`` of a service counts
the proxy's connections to its endpoints.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry

#: How far back (seconds) rates and quantiles look.
WINDOW = 10.0

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))


class _Counts:
    """Cumulative request counts and latency buckets of one listener or service."""

    __slots__ = ("buckets", "failure", "requests", "success")

    def __init__(self) -> None:
        self.requests = 0.0
        self.success = 0.0
        self.failure = 0.0
        self.buckets: dict[float, float] = {}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus's ``histogram_quantile``: ``buckets`` maps upper bounds
    (``inf`` included) to cumulative counts; linear within the bucket, the
    highest finite bound for the ``+Inf`` bucket; None without observations."""
    bounds = sorted(buckets)
    if not bounds:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            inside = count - below
            if inside <= 0:
                return bound
            return lower + (bound - lower) * (rank - below) / inside
        lower, below = bound, count
    return lower


class Stats:
    """Builds ``/stats.json``; keeps the counters of recent calls for rates."""

    def __init__(self, registry: CollectorRegistry, clock, backends: Callable[[], dict],
                 listeners: Callable[[], Iterable[tuple[str, str, str]]],
                 opaque: Callable[[], list] = list, version: str = "") -> None:
        self.registry = registry
        self.clock = clock
        self.backends = backends
        #: (name, address, service) of each listener.
        self.listeners = listeners
        self.opaque = opaque
        self.version = version
        self.started = clock.seconds()
        self._history: deque[tuple[float, dict]] = deque()

    def _collect(self, families: Iterable | None = None) -> tuple[dict, dict, dict, dict, dict]:
        by_listener: dict[str, _Counts] = {}
        by_service: dict[str, _Counts] = {}
        open_src: dict[str, float] = {}
        open_dst: dict[str, float] = {}
        detect: dict[str, dict[str, float]] = {}
        for family in self.registry.collect() if families is None else families:
            name = family.name
            if name == "request":
                for s in family.samples:
                    if s.name == "request_total":
                        for key, table in ((s.labels["listener"], by_listener),
                                           (s.labels["service"], by_service)):
                            table.setdefault(key, _Counts()).requests += s.value
            elif name == "response":
                for s in family.samples:
                    if s.name == "response_total":
                        ok = s.labels["classification"] == "success"
                        for key, table in ((s.labels["listener"], by_listener),
                                           (s.labels["service"], by_service)):
                            counts = table.setdefault(key, _Counts())
                            if ok:
                                counts.success += s.value
                            else:
                                counts.failure += s.value
            elif name == "response_latency_ms":
                for s in family.samples:
                    if s.name == "response_latency_ms_bucket":
                        bound = float(s.labels["le"])
                        for key, table in ((s.labels["listener"], by_listener),
                                           (s.labels["service"], by_service)):
                            b = table.setdefault(key, _Counts()).buckets
                            b[bound] = b.get(bound, 0.0) + s.value
            elif name == "tcp_open_connections":
                for s in family.samples:
                    if s.labels["peer"] == "src":
                        key = s.labels["listener"]
                        open_src[key] = open_src.get(key, 0.0) + s.value
                    else:
                        key = s.labels["service"]
                        open_dst[key] = open_dst.get(key, 0.0) + s.value
            elif name == "protocol_detect":
                for s in family.samples:
                    if s.name == "protocol_detect_total":
                        mix = detect.setdefault(s.labels["listener"], {})
                        proto = s.labels["protocol"]
                        mix[proto] = mix.get(proto, 0.0) + s.value
        return by_listener, by_service, open_src, open_dst, detect

    def snapshot(self, families: Iterable | None = None) -> dict[str, Any]:
        """The ``/stats.json`` document (see the module docstring), from
        ``families`` (the metric families of a whole ``--workers`` group,
        ``l5dproxy.telemetry.merge_families``) or else the registry's."""
        now = self.clock.seconds()
        by_listener, by_service, open_src, open_dst, detect = self._collect(families)
        current = {("l", k): v for k, v in by_listener.items()}
        current.update({("s", k): v for k, v in by_service.items()})
        history = self._history
        while len(history) > 1 and now - history[1][0] >= WINDOW:
            history.popleft()
        if history and now - history[0][0] <= WINDOW * 6:
            then, before = history[0]
        else:
            then, before = self.started, {}
        history.append((now, current))
        while len(history) > 64:
            history.popleft()
        span = now - then

        def figures(key: tuple[str, str]) -> dict[str, Any]:
            counts = current.get(key) or _Counts()
            old = before.get(key) or _Counts()
            requests = counts.requests - old.requests
            done = (counts.success - old.success) + (counts.failure - old.failure)
            window = {b: n - old.buckets.get(b, 0.0) for b, n in counts.buckets.items()}
            return {
                "requests_total": int(counts.requests),
                "requests_per_second": round(requests / span, 3) if span > 0 else None,
                "success_rate": (round((counts.success - old.success) / done, 4)
                                 if done > 0 else None),
                "latency_ms": {label: _round(histogram_quantile(q, window))
                               for label, q in QUANTILES},
            }

        listeners = []
        for name, address, service in self.listeners():
            listeners.append({
                "name": name, "address": address, "service": service,
                "open_connections": int(open_src.get(name, 0)),
                "detect": {k: int(v) for k, v in sorted(detect.get(name, {}).items())},
                **figures(("l", name)),
            })
        services = []
        for name, backends in sorted(self.backends().items()):
            endpoints = []
            for e in backends.endpoints:
                e.available(now)
                endpoints.append({
                    "address": e.label, "state": e.state,
                    "ewma_ms": round(e.latency(now) * 1000.0, 3),
                    "in_flight": e.active, "weight": e.weight, "ejections": e.ejections,
                })
            services.append({
                "name": name, "pending": backends.pending,
                "open_connections": int(open_dst.get(name, 0)),
                **figures(("s", name)), "endpoints": endpoints,
            })
        return {"time": round(now, 3), "window_seconds": round(span, 3),
                "version": self.version, "listeners": listeners, "services": services,
                "opaque": self.opaque()}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
