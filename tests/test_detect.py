"""The detect protocol: buffer the first bytes, decide, hand over every byte once."""

from __future__ import annotations

import random

from prometheus_client.exposition import generate_latest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from l5dproxy.accept.listener import Listener
from l5dproxy.app.listeners import build_listener
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import DetectConfig, HostPort, ListenerConfig, ServiceConfig
from l5dproxy.detect.protocol import DetectProtocol
from l5dproxy.detect.sniff import H2_PREFACE
from l5dproxy.telemetry import Metrics
from tests.support import metric_value, parse_metrics
from tests.test_sniff import HELLO_SNI

HTTP1_REQUEST = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\n\r\n"
H2_START = H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
OPAQUE = b"\x00\x01\x02 not any protocol at all" + bytes(range(256))

#: (what the client sends, the verdict's protocol, its reason)
CASES = [
    (H2_START, "h2", "preface"),
    (HTTP1_REQUEST, "http1", "request_line"),
    (HELLO_SNI, "tls", "client_hello"),
    (OPAQUE, "opaque", "not_http"),
]


def samples_of(metrics: Metrics) -> dict:
    """The metrics as ``/metrics`` would show them, parsed."""
    return parse_metrics(generate_latest(metrics.registry).decode())


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    """Stands in for the protocol a verdict hands the connection to."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.received: list[bytes] = []
        self.made = 0
        self.read_lost = 0
        self.lost: list[Failure] = []

    def makeConnection(self, transport) -> None:
        self.made += 1
        super().makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.read_lost += 1

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        self.conn.closed(reason, "test")

    @property
    def data(self) -> bytes:
        return b"".join(self.received)


class SwitchableTransport(StringTransport):
    """A StringTransport with a ``protocol`` attribute that the reactor
    delivers through, as a real TCP connection has: protocol switching
    replaces it in place."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000),
                         hostAddress=IPv4Address("TCP", "127.0.0.1", 4143))
        self.protocol = None

    def deliver(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def deliver_eof(self) -> None:
        IHalfCloseableProtocol(self.protocol).readConnectionLost()

    def deliver_lost(self, reason: Failure | None = None) -> None:
        self.protocol.connectionLost(reason or Failure(ConnectionDone()))


class DetectTestsMixin:
    timeout = 10.0
    peek_limit = 8192

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        self.recorders: list[Recorder] = []

    def make_listener(self, opaque_listener: bool = False, port: int = 8080,
                      opaque_service: bool = False) -> Listener:
        service = ServiceConfig("app", (HostPort("127.0.0.1", port),), opaque=opaque_service)
        detect = DetectConfig(timeout=self.timeout, peek_limit=self.peek_limit)
        backends = {"app": BackendSet(service, detect.opaque_ports)}
        config = ListenerConfig("inbound", "tcp:0", "app", opaque=opaque_listener)

        def record(conn) -> Recorder:
            recorder = Recorder(conn)
            self.recorders.append(recorder)
            return recorder

        handlers = dict.fromkeys(("h2", "http1", "tls", "opaque"), record)
        return build_listener(config, detect, backends, self.metrics, self.clock,
                              handlers=handlers)

    def accept(self, listener: Listener | None = None) -> SwitchableTransport:
        """Accept one connection the way the reactor does."""
        listener = listener or self.make_listener()
        transport = SwitchableTransport()
        protocol = listener.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport

    def detected(self, protocol: str, reason: str, listener: str = "inbound") -> float:
        samples = samples_of(self.metrics)
        return metric_value(samples, "protocol_detect_total", listener=listener,
                            protocol=protocol, reason=reason)

    def all_detected(self) -> float:
        return metric_value(samples_of(self.metrics),
                            "protocol_detect_total")


class HandOverTests(DetectTestsMixin, SynchronousTestCase):
    """Every byte reaches the next protocol exactly once, in order, however split."""

    def feed(self, data: bytes, cuts: list[int]) -> tuple[SwitchableTransport, Recorder]:
        transport = self.accept()
        self.assertIsInstance(transport.protocol, DetectProtocol)
        start = 0
        for cut in [*cuts, len(data)]:
            if cut > start:
                transport.deliver(data[start:cut])
                start = cut
        self.assertEqual(len(self.recorders), 1, "exactly one protocol built")
        return transport, self.recorders[0]

    def check(self, data: bytes, cuts: list[int], protocol: str, reason: str) -> None:
        transport, recorder = self.feed(data, cuts)
        self.assertEqual(recorder.data, data)
        self.assertEqual(recorder.made, 1)
        self.assertIs(recorder.transport, transport)
        self.assertIs(transport.protocol, recorder, "switched in place")
        self.assertEqual(recorder.conn.protocol, protocol)
        self.assertEqual(self.detected(protocol, reason), 1)
        self.assertEqual(self.all_detected(), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [], "detect timer cancelled")

    def test_one_read(self) -> None:
        for data, protocol, reason in CASES:
            with self.subTest(protocol=protocol):
                self.setUp()
                self.check(data, [], protocol, reason)

    def test_byte_at_a_time(self) -> None:
        for data, protocol, reason in CASES:
            with self.subTest(protocol=protocol):
                self.setUp()
                self.check(data, list(range(1, len(data))), protocol, reason)

    def test_random_splits(self) -> None:
        rng = random.Random(2)
        for data, protocol, reason in CASES:
            for _ in range(30):
                cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 8)))
                with self.subTest(protocol=protocol, cuts=cuts):
                    self.setUp()
                    self.check(data, cuts, protocol, reason)

    def test_bytes_after_the_verdict(self) -> None:
        """Later reads go straight to the next protocol, after the buffered ones."""
        transport, recorder = self.feed(HTTP1_REQUEST, [3])
        transport.deliver(b"more")
        transport.deliver(b" and more")
        self.assertEqual(recorder.data, HTTP1_REQUEST + b"more and more")

    def test_without_in_place_switching(self) -> None:
        """A transport without a ``protocol`` attribute keeps the detect
        protocol as a forwarder; nothing is lost or repeated either way."""
        listener = self.make_listener()
        transport = StringTransport()
        detect = listener.accepted(transport)
        self.assertIsInstance(detect, DetectProtocol)
        detect.makeConnection(transport)
        for i in range(len(HTTP1_REQUEST)):
            detect.dataReceived(HTTP1_REQUEST[i:i + 1])
        detect.dataReceived(b"body")
        (recorder,) = self.recorders
        self.assertEqual(recorder.data, HTTP1_REQUEST + b"body")
        detect.readConnectionLost()
        self.assertEqual(recorder.read_lost, 1)
        detect.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(recorder.lost), 1)
        self.assertEqual(listener.connections, set())

    def test_sni_kept(self) -> None:
        _, recorder = self.feed(HELLO_SNI, [10])
        self.assertEqual(recorder.conn.sni, "example.test")

    def test_peek_limit(self) -> None:
        self.peek_limit = 64
        self.setUp()
        # A method token filling the window could still start a request: it
        # is the HTTP/1 end's to answer, never relayed as TCP.
        data = b"G" * 200 + b" / HTTP/1.1\r\n"
        _, recorder = self.feed(data, list(range(1, len(data))))
        self.assertEqual(recorder.data, data)
        self.assertEqual(recorder.conn.protocol, "http1")
        self.assertEqual(self.detected("http1", "peek_limit"), 1)


class TimeoutTests(DetectTestsMixin, SynchronousTestCase):
    timeout = 0.3

    def test_silent_client(self) -> None:
        """A client that says nothing (server-speaks-first) is relayed after the timeout."""
        transport = self.accept()
        self.clock.advance(0.29)
        self.assertEqual(self.recorders, [])
        self.clock.advance(0.01)
        (recorder,) = self.recorders
        self.assertEqual(recorder.data, b"")
        self.assertIs(transport.protocol, recorder)
        self.assertEqual(recorder.conn.protocol, "opaque")
        self.assertEqual(self.detected("opaque", "timeout"), 1)

    def test_undecided_bytes(self) -> None:
        """Bytes that could still become TLS are handed over on the timeout,
        as tls (a terminating listener's handshake_timeout then applies;
        tests.test_tls_detect)."""
        transport = self.accept()
        transport.deliver(b"\x16\x03")
        self.clock.advance(0.3)
        (recorder,) = self.recorders
        self.assertEqual(recorder.data, b"\x16\x03")
        transport.deliver(b"\x01")
        self.assertEqual(recorder.data, b"\x16\x03\x01")
        self.assertEqual(self.detected("tls", "timeout"), 1)
        self.assertEqual(self.all_detected(), 1)

    def test_undecided_method_token(self) -> None:
        """A method token and a pause is HTTP/1 on the timeout: the HTTP/1 end
        times the head out, as it would a later request (before, the bytes
        after the pause went to the endpoint as TCP, past every HTTP rule)."""
        transport = self.accept()
        transport.deliver(b"GET")
        self.clock.advance(0.3)
        (recorder,) = self.recorders
        transport.deliver(b" /admin HTTP/1.1\r\n")
        self.assertEqual(recorder.data, b"GET /admin HTTP/1.1\r\n")
        self.assertEqual(recorder.conn.protocol, "http1")
        self.assertEqual(self.detected("http1", "timeout"), 1)

    def test_duration_observed(self) -> None:
        self.accept()
        self.clock.advance(0.3)
        samples = samples_of(self.metrics)
        self.assertEqual(metric_value(samples, "protocol_detect_duration_seconds_count",
                                      listener="inbound", protocol="opaque"), 1)
        self.assertAlmostEqual(metric_value(samples, "protocol_detect_duration_seconds_sum",
                                            listener="inbound"), 0.3)

    def test_no_timer_after_verdict(self) -> None:
        transport = self.accept()
        transport.deliver(HTTP1_REQUEST)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(len(self.recorders), 1)
        self.assertEqual(self.all_detected(), 1)


class EndOfDetectionTests(DetectTestsMixin, SynchronousTestCase):
    def test_eof_before_verdict(self) -> None:
        """The client half-closes: what it sent is all there is, handed over
        (a ClientHello's start: tls)."""
        transport = self.accept()
        transport.deliver(b"\x16\x03")
        transport.deliver_eof()
        (recorder,) = self.recorders
        self.assertEqual(recorder.data, b"\x16\x03")
        self.assertEqual(recorder.read_lost, 1, "the EOF is passed on")
        self.assertEqual(self.detected("tls", "eof"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eof_after_a_method_token(self) -> None:
        """A cut-short request start goes to the HTTP/1 end (which sends
        nothing on), not to the endpoint as TCP."""
        transport = self.accept()
        transport.deliver(b"GET")
        transport.deliver_eof()
        (recorder,) = self.recorders
        self.assertEqual((recorder.data, recorder.read_lost), (b"GET", 1))
        self.assertEqual(self.detected("http1", "eof"), 1)

    def test_eof_with_nothing_sent(self) -> None:
        transport = self.accept()
        transport.deliver_eof()
        (recorder,) = self.recorders
        self.assertEqual(recorder.data, b"")
        self.assertEqual(recorder.read_lost, 1)
        self.assertEqual(self.detected("opaque", "eof"), 1)

    def test_eof_to_a_protocol_without_half_close(self) -> None:
        """A next protocol that cannot half-close gets the connection closed."""
        listener = self.make_listener()
        listener.handlers["opaque"] = lambda conn: Protocol()
        transport = self.accept(listener)
        transport.deliver_eof()
        self.assertIsInstance(transport.protocol, Protocol)
        self.assertTrue(transport.disconnecting)

    def test_client_gone_before_verdict(self) -> None:
        listener = self.make_listener()
        transport = self.accept(listener)
        transport.deliver(b"GET")
        self.assertEqual(len(listener.connections), 1)
        transport.deliver_lost(Failure(ConnectionLost()))
        self.assertEqual(self.recorders, [])
        self.assertEqual(self.detected("none", "closed"), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [], "detect timer cancelled")
        self.assertEqual(listener.connections, set())
        self.clock.advance(100)
        self.assertEqual(self.all_detected(), 1)

    def test_connection_lost_after_verdict_goes_to_next_protocol(self) -> None:
        listener = self.make_listener()
        transport = self.accept(listener)
        transport.deliver(HTTP1_REQUEST)
        transport.deliver_lost()
        (recorder,) = self.recorders
        self.assertEqual(len(recorder.lost), 1)
        self.assertEqual(listener.connections, set())
        self.assertEqual(self.detected("none", "closed"), 0)


class SkipDetectionTests(DetectTestsMixin, SynchronousTestCase):
    def test_opaque_listener(self) -> None:
        transport = self.accept(self.make_listener(opaque_listener=True))
        (recorder,) = self.recorders
        self.assertIs(transport.protocol, recorder, "no detect protocol at all")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        transport.deliver(HTTP1_REQUEST)
        self.assertEqual(recorder.data, HTTP1_REQUEST)
        self.assertEqual(recorder.conn.protocol, "opaque")
        self.assertEqual(self.detected("opaque", "opaque_listener"), 1)
        self.assertEqual(self.all_detected(), 1)

    def test_opaque_port(self) -> None:
        transport = self.accept(self.make_listener(port=3306))
        (recorder,) = self.recorders
        self.assertIs(transport.protocol, recorder)
        self.assertEqual(self.detected("opaque", "opaque_port"), 1)

    def test_opaque_service(self) -> None:
        self.accept(self.make_listener(opaque_service=True))
        self.assertEqual(len(self.recorders), 1)
        self.assertEqual(self.detected("opaque", "opaque_port"), 1)

    def test_other_ports_detect(self) -> None:
        transport = self.accept(self.make_listener(port=8080))
        self.assertIsInstance(transport.protocol, DetectProtocol)
        self.assertEqual(self.recorders, [])
