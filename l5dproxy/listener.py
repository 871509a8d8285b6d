"""A listener at run time: accepts connections, detects, dispatches.

A ``Listener`` owns what its connections share: its config, the service it
targets, the metrics, the clock, and the table of *handlers* that build the
protocol for each detected protocol name. Until a protocol has a handler of
its own it falls back to the opaque TCP relay, so detection can be counted
before HTTP proxying exists.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IProtocol, IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory

from l5dproxy.balance import Upstream
from l5dproxy.config import DetectConfig, ListenerConfig
from l5dproxy.connection import InboundConnection, set_no_delay
from l5dproxy.detect import DetectProtocol
from l5dproxy.serverfirst import ServerFirst
from l5dproxy.sniff import Verdict
from l5dproxy.tcp import relay_handler
from l5dproxy.telemetry import Metrics

#: Builds the protocol that speaks a detected protocol on a connection.
Handler = Callable[[InboundConnection], IProtocol]

OPAQUE_LISTENER = Verdict("opaque", "opaque_listener")
OPAQUE_PORT = Verdict("opaque", "opaque_port")


class Listener(Factory):
    """The protocol factory of one ``[[listener]]``."""

    noisy = False

    def __init__(self, config: ListenerConfig, detect: DetectConfig,
                 upstreams: dict[str, Upstream], metrics: Metrics,
                 reactor: IReactorTime | IReactorTCP, log_connections: bool = True,
                 handlers: dict[str, Handler] | None = None,
                 server_first: ServerFirst | None = None) -> None:
        self.config = config
        self.name = config.name
        self.detect = detect
        self.upstreams = upstreams
        self.upstream = upstreams[config.service]
        self.metrics = metrics
        self.clock = reactor
        self.reactor = reactor
        self.log_connections = log_connections
        self.handlers: dict[str, Handler] = dict(handlers or {})
        self.connections: set[InboundConnection] = set()
        #: Early connects and learned opaque destinations (l5dproxy.serverfirst).
        self.server_first = server_first
        self._opaque_verdict = self._skip_detection_verdict()
        self._detect_children: dict[tuple[str, str], tuple] = {}

    def _skip_detection_verdict(self) -> Verdict | None:
        if self.config.opaque:
            return OPAQUE_LISTENER
        if self.upstream.opaque:
            return OPAQUE_PORT
        return None

    def buildProtocol(self, addr) -> IProtocol:
        return _Accepting(self)

    def accepted(self, transport) -> IProtocol:
        """A new connection: skip detection on opaque targets, else detect."""
        conn = InboundConnection(self, transport, self.clock.seconds())
        self.connections.add(conn)
        set_no_delay(transport)
        if self._opaque_verdict is not None:
            return self.protocol_for(conn, self._opaque_verdict)
        if self.server_first is not None:
            learned = self.server_first.learned_protocol(self, conn)
            if learned is not None:
                return learned
        return DetectProtocol(conn)

    def protocol_for(self, conn: InboundConnection, verdict: Verdict) -> IProtocol:
        """Count the verdict and build the protocol that speaks it."""
        self._count_detection(conn, verdict)
        conn.detected(verdict)
        handler = self.handlers.get(verdict.protocol, relay_handler)
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


class _Accepting:
    """Stands in as the protocol for the instant between accept and
    ``makeConnection``, when the transport (and so the peer) becomes known."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener

    def makeConnection(self, transport) -> None:
        protocol = self.listener.accepted(transport)
        if getattr(transport, "protocol", None) is self:
            transport.protocol = protocol
        else:  # pragma: no cover - every transport we listen with sets .protocol
            raise RuntimeError("transport does not allow protocol switching")
        protocol.makeConnection(transport)
