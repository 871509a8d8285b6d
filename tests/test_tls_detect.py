"""Detection on a terminating listener: what reaches the TLS handshake.

A ClientHello sent slowly (bytes, then silence past ``[detect] timeout``)
or cut short (EOF) is TLS, not opaque TCP: it goes to termination, whose
``handshake_timeout`` closes it, and no byte is relayed as plaintext. A
listener without ``[listener.tls]`` relays the same bytes as opaque TCP.
Unit level: a MemoryReactorClock, the listener built as app/ builds it
(l5dproxy.app.tlsterm.Terminations), certificates from trustme.
"""

from __future__ import annotations

import shutil
import tempfile

import trustme
from twisted.internet.error import ConnectionAborted
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.app.listeners import build_listener
from l5dproxy.app.tlsterm import Terminations
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import (
    CertificateConfig,
    DetectConfig,
    HostPort,
    ListenerConfig,
    ListenerTlsConfig,
    ServiceConfig,
)
from l5dproxy.telemetry import Metrics
from l5dproxy.tls.server import HANDSHAKE_ERROR_REASONS
from tests.support import metric_value
from tests.test_detect import Recorder, SwitchableTransport, samples_of
from tests.test_sniff import HELLO_SNI
from tests.tlsfixtures import write_pair

DETECT_TIMEOUT = 3.0
HANDSHAKE_TIMEOUT = 5.0

#: A ClientHello's first bytes, sent and then nothing more (the red team's).
SLOW_HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"

#: Starts of a ClientHello record a client may send and then go silent.
PARTIAL_HELLOS = {
    "red team's 11 bytes": SLOW_HELLO,
    "content type only": b"\x16",
    "record header only": HELLO_SNI[:5],
    "header and handshake type": HELLO_SNI[:6],
    "all but the last byte": HELLO_SNI[:-1],
}


class _ListenerMixin:
    """Builds the listener (terminating or not) and accepts connections."""

    def setUp(self) -> None:
        self.directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.directory)
        ca = trustme.CA()
        cert, key = write_pair(ca.issue_cert("app.test"), self.directory, "app")
        self.tls = ListenerTlsConfig(certificates=(CertificateConfig(cert, key),),
                                     handshake_timeout=HANDSHAKE_TIMEOUT)
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        self.recorders: list[Recorder] = []

    def listener(self, terminating: bool = True):
        service = ServiceConfig("app", (HostPort("127.0.0.1", 8080),))
        detect = DetectConfig(timeout=DETECT_TIMEOUT)
        backends = {"app": BackendSet(service, detect.opaque_ports)}
        lc = ListenerConfig("inbound", "tcp:0", "app",
                            tls=self.tls if terminating else None)

        def record(conn) -> Recorder:
            recorder = Recorder(conn)
            self.recorders.append(recorder)
            return recorder

        handlers = dict.fromkeys(("h2", "http1", "opaque"), record)
        if terminating:
            terminations = Terminations(self.metrics, self.clock)
            contexts = terminations.prepare((lc,))
            terminations.commit((lc,), contexts)
            handlers = terminations.handlers(lc, detect, handlers, contexts["inbound"])
        return build_listener(lc, detect, backends, self.metrics, self.clock,
                              handlers=handlers)

    def accept(self, terminating: bool = True) -> SwitchableTransport:
        listener = self.listener(terminating)
        transport = SwitchableTransport()
        protocol = listener.buildProtocol(transport.getPeer())
        transport.protocol = protocol
        protocol.makeConnection(transport)
        return transport

    def handshake_errors(self) -> dict[str, float]:
        """``tls_handshake_errors_total{listener="inbound"}`` by reason (non-zero)."""
        found: dict[str, float] = {}
        for reason in HANDSHAKE_ERROR_REASONS:
            value = metric_value(samples_of(self.metrics), "tls_handshake_errors_total",
                                 listener="inbound", reason=reason)
            if value:
                found[reason] = value
        return found

    def detected(self, protocol: str, reason: str) -> float:
        return metric_value(samples_of(self.metrics), "protocol_detect_total",
                            listener="inbound", protocol=protocol, reason=reason)



class TerminatingDetectTests(_ListenerMixin, SynchronousTestCase):
    """A partial ClientHello at the detect timeout or EOF on a listener
    with ``[listener.tls]``."""

    def assert_terminated_then_cut_off(self, transport: SwitchableTransport,
                                       reason: str, name: str) -> None:
        """The bytes went to the TLS handshake (not relayed), which is cut off
        ``handshake_timeout`` seconds later."""
        self.assertEqual(self.recorders, [], name)
        self.assertIsInstance(transport.protocol, TLSMemoryBIOProtocol, name)
        self.assertEqual(self.detected("tls", reason), 1, name)
        self.assertFalse(transport.disconnected, name)
        self.clock.advance(HANDSHAKE_TIMEOUT - 0.01)
        self.assertFalse(transport.disconnected, name)
        self.clock.advance(0.01)
        self.assertTrue(transport.disconnected, f"{name}: handshake_timeout applies")
        transport.deliver_lost(Failure(ConnectionAborted()))
        self.assertEqual(self.recorders, [], name)
        self.assertEqual(self.clock.getDelayedCalls(), [], name)
        self.assertEqual(self.handshake_errors(), {"timeout": 1}, name)

    def test_slow_client_hello_meets_the_handshake_timeout(self) -> None:
        """Bytes of a ClientHello, then silence: at the detect timeout they go
        to termination, and the connection is closed at detect timeout +
        handshake_timeout (before: relayed as opaque, open for ever)."""
        for name, data in PARTIAL_HELLOS.items():
            self.recorders.clear()
            self.metrics = Metrics()
            transport = self.accept()
            transport.deliver(data)
            self.assertEqual(self.recorders, [], name)
            self.clock.advance(DETECT_TIMEOUT)
            self.assert_terminated_then_cut_off(transport, "timeout", name)

    def test_split_client_hello_meets_the_handshake_timeout(self) -> None:
        """The same bytes in several reads, the last one then silence."""
        for name, data in PARTIAL_HELLOS.items():
            self.recorders.clear()
            self.metrics = Metrics()
            transport = self.accept()
            for i in range(len(data)):
                transport.deliver(data[i:i + 1])
                self.clock.advance(DETECT_TIMEOUT / (2 * len(data)))
            self.assertEqual(self.recorders, [], name)
            self.clock.advance(DETECT_TIMEOUT)
            self.assert_terminated_then_cut_off(transport, "timeout", name)

    def test_partial_client_hello_then_eof_is_not_relayed(self) -> None:
        """The client half-closes after part of a ClientHello: it goes to
        termination (which cannot finish a handshake), never to the relay."""
        for name, data in PARTIAL_HELLOS.items():
            self.recorders.clear()
            self.metrics = Metrics()
            transport = self.accept()
            transport.deliver(data)
            transport.deliver_eof()
            self.assertEqual(self.recorders, [], name)
            self.assertIsInstance(transport.protocol, TLSMemoryBIOProtocol, name)
            self.assertEqual(self.detected("tls", "eof"), 1, name)
            self.assertTrue(transport.disconnecting or transport.disconnected, name)
            transport.deliver_lost()
            self.assertEqual(self.handshake_errors(), {"closed": 1}, name)

    def test_other_bytes_are_still_relayed(self) -> None:
        """Bytes that cannot start a ClientHello record (a TLS record of
        another content type, a bad version) stay opaque on a terminating
        listener without client_ca."""
        for data in (b"\x17\x03\x03", b"\x16\x02", b"\x16\x03\x01\x00\x00"):
            self.recorders.clear()
            self.metrics = Metrics()
            transport = self.accept()
            transport.deliver(data)
            self.clock.advance(DETECT_TIMEOUT)
            (recorder,) = self.recorders
            self.assertEqual(recorder.data, data)
            self.assertEqual(self.detected("opaque", "not_http"), 1, data)


class PlainListenerTests(_ListenerMixin, SynchronousTestCase):
    """Without ``[listener.tls]`` the same bytes are relayed as opaque TCP,
    as before (their verdict is now ``tls``, which has no handler of its
    own there and goes to the relay)."""

    def test_slow_client_hello_is_relayed(self) -> None:
        for name, data in PARTIAL_HELLOS.items():
            self.recorders.clear()
            self.metrics = Metrics()
            transport = self.accept(terminating=False)
            transport.deliver(data)
            self.clock.advance(DETECT_TIMEOUT)
            (recorder,) = self.recorders
            self.assertEqual(recorder.data, data, name)
            self.assertIs(transport.protocol, recorder, name)
            self.assertEqual(self.detected("tls", "timeout"), 1, name)
            transport.deliver(b"more")
            self.assertEqual(recorder.data, data + b"more", name)
            self.assertFalse(transport.disconnecting, name)
