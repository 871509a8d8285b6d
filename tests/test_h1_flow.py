"""HTTP/1 flow control across both ends: a pause never outlives its body.

A slow client pauses the response body, which stops reading the pooled
upstream connection. Whatever ends the body (it completes, the client goes,
the client asks to close) must leave both connections in a sane state: the
upstream connection back in the pool *reading*, or aborted; the client
connection closed for real, even though its producer was paused when the
close was asked for (Twisted waits forever for a paused producer otherwise).
"""

from __future__ import annotations

import itertools

from twisted.internet import defer, reactor
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import HostPort, HttpConfig, ServiceConfig
from l5dproxy.detect.sniff import Verdict
from l5dproxy.exchange.message import Body, Response, ResponseHead
from l5dproxy.http.h1.pool import H1Client
from l5dproxy.http.h1.server import H1Server
from l5dproxy.net.connection import InboundConnection
from l5dproxy.route.dispatcher import HttpProxy
from tests.fakes import FakeDispatcher, FakeListener, Source, site


def server_on(transport, listener, dispatcher) -> H1Server:
    conn = InboundConnection(listener.site, transport, 0.0, listener)
    conn.detected(Verdict("http1", "request_line"))
    server = H1Server(conn, dispatcher, HttpConfig(), site(conn.listener))
    server.makeConnection(transport)
    return server


class ServerCloseTests(SynchronousTestCase):
    """The server end gives its producer up whenever it closes."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = FakeListener(self.clock)
        self.dispatcher = FakeDispatcher()
        self.transport = StringTransport(peerAddress=None)
        self.server = server_on(self.transport, self.listener, self.dispatcher)

    def respond_paused(self) -> tuple[Body, Source]:
        """A response whose client's socket buffer fills while it streams."""
        [(_, d)] = self.dispatcher.requests
        body = Body(6)
        source = Source()
        body.set_source(source)
        d.callback(Response(ResponseHead(200, [(b"content-length", b"6")]), body))
        body.write(b"abc")
        self.server.pauseProducing()          # Twisted: the client is not reading
        self.assertTrue(source.paused)
        body.write(b"def")
        return body, source

    def test_close_after_a_response_that_ended_while_paused(self) -> None:
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        self.assertIs(self.transport.producer, self.server)
        body, _ = self.respond_paused()
        body.finish()
        self.assertTrue(self.transport.value().endswith(b"\r\n\r\nabcdef"))
        self.assertTrue(self.transport.disconnecting)
        # Registered and paused, Twisted's loseConnection would never complete.
        self.assertIsNone(self.transport.producer)

    def test_drain_after_a_response_that_ended_while_paused(self) -> None:
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        body, _ = self.respond_paused()
        self.server.drain()                   # SIGTERM while the response streams
        self.assertFalse(self.transport.disconnecting)
        body.finish()
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)

    def test_client_eof_after_a_response_that_ended_while_paused(self) -> None:
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        body, _ = self.respond_paused()
        body.finish()
        self.assertFalse(self.transport.disconnecting)
        self.server.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.transport.producer)

    def test_keep_alive_response_ended_while_paused_pauses_the_next(self) -> None:
        # Paused is the client transport's state, not the body's: the next
        # response starts paused and resumes when the client catches up.
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        body, _ = self.respond_paused()
        body.finish()
        self.assertFalse(self.transport.disconnecting)
        self.server.dataReceived(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        _, d = self.dispatcher.requests[1]
        body2 = Body(None)
        source2 = Source()
        body2.set_source(source2)
        d.callback(Response(ResponseHead(200, []), body2))
        self.assertTrue(source2.paused)
        self.server.resumeProducing()
        self.assertFalse(source2.paused)
        body2.finish()
        self.assertFalse(self.transport.disconnecting)
        self.assertIs(self.transport.producer, self.server)


class BothEndsTests(SynchronousTestCase):
    """The server end, the dispatcher and the pool, on StringTransports."""

    BIG = 300_000

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = FakeListener(self.clock)
        config = ServiceConfig("app", (HostPort("127.0.0.1", 8080),), protocol="http1")
        self.proxy = HttpProxy({"app": BackendSet(config, frozenset(), clock=self.clock)},
                               self.listener.metrics, self.clock)
        self.client = H1Client(self.clock, self.listener.metrics)
        self.proxy.clients["http1"] = self.client
        self.backends: list = []

    def serve(self) -> tuple[H1Server, StringTransport]:
        transport = StringTransport(peerAddress=None)
        return server_on(transport, self.listener, self.proxy), transport

    def upstream(self, n: int):
        """The n-th upstream connection opened (connected on first use)."""
        while len(self.backends) <= n:
            protocol = self.clock.tcpClients[len(self.backends)][2].buildProtocol(None)
            transport = StringTransport()
            protocol.makeConnection(transport)
            self.backends.append((protocol, transport))
        return self.backends[n]

    def idle(self) -> list:
        return [conn for pool in self.client.pools.values() for conn in pool.idle]

    def start_big_paused(self):
        """A big response streaming to a client that stopped reading."""
        server, transport = self.serve()
        server.dataReceived(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        up, up_transport = self.upstream(0)
        self.assertTrue(up_transport.value().startswith(b"GET /big HTTP/1.1\r\n"))
        up_transport.clear()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.BIG
                        + b"x" * 100_000)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        server.pauseProducing()               # the client's socket buffer is full
        self.assertEqual(up_transport.producerState, "paused")
        return server, transport, up, up_transport

    def small_get(self, n_upstream: int) -> bytes:
        server, transport = self.serve()
        server.dataReceived(b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
        up, up_transport = self.upstream(n_upstream)
        self.assertEqual(up_transport.producerState, "producing")
        self.assertTrue(up_transport.value().startswith(b"GET /small HTTP/1.1\r\n"))
        up_transport.clear()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        return transport.value()

    def test_body_ending_while_paused_pools_a_reading_connection(self) -> None:
        server, _transport, up, up_transport = self.start_big_paused()
        up.dataReceived(b"x" * (self.BIG - 100_000))     # the rest, in the same read
        self.assertEqual(up_transport.producerState, "producing")
        self.assertEqual(self.idle(), [up])
        self.assertTrue(up.reusable())
        server.resumeProducing()                         # a stale resume: harmless
        self.assertTrue(self.small_get(0).endswith(b"\r\n\r\nhi"))
        self.assertEqual(len(self.clock.tcpClients), 1)  # the same connection
        self.assertEqual(self.idle(), [up])

    def test_client_gone_mid_body_aborts_the_paused_upstream(self) -> None:
        server, _transport, up, up_transport = self.start_big_paused()
        server.connectionLost(Failure(ConnectionLost("client reset")))
        self.assertTrue(up_transport.disconnected)       # aborted, not pooled
        self.assertEqual(self.idle(), [])
        up.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.small_get(1).endswith(b"\r\n\r\nhi"))
        self.assertEqual(len(self.clock.tcpClients), 2)

    def test_client_half_close_mid_body_then_reset_aborts_the_upstream(self) -> None:
        server, transport, _up, up_transport = self.start_big_paused()
        server.readConnectionLost()                      # EOF: the response goes on
        self.assertFalse(up_transport.disconnected)
        self.assertFalse(transport.disconnecting)
        server.connectionLost(Failure(ConnectionLost("client reset")))
        self.assertTrue(up_transport.disconnected)
        self.assertEqual(self.idle(), [])

    def test_response_head_written_as_the_endpoint_sent_it_less_hop_by_hop(self) -> None:
        """The server end writes the client end's header lines as they are:
        names as sent, order kept, hop-by-hop headers and those the
        endpoint's Connection names left out, its length not doubled."""
        server, transport = self.serve()
        server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        up, _ = self.upstream(0)
        up.dataReceived(b"HTTP/1.1 200 Fine\r\nServer: x\r\nKeep-Alive: timeout=5\r\n"
                        b"Content-Length: 2\r\nX-Mixed-Case: v\r\nConnection: keep-alive\r\n"
                        b"\r\nhi")
        self.assertEqual(transport.value(),
                         b"HTTP/1.1 200 Fine\r\nServer: x\r\nContent-Length: 2\r\n"
                         b"X-Mixed-Case: v\r\n\r\nhi")
        transport.clear()
        server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        up.dataReceived(b"HTTP/1.1 200 OK\r\nX-Private: 1\r\nConnection: X-Private\r\n"
                        b"Transfer-Encoding: chunked\r\nA: b\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
        self.assertEqual(transport.value(),
                         b"HTTP/1.1 200 OK\r\nA: b\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"2\r\nhi\r\n0\r\n\r\n")
        transport.clear()
        server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        up.dataReceived(b"HTTP/1.1 204 No Content\r\nB: c\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 204 No Content\r\nB: c\r\n\r\n")

    def test_paused_connection_is_never_pooled_or_taken(self) -> None:
        _server, _transport, up, up_transport = self.start_big_paused()
        self.assertFalse(up.reusable())                  # busy and paused
        pool = next(iter(self.client.pools.values()))
        up.dataReceived(b"x" * (self.BIG - 100_000))
        self.assertEqual(pool.idle, [up])
        up._read_paused = True                           # as if a pause outlived the body
        self.assertFalse(up.reusable())
        self.assertIsNone(pool.take())
        self.assertFalse(up_transport.disconnecting)   # take() only skips it
        pool.release(up)                                 # and release() closes it
        self.assertEqual(pool.idle, [])
        self.assertTrue(up_transport.disconnecting)

    PIPELINED = (b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n"
                 b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nping"
                 b"GET /hello HTTP/1.1\r\nHost: a\r\n\r\n")
    ANSWERS = ((b"GET /hello ", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello"),
               (b"POST /echo ", b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n", b"ping"),
               (b"GET /hello ", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", b"hello"))

    def busy_upstream(self):
        """The one upstream connection with a request on it, connected if new."""
        busy = [self.upstream(n) for n in range(len(self.clock.tcpClients))]
        busy = [(up, t) for up, t in busy if up.call is not None]
        self.assertEqual(len(busy), 1, "one request upstream at a time")
        return busy[0]

    def test_pipelined_requests_answered_in_order_however_the_answers_are_read(self) -> None:
        """The e2e ``test_pipelined_and_http10`` with every way the endpoint's
        answers can reach the pool: each head and body in one read, or the
        body in a read of its own (the next request is then dispatched from
        inside the previous body's end). Every answer reaches the client
        whole and in order, each request goes upstream once, after the
        previous answer."""
        for splits in itertools.product((False, True), repeat=3):
            server, transport = self.serve()
            server.dataReceived(self.PIPELINED)
            expected = b""
            for split, (line, head, body) in zip(splits, self.ANSWERS, strict=True):
                up, up_transport = self.busy_upstream()
                sent = up_transport.value()
                self.assertTrue(sent.startswith(line), (splits, sent))
                if line.startswith(b"POST"):
                    self.assertTrue(sent.endswith(b"\r\n\r\nping"), (splits, sent))
                up_transport.clear()
                if split:
                    up.dataReceived(head)
                    up.dataReceived(body)
                else:
                    up.dataReceived(head + body)
                expected += b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%b" % (
                    len(body), body)
                self.assertEqual(transport.value().lower(), expected.lower(), splits)
            self.assertFalse(transport.disconnecting)
            for up, _ in self.backends:
                self.assertIsNone(up.call)

    def test_underscore_field_names_dropped_and_counted(self) -> None:
        """``Transfer_Encoding: chunked`` and ``Content_Length`` (which a
        CGI/WSGI endpoint reads as framing) and ``X_Real_IP`` are dropped
        before routing; the request and the next one on the connection are
        forwarded as the proxy framed them (nginx: underscores_in_headers off)."""
        server, transport = self.serve()
        server.dataReceived(b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                            b"Transfer_Encoding: chunked\r\nX_Real_IP: 10.0.0.1\r\n"
                            b"X-Real-IP: 1.2.3.4\r\n\r\nhello"
                            b"GET /n HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\n\r\n")
        up, up_transport = self.upstream(0)
        self.assertEqual(up_transport.value(),
                         b"POST /u HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                         b"X-Real-IP: 1.2.3.4\r\nx-forwarded-for: 192.168.1.1\r\n"
                         b"x-forwarded-proto: http\r\n\r\nhello")
        up_transport.clear()
        up.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(up_transport.value(), b"GET /n HTTP/1.1\r\nHost: a\r\n"
                         b"x-forwarded-for: 192.168.1.1\r\nx-forwarded-proto: http\r\n\r\n")
        self.assertEqual(self.listener.metrics.registry.get_sample_value(
            "http_errors_total", {"direction": "inbound", "listener": "in",
                                  "reason": "underscore in field name"}), 3)

    def test_early_answer_to_a_paused_upload_closes_the_upstream_for_real(self) -> None:
        server, transport = self.serve()
        server.dataReceived(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n"
                            + b"u" * 1000)
        up, up_transport = self.upstream(0)
        up.pauseProducing()                  # the endpoint stopped reading the upload
        self.assertEqual(transport.producerState, "paused")
        up.dataReceived(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(up_transport.disconnecting)
        self.assertIsNone(up_transport.producer)   # else Twisted never closes it
        self.assertEqual(self.idle(), [])


# -- over loopback, with Twisted's real TCP transports ------------------------------


class _Accepting(Protocol):
    def __init__(self, factory) -> None:
        self.factory = factory

    def makeConnection(self, transport) -> None:
        server = server_on(transport, self.factory.listener, self.factory.dispatcher)
        transport.protocol = server
        self.factory.servers.append(server)


class _SlowClient(Protocol):
    """Sends one request, reads nothing until told to, then reads to the end."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = 0
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(self.received)


class LoopbackTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_close_after_a_body_that_ended_while_paused_completes(self) -> None:
        listener = FakeListener(reactor)
        factory = Factory()
        factory.listener = listener
        factory.dispatcher = dispatcher = FakeDispatcher()
        factory.servers = []
        factory.buildProtocol = lambda addr: _Accepting(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = _SlowClient(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        cf = ClientFactory()
        cf.buildProtocol = lambda addr: client
        connector = reactor.connectTCP("127.0.0.1", port.getHost().port, cf)
        self.addCleanup(connector.disconnect)
        while not dispatcher.requests:
            yield deferLater(reactor, 0.01)
        [(_, d)] = dispatcher.requests
        body = Body(None)
        source = Source()
        body.set_source(source)
        d.callback(Response(ResponseHead(200, []), body))
        chunk = b"z" * (256 * 1024)
        written = 0
        while not source.paused and written < 512 * 1024 * 1024:
            body.write(chunk)               # until the kernel buffers are full
            written += len(chunk)
            yield deferLater(reactor, 0)
        self.assertTrue(source.paused)
        body.finish()                       # the end, written while paused
        [server] = factory.servers
        self.assertTrue(server.transport.disconnecting)
        client.transport.resumeProducing()
        timer = reactor.callLater(10, client.closed.cancel)
        received = yield client.closed
        timer.cancel()
        self.assertGreater(received, written)
        self.assertTrue(server._closed)
