"""The per-listener records the HTTP server ends are given (``HttpSite``).

Built here, where the listener is known, so that the ends read nothing
through it (ARCH-PLAN §4c): its clock and reactor, what its config allows
(CONNECT, upgrades) and callables that count its errors.
"""

from __future__ import annotations

from typing import Any
from weakref import WeakKeyDictionary

from l5dproxy.exchange.contracts import HttpSite


def http_site(listener: Any) -> HttpSite:
    """``listener``'s ``HttpSite`` (``listener``: an ``accept.Listener``:
    ``name``, ``config``, ``metrics``, ``clock``)."""
    name = listener.name
    config = listener.config
    metrics = listener.metrics
    errors = metrics.http_errors_total
    abuse = metrics.h2_abuse_total

    def count_error(reason: str) -> None:
        errors.labels("inbound", name, reason).inc()

    def count_abuse(kind: str) -> None:
        abuse.labels(kind).inc()

    return HttpSite(
        listener=name, clock=listener.clock,
        allow_connect=bool(config.allow_connect),
        upgrades=frozenset(u.lower().encode("ascii") for u in config.upgrades),
        count_error=count_error, count_abuse=count_abuse, config=config)


class HttpSites:
    """``http_site`` once per listener: called with a connection's listener
    for each connection the HTTP handlers build an end for."""

    def __init__(self) -> None:
        self._sites: WeakKeyDictionary[Any, HttpSite] = WeakKeyDictionary()

    def __call__(self, listener: Any) -> HttpSite:
        site = self._sites.get(listener)
        if site is None:
            site = self._sites[listener] = http_site(listener)
        return site


__all__ = ["HttpSites", "http_site"]
