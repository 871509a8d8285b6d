"""Server-speaks-first protocols without configuration.

A proxy that waits for the client's first bytes before it connects upstream
stalls every server-speaks-first protocol (MySQL, SMTP, SSH, FTP, NATS, ...)
for the whole detect timeout: the client waits for the server's banner, the
server waits for a connection. Two things here remove the stall:

* ``EarlyConnect``: while the detect protocol waits, a client that has sent
  nothing for ``[detect] client_silence`` seconds makes the proxy open the
  upstream connection (the endpoint is picked as the relay picks it). If the
  server speaks first, the verdict is ``opaque`` (reason ``server_first``)
  and the TCP relay adopts the open connection, with the server's bytes
  replayed to the client at once. If the client speaks first after all,
  detection goes on; the connection is then adopted by the verdict's
  protocol if it can take one (the TCP relay can), or closed.
* ``ServerFirst.learned_protocol``: destinations (service, endpoint) that
  spoke first are remembered (``l5dproxy.detect.memory.OpaqueMemory``), so
  later connections to them go straight to the relay with no window at all
  (reason ``learned_opaque``).

The default window (25 ms, ``DetectConfig.client_silence``) comes from
measurement: from accept to a client-speaks-first client's first bytes (curl,
python http.client, openssl s_client) took at most 0.3 ms on an idle
loopback and at most 17 ms (p99 12 ms) with the 2-core machine three times
oversubscribed; 25 ms stays above that, and a server-speaks-first banner
still arrives ~26 ms after connect, against the 250 ms budget and the 10 s
detect timeout. A client merely slower than the window costs an upstream
connection made early (used by the relay, or closed), never a delay.

Early connections are bounded per listener (``EARLY_CONNECT_LIMIT`` being
made or held unadopted at once), so a flood of silent client connections
cannot become a flood of upstream dials: past the bound a silent client gets
no early connection (counted in ``early_connect_limit_total{listener}``) and
waits for detection as if the window were off; destinations already learned
to speak first skip the window and are not affected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet import protocol
from twisted.internet.error import NotConnectingError
from twisted.internet.interfaces import IConnector, IDelayedCall, IProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.detect.memory import OpaqueMemory
from l5dproxy.detect.sniff import Verdict
from l5dproxy.net.connection import errno_name
from l5dproxy.net.transport import IStreamTransport, switch_protocol
from l5dproxy.tcp.relay import IAdoptsConnection

if TYPE_CHECKING:
    from l5dproxy.balance.backends import BackendSet, Endpoint
    from l5dproxy.net.connection import InboundConnection
    from l5dproxy.tcp.relay import RelaySite

log = Logger()

SERVER_FIRST = Verdict("opaque", "server_first")
LEARNED_OPAQUE = Verdict("opaque", "learned_opaque")

#: Early upstream connections one listener may have being made or held
#: (not yet adopted or closed) at once. Under the bench's flood of 2,000
#: silent connections each of them dialled the endpoint (issue 11).
EARLY_CONNECT_LIMIT = 128


class Detecting(Protocol):
    """The detect protocol, as its early connection uses it
    (``l5dproxy.detect.protocol.DetectProtocol``)."""

    @property
    def buffer(self) -> bytes:
        """What the client has sent so far (empty: it has not spoken)."""

    @property
    def conn(self) -> InboundConnection:
        """The client's connection (its ``proxy_header`` goes upstream first)."""

    def decide(self, verdict: Verdict) -> None:
        """A verdict from here (the server spoke first), unless one is in."""


class ServerFirst:
    """What the listeners of one proxy share for server-speaks-first traffic."""

    def __init__(self, memory: OpaqueMemory, client_silence: float,
                 on_limit: Callable[[str], None] | None = None) -> None:
        self.memory = memory
        #: Seconds of client silence before the upstream is dialled; 0 turns
        #: early connecting (and so learning) off.
        self.client_silence = client_silence
        #: Early connections held per listener (by its RelaySite; EarlyConnect.counted).
        self.held: dict[RelaySite, int] = {}
        #: Told (with the listener's name) of each silent client refused an
        #: early connection (app/ counts it in ``early_connect_limit_total{listener}``).
        self.on_limit = on_limit

    def learned_protocol(
            self, backends: BackendSet, conn: InboundConnection,
            protocol_for: Callable[[InboundConnection, Verdict], IProtocol],
    ) -> IProtocol | None:
        """The relay (``protocol_for`` the verdict ``learned_opaque``) for a
        connection to ``backends`` whose picked endpoint is known to speak
        first, dialling that endpoint; None when detection should run."""
        if not self.memory.has_service(backends.name):
            return None
        endpoint = conn.pinned or backends.pick_connection()
        if endpoint is None or not self.memory.knows(
                backends.name, endpoint.label, backends.config):
            return None
        protocol = protocol_for(conn, LEARNED_OPAQUE)
        adopter = IAdoptsConnection(protocol, None)
        if adopter is not None:
            adopter.use_endpoint(endpoint)
        return protocol

    def watch(self, detect: Detecting, relay: RelaySite) -> EarlyConnect | None:
        """Start the client-silence window for a detect protocol on the
        listener whose relays share ``relay``."""
        if self.client_silence <= 0:
            return None
        return EarlyConnect(self, detect, relay)


# EarlyConnect states
_WAITING, _CONNECTING, _CONNECTED, _ATTACHED, _DONE = range(5)


class EarlyConnect:
    """The upstream connection one detect protocol opens while its client is
    silent, until the detect protocol's verdict gives it to a protocol that
    adopts it (``IAdoptsConnection``: the TCP relay) or closes it.

    Never leaked: every path ends in ``attach`` (the adopter owns the
    connection and the endpoint's begin/end from then on) or ``close``.
    """

    def __init__(self, server_first: ServerFirst, detect: Detecting, relay: RelaySite) -> None:
        self.server_first = server_first
        self.detect = detect
        #: The listener's relay site: its service, reactor, clock and metrics.
        self.relay = relay
        self.state = _WAITING
        self.endpoint: Endpoint | None = None
        self.connector: IConnector | None = None
        self.protocol: _EarlyProtocol | None = None
        self.server_bytes: list[bytes] = []
        self.adopter: IAdoptsConnection | None = None
        self._adopter_protocol: IProtocol | None = None
        #: Counted in ``server_first.held`` (being made or held unadopted).
        self.counted = False
        self.timer: IDelayedCall | None = relay.clock.callLater(
            server_first.client_silence, self._silence)

    # -- from the detect protocol --

    def client_spoke(self) -> None:
        """The client sent bytes: no early connection if none is made yet."""
        if self.state == _WAITING:
            self._cancel_timer()
            self.state = _DONE

    @property
    def listening(self) -> bool:
        """Connected to the endpoint early and waiting: a server that speaks
        first is noticed from now on, whenever it speaks."""
        return self.state == _CONNECTED

    def hand_to(self, protocol: IProtocol) -> None:
        """The verdict is in and ``protocol`` will speak it: let it adopt the
        connection (``IAdoptsConnection``) if it can, else close it."""
        self._cancel_timer()
        if self.state in (_CONNECTING, _CONNECTED):
            adopter = IAdoptsConnection(protocol, None)
            if adopter is not None:
                adopter.adopt_connection(self)
                return
        self.close()

    def close(self) -> None:
        """Give up the early connection (and the endpoint it holds)."""
        self._cancel_timer()
        self._uncount()
        state, self.state = self.state, _DONE
        if state == _CONNECTING:
            assert self.connector is not None  # set with _CONNECTING
            with contextlib.suppress(NotConnectingError):
                self.connector.stopConnecting()  # -> _failed, a no-op now
            self._release(success=None)  # given up, not failed: no accrual verdict
        elif state == _CONNECTED:
            assert self.protocol is not None  # set with _CONNECTED
            self.protocol.transport.loseConnection()
            self._release(success=True)  # the endpoint did answer

    # -- from the adopter (the TCP relay) --

    def attach(self, adopter: IAdoptsConnection, upstream_protocol: IProtocol) -> bool:
        """Make ``upstream_protocol`` the protocol of the early connection
        (now, or once it is made), replaying what the server already sent.
        ``adopter`` gets ``upstream_failed(reason)`` if the connect fails.
        False when there is no connection to adopt: the adopter dials."""
        self._uncount()
        if self.state == _CONNECTED:
            self.state = _ATTACHED
            self.endpoint = None  # the adopter owns it now
            self._switch(upstream_protocol)
            return True
        if self.state == _CONNECTING:
            self.state = _ATTACHED
            self.endpoint = None
            self.adopter = adopter
            self._adopter_protocol = upstream_protocol
            return True
        return False

    # -- internals --

    def _cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def _silence(self) -> None:
        self.timer = None
        if self.state != _WAITING:
            return
        server_first, relay = self.server_first, self.relay
        held = server_first.held
        if held.get(relay, 0) >= EARLY_CONNECT_LIMIT:
            self.state = _DONE   # detection goes on without an early connection
            if server_first.on_limit is not None:
                server_first.on_limit(relay.listener)
            return
        backends = relay.backends
        endpoint = self.detect.conn.pinned or backends.pick_connection()
        if endpoint is None:
            self.state = _DONE
            return
        held[relay] = held.get(relay, 0) + 1
        self.counted = True
        endpoint.begin()
        self.endpoint = endpoint
        self.state = _CONNECTING
        address = endpoint.address
        reactor = relay.reactor
        if backends.config.tls is not None:  # as the relay dials it (tcp/relay.py)
            from l5dproxy.tls.client import dial
            connector: Any = dial(reactor, backends.config.tls, address, _EarlyFactory(self),
                                  backends.config.connect_timeout)
            self.connector = connector
            return
        self.connector = reactor.connectTCP(address.host, address.port, _EarlyFactory(self),
                                            timeout=backends.config.connect_timeout)

    def _connected(self, protocol: _EarlyProtocol) -> None:
        self.protocol = protocol
        header = self.detect.conn.proxy_header   # first, as on the relay's own connections
        if header and self.state in (_CONNECTING, _ATTACHED) and protocol.transport is not None:
            protocol.transport.write(header)
        if self.state == _CONNECTING:
            self.state = _CONNECTED
        elif self.state == _ATTACHED and self._adopter_protocol is not None:
            adopter_protocol, self._adopter_protocol = self._adopter_protocol, None
            self.adopter = None
            self._switch(adopter_protocol)
        else:  # closed while the connect was completing
            protocol.transport.loseConnection()

    def _server_data(self, data: bytes) -> None:
        """The server spoke before any verdict: it speaks first."""
        self.server_bytes.append(data)
        if self.state != _CONNECTED:
            return
        detect = self.detect
        if not detect.buffer:
            backends, endpoint = self.relay.backends, self.endpoint
            assert endpoint is not None  # held while _CONNECTED
            self.server_first.memory.learn(backends.name, endpoint.label, backends.config)
            log.info("{service} endpoint {endpoint} speaks first: relaying as opaque TCP",
                     service=backends.name, endpoint=endpoint.label)
        detect.decide(SERVER_FIRST)

    def _failed(self, reason: Failure) -> None:
        self._uncount()
        state, self.state = self.state, _DONE
        if state == _ATTACHED and self.adopter is not None:
            adopter, self.adopter, self._adopter_protocol = self.adopter, None, None
            adopter.upstream_failed(reason)  # the adopter owns the endpoint now
            return
        if state == _CONNECTING:
            relay, endpoint = self.relay, self.endpoint
            assert endpoint is not None  # held while _CONNECTING
            relay.metrics.connect_errors_total.labels(
                relay.backends.name, endpoint.label, errno_name(reason) or "closed").inc()
            self._release(success=False)

    def _lost(self) -> None:
        """The server closed before anyone adopted the connection."""
        if self.state == _CONNECTED:
            self._uncount()
            self.state = _DONE
            self._release(success=True)

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            held, relay = self.server_first.held, self.relay
            held[relay] -= 1
            if not held[relay]:
                del held[relay]

    def _switch(self, protocol: IProtocol) -> None:
        early = self.protocol
        assert early is not None  # connected
        transport = early.transport
        switch_protocol(transport, early, protocol)  # else: early forwards
        early.forward_to = protocol
        protocol.makeConnection(transport)
        pending, self.server_bytes = self.server_bytes, []
        for data in pending:
            protocol.dataReceived(data)

    def _release(self, success: bool | None) -> None:
        if self.endpoint is not None:
            self.endpoint.end(success=success)
            self.endpoint = None


class _EarlyProtocol(protocol.Protocol):
    """The early connection's protocol until an adopter takes over; where the
    transport cannot switch protocols it stays as a forwarder."""

    transport: IStreamTransport

    def __init__(self, early: EarlyConnect) -> None:
        self.early = early
        self.forward_to: IProtocol | None = None

    def connectionMade(self) -> None:
        self.early._connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.forward_to is not None:
            self.forward_to.dataReceived(data)
        else:
            self.early._server_data(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.forward_to is not None:
            self.forward_to.connectionLost(reason)
        else:
            self.early._lost()


class _EarlyFactory(protocol.ClientFactory):
    noisy = False

    def __init__(self, early: EarlyConnect) -> None:
        self.early = early

    def buildProtocol(self, addr: object) -> _EarlyProtocol:
        return _EarlyProtocol(self.early)

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.early._failed(reason)
