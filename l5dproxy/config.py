"""Configuration: a TOML file in, frozen dataclasses out.

Every problem in a file is reported at once, one line each, as
``FILE: key.path: reason``, so an operator fixes a broken config in one
round instead of one error per restart. Unknown keys are errors, not silence.
"""

from __future__ import annotations

import difflib
import functools
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.endpoints import serverFromString

DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})
PROTOCOLS = ("http1", "h2")


class ConfigError(Exception):
    """A config that cannot be used; ``errors`` holds one line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class AdminConfig:
    listen: str = "tcp:4191:interface=127.0.0.1"


@dataclass(frozen=True)
class DetectConfig:
    timeout: float = 10.0
    peek_limit: int = 8192
    opaque_ports: frozenset[int] = DEFAULT_OPAQUE_PORTS
    #: Client silence (s) after which the upstream is dialled early, in case
    #: the server speaks first; 0 turns early connecting off.
    client_silence: float = 0.025
    #: How long (s) and how many destinations that spoke first are remembered.
    learned_ttl: float = 600.0
    learned_max: int = 1024


@dataclass(frozen=True)
class ProxyConfig:
    #: On SIGTERM, how long open connections may go on before they are closed.
    drain_timeout: float = 30.0
    #: One structured log line per closed connection.
    log_connections: bool = True
    #: Reload the config when its file changes (as on SIGHUP).
    watch_config: bool = False
    #: How often (s) the file is checked when watch_config is on.
    watch_interval: float = 2.0
    #: Client connections open at once over every listener; past it a new
    #: one is accepted and closed at once. 0: no limit.
    max_connections: int = 20000
    #: The least severe log level written: debug, info, warn, error, critical
    #: (also read and set at run time at the admin's /log-level).
    log_level: str = "info"
    #: "text" (twistd's lines) or "json" (one JSON object a line).
    log_format: str = "text"


#: Log levels, least severe first (Twisted's names; "warning" is accepted for "warn").
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True)
class DiscoveryConfig:
    #: DNS servers ("host:port") for dns/srv services and static names;
    #: empty means the system's (/etc/resolv.conf), /etc/hosts first either way.
    resolvers: tuple[HostPort, ...] = ()
    #: A record's TTL is clamped to [min_ttl, max_ttl] to schedule the next lookup.
    min_ttl: float = 5.0
    max_ttl: float = 300.0
    #: A failed lookup keeps the last good set and is tried again after this.
    retry_interval: float = 5.0
    #: How long one lookup may take.
    timeout: float = 5.0


@dataclass(frozen=True)
class FailureAccrualConfig:
    #: Failures in a row that eject an endpoint (0: never eject).
    consecutive_failures: int = 7
    #: Ejection backoff: min_backoff * 2^n, up to max_backoff, times 1 + jitter * random.
    min_backoff: float = 1.0
    max_backoff: float = 60.0
    jitter: float = 0.5


@dataclass(frozen=True)
class RouteConfig:
    service: str
    host: str | None = None
    path_prefix: str | None = None
    #: Request timeout for this route (to response headers); overrides the
    #: service's response_timeout.
    timeout: float | None = None
    #: Retry this route's requests whatever their method (they are safe to repeat).
    retryable: bool = False


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    listen: str
    service: str
    opaque: bool = False
    routes: tuple[RouteConfig, ...] = ()
    #: One log line per HTTP request (method, authority, path, status, bytes, time, endpoint).
    access_log: bool = False
    #: HTTP/1 CONNECT is forwarded (and tunnelled on 2xx) instead of refused with 405.
    allow_connect: bool = False
    #: Client connections open at once on this listener; past it a new one
    #: is accepted and closed at once. 0: only [proxy] max_connections applies.
    max_connections: int = 0
    #: HTTP/1 ``Upgrade`` protocols forwarded (and relayed after a 101),
    #: lowercase; any other upgrade is stripped and the request proxied as
    #: plain HTTP/1.
    upgrades: tuple[str, ...] = ("websocket",)


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    endpoints: tuple[HostPort, ...]
    opaque: bool = False
    protocol: str | None = None
    connect_timeout: float = 5.0
    #: DNS A/AAAA discovery: "name:port" (instead of endpoints).
    dns: HostPort | None = None
    #: DNS SRV discovery: "_service._proto.name" (instead of endpoints).
    srv: str | None = None
    #: Request sent to response headers received; None: no limit.
    response_timeout: float | None = None
    #: How long a pooled upstream connection may stay idle before it is closed.
    idle_timeout: float = 60.0
    failure_accrual: FailureAccrualConfig = field(default_factory=FailureAccrualConfig)
    #: Response statuses that make a retryable request be retried.
    retry_statuses: tuple[int, ...] = (502, 503, 504)
    #: Retries per request at most (the budget caps them across requests).
    retry_limit: int = 2
    #: Request bodies up to this size are kept so the request can be retried.
    retry_max_body: int = 65536
    #: Retry budget: ratio of original requests + min_per_second over ttl seconds.
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_second: float = 10.0
    retry_budget_ttl: float = 10.0
    #: HTTP requests in flight to the service (waiting for an endpoint or a
    #: connection included) past which new ones are shed with 503; 0: none.
    max_pending_requests: int = 10000

    def is_opaque(self, opaque_ports: frozenset[int]) -> bool:
        """Opaque by flag, or because every endpoint is on a server-speaks-first port."""
        if self.opaque:
            return True
        if self.dns is not None:
            return self.dns.port in opaque_ports
        return bool(self.endpoints) and all(e.port in opaque_ports for e in self.endpoints)


@dataclass(frozen=True)
class Config:
    source: str
    admin: AdminConfig = field(default_factory=AdminConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    listeners: tuple[ListenerConfig, ...] = ()
    services: dict[str, ServiceConfig] = field(default_factory=dict)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    h2: H2Config = field(default_factory=lambda: H2Config())
    http: HttpConfig = field(default_factory=lambda: HttpConfig())


@dataclass(frozen=True)
class HttpConfig:
    """``[http]``: limits of the HTTP/1 server end and the upstream pools."""

    #: Longest request target; longer: 414.
    max_request_line: int = 8192
    #: Largest request header block; larger: 431.
    max_header_bytes: int = 65536
    #: Idle keep-alive connections kept per endpoint.
    pool_max_idle: int = 256
    #: A request head (request line and headers) must arrive within this
    #: many seconds of its first byte, else 408 and close (slowloris); 0: none.
    request_header_timeout: float = 10.0
    #: A client keep-alive connection idle this long is closed; 0: never.
    idle_timeout: float = 60.0
    #: Upstream HTTP/1 connections to one endpoint at most; requests past them wait.
    max_connections_per_endpoint: int = 1024


@dataclass(frozen=True)
class H2Config:
    """``[h2]``: limits and windows of the HTTP/2 ends."""

    #: Streams one client connection may have open; more get REFUSED_STREAM.
    max_concurrent_streams: int = 256
    #: Largest request header list (name + value + 32 per field); larger: 431.
    max_header_list_size: int = 65536
    #: Receive window of each stream, and of each connection as a whole.
    initial_window_size: int = 1048576
    connection_window_size: int = 4194304
    #: Upstream h2 connections to one endpoint at most; requests past them wait.
    max_connections_per_endpoint: int = 64
    #: Points of work for nothing a peer may cause; past it GOAWAY(ENHANCE_YOUR_CALM).
    abuse_budget: int = 500
    #: Points of that budget that come back each second.
    abuse_refill_per_second: float = 100.0
    #: Seconds from detection to the client's SETTINGS; past it: GOAWAY, close. 0: none.
    preface_timeout: float = 10.0
    #: Seconds with no stream open before a graceful GOAWAY and close; 0: never.
    idle_timeout: float = 60.0


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
    root = _Table(data, source, "", errors)
    return _parse_root(root, source, errors)


def _parse_root(root: _Table, source: str, errors: list[str]) -> Config:
    admin = _parse_admin(root.table("admin"))
    detect = _parse_detect(root.table("detect"))
    proxy = _parse_proxy(root.table("proxy"))
    services = _parse_services(root.table("service"))
    listeners = _parse_listeners(root.array("listener"), services)
    discovery = _parse_discovery(root.table("discovery"))
    h2 = _parse_h2(root.table("h2"))
    http = _parse_http(root.table("http"))
    root.finish()
    if errors:
        raise ConfigError(errors)
    return Config(source, admin, detect, proxy, listeners, services, discovery, h2, http)


class _Table:
    """One TOML table being read: typed getters that record errors and
    remember which keys were used, so the leftovers can be reported.

    ``kind`` names the table as a config file spells it (``[detect]``,
    ``[service.<name>]``, ``[[listener.route]]``); ``registry``, when given,
    collects the keys each kind reads (see ``_known_keys``)."""

    def __init__(self, data: Any, source: str, path: str, errors: list[str],
                 kind: str = "", registry: dict[str, set[str]] | None = None) -> None:
        self.source = source
        self.path = path
        self.errors = errors
        self.kind = kind
        self.registry = registry
        self.used: set[str] = set()
        if not isinstance(data, dict):
            self.error("", f"expected a table, got {_type_name(data)}")
            data = {}
        self.data: dict[str, Any] = data

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else (self.path or key)

    def error(self, key: str, reason: str) -> None:
        self.errors.append(f"{self.source}: {self.key_path(key) or '(top level)'}: {reason}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any,
            check: Callable[[Any], str | None] | None = None) -> Any:
        """The value of ``key`` if it has the right type and passes ``check``
        (which returns a reason when the value is wrong), else ``default``."""
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if not _is_kind(value, kind):
            hint = _TYPE_HINTS.get(check) if check else None
            self.error(key, f"expected {_kind_name(kind)}, got {_type_name(value)}"
                       + (f"; {hint}" if hint else ""))
            return default
        reason = check(value) if check else None
        if reason:
            self.error(key, reason)
            return default
        return value

    def required(self, key: str, kind: type | tuple[type, ...],
                 check: Callable[[Any], str | None] | None = None) -> Any:
        if key not in self.data:
            self.used.add(key)
            self.error(key, "required key is missing")
            return None
        return self.get(key, kind, None, check)

    def table(self, key: str, kind: str | None = None) -> _Table:
        self.used.add(key)
        inner = self.kind.strip("[]")
        if kind is None:
            kind = f"[{inner}.{key}]" if inner else f"[{key}]"
        return _Table(self.data.get(key, {}), self.source, self.key_path(key), self.errors,
                      kind, self.registry)

    def array(self, key: str) -> list[_Table]:
        self.used.add(key)
        items = self.data.get(key, [])
        if not isinstance(items, list):
            self.error(key, f"expected an array of tables ([[{key}]]), got {_type_name(items)}")
            return []
        inner = self.kind.strip("[]")
        kind = f"[[{inner}.{key}]]" if inner else f"[[{key}]]"
        return [_Table(item, self.source, f"{self.key_path(key)}[{i}]", self.errors,
                       kind, self.registry)
                for i, item in enumerate(items)]

    def finish(self) -> None:
        if self.registry is not None:
            self.registry.setdefault(self.kind, set()).update(self.used)
        for key in self.data:
            if key not in self.used:
                hint = _unknown_key_hint(self.kind, key)
                self.error(key, "unknown key" + (f"; {hint}" if hint else ""))


#: A config with one table of every kind, read only to learn each kind's keys.
_PROBE: dict[str, Any] = {
    "service": {"s": {"endpoints": ["127.0.0.1:1"], "failure_accrual": {}}},
    "listener": [{"name": "l", "listen": "tcp:0", "service": "s",
                  "route": [{"service": "s"}]}],
}


@functools.cache
def _known_keys() -> dict[str, frozenset[str]]:
    """Each table kind's keys, learned by reading ``_PROBE`` with the parsers
    themselves, so the hints can never disagree with what is accepted."""
    registry: dict[str, set[str]] = {}
    errors: list[str] = []
    _parse_root(_Table(_PROBE, "<probe>", "", errors, "", registry), "<probe>", errors)
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


def _parse_admin(t: _Table) -> AdminConfig:
    admin = AdminConfig(listen=t.get("listen", str, AdminConfig.listen, check_endpoint))
    t.finish()
    return admin


def _parse_detect(t: _Table) -> DetectConfig:
    detect = DetectConfig(
        timeout=float(t.get("timeout", (int, float), DetectConfig.timeout, check_duration)),
        peek_limit=t.get("peek_limit", int, DetectConfig.peek_limit, _check_peek_limit),
        opaque_ports=frozenset(t.get("opaque_ports", list, DEFAULT_OPAQUE_PORTS, _check_ports)),
        client_silence=float(t.get("client_silence", (int, float), DetectConfig.client_silence,
                                   check_duration)),
        learned_ttl=float(t.get("learned_ttl", (int, float), DetectConfig.learned_ttl,
                                check_duration)),
        learned_max=t.get("learned_max", int, DetectConfig.learned_max, _check_learned_max),
    )
    t.finish()
    return detect


def _parse_proxy(t: _Table) -> ProxyConfig:
    proxy = ProxyConfig(
        drain_timeout=float(
            t.get("drain_timeout", (int, float), ProxyConfig.drain_timeout, check_duration)),
        log_connections=t.get("log_connections", bool, ProxyConfig.log_connections),
        watch_config=t.get("watch_config", bool, ProxyConfig.watch_config),
        watch_interval=float(t.get("watch_interval", (int, float), ProxyConfig.watch_interval,
                                   check_positive_duration)),
        max_connections=t.get("max_connections", int, ProxyConfig.max_connections,
                              _check_count),
        log_level=normal_log_level(t.get("log_level", str, ProxyConfig.log_level,
                                         check_log_level)),
        log_format=t.get("log_format", str, ProxyConfig.log_format, _check_log_format),
    )
    t.finish()
    return proxy


def normal_log_level(value: str) -> str:
    """``value`` (checked by ``check_log_level``) as one of ``LOG_LEVELS``."""
    value = value.strip().lower()
    return "warn" if value == "warning" else value


def check_log_level(value: str) -> str | None:
    """A reason when ``value`` names no log level (case-insensitive)."""
    if normal_log_level(value) not in LOG_LEVELS:
        return f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}"
    return None


def _check_log_format(value: str) -> str | None:
    if value not in LOG_FORMATS:
        return f"expected one of {', '.join(LOG_FORMATS)}, got {value!r}"
    return None


def _parse_h2(t: _Table) -> H2Config:
    def between(low: int, high: int) -> Callable[[int], str | None]:
        return lambda v: None if low <= v <= high else f"must be between {low} and {high}"

    h2 = H2Config(
        max_concurrent_streams=t.get("max_concurrent_streams", int,
                                     H2Config.max_concurrent_streams, between(1, 2**31 - 1)),
        max_header_list_size=t.get("max_header_list_size", int,
                                   H2Config.max_header_list_size, between(1024, 2**24)),
        initial_window_size=t.get("initial_window_size", int,
                                  H2Config.initial_window_size, between(65535, 2**31 - 1)),
        connection_window_size=t.get("connection_window_size", int,
                                     H2Config.connection_window_size,
                                     between(65535, 2**31 - 1)),
        max_connections_per_endpoint=t.get("max_connections_per_endpoint", int,
                                           H2Config.max_connections_per_endpoint,
                                           between(1, 100000)),
        abuse_budget=t.get("abuse_budget", int, H2Config.abuse_budget, between(1, 2**31 - 1)),
        abuse_refill_per_second=float(t.get(
            "abuse_refill_per_second", (int, float), H2Config.abuse_refill_per_second,
            lambda v: None if v >= 0 else "must be 0 or more")),
        preface_timeout=float(t.get("preface_timeout", (int, float), H2Config.preface_timeout,
                                    check_duration)),
        idle_timeout=float(t.get("idle_timeout", (int, float), H2Config.idle_timeout,
                                 check_duration)),
    )
    t.finish()
    return h2


def _parse_http(t: _Table) -> HttpConfig:
    def between(low: int, high: int) -> Callable[[int], str | None]:
        return lambda v: None if low <= v <= high else f"must be between {low} and {high}"

    http = HttpConfig(
        max_request_line=t.get("max_request_line", int, HttpConfig.max_request_line,
                               between(256, 2**20)),
        max_header_bytes=t.get("max_header_bytes", int, HttpConfig.max_header_bytes,
                               between(1024, 2**24)),
        pool_max_idle=t.get("pool_max_idle", int, HttpConfig.pool_max_idle, between(0, 10000)),
        request_header_timeout=float(t.get(
            "request_header_timeout", (int, float), HttpConfig.request_header_timeout,
            check_duration)),
        idle_timeout=float(t.get("idle_timeout", (int, float), HttpConfig.idle_timeout,
                                 check_duration)),
        max_connections_per_endpoint=t.get("max_connections_per_endpoint", int,
                                           HttpConfig.max_connections_per_endpoint,
                                           between(1, 100000)),
    )
    t.finish()
    return http


def _parse_services(t: _Table) -> dict[str, ServiceConfig]:
    services = {}
    for name in t.data:
        s = t.table(name, "[service.<name>]")
        sources = [k for k in ("endpoints", "dns", "srv") if k in s.data]
        if len(sources) > 1:
            s.error("", f"exactly one of endpoints, dns or srv, not {' and '.join(sources)}")
        dns = s.get("dns", str, None, _check_host_port)
        response_timeout = s.get("response_timeout", (int, float), None,
                                 check_positive_duration)
        D = ServiceConfig
        services[name] = ServiceConfig(
            name=name,
            endpoints=_parse_endpoints(s) if not sources or "endpoints" in s.data else (),
            opaque=s.get("opaque", bool, False),
            protocol=s.get("protocol", str, None, _check_protocol),
            connect_timeout=float(
                s.get("connect_timeout", (int, float), ServiceConfig.connect_timeout,
                      check_positive_duration)),
            dns=parse_host_port(dns) if dns is not None else None,
            srv=s.get("srv", str, None, _check_srv),
            response_timeout=None if response_timeout is None else float(response_timeout),
            idle_timeout=float(s.get("idle_timeout", (int, float), D.idle_timeout,
                                     check_positive_duration)),
            failure_accrual=_parse_failure_accrual(s.table("failure_accrual")),
            retry_statuses=tuple(s.get("retry_statuses", list, D.retry_statuses,
                                       _check_statuses)),
            retry_limit=s.get("retry_limit", int, D.retry_limit, _check_count),
            retry_max_body=s.get("retry_max_body", int, D.retry_max_body, _check_count),
            retry_budget_ratio=float(s.get("retry_budget_ratio", (int, float),
                                           D.retry_budget_ratio, _check_ratio)),
            retry_budget_min_per_second=float(s.get(
                "retry_budget_min_per_second", (int, float), D.retry_budget_min_per_second,
                check_duration)),
            retry_budget_ttl=float(s.get("retry_budget_ttl", (int, float), D.retry_budget_ttl,
                                         check_positive_duration)),
            max_pending_requests=s.get("max_pending_requests", int, D.max_pending_requests,
                                       _check_count),
        )
        s.finish()
    t.finish()
    return services


def _parse_failure_accrual(t: _Table) -> FailureAccrualConfig:
    D = FailureAccrualConfig
    fa = FailureAccrualConfig(
        consecutive_failures=t.get("consecutive_failures", int, D.consecutive_failures,
                                   _check_count),
        min_backoff=float(t.get("min_backoff", (int, float), D.min_backoff,
                                check_positive_duration)),
        max_backoff=float(t.get("max_backoff", (int, float), D.max_backoff,
                                check_positive_duration)),
        jitter=float(t.get("jitter", (int, float), D.jitter, _check_ratio)),
    )
    if fa.max_backoff < fa.min_backoff:
        t.error("max_backoff", "must not be less than min_backoff")
    t.finish()
    return fa


def _parse_discovery(t: _Table) -> DiscoveryConfig:
    D = DiscoveryConfig
    resolvers = []
    for i, item in enumerate(t.get("resolvers", list, [])):
        try:
            if not isinstance(item, str):
                raise ValueError(f'expected a string "host:port", got {_type_name(item)}')
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


def _check_host_port(value: str) -> str | None:
    try:
        parse_host_port(value)
    except ValueError as e:
        return f"{value!r}: {e}"
    return None


def _check_srv(value: str) -> str | None:
    labels = value.rstrip(".").split(".")
    if len(labels) < 3 or not labels[0].startswith("_") or not labels[1].startswith("_"):
        return f"{value!r}: expected an SRV name such as _http._tcp.example.com"
    return None


def _check_statuses(value: list[Any]) -> str | None:
    bad = [v for v in value if not _is_kind(v, int) or not 100 <= v <= 599]
    return f"not HTTP status codes: {bad!r}" if bad else None


def _check_count(value: int) -> str | None:
    return "must not be negative" if value < 0 else None


def _check_ratio(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be between 0 and 1"


def _parse_listeners(tables: list[_Table], services: dict[str, ServiceConfig],
                     ) -> tuple[ListenerConfig, ...]:
    listeners = []
    seen: set[str] = set()

    def known_service(name: str) -> str | None:
        return None if name in services else f"no service named {name!r} ([service.{name}])"

    for t in tables:
        name = t.required("name", str, _check_name)
        if name is not None:
            if name in seen:
                t.error("name", f"duplicate listener name {name!r}")
            seen.add(name)
        routes = []
        for r in t.array("route"):
            routes.append(RouteConfig(
                service=r.required("service", str, known_service),
                host=r.get("host", str, None),
                path_prefix=r.get("path_prefix", str, None, _check_path_prefix),
                timeout=_optional_float(r.get("timeout", (int, float), None,
                                              check_positive_duration)),
                retryable=r.get("retryable", bool, False),
            ))
            r.finish()
        listeners.append(ListenerConfig(
            name=name,
            listen=t.required("listen", str, check_endpoint),
            service=t.required("service", str, known_service),
            opaque=t.get("opaque", bool, False),
            routes=tuple(routes),
            access_log=t.get("access_log", bool, False),
            allow_connect=t.get("allow_connect", bool, False),
            max_connections=t.get("max_connections", int, 0, _check_count),
            upgrades=tuple(u.lower() for u in t.get("upgrades", list, ["websocket"],
                                                    _check_upgrades)),
        ))
        t.finish()
    return tuple(listeners)


def parse_host_port(text: str) -> HostPort:
    """``host:port`` or ``[v6addr]:port``; raises ValueError with a reason."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("IPv6 addresses go in brackets, as [::1]:8080")
    if not sep or not host:
        raise ValueError("expected host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    return HostPort(host, int(port))


def check_endpoint(text: str) -> str | None:
    """Why a Twisted server endpoint string cannot be used, or None."""
    from twisted.internet import reactor

    try:
        endpoint = serverFromString(reactor, text)
    except (KeyError, IndexError):
        if text.startswith("systemd:"):
            return None  # the descriptor is looked up when systemd hands it over
        return f"unparsable endpoint string {text!r}; {_LISTEN_HINT}"
    except (ValueError, TypeError, AttributeError) as e:
        return f"unparsable endpoint string {text!r}: {e}; {_LISTEN_HINT}"
    except ImportError as e:  # TLS, in a process started without OpenSSL (l5dproxy.app.lean)
        return f"unusable endpoint string {text!r}: {e}"
    except OSError as e:  # ssl: reads its certificate files while parsing
        return f"unusable endpoint string {text!r}: {e.strerror or e}: {e.filename}"
    # TCP endpoints take any integer as the port; catch it here, not at bind.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        return f"unparsable endpoint string {text!r}: port {port} is not from 0 to 65535"
    return None


_LISTEN_HINT = "listen takes a Twisted endpoint string such as tcp:4143:interface=127.0.0.1"
_DURATION_HINT = "durations are numbers of seconds, e.g. 10"


def check_duration(value: float) -> str | None:
    return "must be a duration in seconds, not negative" if value < 0 else None


def check_positive_duration(value: float) -> str | None:
    return "must be a duration in seconds, greater than 0" if value <= 0 else None


#: What to add to "expected X, got Y", by the check the key has.
_TYPE_HINTS: dict[Callable[[Any], str | None], str] = {
    check_duration: _DURATION_HINT, check_positive_duration: _DURATION_HINT,
    check_endpoint: _LISTEN_HINT}


def _check_peek_limit(value: int) -> str | None:
    return None if 64 <= value <= 1 << 20 else "must be between 64 and 1048576 bytes"


def _check_learned_max(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789"
                   "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _check_upgrades(value: list[Any]) -> str | None:
    """Protocol names (RFC 9110 7.8 tokens). ``h2c`` is refused: after its
    101 the client speaks HTTP/2 straight to the endpoint, past every route
    and limit (the "h2c smuggling" attack); h2 clients use prior knowledge."""
    bad = [u for u in value if not isinstance(u, str) or not u or not set(u) <= _TCHARS]
    if bad:
        return f"not protocol names (tokens): {bad!r}"
    if any(u.lower() == "h2c" for u in value):
        return ("h2c cannot be relayed: after its 101 the client would speak HTTP/2 "
                "straight to the endpoint, past routes and limits")
    return None


def _check_ports(value: list[Any]) -> str | None:
    bad = [p for p in value if not _is_kind(p, int) or not 0 < p < 65536]
    return f"not ports: {bad!r}" if bad else None


def _parse_endpoints(s: _Table) -> tuple[HostPort, ...]:
    """``endpoints``, each bad item reported on its own line."""
    endpoints = []
    for i, item in enumerate(s.required("endpoints", list) or ()):
        key = f"endpoints[{i}]"
        if not isinstance(item, str):
            s.error(key, f'expected a string "host:port", got {_type_name(item)}')
            continue
        try:
            endpoints.append(parse_host_port(item))
        except ValueError as e:
            s.error(key, f"{item!r}: {e}")
    return tuple(endpoints)


def _check_protocol(value: str) -> str | None:
    return None if value in PROTOCOLS else f"must be one of {', '.join(PROTOCOLS)}"


def _check_name(value: str) -> str | None:
    return None if value else "must not be empty"


def _check_path_prefix(value: str) -> str | None:
    return None if value.startswith("/") else "must start with '/'"


def _is_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int in Python, never in a config
        return kind is bool or (isinstance(kind, tuple) and bool in kind)
    return isinstance(value, kind)


_KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer",
               float: "a number", list: "an array", dict: "a table"}


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if kind == (int, float):
        return "a number"
    if isinstance(kind, tuple):
        return " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kind)
    return _KIND_NAMES.get(kind, kind.__name__)


def _type_name(value: Any) -> str:
    return _kind_name(type(value))
