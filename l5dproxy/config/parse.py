"""Configuration: a TOML file in, frozen dataclasses (``l5dproxy.config.model``) out.

Every problem in a file is reported at once, one line each, as
``FILE: key.path: reason``, so an operator fixes a broken config in one
round instead of one error per restart. Unknown keys are errors, not silence.
"""

from __future__ import annotations

import difflib
import functools
import tomllib
from collections.abc import Callable
from typing import Any

from l5dproxy.config.checks import (
    check_count,
    check_duration,
    check_endpoint,
    check_forwarded,
    check_h2_engine,
    check_host_port,
    check_learned_max,
    check_log_format,
    check_log_level,
    check_name,
    check_networks,
    check_path_prefix,
    check_peek_limit,
    check_ports,
    check_positive_duration,
    check_protocol,
    check_proxy_protocol,
    check_proxy_protocol_version,
    check_ratio,
    check_srv,
    check_statuses,
    check_upgrades,
    normal_log_level,
    parse_host_port,
    type_name,
)
from l5dproxy.config.model import (
    DEFAULT_OPAQUE_PORTS,
    ORIGINAL_DST,
    AdminConfig,
    Config,
    DetectConfig,
    DiscoveryConfig,
    FailureAccrualConfig,
    H2Config,
    HostPort,
    HttpConfig,
    ListenerConfig,
    ProxyConfig,
    RouteConfig,
    ServiceConfig,
)
from l5dproxy.config.table import Table
from l5dproxy.config.tls import check_sni_glob, parse_listener_tls, parse_service_tls

#: The defaults of ``[h2]`` and ``[http]`` (a slots dataclass's class
#: attributes are its slots, not its default values).
_H2_DEFAULTS = H2Config()
_HTTP_DEFAULTS = HttpConfig()


class ConfigError(Exception):
    """A config that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def load(path: str) -> Config:
    """Read and validate a config file, raising ConfigError with every problem."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([f"{path}: invalid TOML: {e}"]) from None
    return parse(data, path)


def parse(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate already-decoded TOML; raise ConfigError listing every problem."""
    errors: list[str] = []
    root = Table(data, source, "", errors, hint=_unknown_key_hint)
    return _parse_root(root, source, errors)


def _parse_root(root: Table, source: str, errors: list[str]) -> Config:
    admin = _parse_admin(root.table("admin"))
    detect = _parse_detect(root.table("detect"))
    proxy = _parse_proxy(root.table("proxy"))
    services = _parse_services(root.table("service"))
    listeners = _parse_listeners(root.array("listener"), services)
    _check_proxy_protocol_out(root, services, listeners)
    discovery = _parse_discovery(root.table("discovery"))
    h2 = _parse_h2(root.table("h2"))
    http = _parse_http(root.table("http"))
    root.finish()
    if errors:
        raise ConfigError(errors)
    return Config(source, admin, detect, proxy, listeners, services, discovery, h2, http)


#: A config with one table of every kind, read only to learn each kind's keys.
_PROBE: dict[str, Any] = {
    "service": {"s": {"endpoints": ["127.0.0.1:1"], "failure_accrual": {}, "tls": {}}},
    "listener": [{"name": "l", "listen": "tcp:0", "service": "s",
                  "route": [{"service": "s"}]}],
}


@functools.cache
def _known_keys() -> dict[str, frozenset[str]]:
    """Each table kind's keys, learned by reading ``_PROBE`` with the parsers
    themselves, so the hints can never disagree with what is accepted."""
    registry: dict[str, set[str]] = {}
    errors: list[str] = []
    _parse_root(Table(_PROBE, "<probe>", "", errors, "", registry), "<probe>", errors)
    assert not errors, errors
    del registry["[service]"]  # its keys are service names, not settings
    return {kind: frozenset(keys) for kind, keys in registry.items()}


def _unknown_key_hint(kind: str, key: str) -> str | None:
    """How to fix an unknown ``key`` in a table of ``kind``: the tables it
    belongs in when another kind reads it, else the closest key of this kind
    (``difflib``, as Python's own NameError suggestions), else None."""
    known = _known_keys()
    elsewhere = sorted(k for k, keys in known.items() if k != kind and key in keys)
    if elsewhere:
        return "belongs in " + " or ".join(elsewhere)
    close = difflib.get_close_matches(key, sorted(known.get(kind, ())), n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else None


def _parse_admin(t: Table) -> AdminConfig:
    admin = AdminConfig(listen=t.get("listen", str, AdminConfig.listen, check_endpoint))
    t.finish()
    return admin


def _parse_detect(t: Table) -> DetectConfig:
    detect = DetectConfig(
        timeout=float(t.get("timeout", (int, float), DetectConfig.timeout, check_duration)),
        peek_limit=t.get("peek_limit", int, DetectConfig.peek_limit, check_peek_limit),
        opaque_ports=frozenset(t.get("opaque_ports", list, DEFAULT_OPAQUE_PORTS, check_ports)),
        client_silence=float(t.get("client_silence", (int, float), DetectConfig.client_silence,
                                   check_duration)),
        learned_ttl=float(t.get("learned_ttl", (int, float), DetectConfig.learned_ttl,
                                check_duration)),
        learned_max=t.get("learned_max", int, DetectConfig.learned_max, check_learned_max),
    )
    t.finish()
    return detect


def _parse_proxy(t: Table) -> ProxyConfig:
    proxy = ProxyConfig(
        drain_timeout=float(
            t.get("drain_timeout", (int, float), ProxyConfig.drain_timeout, check_duration)),
        log_connections=t.get("log_connections", bool, ProxyConfig.log_connections),
        watch_config=t.get("watch_config", bool, ProxyConfig.watch_config),
        watch_interval=float(t.get("watch_interval", (int, float), ProxyConfig.watch_interval,
                                   check_positive_duration)),
        max_connections=t.get("max_connections", int, ProxyConfig.max_connections,
                              check_count),
        log_level=normal_log_level(t.get("log_level", str, ProxyConfig.log_level,
                                         check_log_level)),
        log_format=t.get("log_format", str, ProxyConfig.log_format, check_log_format),
    )
    t.finish()
    return proxy



def _parse_h2(t: Table) -> H2Config:
    def between(low: int, high: int) -> Callable[[int], str | None]:
        return lambda v: None if low <= v <= high else f"must be between {low} and {high}"

    h2 = H2Config(
        max_concurrent_streams=t.get("max_concurrent_streams", int,
                                     _H2_DEFAULTS.max_concurrent_streams, between(1, 2**31 - 1)),
        max_header_list_size=t.get("max_header_list_size", int,
                                   _H2_DEFAULTS.max_header_list_size, between(1024, 2**24)),
        initial_window_size=t.get("initial_window_size", int,
                                  _H2_DEFAULTS.initial_window_size, between(65535, 2**31 - 1)),
        connection_window_size=t.get("connection_window_size", int,
                                     _H2_DEFAULTS.connection_window_size,
                                     between(65535, 2**31 - 1)),
        max_connections_per_endpoint=t.get("max_connections_per_endpoint", int,
                                           _H2_DEFAULTS.max_connections_per_endpoint,
                                           between(1, 100000)),
        abuse_budget=t.get("abuse_budget", int, _H2_DEFAULTS.abuse_budget, between(1, 2**31 - 1)),
        abuse_refill_per_second=float(t.get(
            "abuse_refill_per_second", (int, float), _H2_DEFAULTS.abuse_refill_per_second,
            lambda v: None if v >= 0 else "must be 0 or more")),
        preface_timeout=float(t.get("preface_timeout", (int, float), _H2_DEFAULTS.preface_timeout,
                                    check_duration)),
        idle_timeout=float(t.get("idle_timeout", (int, float), _H2_DEFAULTS.idle_timeout,
                                 check_duration)),
        engine=t.get("engine", str, _H2_DEFAULTS.engine, check_h2_engine),
    )
    t.finish()
    return h2


def _parse_http(t: Table) -> HttpConfig:
    def between(low: int, high: int) -> Callable[[int], str | None]:
        return lambda v: None if low <= v <= high else f"must be between {low} and {high}"

    http = HttpConfig(
        max_request_line=t.get("max_request_line", int, _HTTP_DEFAULTS.max_request_line,
                               between(256, 2**20)),
        max_header_bytes=t.get("max_header_bytes", int, _HTTP_DEFAULTS.max_header_bytes,
                               between(1024, 2**24)),
        pool_max_idle=t.get("pool_max_idle", int, _HTTP_DEFAULTS.pool_max_idle, between(0, 10000)),
        request_header_timeout=float(t.get(
            "request_header_timeout", (int, float), _HTTP_DEFAULTS.request_header_timeout,
            check_duration)),
        idle_timeout=float(t.get("idle_timeout", (int, float), _HTTP_DEFAULTS.idle_timeout,
                                 check_duration)),
        max_connections_per_endpoint=t.get("max_connections_per_endpoint", int,
                                           _HTTP_DEFAULTS.max_connections_per_endpoint,
                                           between(1, 100000)),
    )
    t.finish()
    return http


def _parse_services(t: Table) -> dict[str, ServiceConfig]:
    services = {}
    for name in t.data:
        s = t.table(name, "[service.<name>]")
        sources = [k for k in ("endpoints", "dns", "srv") if k in s.data]
        if name == ORIGINAL_DST and sources:   # its settings only: each connection brings
            s.error(sources[0], "the original_dst service's endpoint is each connection's"
                                " original destination (transparent listeners)")
            s.used.update(sources)
        if len(sources) > 1:
            s.error("", f"exactly one of endpoints, dns or srv, not {' and '.join(sources)}")
        dns = s.get("dns", str, None, check_host_port)
        response_timeout = s.get("response_timeout", (int, float), None,
                                 check_positive_duration)
        D = ServiceConfig
        services[name] = ServiceConfig(
            name=name,
            endpoints=_parse_endpoints(s) if name != ORIGINAL_DST and (
                not sources or "endpoints" in s.data) else (),
            opaque=s.get("opaque", bool, False),
            protocol=s.get("protocol", str, None, check_protocol),
            connect_timeout=float(
                s.get("connect_timeout", (int, float), ServiceConfig.connect_timeout,
                      check_positive_duration)),
            dns=parse_host_port(dns) if dns is not None else None,
            srv=s.get("srv", str, None, check_srv),
            response_timeout=None if response_timeout is None else float(response_timeout),
            idle_timeout=float(s.get("idle_timeout", (int, float), D.idle_timeout,
                                     check_positive_duration)),
            failure_accrual=_parse_failure_accrual(s.table("failure_accrual")),
            retry_statuses=tuple(s.get("retry_statuses", list, D.retry_statuses,
                                       check_statuses)),
            retry_limit=s.get("retry_limit", int, D.retry_limit, check_count),
            retry_max_body=s.get("retry_max_body", int, D.retry_max_body, check_count),
            retry_budget_ratio=float(s.get("retry_budget_ratio", (int, float),
                                           D.retry_budget_ratio, check_ratio)),
            retry_budget_min_per_second=float(s.get(
                "retry_budget_min_per_second", (int, float), D.retry_budget_min_per_second,
                check_duration)),
            retry_budget_ttl=float(s.get("retry_budget_ttl", (int, float), D.retry_budget_ttl,
                                         check_positive_duration)),
            max_pending_requests=s.get("max_pending_requests", int, D.max_pending_requests,
                                       check_count),
            send_proxy_protocol=s.get("send_proxy_protocol", str, None,
                                      check_proxy_protocol_version),
            tls=(parse_service_tls(s.table("tls"), s.data.get("protocol"))
                 if "tls" in s.data else None),
        )
        if "tls" in s.data and s.data.get("send_proxy_protocol") is not None:
            s.error("send_proxy_protocol", "not with [service.NAME.tls]: the PROXY header"
                    " must precede the TLS handshake, which l5dproxy does not do yet")
        s.finish()
    t.finish()
    return services


def _parse_failure_accrual(t: Table) -> FailureAccrualConfig:
    D = FailureAccrualConfig
    fa = FailureAccrualConfig(
        consecutive_failures=t.get("consecutive_failures", int, D.consecutive_failures,
                                   check_count),
        min_backoff=float(t.get("min_backoff", (int, float), D.min_backoff,
                                check_positive_duration)),
        max_backoff=float(t.get("max_backoff", (int, float), D.max_backoff,
                                check_positive_duration)),
        jitter=float(t.get("jitter", (int, float), D.jitter, check_ratio)),
    )
    if fa.max_backoff < fa.min_backoff:
        t.error("max_backoff", "must not be less than min_backoff")
    t.finish()
    return fa


def _parse_discovery(t: Table) -> DiscoveryConfig:
    D = DiscoveryConfig
    resolvers = []
    for i, item in enumerate(t.get("resolvers", list, [])):
        try:
            if not isinstance(item, str):
                raise ValueError(f'expected a string "host:port", got {type_name(item)}')
            resolvers.append(parse_host_port(item))
        except ValueError as e:
            t.error(f"resolvers[{i}]", f"{item!r}: {e}" if isinstance(item, str) else str(e))
    discovery = DiscoveryConfig(
        resolvers=tuple(resolvers),
        min_ttl=float(t.get("min_ttl", (int, float), D.min_ttl, check_positive_duration)),
        max_ttl=float(t.get("max_ttl", (int, float), D.max_ttl, check_positive_duration)),
        retry_interval=float(t.get("retry_interval", (int, float), D.retry_interval,
                                   check_positive_duration)),
        timeout=float(t.get("timeout", (int, float), D.timeout, check_positive_duration)),
    )
    if discovery.max_ttl < discovery.min_ttl:
        t.error("max_ttl", "must not be less than min_ttl")
    t.finish()
    return discovery


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)



def _parse_listeners(tables: list[Table], services: dict[str, ServiceConfig],
                     ) -> tuple[ListenerConfig, ...]:
    listeners = []
    seen: set[str] = set()

    def known_service(name: str) -> str | None:
        if name == ORIGINAL_DST:
            return None   # checked with transparent below
        return None if name in services else f"no service named {name!r} ([service.{name}])"

    for t in tables:
        name = t.required("name", str, check_name)
        if name is not None:
            if name in seen:
                t.error("name", f"duplicate listener name {name!r}")
            seen.add(name)
        routes = []
        for r in t.array("route"):
            route = RouteConfig(
                service=r.required("service", str, known_service),
                host=r.get("host", str, None),
                path_prefix=r.get("path_prefix", str, None, check_path_prefix),
                timeout=_optional_float(r.get("timeout", (int, float), None,
                                              check_positive_duration)),
                retryable=r.get("retryable", bool, False),
                sni=r.get("sni", str, None, check_sni_glob),
            )
            if route.sni is not None and (route.host or route.path_prefix):
                r.error("sni", "an sni route matches TLS connections, not HTTP requests:"
                        " it takes no host or path_prefix")
            routes.append(route)
            r.finish()
        if t.data.get("opaque") is True and any(r.sni is not None for r in routes):
            t.error("route", "sni routes need detection (the ClientHello is read):"
                    " not on an opaque listener")
        tls = parse_listener_tls(t.table("tls")) if "tls" in t.data else None
        if tls is not None and any(r.sni is not None for r in routes):
            t.error("route", "sni routes pass TLS through unterminated: a listener with"
                    " [listener.tls] terminates it instead (route after termination by"
                    " host)")
        listeners.append(ListenerConfig(
            name=name,
            listen=t.required("listen", str, check_endpoint),
            service=t.required("service", str, known_service),
            opaque=t.get("opaque", bool, False),
            routes=tuple(routes),
            access_log=t.get("access_log", bool, False),
            allow_connect=t.get("allow_connect", bool, False),
            max_connections=t.get("max_connections", int, 0, check_count),
            upgrades=tuple(u.lower() for u in t.get("upgrades", list, ["websocket"],
                                                    check_upgrades)),
            proxy_protocol=t.get("proxy_protocol", str, "off", check_proxy_protocol),
            proxy_protocol_timeout=float(t.get("proxy_protocol_timeout", (int, float),
                                               ListenerConfig.proxy_protocol_timeout,
                                               check_positive_duration)),
            forwarded=t.get("forwarded", str, "append", check_forwarded),
            trusted_proxies=tuple(t.get("trusted_proxies", list, [], check_networks)),
            tls=tls,
            transparent=t.get("transparent", bool, False),
        ))
        if listeners[-1].service == ORIGINAL_DST:
            if not listeners[-1].transparent:
                t.error("service", f"{ORIGINAL_DST!r} needs transparent = true (the original"
                                   " destination of each connection is where it goes)")
            # A service of its own, no endpoints: each connection brings one.
            services.setdefault(ORIGINAL_DST, ServiceConfig(ORIGINAL_DST, ()))
        t.finish()
    return tuple(listeners)



def _check_proxy_protocol_out(root: Table, services: dict[str, ServiceConfig],
                              listeners: tuple[ListenerConfig, ...]) -> None:
    """``send_proxy_protocol`` is for services only the TCP relay reaches.

    HTTP requests go over pooled upstream connections that carry requests
    of many clients one after another, so one header at the start of a
    connection cannot name the client of each request. Pools per client
    address (HAProxy makes such connections private, Envoy keys its pools
    by downstream address) would turn every client into upstream
    connections of its own, unbounded by the pool limits; HTTP endpoints
    get the client's address in ``X-Forwarded-For`` instead. So a service
    that HTTP may reach (a route's, or a listener's that detects protocols,
    unless the service is ``opaque``) is refused.
    """
    for name, service in services.items():
        if service.send_proxy_protocol is None or service.opaque:
            continue
        reached = [f"listener {lc.name!r} detects protocols" for lc in listeners
                   if lc.service == name and not lc.opaque]
        reached += [f"a route of listener {lc.name!r} sends requests to it"
                    for lc in listeners for r in lc.routes if r.service == name]
        if reached:
            root.errors.append(
                f"{root.source}: service.{name}.send_proxy_protocol: HTTP traffic reaches this"
                f" service ({reached[0]}); a PROXY protocol header names one client per"
                " connection and HTTP pools share connections between clients: set opaque ="
                " true on the service or the listener, or drop the key (HTTP endpoints get"
                " X-Forwarded-For)")


def _parse_endpoints(s: Table) -> tuple[HostPort, ...]:
    """``endpoints``, each bad item reported on its own line."""
    endpoints = []
    for i, item in enumerate(s.required("endpoints", list) or ()):
        key = f"endpoints[{i}]"
        if not isinstance(item, str):
            s.error(key, f'expected a string "host:port", got {type_name(item)}')
            continue
        try:
            endpoints.append(parse_host_port(item))
        except ValueError as e:
            s.error(key, f"{item!r}: {e}")
    return tuple(endpoints)



