"""SendNow: a write goes out at once when nothing is queued, else behind the queue."""

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from l5dproxy.sendnow import SendNow


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


class SendNowTests(unittest.TestCase):
    def test_other_transports_get_write(self) -> None:
        transport = StringTransport()
        sender = SendNow(transport)
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
    def test_sent_at_once_when_nothing_is_queued(self):
        server, client = yield self._pair()
        sender = SendNow(client.transport)
        self.assertIsNotNone(sender.sock)
        sender.write(b"hello")
        # Nothing left for the reactor to write: the kernel has it already.
        self.assertEqual(client.transport._tempDataLen, 0)
        self.assertEqual(client.transport.dataBuffer, b"")
        data = yield server.wait_for(5)
        self.assertEqual(data, b"hello")

    @defer.inlineCallbacks
    def test_queued_bytes_keep_their_order(self):
        server, client = yield self._pair()
        sender = SendNow(client.transport)
        client.transport.write(b"first ")   # queued for the next reactor turn
        sender.write(b"second")
        self.assertEqual(client.transport._tempDataLen, len(b"first second"))
        data = yield server.wait_for(12)
        self.assertEqual(data, b"first second")

    @defer.inlineCallbacks
    def test_after_lose_connection_twisted_decides(self):
        server, client = yield self._pair()
        sender = SendNow(client.transport)
        client.transport.loseConnection()
        sender.write(b"late")   # queued (and flushed before the close) by Twisted
        data = yield server.wait_for(4)
        self.assertEqual(data, b"late")
