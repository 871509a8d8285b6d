"""The opaque TCP relay: bytes both ways, half-close, connect errors,
backpressure, spreading over endpoints.

Most tests drive the relay with in-memory transports and a
``MemoryReactorClock`` (the upstream connection is made by hand from what the
relay asked the reactor for); ``LoopbackTests`` run it on the real reactor
with real sockets, for what only real sockets show (kernel buffers filling,
``shutdown(SHUT_WR)``).
"""

from __future__ import annotations

from prometheus_client.exposition import generate_latest
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass

from l5dproxy.accept.listener import Listener
from l5dproxy.app.listeners import build_listener
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import DetectConfig, HostPort, ListenerConfig, ServiceConfig
from l5dproxy.http.h1.server import H1Server
from l5dproxy.http.h2.server import H2ServerProtocol
from l5dproxy.net import splice
from l5dproxy.net.connection import ListenerSite
from l5dproxy.tcp.relay import (
    CONNECT_BUFFER_LIMIT,
    IAdoptsConnection,
    RelayProtocol,
    UpstreamProtocol,
)
from l5dproxy.telemetry import Metrics
from tests.relayrig import start_opaque_relay
from tests.support import metric_value, parse_metrics


class HalfCloseTransport(StringTransport):
    """A StringTransport that records ``loseWriteConnection`` and lets the
    reactor's view (``protocol``) be switched, like a TCP transport."""

    def __init__(self, port: int) -> None:
        super().__init__(hostAddress=IPv4Address("TCP", "127.0.0.1", 4143),
                         peerAddress=IPv4Address("TCP", "127.0.0.1", port))
        self.protocol = None
        self.write_closed = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def unregisterProducer(self) -> None:
        """Lenient, as TCP transports are: unregistering nothing is fine."""
        self.producer = None
        self.streaming = None


def samples_of(metrics: Metrics) -> dict:
    return parse_metrics(generate_latest(metrics.registry).decode())


class RelayTestsMixin:
    endpoints = (HostPort("127.0.0.1", 8080),)
    connect_timeout = 5.0

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        self.listener = self.make_listener(self.endpoints)

    def make_listener(self, endpoints) -> Listener:
        service = ServiceConfig("app", tuple(endpoints), connect_timeout=self.connect_timeout)
        detect = DetectConfig()
        backends = {"app": BackendSet(service, detect.opaque_ports)}
        config = ListenerConfig("in", "tcp:0", "app", opaque=True)
        return build_listener(config, detect, backends, self.metrics, self.clock)

    def accept(self, client_port: int = 50000) -> tuple[HalfCloseTransport, RelayProtocol]:
        transport = HalfCloseTransport(client_port)
        accepting = self.listener.buildProtocol(transport.getPeer())
        transport.protocol = accepting
        accepting.makeConnection(transport)
        relay = transport.protocol
        self.assertIsInstance(relay, RelayProtocol)
        return transport, relay

    def connect_upstream(self, index: int = -1) -> tuple[HalfCloseTransport, UpstreamProtocol]:
        """Complete the upstream connection the relay asked the reactor for."""
        host, port, factory, _timeout, _ = self.clock.tcpClients[index]
        upstream = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = HalfCloseTransport(port)
        transport.protocol = upstream
        upstream.makeConnection(transport)
        return transport, upstream

    def fail_upstream(self, reason: Exception, index: int = -1) -> None:
        factory = self.clock.tcpClients[index][2]
        factory.clientConnectionFailed(None, Failure(reason))

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(samples_of(self.metrics), name, **labels)


class RelayTests(RelayTestsMixin, SynchronousTestCase):
    def test_connects_to_the_endpoint(self) -> None:
        self.connect_timeout = 2.5
        self.setUp()
        self.accept()
        ((host, port, _, timeout, _),) = self.clock.tcpClients
        self.assertEqual((host, port, timeout), ("127.0.0.1", 8080, 2.5))

    def test_bytes_both_ways(self) -> None:
        client, relay = self.accept()
        relay.dataReceived(b"early ")
        relay.dataReceived(b"bytes")
        server, upstream = self.connect_upstream()
        self.assertEqual(server.value(), b"early bytes", "held until connected, in order")
        relay.dataReceived(b" later")
        self.assertEqual(server.value(), b"early bytes later")
        upstream.dataReceived(b"answer")
        upstream.dataReceived(b"!")
        self.assertEqual(client.value(), b"answer!")

    def test_counted(self) -> None:
        _client, relay = self.accept()
        relay.dataReceived(b"12345")
        _server, upstream = self.connect_upstream()
        upstream.dataReceived(b"abc")
        m = self.metric
        self.assertEqual(m("tcp_read_bytes_total", peer="src", listener="in"), 5)
        self.assertEqual(m("tcp_write_bytes_total", peer="src"), 3)
        self.assertEqual(m("tcp_write_bytes_total", peer="dst",
                           target_addr="127.0.0.1:8080"), 5)
        self.assertEqual(m("tcp_read_bytes_total", peer="dst"), 3)
        self.assertEqual(m("tcp_open_total", peer="src", protocol="opaque", service="app",
                           direction="inbound"), 1)
        self.assertEqual(m("tcp_open_total", peer="dst"), 1)
        self.assertEqual(m("tcp_open_connections", peer="src"), 1)
        self.assertEqual(m("tcp_open_connections", peer="dst"), 1)
        relay.connectionLost(Failure(error.ConnectionDone()))
        upstream.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(m("tcp_open_connections"), 0)
        self.assertEqual(m("tcp_close_total", peer="src", errno=""), 1)
        self.assertEqual(m("tcp_close_total", peer="dst", errno=""), 1)
        self.assertEqual(self.listener.connections, set())

    def test_closed_by_error_has_errno(self) -> None:
        _, relay = self.accept()
        _, upstream = self.connect_upstream()
        upstream.connectionLost(Failure(error.ConnectionLost()))
        relay.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.metric("tcp_close_total", peer="dst", errno="ECONNRESET"), 1)

    def test_producers_registered_both_ways(self) -> None:
        """Each side is the other's streaming producer: a full write buffer on
        one side pauses reading on the other."""
        client, _ = self.accept()
        server, _ = self.connect_upstream()
        self.assertIs(client.producer, server)
        self.assertIs(server.producer, client)
        self.assertTrue(client.streaming)
        self.assertTrue(server.streaming)
        client.producer.pauseProducing()  # the client's buffer is full
        self.assertEqual(server.producerState, "paused")
        client.producer.resumeProducing()
        self.assertEqual(server.producerState, "producing")

    def test_client_paused_while_connecting(self) -> None:
        """Past CONNECT_BUFFER_LIMIT held bytes, the client is not read any more."""
        client, relay = self.accept()
        relay.dataReceived(b"x" * CONNECT_BUFFER_LIMIT)
        self.assertEqual(client.producerState, "producing")
        relay.dataReceived(b"y")
        self.assertEqual(client.producerState, "paused")
        server, _ = self.connect_upstream()
        self.assertEqual(client.producerState, "producing")
        self.assertEqual(server.value(), b"x" * CONNECT_BUFFER_LIMIT + b"y")

    def test_client_half_close(self) -> None:
        """The client's EOF reaches the server as EOF; the server still answers."""
        client, relay = self.accept()
        server, upstream = self.connect_upstream()
        relay.dataReceived(b"question")
        relay.readConnectionLost()
        self.assertTrue(server.write_closed)
        self.assertIsNone(server.producer, "unregistered, or the half-close would wait")
        self.assertFalse(client.disconnecting)
        upstream.dataReceived(b"answer")
        self.assertEqual(client.value(), b"answer")
        upstream.readConnectionLost()
        self.assertTrue(client.write_closed)
        relay.writeConnectionLost()
        self.assertTrue(client.disconnecting, "both directions done: closed")
        upstream.writeConnectionLost()
        self.assertTrue(server.disconnecting)

    def test_server_half_close(self) -> None:
        client, relay = self.accept()
        server, upstream = self.connect_upstream()
        upstream.dataReceived(b"bye")
        upstream.readConnectionLost()
        self.assertTrue(client.write_closed)
        self.assertFalse(server.disconnecting)
        relay.dataReceived(b"still talking")
        self.assertEqual(server.value(), b"still talking")

    def test_client_eof_before_connected(self) -> None:
        """EOF and data before the upstream connects: the data, then the EOF,
        are passed on once it does, and nothing is re-registered on the
        half-closed transport."""
        _client, relay = self.accept()
        relay.dataReceived(b"all of it")
        relay.readConnectionLost()
        server, _ = self.connect_upstream()
        self.assertEqual(server.value(), b"all of it")
        self.assertTrue(server.write_closed)
        self.assertIsNone(server.producer)

    def test_client_gone_before_connected(self) -> None:
        _client, relay = self.accept()
        relay.connectionLost(Failure(error.ConnectionDone()))
        server, _ = self.connect_upstream()
        self.assertTrue(server.disconnecting)
        endpoint = self.listener.backends.endpoints[0]
        self.assertEqual(endpoint.active, 0)

    def test_server_closes(self) -> None:
        client, _relay = self.accept()
        _server, upstream = self.connect_upstream()
        upstream.dataReceived(b"last words")
        upstream.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(client.value(), b"last words")
        self.assertTrue(client.disconnecting)
        self.assertIsNone(client.producer)

    def test_client_closes(self) -> None:
        _client, relay = self.accept()
        server, _upstream = self.connect_upstream()
        relay.connectionLost(Failure(error.ConnectionDone()))
        self.assertTrue(server.disconnecting)
        self.assertEqual(self.listener.backends.endpoints[0].active, 0)


class ConnectErrorTests(RelayTestsMixin, SynchronousTestCase):
    def check_failure(self, reason: Exception, errno: str) -> None:
        client, relay = self.accept()
        relay.dataReceived(b"hello?")
        self.fail_upstream(reason)
        self.assertTrue(client.disconnecting, "the client is closed at once")
        self.assertEqual(client.value(), b"")
        self.assertEqual(self.metric("endpoint_connect_errors_total", service="app",
                                     target_addr="127.0.0.1:8080", reason=errno), 1)
        self.assertEqual(self.listener.backends.endpoints[0].active, 0)
        relay.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(self.metric("tcp_close_total", peer="src"), 1)
        self.assertEqual(self.metric("tcp_open_total", peer="dst"), 0)

    def test_refused(self) -> None:
        self.check_failure(error.ConnectionRefusedError(), "ECONNREFUSED")

    def test_timeout(self) -> None:
        self.check_failure(error.TimeoutError(), "ETIMEDOUT")

    def test_unreachable(self) -> None:
        self.check_failure(error.NoRouteError(), "EHOSTUNREACH")

    def test_client_gone_first(self) -> None:
        _client, relay = self.accept()
        relay.connectionLost(Failure(error.ConnectionDone()))
        self.fail_upstream(error.ConnectionRefusedError())
        self.assertEqual(self.metric("endpoint_connect_errors_total"), 1)
        self.assertEqual(self.listener.backends.endpoints[0].active, 0)

    def test_no_endpoints(self) -> None:
        self.listener = self.make_listener(())
        client, _ = self.accept()
        self.assertTrue(client.disconnecting)
        self.assertEqual(self.clock.tcpClients, [])
        self.assertEqual(self.metric("endpoint_connect_errors_total", reason="no_endpoints"), 1)


class SpreadTests(RelayTestsMixin, SynchronousTestCase):
    """Connections go to the endpoint with fewer open connections. (With two
    endpoints, P2C over open connections is exactly least-connections.)"""

    endpoints = (HostPort("127.0.0.1", 8001), HostPort("127.0.0.1", 8002))

    def ports_connected(self) -> list[int]:
        return [c[1] for c in self.clock.tcpClients]

    def test_even_spread(self) -> None:
        for i in range(6):
            self.accept(50000 + i)
        self.assertEqual(sorted(self.ports_connected()), [8001] * 3 + [8002] * 3)

    def test_least_connections(self) -> None:
        relays = [self.accept(50000 + i)[1] for i in range(4)]
        for i in range(4):
            self.connect_upstream(i)
        on_8002 = [r for r, p in zip(relays, self.ports_connected(), strict=True) if p == 8002]
        for relay in on_8002:
            relay.connectionLost(Failure(error.ConnectionDone()))
        self.accept(50010)
        self.accept(50011)
        self.assertEqual(self.ports_connected()[-2:], [8002, 8002])
        self.assertEqual([e.active for e in self.listener.backends.endpoints], [2, 2])

    def test_failed_connects_release_the_endpoint(self) -> None:
        transport, _ = self.accept()
        self.fail_upstream(error.ConnectionRefusedError())
        # Nothing reached the client: the connect is retried on the other
        # endpoint (up to the service's retry_limit, 2), each failure released.
        ports = self.ports_connected()
        self.assertEqual(len(ports), 2)
        self.assertNotEqual(ports[0], ports[1])
        self.assertEqual(sorted(e.active for e in self.listener.backends.endpoints), [0, 1])
        self.fail_upstream(error.ConnectionRefusedError())
        self.fail_upstream(error.ConnectionRefusedError())
        self.assertEqual(len(self.ports_connected()), 3)
        self.assertEqual([e.active for e in self.listener.backends.endpoints], [0, 0])
        self.assertTrue(transport.disconnecting)


# -- real sockets ---------------------------------------------------------------------

class WiringTests(SynchronousTestCase):
    """What the accept path is given instead of reaching into the listener."""

    def test_the_relay_adopts_early_connections(self) -> None:
        """The early connection of a silent client (l5dproxy.detect.early) is
        handed to a protocol that declares IAdoptsConnection, with all of its
        methods; the HTTP server ends do not, so theirs is closed."""
        self.assertTrue(verifyClass(IAdoptsConnection, RelayProtocol))
        self.assertFalse(IAdoptsConnection.implementedBy(H1Server))
        self.assertFalse(IAdoptsConnection.implementedBy(H2ServerProtocol))

    def test_a_listener_needs_an_opaque_handler(self) -> None:
        """Verdicts without a handler of their own go to "opaque": a table
        without one is refused when the listener is built, not at the first
        TLS or opaque connection."""
        clock = MemoryReactorClock()
        config = ListenerConfig("in", "tcp:0", "app")
        backends = BackendSet(ServiceConfig("app", (HostPort("127.0.0.1", 8080),)), frozenset())
        site = ListenerSite("in", "app", clock, Metrics(), False)
        with self.assertRaises(ValueError):
            Listener(config, site, DetectConfig(), backends, clock,
                     {"http1": lambda conn: protocol.Protocol()})


class _Collect(protocol.Protocol):
    """Collects what it receives; fires ``lost`` when the connection ends."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.reason: Failure | None = None
        self._waiting: list[defer.Deferred] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def lost(self) -> defer.Deferred:
        """Fires once the connection has ended (``reason`` says how)."""
        if self.reason is not None:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiting.append(d)
        return d


@implementer(IHalfCloseableProtocol)
class _HalfCloseCollect(_Collect):
    """Sees EOF as EOF; closes once both directions are done."""

    write_closed = False

    def readConnectionLost(self) -> None:
        self.eof = True
        self.on_eof()
        if self.write_closed:
            self.transport.loseConnection()

    def on_eof(self) -> None:
        pass

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.eof:
            self.transport.loseConnection()


class _AnswerAfterEof(_HalfCloseCollect):
    def on_eof(self) -> None:
        self.transport.write(b"received %d bytes" % len(self.data))
        self.transport.loseConnection()


class _Flood(_Collect):
    """Writes as fast as its transport lets it, as a streaming producer."""

    chunk = b"z" * 65536

    def connectionMade(self) -> None:
        self.written = 0
        self.paused = False
        self.stopped = False
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.stopped:
            reactor.callLater(0, self._write)

    def stopProducing(self) -> None:
        self.stopped = True

    def _write(self) -> None:
        while not self.paused and not self.stopped:
            self.transport.write(self.chunk)
            self.written += len(self.chunk)


def poll(condition, timeout: float = 10.0, what: str = "condition") -> defer.Deferred:
    """Fire when ``condition()`` is true, checking as the reactor turns."""
    deadline = reactor.seconds() + timeout

    @defer.inlineCallbacks
    def loop():
        while not condition():
            if reactor.seconds() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            yield task.deferLater(reactor, 0.005, lambda: None)

    return loop()


class LoopbackTests(TestCase):
    """The relay between real loopback sockets on the real reactor, through
    Twisted (splicing off: the fallback path; tests.test_splice has the
    spliced one)."""

    timeout = 30

    def setUp(self) -> None:
        self.patch(splice, "ENABLED", False)

    def start(self, server_protocol) -> defer.Deferred:
        start_opaque_relay(self, server_protocol)
        return self.connect_client(_HalfCloseCollect)

    def connect_client(self, client_protocol) -> defer.Deferred:
        creator = protocol.ClientCreator(reactor, client_protocol)
        return creator.connectTCP("127.0.0.1", self.proxy_port).addCallback(self._track)

    def _track(self, client):
        self.addCleanup(self._close, client)
        return client

    @defer.inlineCallbacks
    def _close(self, client):
        client.transport.abortConnection()
        yield client.lost()
        for s in self.servers:
            if s.transport.connected:
                s.transport.abortConnection()
            yield s.lost()
        yield poll(lambda: not self.listener.connections, what="the proxy to close")

    @defer.inlineCallbacks
    def test_half_close(self):
        client = yield self.start(_AnswerAfterEof)
        client.transport.write(b"x" * 100_000)
        client.transport.loseWriteConnection()
        yield client.lost()
        self.assertEqual(bytes(client.data), b"received 100000 bytes")
        self.assertTrue(client.eof, "the server's EOF came back as EOF")

    def relay_of(self, client) -> RelayProtocol:
        port = client.transport.getHost().port
        (conn,) = [c for c in self.listener.connections if c.peer.endswith(f":{port}")]
        return conn.transport.protocol

    @defer.inlineCallbacks
    def test_server_to_client_backpressure(self):
        """A client that stops reading makes the proxy stop reading the server."""
        client = yield self.start(_Flood)
        client.transport.pauseProducing()  # the client stops reading
        relay = self.relay_of(client)
        yield poll(lambda: relay.transport.producerPaused,
                   what="the client side to pause the server side")
        self.assertNotIn(relay.upstream.transport, reactor.getReaders(),
                         "the proxy no longer reads from the server")
        server = self.servers[0]
        yield poll(lambda: server.paused, what="the server to be paused")
        written = server.written
        self.assertLess(written, 64 * 1024 * 1024, "bounded by socket buffers")
        client.transport.resumeProducing()
        yield poll(lambda: server.written > written + 4 * 1024 * 1024,
                   what="the flow to resume")

    @defer.inlineCallbacks
    def test_client_to_server_backpressure(self):
        """A server that stops reading makes the proxy stop reading the client."""
        yield self.start(_Collect)
        flood = yield self.connect_client(_Flood)
        yield poll(lambda: len(self.servers) == 2, what="the upstream connection")
        server = self.servers[1]
        server.transport.pauseProducing()  # the server stops reading
        relay = self.relay_of(flood)
        yield poll(lambda: relay.upstream is not None
                   and relay.upstream.transport.producerPaused,
                   what="the server side to pause the client side")
        self.assertNotIn(relay.transport, reactor.getReaders(),
                         "the proxy no longer reads from the client")
        yield poll(lambda: flood.paused, what="the client to be paused")
        written = flood.written
        self.assertLess(written, 64 * 1024 * 1024, "bounded by socket buffers")
        server.transport.resumeProducing()
        yield poll(lambda: flood.written > written + 4 * 1024 * 1024,
                   what="the flow to resume")

    @defer.inlineCallbacks
    def test_refused(self):
        """An endpoint that refuses: the client's connection is closed at once."""
        self.metrics = Metrics()
        service = ServiceConfig("app", (HostPort("127.0.0.1", _refused_port()),))
        detect = DetectConfig()
        self.listener = build_listener(ListenerConfig("in", "tcp:0", "app", opaque=True), detect,
                                       {"app": BackendSet(service, detect.opaque_ports)},
                                       self.metrics, reactor, log_connections=False)
        port = reactor.listenTCP(0, self.listener, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.proxy_port = port.getHost().port
        self.servers = []
        client = yield self.connect_client(_Collect)
        yield client.lost()
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(metric_value(samples_of(self.metrics), "endpoint_connect_errors_total",
                                      reason="ECONNREFUSED"), 1)


def _refused_port() -> int:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
