"""One accepted client connection, as the rest of the proxy sees it.

Whichever protocol ends up speaking on a connection (the TCP relay, an HTTP
server end) shares this record: it carries the src-side metrics, counts the
bytes, and writes the one log line per closed connection, so every protocol
is counted and logged the same way. What it needs of its listener comes in a
``ListenerSite``, built once per listener (a reload's new listener gets a new
one).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IReactorTime, ISSLTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

if TYPE_CHECKING:
    from l5dproxy.telemetry import Metrics, TcpSideMetrics

log = Logger()


#: Twisted's connection errors, as the errno names Linkerd puts in tcp_close_total.
_ERRNO_NAMES: tuple[tuple[type[BaseException], str], ...] = (
    (error.ConnectionDone, ""),
    (error.ConnectionAborted, "ECONNABORTED"),
    (error.ConnectionRefusedError, "ECONNREFUSED"),
    (error.TCPTimedOutError, "ETIMEDOUT"),
    (error.TimeoutError, "ETIMEDOUT"),
    (error.NoRouteError, "EHOSTUNREACH"),
    (error.ConnectionLost, "ECONNRESET"),
)


def errno_name(reason: Failure | None) -> str:
    """The errno label for how a connection ended ("" for a clean close)."""
    if reason is None:
        return ""
    for exc_type, name in _ERRNO_NAMES:
        if reason.check(exc_type):
            return name
    os_errno = getattr(reason.value, "osError", None) or getattr(reason.value, "errno", None)
    return str(os_errno) if os_errno else "EIO"


@dataclass(frozen=True, slots=True, eq=False)
class ListenerSite:
    """What the connections of one listener share, as their record uses it.

    Built once per listener; a reload's new listener gets a new one, so a
    connection keeps the site it was accepted on. ``connections`` is the
    listener's set of open connections: a record leaves it when it closes.
    """

    #: The listener's name: the ``listener`` label and the log lines.
    name: str
    #: The service the listener sends to (a connection's until a protocol says otherwise).
    service: str
    clock: IReactorTime
    metrics: Metrics
    #: One log line per closed connection (``[proxy] log_connections``).
    log_connections: bool
    connections: set[InboundConnection] = field(default_factory=set)


class Detected(Protocol):
    """A detection verdict, as the record keeps it (``l5dproxy.detect.sniff.Verdict``)."""

    @property
    def protocol(self) -> str: ...
    @property
    def sni(self) -> str | None: ...


class InboundConnection:
    """What is known of one client connection, from accept to close."""

    __slots__ = (
        "accepted_at", "authorized", "bytes_read", "bytes_written", "client", "client_id",
        "destination", "endpoint", "listener", "local", "on_drain", "original_dst", "peer",
        "pinned", "protocol", "proxy_header", "service", "site", "sni", "src", "tls",
        "transport", "upstream_tls", "via",
    )

    def __init__(self, site: ListenerSite, transport, accepted_at: float,
                 listener: Any = None) -> None:
        self.site = site
        #: The ``Listener``, for the HTTP server ends and the dispatcher until
        #: they are given what they use (issue 12 plan D3b); nothing on the
        #: accept, detect or relay path reads it.
        self.listener = listener
        self.transport = transport
        self.accepted_at = accepted_at
        #: The client's address (an IAddress): the peer's, or the one a
        #: PROXY protocol header named (set_client). ``peer`` is it as text
        #: ("10.0.0.1:5000", "[::1]:5000"), ``local`` the address the client
        #: connected to.
        self.client = transport.getPeer()
        self.peer = _address(self.client)
        self.destination = transport.getHost()
        self.local = _address(self.destination)
        #: The peer the connection came from when a PROXY protocol header
        #: named another client (a load balancer), else "".
        self.via = ""
        #: What every upstream connection the TCP relay makes for this
        #: connection starts with: the PROXY protocol header naming its
        #: client when the service has ``send_proxy_protocol``, else b"".
        self.proxy_header = b""
        #: A transparent listener's: the address the client asked for before
        #: NAT redirected it ("" otherwise), and with service "original_dst"
        #: the endpoint every upstream connection and request of this
        #: connection goes to (an l5dproxy.balance.backends.Endpoint).
        self.original_dst = ""
        self.pinned: Any = None   # Endpoint | None (balance/ is above net/)
        self.protocol: str | None = None
        self.sni: str | None = None
        self.service = site.service
        self.endpoint = ""
        self.bytes_read = 0
        self.bytes_written = 0
        self.src: TcpSideMetrics | None = None
        #: Set by a protocol that can end gracefully (HTTP: close once idle).
        self.on_drain: Callable[[], None] | None = None
        #: A terminated TLS connection's handshake (l5dproxy.tls.server.TlsInfo:
        #: version, alpn, sni, client_id; net/ sits below tls/, hence Any).
        self.tls: Any = None
        #: The TCP relay originated TLS to the endpoint ([service.NAME.tls]).
        self.upstream_tls = False
        #: The verified client certificate's identity (mTLS), else None.
        self.client_id: str | None = None
        #: False when [listener.tls] allow refuses the client: every HTTP
        #: request is answered 403 (gRPC PERMISSION_DENIED), TCP is closed.
        self.authorized = True

    def set_original_destination(self, destination: IAddress) -> None:
        """A transparent listener read where the client was going (before an
        iptables REDIRECT): it is this connection's destination."""
        self.destination = destination
        self.local = self.original_dst = _address(destination)

    def set_client(self, client: IAddress, destination: IAddress | None) -> None:
        """A PROXY protocol header (l5dproxy.accept.proxyproto) named the
        client and the address it connected to: from now on they are this
        connection's, in logs, labels, headers and what goes upstream; the
        peer that sent the header is kept as ``via``."""
        self.via = self.peer
        self.client = client
        self.peer = _address(client)
        if destination is not None:
            self.destination = destination
            self.local = _address(destination)

    @property
    def client_host(self) -> str | None:
        """The client's IP address as text (no port, IPv6 without
        brackets), or None for a connection without one (``unix:``)."""
        client = self.client
        return client.host if isinstance(client, IPv4Address | IPv6Address) else None

    @property
    def secure(self) -> bool:
        """Whether the client's bytes reach the proxy over TLS it terminates."""
        return self.tls is not None or ISSLTransport.providedBy(self.transport)

    def detected(self, verdict: Detected) -> None:
        """The protocol is known: the connection counts as open under it."""
        self.protocol = verdict.protocol
        self.sni = verdict.sni
        site = self.site
        self.src = site.metrics.tcp_side(
            "src", site.name, self.service, verdict.protocol, self.local)
        self.src.opened()

    def drain(self) -> None:
        """The proxy is stopping: let the protocol wind the connection down."""
        if self.on_drain is not None:
            self.on_drain()

    def count_read(self, n: int) -> None:
        self.bytes_read += n
        src = self.src
        assert src is not None, "bytes counted before detection"
        src.read_pending += n     # into the counter at scrape or close

    def count_written(self, n: int) -> None:
        self.bytes_written += n
        src = self.src
        assert src is not None, "bytes counted before detection"
        src.write_pending += n

    def closed(self, reason: Failure | None, how: str) -> None:
        """Record the end of the connection: metrics, then one log line."""
        site = self.site
        site.connections.discard(self)
        duration = site.clock.seconds() - self.accepted_at
        errno = errno_name(reason)
        src = self.src
        if src is not None:
            src.closed(errno, duration)
        if site.log_connections:
            fields = dict(
                listener=site.name, peer=self.peer, protocol=self.protocol or "none",
                service=self.service, endpoint=self.endpoint or "-", sni=self.sni or "-",
                bytes_in=self.bytes_read, bytes_out=self.bytes_written,
                duration_ms=duration * 1000.0, end=how + (f" {errno}" if errno else ""),
                tls=self._tls_fields(),
            )
            line = _CLOSED_LINE
            if self.via:   # a PROXY protocol header named the client: who sent it
                line = line.replace("{peer}", "{peer} via={via}")
                fields["via"] = self.via
            if self.original_dst:   # a transparent listener: where the client was going
                line = line.replace("{protocol}", "{protocol} original_dst={original_dst}")
                fields["original_dst"] = self.original_dst
            log.info(line, **fields)

    def _tls_fields(self) -> str:
        """`` tls=... alpn=... client_id=... spliced=no`` for a terminated
        TLS connection (the proxy reads the plaintext, so the kernel cannot
        splice it), `` upstream_tls=yes`` for one the relay carried over TLS
        to its endpoint (not spliced either), else ""."""
        tls = self.tls
        if tls is None:
            # Originated to the endpoint: relayed through Twisted, not spliced.
            return " upstream_tls=yes spliced=no" if self.upstream_tls else ""
        return (f" tls={tls.version} alpn={tls.alpn or '-'} client_id={self.client_id or '-'}"
                f"{'' if self.authorized else ' unauthorized'} spliced=no"
                f"{' upstream_tls=yes' if self.upstream_tls else ''}")


_CLOSED_LINE = (
    "closed listener={listener} peer={peer} protocol={protocol} sni={sni}"
    " service={service} endpoint={endpoint} bytes_in={bytes_in} bytes_out={bytes_out}"
    " duration_ms={duration_ms:.1f} end={end}{tls}")


def set_no_delay(transport) -> None:
    """Turn Nagle off: a proxy writes what it has as soon as it has it, and
    small writes (a response head, an h2 SETTINGS ACK) must not wait for the
    peer's delayed ACK (40 ms on Linux)."""
    set_option = getattr(transport, "setTcpNoDelay", None)
    if set_option is not None:
        with suppress(OSError):
            set_option(True)


def _address(addr) -> str:
    host = getattr(addr, "host", None)
    if host is None:
        return str(addr)
    return f"[{host}]:{addr.port}" if ":" in host else f"{host}:{addr.port}"
