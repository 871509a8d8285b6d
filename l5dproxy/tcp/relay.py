"""The opaque TCP relay: bytes both ways, nothing interpreted.

Each side is the other's streaming producer, so a client that stops reading
makes the proxy stop reading from the server (and the other way round), and
memory stays flat whatever is transferred. A half-close travels: the
client's EOF reaches the server as EOF and the server can still answer.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.interfaces import (
    IConnector,
    IHalfCloseableProtocol,
    IProtocol,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from l5dproxy.net import splice
from l5dproxy.net.connection import errno_name, set_no_delay
from l5dproxy.net.transport import IStreamTransport, close, close_write

if TYPE_CHECKING:
    from l5dproxy.balance.backends import BackendSet, Endpoint
    from l5dproxy.net.connection import InboundConnection
    from l5dproxy.telemetry import Metrics, TcpSideMetrics

log = Logger()

#: Client bytes held while the upstream connection is being made; past this
#: the client is paused until the upstream can take them.
CONNECT_BUFFER_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True, eq=False)
class RelaySite:
    """What the relays of one listener share. Built once per listener
    (``l5dproxy.app.listeners``): a reload's new listener gets a new one, so
    a relay keeps the service it was accepted for."""

    #: The listener's name: the ``listener`` label of the dst-side metrics.
    listener: str
    #: The listener's service at run time: endpoints, balancer, retry budget.
    backends: BackendSet
    reactor: IReactorTCP
    clock: IReactorTime
    metrics: Metrics


def relay_handler(site: RelaySite) -> Callable[[InboundConnection], RelayProtocol]:
    """The handler (connection -> protocol) that relays a listener's opaque
    connections: the ``opaque`` entry of its handler table."""
    def relay(conn: InboundConnection) -> RelayProtocol:
        return RelayProtocol(conn, site)
    return relay


class EarlyConnection(typing.Protocol):
    """An upstream connection made, or being made, before the relay
    (``l5dproxy.detect.early.EarlyConnect``), as its adopter uses it."""

    @property
    def endpoint(self) -> Endpoint | None:
        """The endpoint dialled (None once nothing is left to adopt)."""

    def attach(self, adopter: IAdoptsConnection, upstream_protocol: IProtocol) -> bool:
        """Make ``upstream_protocol`` the connection's protocol, now or once
        it is made; False when there is nothing to adopt."""

    def close(self) -> None:
        """Give the connection up (the relay dials another service)."""


class IAdoptsConnection(Interface):
    """A protocol that can take an upstream connection made before it
    (``l5dproxy.detect.early``) instead of dialling, or dial a given endpoint.
    ``RelayProtocol`` provides it; the HTTP server ends do not."""

    def adopt_connection(early: EarlyConnection) -> None:  # noqa: N805 - zope: no self
        """Use ``early`` (made, or being made) instead of dialling."""

    def use_endpoint(endpoint: Endpoint) -> None:  # noqa: N805
        """Dial ``endpoint`` rather than the balancer's pick."""

    def upstream_failed(reason: Failure) -> None:  # noqa: N805
        """The adopted connection's connect failed."""


@implementer(IHalfCloseableProtocol, IAdoptsConnection)
class RelayProtocol(Protocol):
    """The client side of a relayed connection."""

    transport: IStreamTransport

    def __init__(self, conn: InboundConnection, site: RelaySite,
                 target: BackendSet | None = None) -> None:
        self.conn = conn
        self.site = site
        #: The service dialled: the listener's, or an SNI route's (tcp/sni.py).
        self.target: BackendSet = target if target is not None else site.backends
        self.routed = target is not None
        self.upstream: UpstreamProtocol | None = None
        self.endpoint: Endpoint | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.client_eof = False
        self.write_closed = False
        self.closed = False
        self.ended_by = "client closed"
        #: Connects retried on another endpoint after a connect failure.
        self.connect_retries = 0
        #: An upstream connection made before the relay (adopt_connection).
        self.early: EarlyConnection | None = None
        #: The upstream connection is an early one, adopted (adopt_connection).
        self.adopted = False
        #: The endpoint to dial instead of picking one (use_endpoint).
        self.chosen: Endpoint | None = None
        #: Set while the kernel moves the bytes (l5dproxy.net.splice).
        self.splice: splice.Splice | None = None

    def adopt_connection(self, early: EarlyConnection) -> None:
        """Use ``early`` (an upstream connection made, or being made, before
        the relay) instead of dialling; closed instead when the relay dials
        another service (an SNI route)."""
        if self.routed:
            early.close()
            return
        self.early = early

    def use_endpoint(self, endpoint: Endpoint) -> None:
        """Dial ``endpoint`` rather than the balancer's pick."""
        self.chosen = endpoint

    def connectionMade(self) -> None:
        conn = self.conn
        early, self.early = self.early, None
        if early is not None and early.endpoint is not None:
            self.endpoint = early.endpoint
            conn.endpoint = early.endpoint.label
            if early.attach(self, UpstreamProtocol(self)):
                self.adopted = True
                return
            self.endpoint = None
        site = self.site
        backends = self.target
        endpoint, self.chosen = self.chosen or conn.pinned or backends.pick_connection(), None
        if endpoint is None:
            site.metrics.connect_errors_total.labels(backends.name, "", "no_endpoints").inc()
            self.ended_by = "no endpoints"
            self.transport.loseConnection()
            return
        backends.deposit()  # an original connection earns the retry budget
        self._dial(endpoint)

    def _dial(self, endpoint: Endpoint) -> None:
        conn = self.conn
        endpoint.begin()
        self.endpoint = endpoint
        conn.endpoint = endpoint.label
        address = endpoint.address
        service = self.target.config
        reactor = self.site.reactor
        if service.tls is not None:  # TLS origination (issue 13): never spliced
            from l5dproxy.tls.client import dial
            conn.upstream_tls = True
            dial(reactor, service.tls, address, _UpstreamFactory(self), service.connect_timeout)
            return
        reactor.connectTCP(address.host, address.port, _UpstreamFactory(self),
                           timeout=service.connect_timeout)

    def dataReceived(self, data: bytes) -> None:
        self.conn.count_read(len(data))
        if self.upstream is not None:
            self.upstream.write(data)
            return
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > CONNECT_BUFFER_LIMIT:
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        self.client_eof = True
        if self.upstream is not None:
            self.upstream.close_write()
        if self.write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.client_eof:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self.splice is not None:  # closed under the splice (an abort)
            self.splice.hand_back(gone=self.transport)
        if self.upstream is not None:
            self.upstream.close()
        self._release_endpoint()
        self.conn.closed(reason, self.ended_by)

    # -- called by the upstream side --

    def upstream_connected(self, upstream: UpstreamProtocol) -> None:
        if self.closed:
            upstream.close()
            return
        self.upstream = upstream
        if self.endpoint is not None:
            self.endpoint.report(True)  # failure accrual: the endpoint answered
        pending, self.pending, self.pending_size = self.pending, [], 0
        if self.conn.proxy_header and not self.adopted:   # an early one sent it when made
            pending.insert(0, self.conn.proxy_header)
        if not self.client_eof and splice.can_splice(self.transport, upstream.transport):
            # Steady from here: the kernel moves the bytes (held ones first).
            self.splice = splice.Splice(self, upstream, self.site.reactor)
            self.splice.start()
            if pending:
                upstream.write(b"".join(pending))
            return
        if pending:
            upstream.write(b"".join(pending))
        self._relay_through_twisted(upstream)

    def splice_ended(self, spliced: splice.Splice, restore: bool = True) -> None:
        """The splice gave the sockets back: relay through Twisted again
        (unless the connection is closing)."""
        self.splice = None
        upstream = self.upstream
        if restore and not self.closed and upstream is not None:
            upstream.transport.resumeProducing()
            self._relay_through_twisted(upstream)

    def _relay_through_twisted(self, upstream: UpstreamProtocol) -> None:
        # Each side is the other's producer: a full write buffer on one
        # pauses reading on the other.
        self.transport.registerProducer(upstream.transport, True)
        if self.client_eof:
            # The client is done sending: nothing to read from it (resuming
            # it would only read its EOF again), and no producer on the
            # upstream transport, or its half-close would wait for one.
            upstream.close_write()
            return
        upstream.transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()

    def upstream_failed(self, reason: Failure) -> None:
        conn = self.conn
        backends = self.target
        errno = errno_name(reason) or "closed"
        self.site.metrics.connect_errors_total.labels(
            backends.name, conn.endpoint, errno).inc()
        log.info("connect to {endpoint} for {service} failed: {reason}",
                 endpoint=conn.endpoint, service=backends.name,
                 reason=reason.getErrorMessage())
        failed = self.endpoint
        self._release_endpoint(success=False)
        if self.closed:
            return
        # Nothing has reached the client yet: another endpoint may serve it,
        # within the service's retry limit and budget.
        if self.connect_retries < backends.config.retry_limit:
            retry = backends.pick_connection(avoid=failed)
            if retry is not None and retry is not failed and backends.retry_allowed():
                self.connect_retries += 1
                log.info("retrying the connect for {service} on {endpoint}",
                         service=backends.name, endpoint=retry.label)
                self._dial(retry)
                return
        self.ended_by = "connect failed"
        self.transport.loseConnection()

    def write(self, data: bytes) -> None:
        self.conn.count_written(len(data))
        if self.splice is not None:
            self.splice.send_to_client(data)
        else:
            self.transport.write(data)

    def close_write(self) -> None:
        close_write(self.transport)

    def close(self) -> None:
        if not self.closed:
            self.ended_by = "server closed"
        close(self.transport)

    def _release_endpoint(self, success: bool | None = None) -> None:
        """Done with the endpoint; ``success`` is the failure-accrual verdict
        (None: none, as when the client leaves first or after the connect,
        whose success was reported when it happened)."""
        if self.endpoint is not None:
            self.endpoint.end(success=success)
            self.endpoint = None


@implementer(IHalfCloseableProtocol)
class UpstreamProtocol(Protocol):
    """The server side of a relayed connection."""

    transport: IStreamTransport
    #: The dst-side metrics, from connectionMade on.
    dst: TcpSideMetrics

    def __init__(self, relay: RelayProtocol) -> None:
        self.relay = relay
        self.connected_at = 0.0
        self.server_eof = False
        self.write_closed = False

    def connectionMade(self) -> None:
        conn, site = self.relay.conn, self.relay.site
        set_no_delay(self.transport)
        self.connected_at = site.clock.seconds()
        self.dst = site.metrics.tcp_side(
            "dst", site.listener, conn.service, conn.protocol or "opaque", conn.endpoint)
        self.dst.opened()
        self.relay.upstream_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.dst.read_bytes.inc(len(data))
        self.relay.write(data)

    def readConnectionLost(self) -> None:
        self.server_eof = True
        self.relay.close_write()
        if self.write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.server_eof:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.relay.splice is not None:  # closed under the splice (an abort)
            self.relay.splice.hand_back(gone=self.transport)
        self.dst.closed(errno_name(reason), self.relay.site.clock.seconds() - self.connected_at)
        self.relay.close()

    def write(self, data: bytes) -> None:
        self.dst.write_bytes.inc(len(data))
        splicing = self.relay.splice
        if splicing is not None:
            splicing.send_to_server(data)
        else:
            self.transport.write(data)

    def close_write(self) -> None:
        close_write(self.transport)

    def close(self) -> None:
        close(self.transport)


class _UpstreamFactory(ClientFactory):
    noisy = False

    def __init__(self, relay: RelayProtocol) -> None:
        self.relay = relay

    def buildProtocol(self, addr: object) -> UpstreamProtocol:
        return UpstreamProtocol(self.relay)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.relay.upstream_failed(reason)

