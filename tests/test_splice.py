"""The spliced relay (l5dproxy.net.splice) on real loopback sockets: exact bytes
both ways, half-close each way, resets, aborts, backpressure with flat
memory, byte counters, and the hand-back to the Python relay."""

from __future__ import annotations

import errno
import hashlib
import os

from twisted.internet import defer, protocol, reactor
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from l5dproxy.net import splice
from l5dproxy.net.connection import InboundConnection
from tests.relayrig import start_opaque_relay
from tests.support import metric_value
from tests.test_tcp import _AnswerAfterEof, _Collect, _Flood, _HalfCloseCollect, poll, samples_of


@implementer(IHalfCloseableProtocol)
class _Peer(_Collect):
    """Sends ``payload`` as a streaming producer, then half-closes; collects
    (or only counts, with ``keep=False``) what it receives; closes once
    both directions are done."""

    keep = True
    chunk_size = 256 * 1024

    def __init__(self, payload: bytes = b"") -> None:
        super().__init__()
        self.payload = payload
        self.received = 0
        self.sent = 0
        self.paused = False
        self.write_closed = False

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        if self.keep:
            self.data += data

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self._write)

    def stopProducing(self) -> None:
        self.paused = True

    def _write(self) -> None:
        while not self.paused and self.sent < len(self.payload):
            self.transport.write(self.payload[self.sent:self.sent + self.chunk_size])
            self.sent += self.chunk_size
        if self.sent >= len(self.payload) and not self.write_closed:
            self.write_closed = True
            self.transport.unregisterProducer()
            self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        self.eof = True
        self._maybe_close()

    def writeConnectionLost(self) -> None:
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.eof and self.write_closed:
            self.transport.loseConnection()


class _Counter(_Collect):
    """Counts what it receives and keeps nothing."""

    received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SpliceTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        if not splice.ENABLED:
            raise SkipTest("splice is not available here")
        self.patch(splice, "ENABLED", True)

    def start(self, server_factory) -> None:
        start_opaque_relay(self, server_factory)

    def connect(self, client) -> defer.Deferred:
        d = protocol.ClientCreator(reactor, lambda: client).connectTCP(
            "127.0.0.1", self.proxy_port)
        d.addCallback(self._track)
        return d

    def _track(self, client):
        self.addCleanup(self._close, client)
        return client

    @defer.inlineCallbacks
    def _close(self, client):
        if client.transport.connected:
            client.transport.abortConnection()
        yield client.lost()
        for s in self.servers:
            if s.transport.connected:
                s.transport.abortConnection()
            yield s.lost()
        yield poll(lambda: not self.listener.connections, what="the proxy to close")

    def relay(self):
        (conn,) = self.listener.connections
        return conn.transport.protocol

    def metric(self, name: str, **labels: str) -> float:
        return metric_value(samples_of(self.metrics), name, **labels)

    @defer.inlineCallbacks
    def exchange(self, up: bytes, down: bytes, wait_spliced: bool = True):
        """Client sends ``up``, server ``down``, both at once, both half-close."""
        self.start(lambda: _Peer(down))
        client = yield self.connect(_Peer(up))
        if wait_spliced:
            yield poll(lambda: self.listener.connections and self.relay().upstream is not None,
                       what="the upstream connection")
        yield client.lost()
        yield self.servers[0].lost()
        yield poll(lambda: not self.listener.connections, what="the proxy to close")
        return client, self.servers[0]

    # -- bytes ----------------------------------------------------------------

    @defer.inlineCallbacks
    def test_spliced(self):
        """A steady opaque relay is spliced: Twisted reads neither socket."""
        self.start(_HalfCloseCollect)
        client = yield self.connect(_HalfCloseCollect())
        yield poll(lambda: self.listener.connections and self.relay().splice is not None,
                   what="the relay to splice")
        relay = self.relay()
        readers = reactor.getReaders()
        self.assertNotIn(relay.transport, readers)
        self.assertNotIn(relay.upstream.transport, readers)
        client.transport.write(b"hello")
        yield poll(lambda: bytes(self.servers[0].data) == b"hello", what="the bytes")

    @defer.inlineCallbacks
    def test_exact_bytes_both_ways(self):
        """Large random payloads cross both ways at once, byte for byte."""
        up = os.urandom(24 * 1024 * 1024 + 12345)
        down = os.urandom(17 * 1024 * 1024 + 54321)
        client, server = yield self.exchange(up, down)
        self.assertEqual((len(server.data), _digest(bytes(server.data))), (len(up), _digest(up)))
        self.assertEqual((len(client.data), _digest(bytes(client.data))),
                         (len(down), _digest(down)))
        self.assertTrue(client.eof and server.eof, "EOF travelled both ways")

    @defer.inlineCallbacks
    def test_metrics(self):
        """Byte counters from splice's results; one clean close each side."""
        up, down = os.urandom(3_000_001), os.urandom(5_000_003)
        yield self.exchange(up, down)
        self.assertEqual(self.metric("tcp_read_bytes_total", peer="src"), len(up))
        self.assertEqual(self.metric("tcp_write_bytes_total", peer="dst"), len(up))
        self.assertEqual(self.metric("tcp_read_bytes_total", peer="dst"), len(down))
        self.assertEqual(self.metric("tcp_write_bytes_total", peer="src"), len(down))
        self.assertEqual(self.metric("tcp_close_total", peer="src", errno=""), 1)
        self.assertEqual(self.metric("tcp_close_total", peer="dst", errno=""), 1)
        self.assertEqual(self.metric("tcp_open_connections"), 0)

    @defer.inlineCallbacks
    def test_log_line_counts(self):
        """The per-connection record (what the log line prints) has the bytes."""
        seen = []
        self.start(lambda: _Peer(b"d" * 700_000))
        client = yield self.connect(_Peer(b"u" * 900_000))
        yield poll(lambda: self.listener.connections, what="the connection")
        original = InboundConnection.closed

        def closed(conn, reason, how):
            seen.append((conn.bytes_read, conn.bytes_written, how))
            original(conn, reason, how)

        self.patch(InboundConnection, "closed", closed)
        yield client.lost()
        yield poll(lambda: seen, what="the connection record")
        self.assertEqual(seen[0][:2], (900_000, 700_000))

    # -- half-close -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_client_half_close(self):
        """The client's EOF reaches the server, which can still answer."""
        self.start(_AnswerAfterEof)
        client = yield self.connect(_HalfCloseCollect())
        yield poll(lambda: self.listener.connections and self.relay().splice is not None,
                   what="the relay to splice")
        client.transport.write(b"x" * 1_000_000)
        client.transport.loseWriteConnection()
        yield client.lost()
        self.assertEqual(bytes(client.data), b"received 1000000 bytes")
        self.assertTrue(client.eof)

    @defer.inlineCallbacks
    def test_server_half_close(self):
        """The server's EOF reaches the client, which can still send."""
        class Banner(_HalfCloseCollect):
            def connectionMade(self):
                self.transport.write(b"banner " * 100_000)
                self.transport.loseWriteConnection()

        @implementer(IHalfCloseableProtocol)
        class Reply(_HalfCloseCollect):
            def on_eof(self):
                self.transport.write(b"got %d" % len(self.data))
                self.transport.loseWriteConnection()

        self.start(Banner)
        client = yield self.connect(Reply())
        yield client.lost()
        server = self.servers[0]
        yield server.lost()
        self.assertEqual(len(client.data), 700_000)
        self.assertEqual(bytes(server.data), b"got 700000")
        self.assertTrue(server.eof, "the client's EOF came back as EOF")

    # -- failures -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_server_reset(self):
        """A reset from the server closes the client's connection and is
        counted as ECONNRESET."""
        class ResetAfterData(_Collect):
            def dataReceived(self, data):
                self.transport.write(b"bye")
                reactor.callLater(0.05, self.transport.abortConnection)

        self.start(ResetAfterData)
        client = yield self.connect(_Collect())
        yield poll(lambda: self.listener.connections and self.relay().splice is not None,
                   what="the relay to splice")
        client.transport.write(b"hi")
        yield client.lost()
        self.assertEqual(bytes(client.data), b"bye")
        yield poll(lambda: not self.listener.connections, what="the proxy to close")
        self.assertEqual(self.metric("tcp_close_total", peer="dst", errno="ECONNRESET"), 1)
        self.assertEqual(self.metric("tcp_open_connections"), 0)

    @defer.inlineCallbacks
    def test_client_reset_mid_stream(self):
        """A client that resets mid-transfer: both sides closed, nothing leaks."""
        self.start(_Flood)
        client = yield self.connect(_Counter())
        yield poll(lambda: client.received > 4 * 1024 * 1024, what="the flow")
        client.transport.abortConnection()
        yield self.servers[0].lost()
        yield poll(lambda: not self.listener.connections, what="the proxy to close")
        self.assertEqual(self.metric("tcp_open_connections"), 0)

    @defer.inlineCallbacks
    def test_abort_while_spliced(self):
        """The drain's abort of a spliced client connection closes both."""
        self.start(_Flood)
        client = yield self.connect(_Counter())
        yield poll(lambda: client.received > 1024 * 1024, what="the flow")
        (conn,) = self.listener.connections
        conn.transport.abortConnection()
        yield client.lost()
        yield self.servers[0].lost()
        yield poll(lambda: not self.listener.connections, what="the proxy to close")

    # -- backpressure -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_slow_reader_backpressure(self):
        """A client that stops reading stops the proxy reading the server; the
        pipe holds at most its capacity and memory stays flat."""
        self.start(_Flood)
        client = yield self.connect(_Counter())
        yield poll(lambda: client.received > 8 * 1024 * 1024, what="the flow")
        rss = _rss_kib()
        client.transport.pauseProducing()
        server = self.servers[0]
        yield poll(lambda: server.paused, what="the server to be paused")
        relay = self.relay()
        self.assertIsNotNone(relay.splice)
        self.assertNotIn(relay.splice.server, reactor.getReaders(),
                         "the proxy no longer reads from the server")
        yield _sleep(0.5)
        written = server.written
        self.assertLess(written - client.received, 64 * 1024 * 1024,
                        "in flight: bounded by socket buffers and one pipe")
        self.assertLessEqual(relay.splice.s2c.in_pipe, splice.PIPE_SIZE)
        client.transport.resumeProducing()
        yield poll(lambda: client.received > written + 200 * 1024 * 1024,
                   what="200 MiB more")
        self.assertLess(_rss_kib() - rss, 16 * 1024, "RSS flat (within 16 MiB)")

    @defer.inlineCallbacks
    def test_slow_server_backpressure(self):
        """A server that stops reading stops the proxy reading the client."""
        self.start(_Counter)
        client = yield self.connect(_Flood())
        yield poll(lambda: self.servers and self.servers[0].received > 4 * 1024 * 1024,
                   what="the flow")
        server = self.servers[0]
        server.transport.pauseProducing()
        yield poll(lambda: client.paused, what="the client to be paused")
        relay = self.relay()
        self.assertNotIn(relay.splice.client, reactor.getReaders())
        written = client.written
        server.transport.resumeProducing()
        yield poll(lambda: client.written > written + 16 * 1024 * 1024, what="the flow to resume")

    # -- falling back -----------------------------------------------------------

    @defer.inlineCallbacks
    def test_disabled_relays_in_python(self):
        self.patch(splice, "ENABLED", False)
        up, down = os.urandom(2_000_000), os.urandom(3_000_000)
        client, server = yield self.exchange(up, down)
        self.assertEqual(bytes(server.data), up)
        self.assertEqual(bytes(client.data), down)

    @defer.inlineCallbacks
    def test_unsupported_hands_back_mid_stream(self):
        """splice refusing the sockets (EINVAL) mid-transfer: what was in the
        pipes goes through Twisted and the transfer completes exactly."""
        calls = [0]
        real = splice._splice

        def flaky(*args, **kwargs):
            calls[0] += 1
            if calls[0] > 40:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(*args, **kwargs)

        self.patch(splice, "_splice", flaky)
        up, down = os.urandom(9_000_000), os.urandom(11_000_000)
        client, server = yield self.exchange(up, down)
        self.assertGreater(calls[0], 40)
        self.assertFalse(splice.ENABLED, "splicing is off from then on")
        self.assertEqual(_digest(bytes(server.data)), _digest(up))
        self.assertEqual(_digest(bytes(client.data)), _digest(down))
        self.assertEqual(self.metric("tcp_read_bytes_total", peer="src"), len(up))
        self.assertEqual(self.metric("tcp_write_bytes_total", peer="src"), len(down))


def _sleep(seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
