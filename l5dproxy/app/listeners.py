"""Each listener built with what its protocols are given.

``build_listener`` makes the per-listener records once (``ListenerSite`` for
the connection records, ``RelaySite`` for the TCP relay and the early
connects, the ``DetectSite`` inside the ``Listener``) and the complete handler
table: the shared HTTP handlers plus "opaque", the relay. A reload builds new
listeners, so new records: a connection keeps the ones it was accepted with.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from l5dproxy.accept.listener import ConnectionLimits, Handler, Listener
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import DetectConfig, ListenerConfig
from l5dproxy.detect.early import Detecting, EarlyConnect, ServerFirst
from l5dproxy.net.connection import ListenerSite
from l5dproxy.tcp.relay import RelaySite, relay_handler
from l5dproxy.telemetry import Metrics


def relay_site(config: ListenerConfig, backends: Mapping[str, BackendSet], metrics: Metrics,
               reactor: Any) -> RelaySite:
    """What the TCP relays of listener ``config`` share (its handlers that
    relay, the SNI routes' and TLS termination's, are built with it)."""
    return RelaySite(config.name, backends[config.service], reactor, reactor, metrics)


def build_listener(config: ListenerConfig, detect: DetectConfig,
                   services: Mapping[str, BackendSet], metrics: Metrics, reactor: Any,
                   log_connections: bool = True, handlers: Mapping[str, Handler] | None = None,
                   server_first: ServerFirst | None = None,
                   limits: ConnectionLimits | None = None,
                   relay: RelaySite | None = None) -> Listener:
    """The ``Listener`` of ``config`` sending to ``services[config.service]``.

    ``reactor`` is the clock and the dialler (IReactorTime and IReactorTCP);
    ``handlers`` are the listener's protocols by verdict ("http1", "h2"): an
    "opaque" one given here replaces the TCP relay (tests record with it).
    ``relay`` is the listener's ``relay_site`` when its handlers were built
    with it. Raises KeyError when the service is not in ``services``.
    """
    backends = services[config.service]
    site = ListenerSite(config.name, config.service, reactor, metrics, log_connections)
    if relay is None:
        relay = relay_site(config, services, metrics, reactor)
    table: dict[str, Handler] = {"opaque": relay_handler(relay), **(handlers or {})}
    watch: Callable[[Detecting], EarlyConnect | None] | None = None
    if server_first is not None:
        def watch(detecting: Detecting) -> EarlyConnect | None:
            return server_first.watch(detecting, relay)
    return Listener(config, site, detect, backends, reactor, table,
                    server_first=server_first, watch=watch, limits=limits)
