"""/tap: live request events, filters, limit, and a slow watcher that loses
events instead of growing memory (issue 15 part 2).

A real ProxyService with a real listener and a real twisted.web backend on
loopback, driven by Twisted's Agent in the test reactor; the tap watchers
are raw TCP clients of the admin port.
"""

from __future__ import annotations

import json
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from l5dproxy.app.service import ProxyService
from l5dproxy.app.tap import Filter, TapError
from l5dproxy.config.model import AdminConfig, Config, HostPort, ListenerConfig, ServiceConfig

LISTEN = "tcp:0:interface=127.0.0.1"


class _Backend(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"connection", b"close")   # nothing pooled is left at the end
        if request.path.startswith(b"/fail"):
            request.setResponseCode(503)
            return b"down\n"
        return b"hello " + request.path + b"\n"

    render_POST = render_GET


class _Watcher(protocol.Protocol):
    """A raw /tap client: collects what arrives; ``hold()`` stops reading."""

    def __init__(self) -> None:
        self.data = b""
        self.head = defer.Deferred()
        self.closed = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.factory.request)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if b"\r\n\r\n" in self.data and not self.head.called:
            self.head.callback(self.data.split(b"\r\n\r\n", 1)[0])

    def connectionLost(self, reason) -> None:
        self.closed.callback(None)

    def events(self) -> list[dict]:
        body = _unchunk(self.data.split(b"\r\n\r\n", 1)[1])
        return [json.loads(line) for line in body.split(b"\n") if line]


def _unchunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        if not rest and not size_line:
            break
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        if len(rest) < size + 2:   # a chunk not complete yet: what is there
            out.append(rest[:size])
            break
        out.append(rest[:size])
        data = rest[size + 2:]
    return b"".join(out)


class TapTests(TestCase):
    def setUp(self) -> None:
        backend = reactor.listenTCP(0, Site(_Backend()), interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        config = Config(
            source="test", admin=AdminConfig(listen=LISTEN),
            listeners=(ListenerConfig("in", LISTEN, "app"),),
            services={"app": ServiceConfig("app", (HostPort("127.0.0.1",
                                                            backend.getHost().port),),
                                           retry_statuses=())},
        )
        self.service = ProxyService(config)
        self.service.privilegedStartService()
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        self.admin = self.service.admin_port.getHost().port
        self.proxy = f"http://127.0.0.1:{self.service.port_of('in')}"
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def watch(self, query: str, accept: bytes = b"") -> _Watcher:
        factory = protocol.ClientFactory.forProtocol(_Watcher)
        factory.request = (b"GET /tap" + query.encode() + b" HTTP/1.1\r\nHost: admin\r\n"
                           b"Connection: close\r\n"
                           + (b"Accept: " + accept + b"\r\n" if accept else b"") + b"\r\n")
        watcher = yield TCP4ClientEndpoint(reactor, "127.0.0.1", self.admin).connect(factory)
        self.addCleanup(lambda: watcher.transport.connected
                        and watcher.transport.abortConnection())
        yield watcher.head
        return watcher

    @defer.inlineCallbacks
    def send(self, path: str, method: bytes = b"GET") -> int:
        response = yield self.agent.request(method, (self.proxy + path).encode())
        yield readBody(response)
        return response.code

    @defer.inlineCallbacks
    def test_nobody_tapping_sets_no_hook(self):
        http = self.service.http
        self.assertIsNone(http.tap)
        self.assertIsNone(http.tap_start)
        watcher = yield self.watch("")
        self.assertIs(http.tap, self.service.tap)
        self.assertIsNone(http.tap_start)
        watcher.transport.loseConnection()
        yield watcher.closed
        while self.service.tap.watchers:   # the server sees the close a moment later
            yield _tick()
        self.assertIsNone(http.tap)

    @defer.inlineCallbacks
    def test_event_fields(self):
        watcher = yield self.watch("?limit=2")
        self.assertIn(b"content-type: application/x-ndjson", watcher.data.lower())
        self.assertEqual((yield self.send("/a?x=1")), 200)
        self.assertEqual((yield self.send("/fail", b"POST")), 503)
        yield watcher.closed   # limit=2 ends the stream
        first, second = watcher.events()
        port = self.service.port_of("in")
        backend = str(self.service.backends["app"].endpoints[0].address)
        self.assertEqual(first["type"], "end")
        self.assertEqual({k: first[k] for k in (
            "method", "authority", "path", "listener", "service", "endpoint", "protocol",
            "status", "grpc_status", "request_bytes", "response_bytes", "error")},
            {"method": "GET", "authority": f"127.0.0.1:{port}", "path": "/a?x=1",
             "listener": "in", "service": "app", "endpoint": backend, "protocol": "http1",
             "status": 200, "grpc_status": "", "request_bytes": 0,
             "response_bytes": len(b"hello /a\n"), "error": ""})
        self.assertRegex(first["client"], r"^127\.0\.0\.1:\d+$")
        self.assertGreater(first["latency_ms"], 0)
        self.assertEqual((second["method"], second["status"]), ("POST", 503))

    @defer.inlineCallbacks
    def test_filters_and_limit(self):
        by_prefix = yield self.watch("?path_prefix=/a&limit=2")
        by_status = yield self.watch("?status=5xx")
        by_method = yield self.watch("?method=post&service=app")
        by_service = yield self.watch("?service=other")
        with_start = yield self.watch("?start=1&authority=NOPE&seconds=60")
        for path, method in (("/b", b"GET"), ("/a1", b"GET"), ("/fail", b"GET"),
                             ("/a2", b"POST"), ("/a3", b"GET")):
            yield self.send(path, method)
        yield by_prefix.closed
        self.assertEqual([e["path"] for e in by_prefix.events()], ["/a1", "/a2"])
        self.assertEqual([e["path"] for e in by_status.events()], ["/fail"])
        self.assertEqual([e["path"] for e in by_method.events()], ["/a2"])
        self.assertEqual(by_service.events(), [])
        self.assertEqual(with_start.events(), [])
        self.assertIsNotNone(self.service.http.tap_start)

    @defer.inlineCallbacks
    def test_start_events(self):
        watcher = yield self.watch("?start=1&limit=2")
        yield self.send("/s")
        yield watcher.closed
        start, end = watcher.events()
        self.assertEqual((start["type"], start["path"], start["service"]), ("start", "/s", "app"))
        self.assertNotIn("status", start)
        self.assertEqual((end["type"], end["status"]), ("end", 200))

    @defer.inlineCallbacks
    def test_seconds_ends_the_stream(self):
        watcher = yield self.watch("?seconds=0.2")
        yield watcher.closed
        self.assertEqual(watcher.events(), [])
        self.assertEqual(self.service.tap.watchers, [])

    @defer.inlineCallbacks
    def test_sse(self):
        watcher = yield self.watch("?limit=1", accept=b"text/event-stream")
        self.assertIn(b"content-type: text/event-stream", watcher.data.lower())
        yield self.send("/e")
        yield watcher.closed
        body = _unchunk(watcher.data.split(b"\r\n\r\n", 1)[1])
        self.assertTrue(body.startswith(b"event: end\ndata: {"), body)
        self.assertTrue(body.endswith(b"}\n\n"))
        self.assertEqual(json.loads(body.split(b"data: ", 1)[1])["path"], "/e")

    @defer.inlineCallbacks
    def test_bad_parameters_are_400(self):
        for query in ("?status=9xx", "?limit=x", "?seconds=-1", "?status=600"):
            watcher = yield self.watch(query)
            yield watcher.closed
            self.assertTrue(watcher.data.startswith(b"HTTP/1.1 400 "), (query, watcher.data))
        self.assertEqual(self.service.tap.watchers, [])

    @defer.inlineCallbacks
    def test_too_many_watchers_is_503(self):
        self.service.tap.max_watchers = 2
        yield self.watch("")
        yield self.watch("")
        third = yield self.watch("")
        yield third.closed
        self.assertTrue(third.data.startswith(b"HTTP/1.1 503 "), third.data)

    @defer.inlineCallbacks
    def test_slow_watcher_loses_events_and_memory_stays_bounded(self):
        """A watcher that stops reading: at most ``queue_max`` events wait,
        the rest are dropped and counted, the stream says how many once it
        flows again, and every proxied request is still answered."""
        hub = self.service.tap
        hub.queue_max = 8
        watcher = yield self.watch("")
        watcher.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        watcher.transport.pauseProducing()      # the watcher stops reading
        (server,) = hub.watchers
        server.request.transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        path = "/" + "p" * 4000   # ~4 KB events: the buffers fill after a few dozen
        sent = 300
        largest = 0
        for i in range(sent):
            self.assertEqual((yield self.send(f"{path}?{i}")), 200)
            largest = max(largest, len(server.queue))
        self.assertTrue(server.paused)
        self.assertEqual(largest, hub.queue_max)
        self.assertGreater(server.dropped_total, 0)
        watcher.transport.resumeProducing()
        while b'"type":"dropped"' not in watcher.data:
            yield _tick()
        events = watcher.events()
        ends = [e for e in events if e["type"] == "end"]
        (notice,) = [e for e in events if e["type"] == "dropped"]
        self.assertEqual(notice["dropped_total"], server.dropped_total)
        self.assertEqual(len(ends) + notice["dropped_total"], sent)
        received = [int(e["path"].rsplit("?", 1)[1]) for e in ends]
        self.assertEqual(received, list(range(len(received))))   # the first ones, in order
        self.assertIs(events[-1], notice)


def _tick() -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(0.01, d.callback, None)
    return d


class FilterTests(SynchronousTestCase):
    EVENT = {"service": "app", "authority": "Web.example:80", "path": "/api/x",
             "method": "GET", "status": 404}

    def test_each_field(self):
        e = self.EVENT
        self.assertTrue(Filter().matches(e))
        self.assertTrue(Filter(service="app", authority="web.EXAMPLE:80", path_prefix="/api",
                               method="get", status="4xx").matches(e))
        self.assertTrue(Filter(status="404").matches(e))
        for wrong in ({"service": "db"}, {"authority": "web.example"}, {"path_prefix": "/x"},
                      {"method": "POST"}, {"status": "5xx"}, {"status": "400"}):
            self.assertFalse(Filter(**wrong).matches(e), wrong)
        self.assertFalse(Filter(status="2xx").matches({**e, "status": None}))

    def test_bad_status(self):
        for bad in ("6xx", "abc", "99", "1000", "5x"):
            self.assertRaises(TapError, Filter, status=bad)
