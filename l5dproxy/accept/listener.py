"""A listener at run time: accepts connections, detects, dispatches.

A ``Listener`` owns what its connections share: its config, the service it
targets, the records its connections and detect protocols read
(``ListenerSite``, ``DetectSite``), and the table of *handlers* that build
the protocol for each detected protocol name ("http1", "h2", "opaque"). A
verdict without a handler of its own ("tls") goes to the "opaque" one, the
TCP relay. The table is built by ``l5dproxy.app.listeners``: nothing here
imports a protocol that speaks after detection.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.interfaces import IProtocol, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from l5dproxy.accept.proxyproto import ProxyHeaderProtocol
from l5dproxy.accept.transparent import OriginalDestinations, Refused
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import ORIGINAL_DST, DetectConfig, ListenerConfig
from l5dproxy.detect.early import Detecting, EarlyConnect, ServerFirst
from l5dproxy.detect.protocol import DetectProtocol, DetectSite
from l5dproxy.detect.sniff import Verdict
from l5dproxy.net import proxyheader
from l5dproxy.net.connection import InboundConnection, ListenerSite, set_no_delay
from l5dproxy.net.transport import switch_protocol

#: Builds the protocol that speaks a detected protocol on a connection.
Handler = Callable[[InboundConnection], IProtocol]

log = Logger()

#: At most one log line per listener per this many seconds about the
#: connections a max_connections limit closed (with how many since the last).
LIMIT_LOG_INTERVAL = 10.0

OPAQUE_LISTENER = Verdict("opaque", "opaque_listener")
OPAQUE_PORT = Verdict("opaque", "opaque_port")


class Listener(Factory):
    """The protocol factory of one ``[[listener]]``."""

    noisy = False

    def __init__(self, config: ListenerConfig, site: ListenerSite, detect: DetectConfig,
                 backends: BackendSet, reactor: Any, handlers: Mapping[str, Handler], *,
                 server_first: ServerFirst | None = None,
                 watch: Callable[[Detecting], EarlyConnect | None] | None = None,
                 limits: ConnectionLimits | None = None) -> None:
        """``handlers`` must have "opaque"; ``watch`` starts a detect
        protocol's client-silence window and ``server_first`` knows the
        destinations that spoke first (both ``l5dproxy.detect.early``)."""
        if "opaque" not in handlers:
            raise ValueError("a listener's handlers need an 'opaque' one (the TCP relay)")
        self.config = config
        self.name = config.name
        self.detect = detect
        self.backends = backends
        self.metrics = site.metrics
        #: ``reactor`` provides both (Twisted's reactors do; zope interfaces
        #: have no intersection type, so the parameter is Any).
        self.clock: IReactorTime = reactor
        self.reactor: IReactorTCP = reactor
        self.log_connections = site.log_connections
        self.handlers: dict[str, Handler] = dict(handlers)
        self._opaque_handler = self.handlers["opaque"]
        #: What its connections' records share (their set of open connections too).
        self.site = site
        self.connections: set[InboundConnection] = site.connections
        #: What its detect protocols share, the verdict callables included.
        self.detect_site = DetectSite(detect.peek_limit, detect.timeout, reactor,
                                      self.protocol_for, self.detection_abandoned, watch)
        #: Early connects and learned opaque destinations (l5dproxy.detect.early).
        self.server_first = server_first
        self._opaque_verdict = self._skip_detection_verdict()
        self._detect_children: dict[tuple[str, str], tuple] = {}
        #: The max_connections limits (None: none).
        self.limits = limits
        #: A transparent listener's original destinations (l5dproxy.accept.transparent).
        self.transparent = OriginalDestinations(
            self.backends, config.service == ORIGINAL_DST,
            lambda reason: site.metrics.original_dst_refused_total.labels(self.name, reason).inc(),
        ) if config.transparent else None

    def _skip_detection_verdict(self) -> Verdict | None:
        if self.config.opaque:
            return OPAQUE_LISTENER
        if self.backends.opaque:
            return OPAQUE_PORT
        return None

    def buildProtocol(self, addr) -> Protocol:
        return _Accepting(self)

    def accepted(self, transport) -> IProtocol:
        """A new connection: closed at once past a max_connections limit,
        else skip detection on opaque targets, else detect."""
        limits = self.limits
        if limits is not None and not limits.admit(self):
            return _Refused()
        conn = InboundConnection(self.site, transport, self.clock.seconds(), self)
        self.connections.add(conn)
        set_no_delay(transport)
        if self.transparent is not None:
            refused = self.transparent.accepted(conn, transport)
            if refused is not None:
                return Refused(conn, refused)
        mode = self.config.proxy_protocol
        if mode != "off":   # the client's address first, then the rest as usual
            return ProxyHeaderProtocol(conn, mode, self.config.proxy_protocol_timeout,
                                       self.clock, lambda: self._after_accept(conn),
                                       self._count_proxy_protocol)
        return self._after_accept(conn)

    def _count_proxy_protocol(self, result: str) -> None:
        self.metrics.proxy_protocol_total.labels(self.name, result).inc()

    def _after_accept(self, conn: InboundConnection) -> IProtocol:
        """Skip detection on opaque targets, else detect."""
        version = self.backends.config.send_proxy_protocol
        if version is not None:   # the client is known now, PROXY header in or not
            conn.proxy_header = proxyheader.encode(version, conn.client, conn.destination)
        if self._opaque_verdict is not None:
            return self.protocol_for(conn, self._opaque_verdict)
        if conn.pinned is not None and conn.pinned.address.port in self.detect.opaque_ports:
            return self.protocol_for(conn, OPAQUE_PORT)   # its original destination's port
        if self.server_first is not None:
            learned = self.server_first.learned_protocol(self.backends, conn, self.protocol_for)
            if learned is not None:
                return learned
        return DetectProtocol(conn, self.detect_site)

    def protocol_for(self, conn: InboundConnection, verdict: Verdict) -> IProtocol:
        """Count the verdict and build the protocol that speaks it."""
        self._count_detection(conn, verdict)
        conn.detected(verdict)
        handler = self.handlers.get(verdict.protocol, self._opaque_handler)
        return handler(conn)

    def detection_abandoned(self, conn: InboundConnection) -> None:
        """The client went away before a verdict."""
        self._count_detection(conn, Verdict("none", "closed"))

    def _count_detection(self, conn: InboundConnection, verdict: Verdict) -> None:
        key = (verdict.protocol, verdict.reason)
        children = self._detect_children.get(key)
        if children is None:
            m = self.metrics
            children = (
                m.protocol_detect_total.labels(self.name, verdict.protocol, verdict.reason),
                m.protocol_detect_duration_seconds.labels(self.name, verdict.protocol),
            )
            self._detect_children[key] = children
        total, duration = children
        total.inc()
        duration.observe(self.clock.seconds() - conn.accepted_at)


class ConnectionLimits:
    """``[proxy] max_connections`` and ``[[listener]] max_connections``: how
    many client connections may be open at once, over every listener and on
    one. A connection past either is accepted and closed at once (nginx's
    ``limit_conn`` and Envoy's ``max_connections`` do the same: the kernel
    has already accepted it, so closing is the only answer), counted in
    ``connection_limit_total{listener}`` and logged at most once per
    ``LIMIT_LOG_INTERVAL`` seconds per listener.

    ``listeners()`` gives every listener whose connections count, the ones a
    reload retired included, so a reload neither resets nor doubles a count;
    ``max_connections`` is read from the config at each accept, so a reload
    applies at once (connections over a lowered limit are not closed).
    """

    def __init__(self, max_connections: Callable[[], int],
                 listeners: Callable[[], list[Listener]]) -> None:
        self.max_connections = max_connections
        self.listeners = listeners
        self._refused: dict[str, int] = {}
        self._logged_at: dict[str, float] = {}

    def admit(self, listener: Listener) -> bool:
        """Whether a connection just accepted by ``listener`` may stay."""
        own = listener.config.max_connections
        total = self.max_connections()
        if not own and not total:
            return True
        name = listener.name
        mine = everyone = 0
        for other in self.listeners():
            n = len(other.connections)
            everyone += n
            if other.name == name:
                mine += n
        if own and mine >= own:
            self._refuse(listener, f"listener max_connections ({own})")
            return False
        if total and everyone >= total:
            self._refuse(listener, f"proxy max_connections ({total})")
            return False
        return True

    def _refuse(self, listener: Listener, limit: str) -> None:
        name = listener.name
        listener.metrics.connection_limit_total.labels(name).inc()
        refused = self._refused[name] = self._refused.get(name, 0) + 1
        now = listener.clock.seconds()
        last = self._logged_at.get(name)
        if last is None or now - last >= LIMIT_LOG_INTERVAL:
            self._logged_at[name] = now
            self._refused[name] = 0
            log.warn("listener {listener}: {limit} reached: {n} new connection(s) closed at"
                     " once (logged at most every {interval:g} s)", listener=name,
                     limit=limit, n=refused, interval=LIMIT_LOG_INTERVAL)


class _Refused(Protocol):
    """The protocol of a connection past a limit: closed as soon as it is made."""

    def connectionMade(self) -> None:
        assert self.transport is not None  # set by makeConnection
        self.transport.loseConnection()


class _Accepting(Protocol):
    """Stands in as the protocol for the instant between accept and
    ``makeConnection``, when the transport (and so the peer) becomes known."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def makeConnection(self, transport) -> None:
        protocol = self.listener.accepted(transport)
        if not switch_protocol(transport, self, protocol):
            # pragma: no cover - every transport we listen with sets .protocol
            raise RuntimeError("transport does not allow protocol switching")
        protocol.makeConnection(transport)
