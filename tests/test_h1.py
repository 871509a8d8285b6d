"""The HTTP/1 codec ends against StringTransport: framing, hop-by-hop headers,
pipelining, streaming and backpressure, smuggling vectors, the pool."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.base import DelayedCall
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.balance.backends import Endpoint
from l5dproxy.config.model import HostPort, HttpConfig, ServiceConfig
from l5dproxy.detect.sniff import Verdict
from l5dproxy.exchange.message import (
    Body,
    ProxyError,
    Request,
    RequestHead,
    Response,
    ResponseHead,
)
from l5dproxy.http.h1.pool import H1Client
from l5dproxy.http.h1.server import H1Server
from l5dproxy.http.h1.upgrade import UpgradeRequest
from l5dproxy.net.connection import InboundConnection
from l5dproxy.telemetry import Metrics
from tests.fakes import FakeDispatcher, FakeListener, Sink, send, site


def ok(body: bytes = b"hi", headers=None) -> Response:
    b = Body(len(body))
    if body:
        b.write(body)
    b.finish()
    return Response(ResponseHead(200, headers or [(b"Content-Length", str(len(body)).encode())]),
                    b)


class ServerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = FakeListener(self.clock)
        self.dispatcher = FakeDispatcher()
        self.server, self.transport = self.connect()

    def connect(self, limits: HttpConfig | None = None):
        transport = StringTransport(peerAddress=None)
        conn = InboundConnection(self.listener.site, transport, 0.0, self.listener)
        conn.detected(Verdict("http1", "request_line"))
        server = H1Server(conn, self.dispatcher, limits or HttpConfig(), site(conn.listener))
        server.makeConnection(transport)
        return server, transport

    def feed(self, data: bytes) -> None:
        self.server.dataReceived(data)

    def out(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def test_get_keeps_headers_strips_hop_by_hop(self) -> None:
        self.feed(b"GET /a?b HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\nConnection: x-gone\r\n"
                  b"X-Gone: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nProxy-Connection: k\r\n"
                  b"x-a: 2\r\nUpgrade: foo\r\nAccept: */*\r\n\r\n")
        [(request, d)] = self.dispatcher.requests
        head = request.head
        self.assertEqual((head.method, head.target, head.authority, head.version),
                         (b"GET", b"/a?b", b"example.com", "1.1"))
        self.assertEqual(head.headers, [(b"X-A", b"1"), (b"x-a", b"2"), (b"Accept", b"*/*")])
        self.assertTrue(request.body.is_empty)
        d.callback(ok(b"hello", [(b"Content-Length", b"5"), (b"Connection", b"x-r"),
                                 (b"X-R", b"1"), (b"Set-Cookie", b"a"), (b"Set-Cookie", b"b")]))
        self.assertEqual(self.out(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-R: 1\r\n"
                                     b"Set-Cookie: a\r\nSet-Cookie: b\r\n\r\nhello")
        self.assertFalse(self.transport.disconnecting)

    def test_absolute_form_sets_authority(self) -> None:
        self.feed(b"GET http://api.example:81/p?q HTTP/1.1\r\nHost: other\r\n\r\n")
        head = self.dispatcher.requests[0][0].head
        self.assertEqual((head.authority, head.target), (b"api.example:81", b"/p?q"))

    def test_pipelined_requests_answered_in_order(self) -> None:
        self.feed(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(self.dispatcher.requests), 1)
        self.dispatcher.requests[0][1].callback(ok(b"one"))
        self.assertEqual(len(self.dispatcher.requests), 2)
        self.assertEqual(self.dispatcher.requests[1][0].head.target, b"/2")
        self.dispatcher.requests[1][1].callback(ok(b"two"))
        out = self.out()
        self.assertLess(out.index(b"one"), out.index(b"two"))

    def test_chunked_request_streams_with_trailers(self) -> None:
        self.feed(b"POST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3\r\nabc\r\n")
        request, _d = self.dispatcher.requests[0]
        self.assertIsNone(request.body.length)
        sink = Sink()
        request.body.consume(sink)
        self.assertEqual(sink.data, [b"abc"])
        self.feed(b"2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n")
        self.assertEqual(sink.data, [b"abc", b"de"])
        self.assertTrue(sink.ended)
        self.assertEqual(sink.trailers, [(b"X-Sum", b"5")])

    def test_chunked_response_and_trailers(self) -> None:
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        body = Body()
        self.dispatcher.requests[0][1].callback(Response(ResponseHead(200, []), body))
        body.write(b"hello")
        body.finish([(b"grpc-status", b"0")])
        self.assertEqual(self.out(), b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                     b"5\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n")

    def test_http10_unknown_length_is_close_delimited(self) -> None:
        self.feed(b"GET / HTTP/1.0\r\n\r\n")
        body = Body()
        self.dispatcher.requests[0][1].callback(Response(ResponseHead(200, []), body))
        body.write(b"x")
        body.finish()
        self.assertEqual(self.out(), b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nx")
        self.assertTrue(self.transport.disconnecting)

    def test_http10_keep_alive(self) -> None:
        self.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.dispatcher.requests[0][1].callback(ok(b"x"))
        self.assertIn(b"connection: keep-alive\r\n", self.out())
        self.assertFalse(self.transport.disconnecting)

    def test_connection_close(self) -> None:
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
                  b"GET /never HTTP/1.1\r\nHost: a\r\n\r\n")
        self.dispatcher.requests[0][1].callback(ok(b"x"))
        self.assertIn(b"connection: close\r\n", self.out())
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.dispatcher.requests), 1)

    def test_head_and_204_have_no_body(self) -> None:
        self.feed(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.dispatcher.requests[0][1].callback(
            Response(ResponseHead(200, [(b"Content-Length", b"100")]), Body.empty()))
        self.assertEqual(self.out(), b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        self.feed(b"DELETE / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.dispatcher.requests[1][1].callback(Response(ResponseHead(204, []), Body.empty()))
        self.assertEqual(self.out(), b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_expect_100_continue_when_body_is_consumed(self) -> None:
        self.feed(b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                  b"Content-Length: 3\r\n\r\n")
        request, _d = self.dispatcher.requests[0]
        self.assertEqual(request.head.headers, [(b"Content-Length", b"3")])
        self.assertEqual(self.out(), b"")
        sink = Sink()
        request.body.consume(sink)
        self.assertEqual(self.out(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.feed(b"abc")
        self.assertEqual(sink.data, [b"abc"])

    def test_expect_100_continue_ignored_for_http10(self) -> None:
        # RFC 9110 10.1.1 and 15.2: the expectation is ignored for HTTP/1.0,
        # and no 1xx is ever sent to an HTTP/1.0 client.
        self.feed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        request, d = self.dispatcher.requests[0]
        self.assertEqual(request.head.headers, [(b"Content-Length", b"5")])
        self.assertIsNone(request.interim)
        sink = Sink()
        request.body.consume(sink)
        self.feed(b"hello")
        self.assertEqual((sink.data, sink.ended), ([b"hello"], True))
        self.assertEqual(self.out(), b"")
        d.callback(ok(b"x"))
        self.assertTrue(self.out().startswith(b"HTTP/1.1 200 OK\r\n"))

    def test_proxy_error_response(self) -> None:
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.dispatcher.requests[0][1].errback(ProxyError.unavailable("no endpoints"))
        self.assertEqual(self.out(), b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                                     b"l5d-proxy-error: no endpoints\r\n\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_error_with_unread_body_closes(self) -> None:
        self.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        self.dispatcher.requests[0][1].errback(ProxyError.bad_gateway("connection refused"))
        self.assertIn(b"connection: close", self.out())
        self.assertTrue(self.transport.disconnecting)

    SMUGGLING = {
        "bad request line": b"GET / HTTP/1.1 x\r\nHost: a\r\n\r\n",
        "header without colon": b"GET / HTTP/1.1\r\nHost: a\r\nFoo\r\n\r\n",
        "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nFoo: a\r\n b\r\n\r\n",
        "CL and TE": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "TE and CL": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Length: 3\r\n\r\n0\r\n\r\n",
        "two lengths": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                       b"Content-Length: 4\r\n\r\nabcd",
        "bad chunk size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                          b"zz\r\nabc\r\n0\r\n\r\n",
        "TE not chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nabc",
        "TE chunked not last": b"POST / HTTP/1.1\r\nHost: a\r\n"
                               b"Transfer-Encoding: chunked, gzip\r\n\r\n",
        "TE twice": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                    b"Transfer-Encoding: identity\r\n\r\n",
        "space before colon": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n",
        "TE on HTTP/1.0": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "no host": b"GET / HTTP/1.1\r\n\r\n",
        "HTTP/0.9": b"GET /\r\n\r\n",
        "bare LF": b"GET / HTTP/1.1\nHost: a\n\n",
        "NUL in value": b"GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n",
    }

    def test_smuggling_vectors_get_400_and_close(self) -> None:
        for name, data in self.SMUGGLING.items():
            self.dispatcher.requests.clear()
            self.server, self.transport = self.connect()
            self.feed(data)
            out = self.out()
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), f"{name}: {out!r}")
            self.assertIn(b"l5d-proxy-error: ", out, name)
            self.assertIn(b"connection: close", out, name)
            self.assertTrue(self.transport.disconnecting, name)
            self.assertEqual(self.dispatcher.requests, [], name)

    def test_bad_chunk_after_dispatch_answers_400(self) -> None:
        self.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        request, d = self.dispatcher.requests[0]
        sink = Sink()
        request.body.consume(sink)
        self.feed(b"zz\r\n")
        self.assertIsNotNone(sink.error)   # the upstream never sees a whole request
        d.errback(ProxyError.bad_gateway("x"))
        self.assertTrue(self.out().startswith(b"HTTP/1.1 400 "))
        self.assertTrue(self.transport.disconnecting)

    def test_limits_414_431(self) -> None:
        limits = HttpConfig(max_request_line=300, max_header_bytes=1024)
        self.server, self.transport = self.connect(limits)
        self.feed(b"GET /" + b"a" * 400 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertTrue(self.out().startswith(b"HTTP/1.1 414 "))
        self.server, self.transport = self.connect(limits)
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"b" * 600 + b"\r\n"
                  + b"X-Big2: " + b"b" * 600 + b"\r\n\r\n")
        self.assertTrue(self.out().startswith(b"HTTP/1.1 431 "))
        # one header that never ends, a read at a time
        self.server, self.transport = self.connect(limits)
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
        for _ in range(5):
            self.feed(b"c" * 500)
        self.assertTrue(self.out().startswith(b"HTTP/1.1 431 "))
        self.assertEqual(self.dispatcher.requests, [])

    def test_connect_refused_405(self) -> None:
        self.feed(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n")
        out = self.out()
        self.assertTrue(out.startswith(b"HTTP/1.1 405 "))
        self.assertIn(b"l5d-proxy-error: CONNECT not allowed", out)
        self.assertEqual(self.dispatcher.requests, [])

    def test_upgrade_refused_closes_after_response(self) -> None:
        self.feed(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n"
                  b"Upgrade: websocket\r\n\r\n")
        request, d = self.dispatcher.requests[0]
        self.assertEqual(request.upgrade, b"websocket")
        d.callback(ok(b"no"))
        self.assertIn(b"connection: close\r\n", self.out())
        self.assertTrue(self.transport.disconnecting)

    def test_version_2_is_505(self) -> None:
        self.feed(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n")
        self.assertTrue(self.out().startswith(b"HTTP/1.1 505 "))

    def test_response_body_paused_by_slow_client(self) -> None:
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        events = []

        class Source:
            def pause_body(self):
                events.append("pause")

            def resume_body(self):
                events.append("resume")

            def stop_body(self):
                events.append("stop")

        body = Body()
        body.set_source(Source())
        self.dispatcher.requests[0][1].callback(Response(ResponseHead(200, []), body))
        self.server.pauseProducing()    # the transport's buffer is full
        self.server.resumeProducing()
        self.assertEqual(events, ["pause", "resume"])
        self.server.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(events[-1], "stop")

    def test_request_body_backpressure_pauses_reading(self) -> None:
        self.feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
        request, _ = self.dispatcher.requests[0]
        self.feed(b"x" * 70000)   # past the body's high water with no consumer
        self.assertEqual(self.transport.producerState, "paused")
        request.body.consume(Sink())
        self.assertEqual(self.transport.producerState, "producing")

    def test_upstream_dies_mid_response_aborts(self) -> None:
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        body = Body(10)
        self.dispatcher.requests[0][1].callback(
            Response(ResponseHead(200, [(b"Content-Length", b"10")]), body))
        body.write(b"abc")
        body.fail(ConnectionLost())
        self.assertTrue(self.transport.disconnecting)

    def test_drain_closes_idle(self) -> None:
        self.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.server.conn.drain()
        self.assertFalse(self.transport.disconnecting)
        self.dispatcher.requests[0][1].callback(ok(b"x"))
        self.assertIn(b"connection: close", self.out())
        self.assertTrue(self.transport.disconnecting)


class HalfCloseTests(SynchronousTestCase):
    """A client that sends pipelined requests and then its FIN
    (``shutdown(SHUT_WR)``): every request received whole before the FIN is
    answered, in order, and only the last answer closes the connection."""

    REQUESTS = (b"GET /0 HTTP/1.1\r\nHost: a\r\n\r\n",
                b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nping",
                b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n",
                b"PUT /3 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"2\r\nhi\r\n0\r\n\r\n")

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = FakeListener(self.clock)
        self.dispatcher = FakeDispatcher()
        self.transport = StringTransport(peerAddress=None)
        conn = InboundConnection(self.listener.site, self.transport, 0.0, self.listener)
        conn.detected(Verdict("http1", "request_line"))
        self.server = H1Server(conn, self.dispatcher, HttpConfig(), site(conn.listener))
        self.server.makeConnection(self.transport)

    def out(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def errors(self, reason: str) -> float | None:
        return self.listener.metrics.registry.get_sample_value(
            "http_errors_total", {"direction": "inbound", "listener": "in", "reason": reason})

    def test_every_request_before_the_fin_is_answered_in_order(self) -> None:
        # n requests in one read, the FIN read after `fin_after` answers,
        # each answer a response or a proxy error (504): n answers, in
        # order, connection: close on the last only, then the close.
        for n, fin_after, failing in itertools.product(range(1, 5), range(4), range(-1, 4)):
            if fin_after >= n:
                continue
            with self.subTest(n=n, fin_after=fin_after, failing=failing):
                self.setUp()
                self.server.dataReceived(b"".join(self.REQUESTS[:n]))
                for i in range(n):
                    if i == fin_after:
                        self.server.readConnectionLost()
                    self.assertEqual(len(self.dispatcher.requests), i + 1)   # one at a time
                    request, d = self.dispatcher.requests[i]
                    self.assertEqual(request.head.target, b"/%d" % i)
                    if i == failing:
                        d.errback(ProxyError.timeout("response timeout"))
                    else:
                        d.callback(ok(b"answer %d" % i))
                    out = self.out()
                    if i == failing:
                        self.assertTrue(out.startswith(b"HTTP/1.1 504 "), out)
                    else:
                        self.assertTrue(out.endswith(b"\r\n\r\nanswer %d" % i), out)
                    last = i == n - 1
                    self.assertEqual(b"connection: close\r\n" in out, last, (i, out))
                    self.assertEqual(self.transport.disconnecting, last, i)
                self.assertEqual(len(self.dispatcher.requests), n)

    def test_fin_while_idle_closes(self) -> None:
        self.server.dataReceived(self.REQUESTS[0])
        self.dispatcher.requests[0][1].callback(ok(b"zero"))
        self.assertNotIn(b"connection: close", self.out())
        self.assertFalse(self.transport.disconnecting)
        self.server.readConnectionLost()
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.out(), b"")

    def test_head_cut_short_by_the_fin_is_dropped(self) -> None:
        # Nothing to answer for a request never received whole: the ones
        # before it are answered, then the close; no 408 comes for it later.
        self.server.dataReceived(self.REQUESTS[0] + b"GET /1 HTTP/1.1\r\nHo")
        self.server.readConnectionLost()
        self.clock.advance(HttpConfig().request_header_timeout + 1)
        self.assertEqual(self.out(), b"")
        self.dispatcher.requests[0][1].callback(ok(b"zero"))
        out = self.out()
        self.assertTrue(out.endswith(b"connection: close\r\n\r\nzero"), out)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(len(self.dispatcher.requests), 1)

    def test_queued_body_cut_short_by_the_fin_is_400_never_dispatched(self) -> None:
        self.server.dataReceived(self.REQUESTS[0] + b"POST /1 HTTP/1.1\r\nHost: a\r\n"
                                 b"Content-Length: 10\r\n\r\npin")
        self.server.readConnectionLost()
        self.dispatcher.requests[0][1].callback(ok(b"zero"))
        out = self.out()
        self.assertEqual(len(self.dispatcher.requests), 1)   # /1 never went anywhere
        head, _, rest = out.partition(b"\r\n\r\nzero")
        self.assertNotIn(b"connection: close", head)
        self.assertTrue(rest.startswith(b"HTTP/1.1 400 Bad Request\r\n"), rest)
        self.assertIn(b"l5d-proxy-error: client closed mid-body\r\n", rest)
        self.assertIn(b"connection: close\r\n", rest)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.errors("client closed mid-body"), 1)

    def test_body_being_sent_cut_short_by_the_fin_fails_it(self) -> None:
        # The request being answered: its body fails (the client end aborts
        # the upstream); the answer is what the dispatcher makes of it.
        self.server.dataReceived(b"POST /0 HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\npin")
        request, d = self.dispatcher.requests[0]
        sink = Sink()
        request.body.consume(sink)
        self.server.readConnectionLost()
        self.assertIsInstance(sink.error, ConnectionLost)
        self.assertFalse(self.transport.disconnecting)
        d.errback(ProxyError.bad_request("client closed mid-body"))
        out = self.out()
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertTrue(self.transport.disconnecting)


class TimeoutAndInterimTests(SynchronousTestCase):
    """The request-head timeout (slowloris), the keep-alive idle timeout and 1xx
    responses forwarded to the client, on one server connection with a Clock."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = FakeListener(self.clock)
        self.dispatcher = FakeDispatcher()
        self.connect()

    def connect(self, limits: HttpConfig | None = None) -> None:
        self.transport = StringTransport(peerAddress=None)
        conn = InboundConnection(self.listener.site, self.transport, 0.0, self.listener)
        conn.detected(Verdict("http1", "request_line"))
        self.server = H1Server(conn, self.dispatcher,
                               limits or HttpConfig(request_header_timeout=10.0, idle_timeout=60.0),
                               site(conn.listener))
        self.server.makeConnection(self.transport)

    def out(self) -> bytes:
        value = self.transport.value()
        self.transport.clear()
        return value

    def answer(self, index: int) -> None:
        self.dispatcher.requests[index][1].callback(ok(b"x"))

    def test_slow_request_head_gets_408_and_close(self) -> None:
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n")
        for _ in range(9):   # a byte a second does not extend the deadline
            self.clock.advance(1)
            self.server.dataReceived(b"X")
        self.assertEqual(self.out(), b"")
        self.clock.advance(1)
        out = self.out()
        self.assertTrue(out.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), out)
        self.assertIn(b"l5d-proxy-error: request header timeout\r\n", out)
        self.assertIn(b"connection: close\r\n", out)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.dispatcher.requests, [])
        self.assertEqual(self.listener.metrics.registry.get_sample_value(
            "http_errors_total", {"direction": "inbound", "listener": "in",
                                  "reason": "request header timeout"}), 1)

    def test_idle_keep_alive_connection_is_closed(self) -> None:
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(120)   # waiting for a response is not idleness
        self.assertFalse(self.transport.disconnecting)
        self.answer(0)
        self.clock.advance(59)
        self.server.dataReceived(b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.answer(1)
        self.clock.advance(59)   # idle again from the second response
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.server._ended_by, "idle timeout")

    def test_head_timeout_after_keep_alive_idleness(self) -> None:
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.answer(0)   # idle from now (t=0)
        self.clock.advance(55)
        self.server.dataReceived(b"GET /2 HTTP/1.1\r\n")   # head due at 65
        self.clock.advance(9.9)
        self.assertEqual(self.out().count(b"408"), 0)
        self.clock.advance(0.1)
        self.assertIn(b"HTTP/1.1 408", self.out())

    def test_head_deadline_before_a_sleeping_timer(self) -> None:
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(30)
        self.answer(0)            # idle until 90: the timer is due at 90
        self.clock.advance(31)    # t=61
        self.server.dataReceived(b"GET /2 HTTP/1.1\r\n")   # head due at 71, before 90
        self.out()
        self.clock.advance(10)
        self.assertIn(b"HTTP/1.1 408", self.out())

    def test_head_deadline_moves_no_timer_sooner(self) -> None:
        """A request head begun on a new connection brings its deadline (10 s)
        before the idle timer's (60 s) with a new timer, never with
        ``DelayedCall.reset`` to a sooner time: in Twisted's reactor that
        searches the whole timer heap, and under a slowloris of 5,000
        connections it took 68 % of the proxy's CPU (py-spy, issue 11)."""
        sooner = []
        reset = DelayedCall.reset

        def recording_reset(call, seconds):
            if call.seconds() + seconds < call.getTime():
                sooner.append(seconds)
            reset(call, seconds)
        self.patch(DelayedCall, "reset", recording_reset)
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n")
        self.assertEqual(sooner, [])
        self.assertEqual([c.getTime() for c in self.clock.getDelayedCalls()
                          if c.active()], [10.0])
        self.clock.advance(10)
        self.assertTrue(self.out().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertTrue(self.transport.disconnecting)

    def test_zero_turns_timeouts_off(self) -> None:
        self.connect(HttpConfig(request_header_timeout=0, idle_timeout=0))
        self.server.dataReceived(b"GET / HTTP/1.1\r\n")
        self.clock.advance(3600)
        self.assertEqual(self.out(), b"")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_timer_gone_with_the_connection(self) -> None:
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])

    def test_early_hints_forwarded_before_the_response(self) -> None:
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        request, d = self.dispatcher.requests[0]
        request.interim(ResponseHead(103, [(b"Link", b"</a.css>; rel=preload"),
                                           (b"Connection", b"x")], b"Early Hints"))
        self.assertEqual(self.out(), b"HTTP/1.1 103 Early Hints\r\n"
                                     b"Link: </a.css>; rel=preload\r\n\r\n")
        d.callback(ok(b"x"))
        self.assertTrue(self.out().startswith(b"HTTP/1.1 200 OK\r\n"))
        request.interim(ResponseHead(103, []))   # too late: nothing is written
        self.assertEqual(self.out(), b"")

    def test_no_interim_responses_for_http10(self) -> None:
        self.server.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        request, _d = self.dispatcher.requests[0]
        self.assertIsNone(request.interim)


class ClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.metrics = Metrics()
        self.config = ServiceConfig("app", (HostPort("127.0.0.1", 8080),), idle_timeout=30.0)
        self.client = H1Client(self.reactor, self.metrics, max_idle=2)
        self.endpoint = Endpoint(HostPort("127.0.0.1", 8080))

    def request(self, method=b"GET", body=None, headers=None):
        request = Request(RequestHead(method, b"/x", b"example.com", headers or []),
                          body if body is not None else Body.empty())
        return send(self.client, self.endpoint, request, self.config.target)

    def accept(self, index=-1):
        _host, _port, factory, timeout, _ = self.reactor.tcpClients[index]
        self.assertEqual(timeout, 5.0)
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_response_transfer_codings(self) -> None:
        """RFC 9112 6.1/6.3: codings other than a final chunked are kept on
        the response (read until the close when chunked is not last), for
        HTTP/1.1 clients only; chunked twice, or to an HTTP/2 or HTTP/1.0
        client, is a 502 and the connection is dropped."""
        cases = [
            ("1.1", b"gzip", b"gzip", None),
            ("1.1", b"gzip, chunked", b"gzip", None),
            ("1.1", b"Deflate ,  GZIP,chunked", b"deflate, gzip", None),
            ("1.1", b"gzip\r\nTransfer-Encoding: chunked", b"gzip", None),   # two fields
            ("1.1", b"chunked, gzip", None, "invalid response: transfer-encoding chunked, gzip "
                                              "(chunked not last)"),
            ("2", b"gzip, chunked", None, "response transfer-encoding gzip cannot be sent to "
                                          "an HTTP/2 client"),
            ("1.0", b"gzip", None, "response transfer-encoding gzip cannot be sent to an "
                                   "HTTP/1.0 client"),
        ]
        for version, te, codings, error in cases:
            self.setUp()   # a new pool: one connection per case
            request = Request(RequestHead(b"GET", b"/x", b"example.com", [], b"http", version),
                              Body.empty())
            d = send(self.client, self.endpoint, request, self.config.target)
            proto, transport = self.accept()
            body = b"3\r\nabc\r\n0\r\n\r\n" if te.endswith(b"chunked") else b"abc"
            proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n" + body)
            if error is not None:
                self.assertEqual(self.failureResultOf(d, ProxyError).value.reason, error)
                self.assertTrue(transport.disconnecting or transport.disconnected, te)
                continue
            response = self.successResultOf(d)
            self.assertEqual(response.head.transfer_codings, codings, te)
            sink = Sink()
            response.body.consume(sink)
            if not te.endswith(b"chunked"):
                self.assertFalse(sink.ended)   # until the close
                proto.connectionLost(Failure(ConnectionDone()))
            self.assertEqual((b"".join(sink.data), sink.ended, sink.error), (b"abc", True, None))

    def test_get_reuses_connection(self) -> None:
        d = self.request(headers=[(b"Accept", b"*/*")])
        proto, transport = self.accept()
        self.assertEqual(transport.value(),
                         b"GET /x HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n")
        transport.clear()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
                           b"Keep-Alive: timeout=5\r\nX-A: 1\r\n\r\nhi")
        response = self.successResultOf(d)
        self.assertEqual(response.head.status, 200)
        self.assertEqual(response.head.reason, b"OK")
        self.assertEqual(response.head.headers, [(b"Content-Length", b"2"), (b"X-A", b"1")])
        sink = Sink()
        response.body.consume(sink)
        self.assertEqual((sink.data, sink.ended), ([b"hi"], True))
        d2 = self.request(method=b"POST", body=Body.empty())
        self.assertEqual(len(self.reactor.tcpClients), 1)   # pooled
        self.assertEqual(transport.value(),
                         b"POST /x HTTP/1.1\r\nHost: example.com\r\ncontent-length: 0\r\n\r\n")
        proto.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(self.successResultOf(d2).head.status, 204)

    def test_call_without_deferred(self) -> None:
        class Waiter:
            def __init__(self) -> None:
                self.outcomes: list = []

            def attempt_responded(self, response) -> None:
                self.outcomes.append(response)

            def attempt_failed(self, failure) -> None:
                self.outcomes.append(failure)

        waiter = Waiter()
        request = Request(RequestHead(b"GET", b"/x", b"example.com", []), Body.empty())
        call = self.client.send(self.config.target, self.endpoint, request, waiter)
        proto, transport = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
        [response] = waiter.outcomes
        self.assertEqual(response.head.status, 200)
        call.cancel()   # after the response: nothing happens, the connection stays
        self.assertFalse(transport.disconnecting)
        # Cancelled before a response: the connection is aborted, nothing reported.
        waiter2 = Waiter()
        call2 = self.client.send(self.config.target, self.endpoint, request, waiter2)
        call2.cancel()
        self.assertEqual(waiter2.outcomes, [])
        self.assertTrue(transport.disconnecting)
        # A failure is reported as a Failure.
        waiter3 = Waiter()
        self.client.send(self.config.target, self.endpoint, request, waiter3)
        proto3, _ = self.accept()
        proto3.connectionLost(Failure(ConnectionLost("gone")))
        [failure] = waiter3.outcomes
        self.assertIsInstance(failure, Failure)
        self.assertTrue(failure.check(ConnectionLost))

    def test_chunked_request_and_response(self) -> None:
        body = Body()
        d = self.request(method=b"POST", body=body)
        proto, transport = self.accept()
        body.write(b"abc")
        body.finish([(b"x-t", b"1")])
        self.assertTrue(transport.value().endswith(
            b"transfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n"))
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        response = self.successResultOf(d)
        sink = Sink()
        response.body.consume(sink)
        proto.dataReceived(b"0\r\nT: 2\r\n\r\n")
        self.assertEqual((sink.data, sink.trailers), ([b"hi"], [(b"T", b"2")]))
        self.assertEqual(self.client.pools[("app", self.endpoint.label)].idle, [proto])

    def test_paused_reader_then_end_resumes_reading_for_the_pool(self) -> None:
        d = self.request()
        proto, transport = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        body = self.successResultOf(d).body
        sink = Sink()
        body.consume(sink)
        body.pause()                      # a slow client
        self.assertEqual(transport.producerState, "paused")
        proto.dataReceived(b"cd")          # already read: the body ends
        self.assertTrue(sink.ended)
        self.assertEqual(transport.producerState, "producing")
        body.pause()                       # a stale pause does not stop the next response
        body.resume()
        d2 = self.request()
        self.assertEqual(transport.producerState, "producing")
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d2).head.status, 200)

    def test_close_delimited_response(self) -> None:
        d = self.request()
        proto, _transport = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nsome")
        sink = Sink()
        self.successResultOf(d).body.consume(sink)
        proto.dataReceived(b"more")
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((sink.data, sink.ended), ([b"some", b"more"], True))

    def test_dies_mid_response(self) -> None:
        d = self.request()
        proto, _transport = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        sink = Sink()
        self.successResultOf(d).body.consume(sink)
        proto.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(sink.error)

    def test_head_response(self) -> None:
        d = self.request(method=b"HEAD")
        proto, _transport = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        response = self.successResultOf(d)
        self.assertTrue(response.body.is_empty)
        self.assertEqual(response.head.headers, [(b"Content-Length", b"10")])

    def test_interim_responses_skipped(self) -> None:
        d = self.request()
        proto, _ = self.accept()
        proto.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n")
        self.assertNoResult(d)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).head.status, 200)

    def test_head_response_keeps_the_pooled_connection(self) -> None:
        for response_bytes in (
            [b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"],
            [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"],
            [b"HTTP/1.1 200 OK\r\nConte", b"nt-Length: 10\r\n\r", b"\n"],
            [b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\nHTTP/1.1 200 OK\r\n"
             b"Content-Length: 5\r\n\r\n"],
        ):
            self.setUp()
            d = self.request(method=b"HEAD")
            proto, transport = self.accept()
            for piece in response_bytes:
                proto.dataReceived(piece)
            response = self.successResultOf(d)
            self.assertEqual(response.head.status, 200)
            self.assertTrue(response.body.is_empty)
            self.assertFalse(transport.disconnecting, response_bytes)
            # The next request goes out on the same connection and is parsed afresh.
            transport.clear()
            d2 = self.request()
            self.assertEqual(len(self.reactor.tcpClients), 1)
            self.assertTrue(transport.value().startswith(b"GET /x HTTP/1.1\r\n"))
            proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
            sink = Sink()
            self.successResultOf(d2).body.consume(sink)
            self.assertEqual((sink.data, sink.ended), ([b"hi"], True))
            self.assertFalse(transport.disconnecting)

    def test_head_response_with_bytes_after_it_closes(self) -> None:
        d = self.request(method=b"HEAD")
        proto, transport = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        self.assertEqual(self.successResultOf(d).head.status, 200)
        self.assertTrue(transport.disconnecting)   # the endpoint sent a body after all

    def test_interim_responses_go_to_the_request_hook(self) -> None:
        seen = []
        request = Request(RequestHead(b"GET", b"/x", b"example.com", []), Body.empty(),
                          seen.append)
        d = send(self.client, self.endpoint, request, self.config.target)
        proto, _ = self.accept()
        proto.dataReceived(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
                           b"Connection: x\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual([(h.status, h.reason, h.headers) for h in seen],
                         [(103, b"Early Hints", [(b"Link", b"</a.css>; rel=preload")])])
        self.assertNoResult(d)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).head.status, 200)

    def test_stale_pooled_connection_is_retried_when_safe(self) -> None:
        d = self.request()
        proto, _ = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        d2 = self.request()   # goes out on the pooled connection...
        proto.connectionLost(Failure(ConnectionDone()))   # ...which the server had closed
        self.assertNoResult(d2)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        proto2, _ = self.accept()
        proto2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d2).head.status, 200)

    def test_request_with_body_is_not_replayed(self) -> None:
        d = self.request()
        proto, _ = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        body = Body(3)
        d2 = self.request(method=b"POST", body=body)
        body.write(b"abc")
        body.finish()
        proto.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(d2, ConnectionLost)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_server_closed_idle_connection_leaves_pool(self) -> None:
        d = self.request()
        proto, _ = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.successResultOf(d)
        proto.readConnectionLost()
        proto.connectionLost(Failure(ConnectionDone()))
        self.request()
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_idle_timeout_and_limit(self) -> None:
        ds = [self.request() for _ in range(3)]
        conns = [self.accept(i) for i in range(3)]
        for proto, _ in conns:
            proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        for d in ds:
            self.successResultOf(d)
        pool = self.client.pools[("app", self.endpoint.label)]
        self.assertEqual(len(pool.idle), 2)   # max_idle
        self.assertTrue(conns[2][1].disconnecting)
        self.reactor.advance(31)
        self.assertEqual(pool.idle, [])
        self.assertTrue(all(t.disconnecting for _, t in conns))

    def test_early_response_closes_connection(self) -> None:
        body = Body(100)
        d = self.request(method=b"POST", body=body)
        proto, transport = self.accept()
        body.write(b"x" * 10)
        proto.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.successResultOf(d).head.status, 413)
        self.assertTrue(transport.disconnecting)

    def test_cancel_aborts(self) -> None:
        d = self.request()
        _proto, transport = self.accept()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(transport.disconnecting)

    def test_invalid_response_is_502(self) -> None:
        d = self.request()
        proto, _ = self.accept()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 502)


class UpgradeTests(SynchronousTestCase):
    """``[[listener]] upgrades``: listed protocols are forwarded, any other
    upgrade (h2c above all) is stripped and proxied as plain HTTP/1."""

    H2C = (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = FakeListener(self.clock)
        self.dispatcher = FakeDispatcher()

    def serve(self, upgrades: frozenset[bytes] | None = None):
        changes = {} if upgrades is None else {"upgrades": upgrades}
        transport = StringTransport()
        conn = InboundConnection(self.listener.site, transport, 0.0, self.listener)
        conn.detected(Verdict("http1", "request_line"))
        server = H1Server(conn, self.dispatcher, HttpConfig(), site(conn.listener, **changes))
        server.makeConnection(transport)
        return server, transport

    def upstream_bytes(self, request) -> tuple[bytes, H1Client, object, defer.Deferred]:
        reactor = MemoryReactorClock()
        client = H1Client(reactor, Metrics())
        d = send(client, Endpoint(HostPort("127.0.0.1", 1)), request)
        proto = reactor.tcpClients[0][2].buildProtocol(None)
        upstream = StringTransport()
        proto.makeConnection(upstream)
        return upstream, proto, d

    def test_h2c_upgrade_is_stripped(self) -> None:
        """h2c smuggling: the endpoint gets a plain GET (no Upgrade, no
        HTTP2-Settings, no Connection), and the next request on the
        connection is read as HTTP/1, not relayed."""
        server, transport = self.serve()
        server.dataReceived(self.H2C + b"GET /admin HTTP/1.1\r\nHost: a\r\n\r\n")
        [(request, d)] = self.dispatcher.requests
        self.assertNotIsInstance(request, UpgradeRequest)
        self.assertEqual((request.head.method, request.head.target, request.head.headers),
                         (b"GET", b"/", []))
        upstream, _proto, _ = self.upstream_bytes(request)
        self.assertEqual(upstream.value(), b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        d.callback(ok(b"plain"))
        self.assertEqual(transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
        self.assertEqual(self.dispatcher.requests[1][0].head.target, b"/admin")
        self.assertFalse(transport.disconnecting)

    def test_h2c_upgrade_with_a_body(self) -> None:
        """llhttp stops at an upgrade request's head: a stripped one's
        Content-Length body is still its body, however it is split."""
        data = (b"POST /u HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                b"Content-Length: 5\r\n\r\nhelloGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
        for cut in (len(data), data.index(b"hello") + 2, data.index(b"hello") + 5, 10):
            self.dispatcher.requests.clear()
            server, _ = self.serve()
            server.dataReceived(data[:cut])
            server.dataReceived(data[cut:])
            request, d = self.dispatcher.requests[0]
            sink = Sink()
            request.body.consume(sink)
            self.assertEqual((b"".join(sink.data), sink.ended), (b"hello", True), cut)
            self.assertEqual(request.head.headers, [(b"Content-Length", b"5")])
            d.callback(ok())
            self.assertEqual(self.dispatcher.requests[1][0].head.target, b"/next", cut)

    def test_body_on_an_upgrade_request_is_refused(self) -> None:
        """One rule: a forwarded upgrade (WebSocket) with any body, and a
        stripped one (h2c) with a chunked body, get 400 before anything is
        dispatched: after a forwarded upgrade's head every byte is tunnel
        data, so its Content-Length body would never reach the endpoint."""
        ws = b"Connection: Upgrade\r\nUpgrade: websocket\r\n"
        h2c = b"Connection: Upgrade\r\nUpgrade: h2c\r\n"
        cases = [
            (b"POST", ws, b"Content-Length: 5\r\n\r\nhello"),
            (b"GET", ws, b"Content-Length: 1\r\n\r\nx"),
            (b"GET", ws, b"Content-Length: 5\r\n\r\n"),      # body not yet sent
            (b"POST", ws, b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            (b"POST", h2c, b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
        ]
        for n, (method, upgrade, rest) in enumerate(cases, 1):
            server, transport = self.serve()
            server.dataReceived(method + b" / HTTP/1.1\r\nHost: a\r\n" + upgrade + rest)
            self.assertEqual(self.dispatcher.requests, [], rest)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"), rest)
            self.assertIn(b"l5d-proxy-error: body on an upgrade request\r\n",
                          transport.value())
            self.assertTrue(transport.disconnecting, rest)
            self.assertEqual(self.listener.metrics.http_errors_total.labels(
                "inbound", "in", "body on an upgrade request")._value.get(), n)

    def test_websocket_upgrade_with_content_length_0_is_forwarded(self) -> None:
        server, _ = self.serve()
        server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                            b"Upgrade: websocket\r\nContent-Length: 0\r\n\r\n")
        [(request, _d)] = self.dispatcher.requests
        self.assertIsInstance(request, UpgradeRequest)

    def test_unlisted_and_mixed_offers_are_stripped(self) -> None:
        """Every offered protocol must be listed; HTTP/1.0 never upgrades
        (RFC 9110 7.8); an empty ``upgrades`` strips WebSocket too."""
        cases = [
            (None, b"HTTP/1.1", b"websocket, h2c"),
            (None, b"HTTP/1.1", b"foo"),
            (None, b"HTTP/1.0", b"websocket"),
            (frozenset(), b"HTTP/1.1", b"websocket"),
        ]
        for upgrades, version, offer in cases:
            self.dispatcher.requests.clear()
            server, _ = self.serve(upgrades)
            server.dataReceived(b"GET /ws " + version + b"\r\nHost: a\r\nConnection: Upgrade\r\n"
                                b"Upgrade: " + offer + b"\r\nSec-WebSocket-Key: k\r\n\r\n")
            [(request, _)] = self.dispatcher.requests
            self.assertFalse(isinstance(request, UpgradeRequest), (version, offer))
            self.assertEqual(request.head.headers, [(b"Sec-WebSocket-Key", b"k")])

    def test_listed_upgrades_are_forwarded(self) -> None:
        """WebSocket by default, any case, with a version; others when listed."""
        for upgrades, offer in ((None, b"WebSocket"), (None, b"websocket/13"),
                              (frozenset({b"foo", b"websocket"}),
                               b"foo, websocket")):
            self.dispatcher.requests.clear()
            server, _ = self.serve(upgrades)
            server.dataReceived(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                                b"Upgrade: " + offer + b"\r\n\r\n")
            [(request, _)] = self.dispatcher.requests
            self.assertIsInstance(request, UpgradeRequest)
            self.assertEqual(request.upgrade, offer)

    def test_101_to_a_protocol_not_offered_is_502(self) -> None:
        """RFC 9110 7.8: an endpoint answering a WebSocket upgrade with a
        switch to h2c (or naming no protocol) is not relayed: 502."""
        for answer in (b"Upgrade: h2c\r\nConnection: Upgrade\r\n", b"",
                       b"Upgrade: websocket, h2c\r\n"):
            self.dispatcher.requests.clear()
            server, _ = self.serve()
            server.dataReceived(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                                b"Upgrade: websocket\r\n\r\n")
            [(request, _)] = self.dispatcher.requests
            upstream, proto, d = self.upstream_bytes(request)
            proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\n" + answer + b"\r\n"
                               + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            error = self.failureResultOf(d, ProxyError).value
            self.assertEqual((error.status, error.reason),
                             (502, "101 response switching to a protocol not asked for"))
            self.assertTrue(upstream.disconnecting or upstream.disconnected)
        server, _ = self.serve()   # the protocol offered, with a version: relayed
        server.dataReceived(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                            b"Upgrade: websocket\r\n\r\n")
        upstream, proto, d = self.upstream_bytes(self.dispatcher.requests[-1][0])
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket/13\r\n"
                           b"Connection: Upgrade\r\n\r\n")
        self.assertEqual(self.successResultOf(d).head.status, 101)

    def test_forwarded_upgrade_keeps_named_headers(self) -> None:
        server, transport = self.serve(frozenset({b"foo"}))
        server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, Foo-Settings\r\n"
                            b"Upgrade: foo\r\nFoo-Settings: AAMA\r\n\r\n")
        [(request, _)] = self.dispatcher.requests
        self.assertEqual(request.upgrade, b"foo")
        self.assertEqual(request.connection, (b"foo-settings",))
        self.assertEqual(request.head.headers, [(b"Foo-Settings", b"AAMA")])
        upstream, proto, d = self.upstream_bytes(request)
        self.assertEqual(upstream.value(), b"GET / HTTP/1.1\r\nHost: a\r\nFoo-Settings: "
                         b"AAMA\r\nconnection: upgrade, foo-settings\r\n"
                         b"upgrade: foo\r\n\r\n")
        proto.dataReceived(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: foo\r\n"
                           b"Connection: Upgrade\r\n\r\nfrom-server")
        response = self.successResultOf(d)
        self.assertEqual(response.head.status, 101)
        self.assertIs(response.tunnel, proto)
        transport.clear()
        d_server = self.dispatcher.requests[0][1]
        d_server.callback(response)
        self.assertEqual(transport.value(), b"HTTP/1.1 101 Switching Protocols\r\n"
                         b"connection: upgrade\r\nupgrade: foo\r\n\r\nfrom-server")
        server.dataReceived(b"client bytes")
        self.assertTrue(upstream.value().endswith(b"client bytes"))


class PipelineGarbageTests(SynchronousTestCase):
    """Requests through both ends and the dispatcher leave no reference cycles:
    each would be work for the cyclic GC, per request (it showed in req/s)."""

    def test_no_cyclic_garbage_per_request(self) -> None:
        import gc

        from l5dproxy.balance.backends import BackendSet
        from l5dproxy.route.dispatcher import HttpProxy

        clock = MemoryReactorClock()
        listener = FakeListener(clock)
        config = ServiceConfig("app", (HostPort("127.0.0.1", 8080),), protocol="http1")
        proxy = HttpProxy({"app": BackendSet(config, frozenset(), clock=clock)},
                          listener.metrics, clock)
        proxy.clients["http1"] = H1Client(clock, listener.metrics)
        transport = StringTransport(peerAddress=None)
        conn = InboundConnection(listener.site, transport, 0.0, listener)
        conn.detected(Verdict("http1", "request_line"))
        server = H1Server(conn, proxy, HttpConfig(), site(conn.listener))
        server.makeConnection(transport)
        cases = [
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nServer: x\r\n\r\nhi"),
            (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nping",
             b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
            (b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n",
             b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"),
        ]
        server.dataReceived(cases[0][0])
        upstream = clock.tcpClients[0][2].buildProtocol(None)
        upstream.makeConnection(StringTransport())
        upstream.dataReceived(cases[0][1])
        enabled = gc.isenabled()
        self.addCleanup(lambda: gc.enable() if enabled else None)
        for request, response in cases:
            gc.collect()
            gc.disable()
            for _ in range(20):
                transport.clear()
                server.dataReceived(request)
                upstream.dataReceived(response)
                self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 OK"))
            self.assertEqual(gc.collect(), 0, request)
            gc.enable()
        self.assertEqual(len(clock.tcpClients), 1)   # one pooled connection throughout


class HostTests(SynchronousTestCase):
    """RFC 9112 3.2: a Host with an invalid value gets 400; RFC 9110 4.2.4:
    userinfo is an error. One check with h2's ``:authority``
    (``headers.valid_authority``), for a non-empty Host and for an
    absolute-form request target's authority."""

    def setUp(self) -> None:
        self.listener = FakeListener(MemoryReactorClock())
        self.dispatcher = FakeDispatcher()

    def send(self, data: bytes) -> bytes:
        transport = StringTransport()
        conn = InboundConnection(self.listener.site, transport, 0.0, self.listener)
        conn.detected(Verdict("http1", "request_line"))
        server = H1Server(conn, self.dispatcher, HttpConfig(), site(conn.listener))
        server.makeConnection(transport)
        server.dataReceived(data)
        return transport.value()

    def refused(self) -> int:
        return self.listener.metrics.http_errors_total.labels(
            "inbound", "in", "invalid host")._value.get()

    def assertRefused(self, data: bytes) -> None:
        before = self.refused()
        out = self.send(data)
        self.assertTrue(out.startswith(b"HTTP/1.1 400 Bad Request\r\n"), data)
        self.assertIn(b"\r\nl5d-proxy-error: invalid host\r\n", out)
        self.assertEqual(self.dispatcher.requests, [], data)
        self.assertEqual(self.refused(), before + 1, data)

    def test_invalid_host_values_are_refused(self) -> None:
        for host in (b"a/admin", b"x@internal.example", b"user:pw@a", b"a:80/x", b"a?b",
                     b"a#b", b"a b", b"a\\b", b"[::1", b"a:b", b":80", b'a"b'):
            self.assertRefused(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        self.assertRefused(b"GET / HTTP/1.0\r\nHost: x@a\r\n\r\n")

    def test_invalid_absolute_form_authority_is_refused(self) -> None:
        for target in (b"http://internal.example@a/", b"http://u:p@a/x", b"https://a:b/",
                       b"http://:80/", b"http://a%zz/"):
            self.assertRefused(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_valid_hosts_are_forwarded(self) -> None:
        cases = [
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", b"a"),
            (b"GET / HTTP/1.1\r\nHost: a.example:8080\r\n\r\n", b"a.example:8080"),
            (b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n", b"[::1]:80"),
            (b"GET / HTTP/1.1\r\nHost: internal.example.\r\n\r\n", b"internal.example."),
            (b"GET / HTTP/1.1\r\nHost: %41b\r\n\r\n", b"%41b"),
            (b"GET / HTTP/1.1\r\nHost:\r\n\r\n", b""),       # RFC 9112 3.2: empty is allowed
            (b"GET http://b:81/x HTTP/1.1\r\nHost: a\r\n\r\n", b"b:81"),
        ]
        for n, (data, authority) in enumerate(cases, 1):
            self.send(data)
            self.assertEqual(len(self.dispatcher.requests), n, data)
            self.assertEqual(self.dispatcher.requests[-1][0].head.authority, authority)
        self.assertEqual(self.refused(), 0)

    @settings(max_examples=60, derandomize=True, deadline=None, database=None)
    @given(st.from_regex(rb"\A[a-z0-9][a-z0-9.\-]{0,20}(:[0-9]{1,5})?\Z", fullmatch=True),
           st.sampled_from([b"/", b"@", b"?", b"#", b"\\", b"\"", b"<", b"{", b"%"]),
           st.integers(min_value=0, max_value=30))
    def test_a_valid_host_with_a_foreign_byte_is_refused(self, host: bytes, bad: bytes,
                                                         at: int) -> None:
        """A generated ``host[:port]`` is forwarded as it is; the same with
        any byte outside RFC 3986's authority put anywhere is refused."""
        self.dispatcher.requests.clear()
        self.send(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
        self.assertEqual(self.dispatcher.requests[0][0].head.authority, host)
        at = min(at, len(host))
        mutated = host[:at] + bad + host[at:]
        self.dispatcher.requests.clear()
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: " + mutated + b"\r\n\r\n")

    @settings(max_examples=200, derandomize=True, deadline=None, database=None)
    @given(st.lists(st.binary(max_size=24) | st.from_regex(
        rb"\A[a-z0-9.\-%\[\]:]{1,24}\Z", fullmatch=True), min_size=1, max_size=12))
    def test_remembered_verdicts_are_the_patterns(self, values: list[bytes]) -> None:
        """``valid_authority`` remembers its verdicts (a connection sends
        one Host again and again): asked twice, in any order, each value
        gets the pattern's own verdict, and the memory stays bounded."""
        from l5dproxy.http import headers

        for value in values + values[::-1]:
            self.assertEqual(headers.valid_authority(value),
                             headers._AUTHORITY(value) is not None, value)
        self.patch(headers, "_SEEN_LIMIT", 4)
        for n in range(20):
            headers.valid_authority(b"h%d" % n)
        self.assertLessEqual(len(headers._seen), 4)
        self.assertFalse(headers.valid_authority(b"h1@x"))
        self.assertFalse(headers.valid_authority(b"x" * 300 + b"/"))
