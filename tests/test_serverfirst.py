"""Server-speaks-first without configuration: the learned-opaque memory (pure,
with a Clock) and the early connect of the detect protocol (MemoryReactorClock
and StringTransport: no sockets)."""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from l5dproxy.accept.listener import Listener
from l5dproxy.app.admin import OpaqueResource
from l5dproxy.app.listeners import build_listener
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.checks import parse_host_port
from l5dproxy.config.model import DetectConfig, ListenerConfig, ServiceConfig
from l5dproxy.config.parse import ConfigError, parse
from l5dproxy.detect.early import EARLY_CONNECT_LIMIT, ServerFirst
from l5dproxy.detect.memory import OpaqueMemory
from l5dproxy.detect.protocol import DetectProtocol
from l5dproxy.tcp.relay import RelayProtocol, UpstreamProtocol
from l5dproxy.telemetry import Metrics

SILENCE = 0.025
BANNER = b"220 smtp.example ESMTP ready\r\n"
HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class OpaqueMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.memory = OpaqueMemory(self.clock, max_entries=3, ttl=60.0)

    def test_learn_and_know(self) -> None:
        m = self.memory
        self.assertFalse(m.knows("db", "10.0.0.1:3307"))
        self.assertFalse(m.has_service("db"))
        m.learn("db", "10.0.0.1:3307")
        self.assertTrue(m.has_service("db"))
        self.assertTrue(m.knows("db", "10.0.0.1:3307"))
        self.assertFalse(m.knows("db", "10.0.0.2:3307"))
        self.assertFalse(m.knows("other", "10.0.0.1:3307"))

    def test_expiry(self) -> None:
        m = self.memory
        m.learn("db", "a:1")
        self.clock.advance(59.9)
        self.assertTrue(m.knows("db", "a:1"))
        self.clock.advance(0.1)
        self.assertFalse(m.knows("db", "a:1"))
        self.assertEqual(len(m), 0)
        self.assertFalse(m.has_service("db"))

    def test_relearning_restarts_the_expiry(self) -> None:
        m = self.memory
        m.learn("db", "a:1")
        self.clock.advance(50)
        m.learn("db", "a:1")
        self.clock.advance(50)
        self.assertTrue(m.knows("db", "a:1"))
        self.assertEqual(len(m), 1)

    def test_hits_do_not_extend_the_expiry(self) -> None:
        m = self.memory
        m.learn("db", "a:1")
        for _ in range(6):
            self.clock.advance(10)
            m.knows("db", "a:1")
        self.assertFalse(m.knows("db", "a:1"))

    def test_size_bound_evicts_the_oldest(self) -> None:
        m = self.memory
        for i in range(5):
            m.learn("db", f"a:{i}")
            self.clock.advance(1)
        self.assertEqual(len(m), 3)
        self.assertEqual([e["endpoint"] for e in m.entries()], ["a:2", "a:3", "a:4"])
        self.assertFalse(m.knows("db", "a:0"))
        self.assertTrue(m.knows("db", "a:4"))

    def test_size_bound_prefers_dropping_expired(self) -> None:
        m = OpaqueMemory(self.clock, max_entries=2, ttl=10.0)
        m.learn("db", "old:1")
        self.clock.advance(5)
        m.learn("db", "young:1")
        self.clock.advance(6)  # old:1 expired, young:1 still valid
        m.learn("db", "new:1")
        self.assertEqual([e["endpoint"] for e in m.entries()], ["young:1", "new:1"])

    def test_generation_change_forgets(self) -> None:
        m = self.memory
        m.learn("db", "a:1", generation="v1")
        self.assertTrue(m.knows("db", "a:1", "v1"))
        self.assertFalse(m.knows("db", "a:1", "v2"))
        self.assertFalse(m.knows("db", "a:1", "v1"))  # dropped, not just hidden

    def test_entries(self) -> None:
        m = self.memory
        m.learn("db", "a:1")
        self.clock.advance(2.5)
        m.knows("db", "a:1")
        self.assertEqual(m.entries(), [{
            "service": "db", "endpoint": "a:1", "age_seconds": 2.5,
            "expires_in_seconds": 57.5, "hits": 1}])
        self.clock.advance(60)
        self.assertEqual(m.entries(), [])

    def test_bound_must_be_positive(self) -> None:
        self.assertRaises(ValueError, OpaqueMemory, self.clock, 0)


class ConfigTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        detect = parse({}).detect
        self.assertEqual(detect.client_silence, DetectConfig.client_silence)
        self.assertGreater(detect.client_silence, 0)
        self.assertLess(detect.client_silence, 0.1)

    def test_set(self) -> None:
        detect = parse({"detect": {"client_silence": 0, "learned_ttl": 30,
                                   "learned_max": 5}}).detect
        self.assertEqual((detect.client_silence, detect.learned_ttl, detect.learned_max),
                         (0.0, 30.0, 5))

    def test_errors(self) -> None:
        with self.assertRaises(ConfigError) as e:
            parse({"detect": {"client_silence": -1, "learned_max": 0}}, "x.toml")
        self.assertEqual(sorted(e.exception.errors), [
            "x.toml: detect.client_silence: must be a duration in seconds, not negative",
            "x.toml: detect.learned_max: must be at least 1",
        ])


class _Handled(Protocol):
    """A stand-in for a protocol with its own backends (the HTTP server end)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data


class EarlyConnectTests(SynchronousTestCase):
    """The detect protocol with the client-silence window, on a fake reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.memory = OpaqueMemory(self.reactor, max_entries=16, ttl=60.0)
        self.listener = self.make_listener()

    def make_listener(self, silence: float = SILENCE, handlers=None,
                      endpoints=("127.0.0.1:2525",)) -> Listener:
        service = ServiceConfig("mail", tuple(parse_host_port(e) for e in endpoints))
        detect = DetectConfig(timeout=10.0, client_silence=silence)
        self.upstream = BackendSet(service, detect.opaque_ports)
        metrics = Metrics()
        self.server_first = ServerFirst(
            self.memory, silence,
            lambda listener: metrics.early_connect_limit_total.labels(listener).inc())
        return build_listener(ListenerConfig("in", "tcp:0", "mail"), detect,
                              {"mail": self.upstream}, metrics, self.reactor,
                              log_connections=False, handlers=handlers,
                              server_first=self.server_first)

    def accept(self, listener: Listener | None = None) -> StringTransport:
        listener = listener or self.listener
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol = listener.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport

    def connect_upstream(self, index: int = -1) -> StringTransport:
        """Complete the connect the proxy asked for."""
        host, port, factory, _, _ = self.reactor.tcpClients[index]
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
        protocol = factory.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport

    def detections(self, listener: Listener | None = None) -> dict[tuple[str, str], float]:
        listener = listener or self.listener
        out = {}
        for family in listener.metrics.registry.collect():
            if family.name == "protocol_detect":
                for s in family.samples:
                    if s.name == "protocol_detect_total":
                        out[(s.labels["protocol"], s.labels["reason"])] = s.value
        return out

    def held(self) -> dict[str, int]:
        """Early connections held, by listener name (held is keyed by each
        listener's RelaySite)."""
        return {site.listener: n for site, n in self.server_first.held.items()}

    @property
    def endpoint(self):
        return self.upstream.endpoints[0]

    def test_no_connect_before_the_window(self) -> None:
        client = self.accept()
        self.assertIsInstance(client.protocol, DetectProtocol)
        self.reactor.advance(SILENCE * 0.9)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_silence_connects_upstream(self) -> None:
        self.accept()
        self.reactor.advance(SILENCE)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 2525, 5.0))
        self.assertEqual(self.endpoint.active, 1)

    def test_client_speaking_first_never_connects_early(self) -> None:
        client = self.accept()
        client.protocol.dataReceived(b"GE")
        self.reactor.advance(1.0)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_server_first_relays_at_once(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        server.protocol.dataReceived(BANNER)
        self.assertEqual(client.value(), BANNER)
        self.assertIsInstance(client.protocol, RelayProtocol)
        self.assertIsInstance(server.protocol, UpstreamProtocol)
        self.assertEqual(self.detections(), {("opaque", "server_first"): 1.0})
        # From here it is a relay both ways, on the same upstream connection.
        client.protocol.dataReceived(b"EHLO me\r\n")
        self.assertEqual(server.value(), b"EHLO me\r\n")
        server.protocol.dataReceived(b"250 hi\r\n")
        self.assertEqual(client.value(), BANNER + b"250 hi\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.listener.metrics.tcp_read_bytes_total.labels(
            "inbound", "dst", "in", "mail", "opaque", "127.0.0.1:2525")._value.get(),
            len(BANNER) + 8)
        # And the destination is learned.
        self.assertEqual([e["endpoint"] for e in self.memory.entries()], ["127.0.0.1:2525"])
        # The endpoint is held once, and released when the relay ends.
        self.assertEqual(self.endpoint.active, 1)
        client.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(server.disconnecting)
        self.assertEqual(self.endpoint.active, 0)

    def test_a_flood_of_silent_clients_dials_at_most_the_limit(self) -> None:
        """Issue 11: every silent flood connection dialled the endpoint. Past
        EARLY_CONNECT_LIMIT held per listener, silent clients get no early
        connection (counted); one that ends frees its place."""
        clients = [self.accept() for _ in range(EARLY_CONNECT_LIMIT + 10)]
        self.reactor.advance(SILENCE)
        self.assertEqual(len(self.reactor.tcpClients), EARLY_CONNECT_LIMIT)
        self.assertEqual(self.endpoint.active, EARLY_CONNECT_LIMIT)
        self.assertEqual(self.listener.metrics.registry.get_sample_value(
            "early_connect_limit_total", {"listener": "in"}), 10)
        # Connected ones and connecting ones both hold a place until they go.
        self.connect_upstream(0)
        for client in clients[:2]:
            client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.endpoint.active, EARLY_CONNECT_LIMIT - 2)
        self.assertEqual(self.held(), {"in": EARLY_CONNECT_LIMIT - 2})
        self.accept()
        self.reactor.advance(SILENCE)
        self.assertEqual(len(self.reactor.tcpClients), EARLY_CONNECT_LIMIT + 1)
        # The ones without an early connection are still detected as they speak.
        clients[-1].protocol.dataReceived(HTTP_REQUEST)
        self.assertEqual(self.detections().get(("http1", "request_line")), 1.0)
        for client in clients[2:]:
            client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.held(), {"in": 1})

    def test_server_first_then_close(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        server.protocol.dataReceived(b"421 too busy\r\n")
        server.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(client.value(), b"421 too busy\r\n")
        self.assertTrue(client.disconnecting)
        client.protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.endpoint.active, 0)
        self.assertEqual(self.listener.connections, set())

    def test_detect_timeout_is_cancelled(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        self.connect_upstream().protocol.dataReceived(BANNER)
        self.reactor.advance(20)
        self.assertEqual(self.detections(), {("opaque", "server_first"): 1.0})
        self.assertFalse(client.disconnecting)

    def test_learned_destination_skips_detection(self) -> None:
        self.accept()
        self.reactor.advance(SILENCE)
        self.connect_upstream().protocol.dataReceived(BANNER)
        client = self.accept()
        self.assertIsInstance(client.protocol, RelayProtocol)
        self.assertEqual(len(self.reactor.tcpClients), 2)  # dialled at once
        server = self.connect_upstream()
        server.protocol.dataReceived(BANNER)
        self.assertEqual(client.value(), BANNER)
        self.assertEqual(self.detections(), {("opaque", "server_first"): 1.0,
                                             ("opaque", "learned_opaque"): 1.0})
        self.assertEqual(self.memory.entries()[0]["hits"], 1)

    def test_learned_destination_expires(self) -> None:
        self.accept()
        self.reactor.advance(SILENCE)
        self.connect_upstream().protocol.dataReceived(BANNER)
        self.reactor.advance(60)
        client = self.accept()
        self.assertIsInstance(client.protocol, DetectProtocol)
        self.assertEqual(self.memory.entries(), [])

    def test_changed_service_is_not_trusted(self) -> None:
        self.accept()
        self.reactor.advance(SILENCE)
        self.connect_upstream().protocol.dataReceived(BANNER)
        # A new config for the service (another endpoint added), same memory.
        listener = self.make_listener(endpoints=("127.0.0.1:2525", "127.0.0.1:2526"))
        client = self.accept(listener)
        self.assertIsInstance(client.protocol, DetectProtocol)

    def test_reloaded_service_config_is_not_trusted(self) -> None:
        self.accept()
        self.reactor.advance(SILENCE)
        self.connect_upstream().protocol.dataReceived(BANNER)
        self.assertIsInstance(self.accept().protocol, RelayProtocol)
        # A reload changes the service in place (BackendSet.reconfigure).
        changed = ServiceConfig("mail", self.upstream.config.endpoints, connect_timeout=2.0)
        self.upstream.reconfigure(changed, DetectConfig().opaque_ports)
        self.assertIsInstance(self.accept().protocol, DetectProtocol)
        self.assertEqual(self.memory.entries(), [])

    def test_client_first_during_early_connection_relay_adopts(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        client.protocol.dataReceived(HTTP_REQUEST)  # no HTTP handler: the relay
        self.assertIsInstance(client.protocol, RelayProtocol)
        self.assertEqual(server.value(), HTTP_REQUEST)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.detections(), {("http1", "request_line"): 1.0})
        self.assertEqual(self.memory.entries(), [])
        self.assertEqual(self.endpoint.active, 1)

    def test_client_first_while_still_connecting_relay_adopts(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        client.protocol.dataReceived(b"\x00\x01binary")  # opaque at once
        self.assertIsInstance(client.protocol, RelayProtocol)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        server = self.connect_upstream()
        self.assertEqual(server.value(), b"\x00\x01binary")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.endpoint.active, 1)

    def test_adopted_connect_failure_closes_client(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        client.protocol.dataReceived(b"\x00\x01binary")
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(self.reactor.connectors[0],
                                       Failure(ConnectionRefusedError()))
        self.assertTrue(client.disconnecting)
        client.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.endpoint.active, 0)

    def test_http_handler_gets_client_and_early_connection_is_closed(self) -> None:
        listener = self.make_listener(handlers={"http1": _Handled})
        client = self.accept(listener)
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        client.protocol.dataReceived(HTTP_REQUEST)
        self.assertIsInstance(client.protocol, _Handled)
        self.assertEqual(client.protocol.received, HTTP_REQUEST)
        self.assertTrue(server.disconnecting)
        self.assertEqual(self.endpoint.active, 0)

    def test_http_handler_while_connecting_stops_the_connect(self) -> None:
        listener = self.make_listener(handlers={"http1": _Handled})
        client = self.accept(listener)
        self.reactor.advance(SILENCE)
        client.protocol.dataReceived(HTTP_REQUEST)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.endpoint.active, 0)
        # A connect that completes anyway is closed at once.
        server = self.connect_upstream()
        self.assertTrue(server.disconnecting)
        self.assertEqual(self.endpoint.active, 0)

    def test_client_gone_during_detection_closes_early_connection(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        client.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(server.disconnecting)
        self.assertEqual(self.endpoint.active, 0)
        self.assertEqual(self.detections(), {("none", "closed"): 1.0})

    def test_client_gone_while_connecting_stops_the_connect(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        client.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.endpoint.active, 0)

    def test_server_closing_silently_then_client_speaks_dials_again(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        server.protocol.connectionLost(Failure(ConnectionRefusedError()))
        self.assertEqual(self.endpoint.active, 0)
        client.protocol.dataReceived(b"\x00\x01binary")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        second = self.connect_upstream()
        self.assertEqual(second.value(), b"\x00\x01binary")
        self.assertEqual(self.endpoint.active, 1)

    def test_early_connect_failure_lets_detection_go_on(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        factory.clientConnectionFailed(self.reactor.connectors[0],
                                       Failure(ConnectionRefusedError()))
        self.assertEqual(self.endpoint.active, 0)
        self.assertFalse(client.disconnecting)
        client.protocol.dataReceived(HTTP_REQUEST)
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_server_speaking_after_partial_client_bytes(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        client.protocol.dataReceived(b"GE")  # could still be HTTP (no method yet)
        server.protocol.dataReceived(BANNER)
        self.assertIsInstance(client.protocol, RelayProtocol)
        self.assertEqual(client.value(), BANNER)
        self.assertEqual(server.value(), b"GE")
        self.assertEqual(self.detections(), {("opaque", "server_first"): 1.0})
        self.assertEqual(self.memory.entries(), [])  # the client spoke too: not learned

    def test_tls_client_hello_wins_during_early_connection(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        hello = _client_hello()
        client.protocol.dataReceived(hello)
        self.assertEqual(self.detections(), {("tls", "client_hello"): 1.0})
        self.assertEqual(server.value(), hello)

    def test_quiet_past_the_detect_timeout_waits_for_whoever_speaks(self) -> None:
        """Neither side spoke within the detect timeout: with the early
        connection listening, detection waits on. Bytes that are no protocol
        are relayed on that connection at once."""
        client = self.accept()
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        self.reactor.advance(10.0)
        self.assertIsInstance(client.protocol, DetectProtocol)
        self.assertEqual(self.detections(), {})
        client.protocol.dataReceived(b"\x00late")
        self.assertIsInstance(client.protocol, RelayProtocol)
        self.assertEqual(self.detections(), {("opaque", "not_http"): 1.0})
        self.assertEqual(server.value(), b"\x00late")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_http_request_after_a_quiet_detect_timeout_is_http1(self) -> None:
        """A client that stays quiet past the detect timeout and then sends
        an HTTP request gets the HTTP/1 end (routes, limits), not a TCP relay
        to the endpoint (it used to be relayed: reason timeout)."""
        listener = self.make_listener(handlers={"http1": _Handled})
        client = self.accept(listener)
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        self.reactor.advance(30.0)
        client.protocol.dataReceived(HTTP_REQUEST)
        self.assertIsInstance(client.protocol, _Handled)
        self.assertEqual(client.protocol.received, HTTP_REQUEST)
        self.assertEqual(self.detections(listener), {("http1", "request_line"): 1.0})
        self.assertEqual(server.value(), b"")
        self.assertTrue(server.disconnecting)

    def test_late_partial_bytes_get_a_detect_timeout_of_their_own(self) -> None:
        listener = self.make_listener(handlers={"http1": _Handled})
        client = self.accept(listener)
        self.reactor.advance(SILENCE)
        self.connect_upstream()
        self.reactor.advance(10.0)
        client.protocol.dataReceived(b"\x16\x03")   # could still be TLS
        self.reactor.advance(9.9)
        self.assertIsInstance(client.protocol, DetectProtocol)
        self.reactor.advance(0.1)
        self.assertIsInstance(client.protocol, RelayProtocol)
        self.assertEqual(self.detections(listener), {("tls", "timeout"): 1.0})

    def test_server_speaking_after_a_quiet_detect_timeout(self) -> None:
        client = self.accept()
        self.reactor.advance(SILENCE)
        server = self.connect_upstream()
        self.reactor.advance(10.0)
        server.protocol.dataReceived(BANNER)
        self.assertIsInstance(client.protocol, RelayProtocol)
        self.assertEqual(client.value(), BANNER)
        self.assertEqual(self.detections(), {("opaque", "server_first"): 1.0})

    def test_detect_timeout_while_still_connecting_relays(self) -> None:
        """Not listening yet (the early connect is slow): the timeout relays
        the quiet connection as before."""
        client = self.accept()
        self.reactor.advance(SILENCE)
        self.reactor.advance(10.0)
        self.assertIsInstance(client.protocol, RelayProtocol)
        self.assertEqual(self.detections(), {("opaque", "timeout"): 1.0})

    def test_zero_silence_turns_it_off(self) -> None:
        listener = self.make_listener(silence=0)
        client = self.accept(listener)
        self.reactor.advance(5.0)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIsNone(client.protocol.early)

    def test_opaque_resource(self) -> None:
        self.memory.learn("mail", "127.0.0.1:2525")
        request = DummyRequest([b""])
        body = OpaqueResource(self.server_first).render_GET(request)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"application/json"])
        data = json.loads(body)
        self.assertEqual(data["client_silence_seconds"], SILENCE)
        self.assertEqual(data["ttl_seconds"], 60.0)
        self.assertEqual([(e["service"], e["endpoint"]) for e in data["learned"]],
                         [("mail", "127.0.0.1:2525")])


def _client_hello() -> bytes:
    """A minimal TLS 1.2 ClientHello record with no extensions."""
    body = (b"\x03\x03" + b"\x00" * 32 + b"\x00" + b"\x00\x02\x00\x2f" + b"\x01\x00"
            + b"\x00\x00")
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake
