"""What a config is: the frozen records a config file becomes.

``l5dproxy.config.parse`` builds them from TOML (checking every value);
everything else reads them. Each field's comment gives its unit and what it
bounds; README.rst's configuration reference documents every key.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

DEFAULT_OPAQUE_PORTS = frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211})
#: ``[[listener]] proxy_protocol`` and ``forwarded``, ``[service] send_proxy_protocol``.
PROXY_PROTOCOL_MODES = ("off", "required", "optional")
FORWARDED_MODES = ("append", "replace", "off")
PROXY_PROTOCOL_VERSIONS = ("v1", "v2")
#: The service of a transparent listener that sends each connection to its
#: original destination (built in, never a [service.NAME] table).
ORIGINAL_DST = "original_dst"

PROTOCOLS = ("http1", "h2")


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int
    #: The DNS name ``host`` was found under (``endpoints``, ``dns``, an SRV
    #: target), "" when it was given as an address; not part of equality.
    #: TLS origination verifies it (a service's ``tls.server_name`` default).
    name: str = field(default="", compare=False)

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
    #: SNI passthrough: a glob matched against a TLS ClientHello's server
    #: name on a listener without [listener.tls]; the connection goes to
    #: ``service`` as opaque TCP, unterminated (l5dproxy.tcp.sni). Such a
    #: route has no host or path_prefix and takes no part in HTTP routing.
    sni: str | None = None


@dataclass(frozen=True)
class CertificateConfig:
    """One ``{ cert = "PATH", key = "PATH" }`` (absolute paths)."""

    cert: str
    key: str


@dataclass(frozen=True)
class ListenerTlsConfig:
    """``[listener.tls]``: the listener terminates TLS (l5dproxy.tls.server)."""

    #: PEM certificate (chain allowed) and key pairs; the first is the default.
    certificates: tuple[CertificateConfig, ...]
    alpn: tuple[str, ...] = ("h2", "http/1.1")
    min_version: str = "1.2"
    handshake_timeout: float = 10.0
    session_tickets: bool = False
    #: PEM roots client certificates must chain to (mTLS); None: none asked for.
    client_ca: str | None = None
    #: Glob patterns over the client's identity; None: any verified client.
    allow: tuple[str, ...] | None = None


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
    #: PROXY protocol in: "off", "required" or "optional" (l5dproxy.accept.proxyproto).
    proxy_protocol: str = "off"
    #: Seconds a connection has to send its whole PROXY protocol header.
    proxy_protocol_timeout: float = 5.0
    #: X-Forwarded-For/-Proto and Forwarded: "append", "replace" or "off"
    #: (l5dproxy.route.forwarded).
    forwarded: str = "append"
    #: Peers (CIDR networks) whose forwarding fields are kept as they came.
    trusted_proxies: tuple[str, ...] = ()
    #: [listener.tls]: terminate TLS; None: TLS is relayed (or SNI-routed) opaque.
    tls: ListenerTlsConfig | None = None
    #: Each connection's destination is its original one (SO_ORIGINAL_DST,
    #: after an iptables REDIRECT); with service = "original_dst" the proxy
    #: connects there.
    transparent: bool = False


@dataclass(frozen=True, slots=True)
class Target:
    """How a client end reaches one service's endpoints, handed over with
    every request (``ClientEnd.send``): the pool key with the endpoint, so
    two services whose endpoints share an address never share a
    connection, a label or a timeout."""

    #: The service's name: half of the pool key, the dst metrics' ``service`` label.
    service: str
    #: Seconds each dial may take (and a request's wait for a connection or stream).
    connect_timeout: float = 5.0
    #: Seconds an unused upstream connection is kept (HTTP/1 and h2).
    idle_timeout: float = 60.0
    #: [service.NAME.tls]: dial TLS (l5dproxy.tls.client.dial); None: plaintext.
    tls: ServiceTlsConfig | None = None


@dataclass(frozen=True, eq=False)
class ServiceTlsConfig:
    """``[service.NAME.tls]``: connections to the service's endpoints
    originate TLS (``l5dproxy.tls.client``). Paths are absolute (a relative
    one is taken from the config file's folder). Compared by identity: each
    parse (start, reload) makes a new record, and its files are read anew."""

    #: PEM trust roots the endpoints' certificates must chain to; None: the system's.
    ca: str | None = None
    #: SNI and the identity verified; None: the name each endpoint was found
    #: under (``endpoints``, ``dns``, an SRV target), else its address.
    server_name: str | None = None
    #: ALPN protocols offered; None: the client end's own (``h2`` for h2,
    #: ``http/1.1`` for HTTP/1, none for the TCP relay).
    alpn: tuple[str, ...] | None = None
    #: Client certificate (PEM chain, leaf first) and its PEM key, for mTLS.
    cert: str | None = None
    key: str | None = None


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
    #: PROXY protocol out: "v1" or "v2" header first on every upstream
    #: connection (TCP relay only; l5dproxy.net.proxyheader). None: none.
    send_proxy_protocol: str | None = None
    #: Retry budget: ratio of original requests + min_per_second over ttl seconds.
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_second: float = 10.0
    retry_budget_ttl: float = 10.0
    #: HTTP requests in flight to the service (waiting for an endpoint or a
    #: connection included) past which new ones are shed with 503; 0: none.
    max_pending_requests: int = 10000
    #: [service.NAME.tls]: originate TLS to the endpoints; None: plaintext.
    tls: ServiceTlsConfig | None = None

    def is_opaque(self, opaque_ports: frozenset[int]) -> bool:
        """Opaque by flag, or because every endpoint is on a server-speaks-first port."""
        if self.opaque:
            return True
        if self.dns is not None:
            return self.dns.port in opaque_ports
        return bool(self.endpoints) and all(e.port in opaque_ports for e in self.endpoints)

    @functools.cached_property
    def target(self) -> Target:
        """This service as its client ends see it; one object per config, so
        a reload (a new ``ServiceConfig``) is a new target, and a pool tells
        a change by identity (``pool.target is not target``)."""
        return Target(self.name, self.connect_timeout, self.idle_timeout, self.tls)


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


@dataclass(frozen=True, slots=True)
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
    #: BackendSet HTTP/1 connections to one endpoint at most; requests past them wait.
    max_connections_per_endpoint: int = 1024


@dataclass(frozen=True, slots=True)
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
    #: The HTTP/2 codec: "h2" (the pure-Python library), "nghttp2" (libnghttp2
    #: through cffi), or "auto" (nghttp2 if it loads, else h2).
    engine: str = "auto"
