"""The common case's short path and the general one give the same answer.

A response whose body has ended by the time its head is handed on (a small
response read at once: the common case) is delivered and counted without
the body's hooks (``route.dispatcher._Exchange.attempt_responded``) and
written with its head in one write; a response whose body comes in later
reads goes the streamed way. Differential: the same endpoint answer, read
at once by one proxy and in pieces by another (head first, then the body in
slices), through the real HTTP/1 server end, dispatcher and client pool on
``StringTransport``s, gives the client the same response (the same bytes
when the body's length is known; the same status, fields, body and trailers
when it is chunked, whose chunk sizes follow the reads) and the same
metrics, and leaves the endpoint connection pooled the same way.
"""

from __future__ import annotations

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import HostPort, ServiceConfig
from l5dproxy.http.h1.pool import H1Client
from l5dproxy.route.dispatcher import HttpProxy
from tests.fakes import FakeListener
from tests.test_h1_flow import server_on


class _Rig:
    """The server end, the dispatcher and the pool, one endpoint connection."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = FakeListener(self.clock)
        config = ServiceConfig("app", (HostPort("127.0.0.1", 8080),), protocol="http1",
                               retry_limit=0)
        self.backends = BackendSet(config, frozenset(), clock=self.clock)
        self.proxy = HttpProxy({"app": self.backends}, self.listener.metrics, self.clock)
        self.client = H1Client(self.clock, self.listener.metrics)
        self.proxy.clients["http1"] = self.client
        self.transport = StringTransport()
        self.server = server_on(self.transport, self.listener, self.proxy)
        self.upstream_transport = StringTransport()
        self.upstream = None

    def exchange(self, request: bytes, pieces: list[bytes], close: bool) -> bytes:
        self.server.dataReceived(request)
        if self.upstream is None:
            self.upstream = self.clock.tcpClients[0][2].buildProtocol(None)
            self.upstream.makeConnection(self.upstream_transport)
        for piece in pieces:
            self.upstream.dataReceived(piece)
        if close:
            self.upstream.connectionLost(Failure(ConnectionDone()))
        return self.transport.value()

    def metrics(self) -> list[tuple[str, tuple, float]]:
        """Every HTTP sample (request and response counts, latency buckets)."""
        registry = self.listener.metrics.registry
        out = []
        for family in registry.collect():
            if family.name in ("request", "response", "response_latency_ms"):
                for s in family.samples:
                    out.append((s.name, tuple(sorted(s.labels.items())), s.value))
        return sorted(out)

    def pool_state(self) -> tuple[int, int]:
        pools = list(self.client.pools.values())
        return (sum(len(p.idle) for p in pools), sum(p.open for p in pools))


def _answer(status: int, fields: list[tuple[bytes, bytes]], body: bytes, framing: str,
            trailers: list[tuple[bytes, bytes]], head_only: bool) -> bytes:
    """The endpoint's response bytes."""
    lines = [b"HTTP/1.1 %d X\r\n" % status]
    lines += [name + b": " + value + b"\r\n" for name, value in fields]
    bodiless = head_only or status in (204, 304)
    if framing == "length":
        lines.append(b"Content-Length: %d\r\n" % len(body))
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked\r\n")
    else:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    head = b"".join(lines)
    if bodiless:
        return head
    if framing == "chunked":
        out = b"".join(b"%x\r\n%b\r\n" % (len(body[i:i + 700]), body[i:i + 700])
                       for i in range(0, len(body), 700))
        out += b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
        return head + out
    return head + body


def _client_view(method: bytes, data: bytes, framed: bool) -> list:
    """The client's h11 events for ``data``, bodies joined; without its
    framing fields unless ``framed`` (a chunked body whose end the proxy
    saw with the head is sent with its length, else chunked)."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    conn.receive_data(b"")
    events: list = []
    body = b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            break
        if isinstance(event, h11.Data):
            body += event.data
            continue
        if isinstance(event, h11.EndOfMessage):
            events += [body, list(event.headers)]
            break
        events.append((event.status_code, [
            (name, value) for name, value in event.headers
            if framed or name not in (b"content-length", b"transfer-encoding")]))
    return events


_FIELDS = st.lists(st.sampled_from([
    (b"Server", b"nginx"), (b"X-A", b"1"), (b"Content-Type", b"text/plain"),
    (b"Connection", b"x-hop"), (b"X-Hop", b"dropped"), (b"Keep-Alive", b"timeout=5"),
    (b"grpc-status", b"14"), (b"Date", b"Tue, 01 Dec 2026 03:00:00 GMT"),
]), max_size=6)


class ShortPathTests(SynchronousTestCase):

    @settings(max_examples=60, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(status=st.sampled_from([200, 201, 204, 304, 404, 500, 503]),
           fields=_FIELDS,
           body=st.binary(max_size=2000),
           framing=st.sampled_from(["length", "chunked", "close"]),
           trailers=st.lists(st.sampled_from([(b"x-t", b"1"), (b"grpc-status", b"0"),
                                              (b"l5d-client-id", b"forged")]), max_size=2),
           head_only=st.booleans(),
           cuts=st.lists(st.integers(min_value=1, max_value=2999), max_size=3))
    def test_read_at_once_and_in_pieces_give_the_same_answer(
            self, status, fields, body, framing, trailers, head_only, cuts) -> None:
        method = b"HEAD" if head_only else b"GET"
        request = method + b" / HTTP/1.1\r\nHost: a\r\n\r\n"
        answer = _answer(status, fields, body, framing, trailers, head_only)
        head_end = answer.index(b"\r\n\r\n") + 4
        bounds = sorted({head_end, *(head_end + c for c in cuts if head_end + c < len(answer))})
        pieces = [answer[a:b] for a, b in zip([0, *bounds], [*bounds, len(answer)],
                                              strict=True) if answer[a:b]]
        close = framing == "close"
        whole, sliced = _Rig(), _Rig()
        # Twice on one connection when it is kept: the second request reuses the
        # pooled endpoint connection (and the connection's cached rule state).
        for _ in range(1 if close else 2):
            whole.transport.clear()
            sliced.transport.clear()
            at_once = whole.exchange(request, [answer], close)
            in_pieces = sliced.exchange(request, pieces, close)
            self.assertTrue(at_once.startswith(b"HTTP/1.1 %d " % status), at_once)
            framed = framing == "length"
            self.assertEqual(_client_view(method, at_once, framed),
                             _client_view(method, in_pieces, framed))
            if framing != "chunked" or head_only or status in (204, 304):
                self.assertEqual(at_once, in_pieces)
        self.assertEqual(whole.metrics(), sliced.metrics())
        self.assertEqual(whole.pool_state(), sliced.pool_state())
        self.assertEqual([e.active for e in whole.backends.endpoints],
                         [e.active for e in sliced.backends.endpoints])


class EmptyBodyWithTrailersTests(SynchronousTestCase):
    """A chunked body with no data but a trailer section keeps its trailers
    when it has ended by the time its head is written (read in one piece
    with it): it is sent chunked, not as ``content-length: 0`` (which has
    no place for them). Found by the differential test above."""

    def test_response_read_at_once(self) -> None:
        rig = _Rig()
        out = rig.exchange(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n"
            b"0\r\nx-t: 1\r\n\r\n"], False)
        self.assertEqual(out, b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                              b"0\r\nx-t: 1\r\n\r\n")

    def test_request_read_at_once(self) -> None:
        rig = _Rig()
        rig.exchange(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"0\r\nx-t: 1\r\n\r\n", [], False)
        self.assertEqual(rig.upstream_transport.value(),
                         b"POST / HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 192.168.1.1\r\n"
                         b"x-forwarded-proto: http\r\ntransfer-encoding: chunked\r\n\r\n"
                         b"0\r\nx-t: 1\r\n\r\n")
