"""BatchSender: writes queued without epoll and sent at the end of the reactor turn,
in order with Twisted's own writes and close."""

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from l5dproxy.net.batchsend import BatchSender


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.waiting: list[tuple[int, defer.Deferred]] = []

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for n, d in list(self.waiting):
            if len(self.data) >= n:
                self.waiting.remove((n, d))
                d.callback(self.data)

    def wait_for(self, n: int) -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append((n, d))
        self.dataReceived(b"")
        return d


class BatchSenderTests(unittest.TestCase):
    def test_other_transports_get_write(self) -> None:
        transport = StringTransport()
        sender = BatchSender(transport)
        self.assertIsNone(sender.sock)
        sender.write(b"abc")
        self.assertEqual(transport.value(), b"abc")

    @defer.inlineCallbacks
    def _pair(self):
        server = _Collect()
        factory = protocol.Factory.forProtocol(lambda: server)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield protocol.ClientCreator(reactor, protocol.Protocol).connectTCP(
            "127.0.0.1", port.getHost().port)
        self.addCleanup(client.transport.loseConnection)
        return server, client

    @defer.inlineCallbacks
    def test_sent_at_the_end_of_the_turn_without_epoll(self):
        server, client = yield self._pair()
        sender = BatchSender(client.transport)
        self.assertIsNotNone(sender.sock)
        sender.write(b"hel")
        sender.write(b"lo")
        # Queued in the transport, but the reactor was not asked to watch it.
        self.assertEqual(client.transport._tempDataLen, 5)
        self.assertNotIn(client.transport, reactor.getWriters())
        data = yield server.wait_for(5)
        self.assertEqual(data, b"hello")
        self.assertEqual(client.transport._tempDataLen, 0)

    @defer.inlineCallbacks
    def test_order_with_twisted_writes(self):
        server, client = yield self._pair()
        sender = BatchSender(client.transport)
        client.transport.write(b"first ")   # Twisted is writing: the next goes behind
        sender.write(b"second ")
        client.transport.writeSequence([b"third ", b"fourth"])
        data = yield server.wait_for(25)
        self.assertEqual(data, b"first second third fourth")

    @defer.inlineCallbacks
    def test_lose_connection_after_a_queued_write(self):
        server, client = yield self._pair()
        sender = BatchSender(client.transport)
        sender.write(b"last words")
        client.transport.loseConnection()   # Twisted flushes the queue, then closes
        sender.write(b"!")
        data = yield server.wait_for(11)
        self.assertEqual(data, b"last words!")

    @defer.inlineCallbacks
    def test_what_the_kernel_does_not_take_is_left_to_twisted(self):
        server, client = yield self._pair()
        server.transport.pauseProducing()   # the reader stops reading
        sender = BatchSender(client.transport)
        big = bytes(range(256)) * (32 * 1024)   # 8 MiB: more than the socket buffers
        sender.write(big)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertGreater(client.transport._tempDataLen + len(client.transport.dataBuffer), 0)
        self.assertIn(client.transport, reactor.getWriters())
        server.transport.resumeProducing()
        data = yield server.wait_for(len(big))
        self.assertEqual(data, big)
