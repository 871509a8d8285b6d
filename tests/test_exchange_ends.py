"""Every request the proxy accepts ends: a property of the whole exchange.

Generated scenarios go through the production path (the HTTP/1 server end,
``HttpProxy`` with its retries and timeouts, the HTTP/1 client pool) on
``StringTransport``s and a ``MemoryReactorClock``: a request whose head and
body arrive in pieces with pauses between them, endpoints that answer early
(503, 502, 200), reset before or after their response head, close mid-body,
accept slowly or not at all, or stop reading for a while; retry settings and a
client that may go away. Endpoints are strict h11 servers. After every event
has been delivered and the clock has run past every timeout:

* the client has its whole response or its connection was closed: no request
  waits on an event that can no longer come (issue 10, item 8);
* every request an endpoint saw whole carries exactly the client's method,
  target and body bytes (a retry replays the whole body or does not happen);
* no endpoint connection is left open holding part of a request;
* a request that may not be retried (POST) reaches at most one endpoint.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError, UserError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import HostPort, ServiceConfig
from l5dproxy.http.h1.pool import H1Client
from l5dproxy.route.dispatcher import HttpProxy
from tests.fakes import FakeListener
from tests.test_h1_flow import server_on

#: What one upstream connection attempt does (in the order attempts are made).
BEHAVIOURS = (
    "ok",                 # reads the whole request, answers 200
    "ok_503",             # reads the whole request, answers 503
    "early_503",          # answers 503 as soon as the head is in
    "early_502",
    "early_200",
    "reset_before_head",  # resets once the request head is in
    "reset_after_head",   # sends a response head and part of its body, then resets
    "close_mid_body",     # closes (FIN) once some of the request is in, no answer
    "refuse",             # connection refused
    "slow_accept",        # accepts after a delay (maybe past the connect timeout)
    "stall_read",         # stops reading for a while, then behaves as "ok"
)

#: Clock time the scenario runs to: past every timeout a scenario sets.
HORIZON = 120.0
CONNECT_TIMEOUT = 2.0


@dataclass
class Case:
    method: bytes
    body: bytes = field(repr=False)
    chunked: bool
    cuts: list[int]              # where the request bytes are split
    ops: list[tuple]             # ("send",) / ("tick", s) / ("cancel",)
    behaviours: list[str]
    accept_delay: float
    endpoints: int
    retry_limit: int
    retry_max_body: int
    response_timeout: float | None
    #: The chunked body's last chunk-size line is not hex: the request is
    #: rejected mid-body (and must then never be retried).
    corrupt: bool = False

    def request_bytes(self) -> bytes:
        head = b"%s /r?x=1 HTTP/1.1\r\nHost: app\r\n" % self.method
        if self.chunked:
            body = b"".join(b"%x\r\n%s\r\n" % (len(self.body[i:i + 700]), self.body[i:i + 700])
                            for i in range(0, len(self.body), 700))
            body += b"zz\r\n\r\n" if self.corrupt else b"0\r\n\r\n"
            return head + b"Transfer-Encoding: chunked\r\n\r\n" + body
        return head + b"Content-Length: %d\r\n\r\n" % len(self.body) + self.body


@st.composite
def cases(draw) -> Case:
    size = draw(st.sampled_from([0, 1, 999, 2000, 5000]))
    body = bytes(random.Random(size).randrange(256) for _ in range(size))
    case = Case(
        method=draw(st.sampled_from([b"PUT", b"GET", b"POST", b"DELETE"])),
        body=body,
        chunked=draw(st.booleans()) and size > 0,
        cuts=[],
        ops=draw(st.lists(st.one_of(
            st.just(("send",)), st.just(("send",)),
            st.tuples(st.just("tick"), st.sampled_from([0.001, 0.5, 3.0, 20.0])),
            st.just(("cancel",))), max_size=8)),
        behaviours=draw(st.lists(st.sampled_from(BEHAVIOURS), max_size=4)),
        accept_delay=draw(st.sampled_from([0.5, 3.0])),
        endpoints=draw(st.integers(1, 3)),
        retry_limit=draw(st.integers(0, 2)),
        retry_max_body=draw(st.sampled_from([0, 1000, 65536])),
        response_timeout=draw(st.sampled_from([None, None, 1.0, 10.0])),
    )
    case.corrupt = case.chunked and draw(st.booleans())
    total = len(case.request_bytes())
    case.cuts = sorted(set(draw(st.lists(st.integers(1, total - 1), max_size=4))))
    return case


class Endpoint:
    """One upstream connection attempt, played by an h11 server."""

    def __init__(self, rig: Rig, index: int, behaviour: str) -> None:
        self.rig = rig
        self.behaviour = behaviour
        _host, _port, self.factory, _timeout, _ = rig.clock.tcpClients[index]
        self.connector = rig.clock.connectors[index]
        self.started = rig.clock.seconds()
        self.protocol = None
        self.transport: StringTransport | None = None
        self.h11 = h11.Connection(h11.SERVER)
        self.fed = 0
        self.gone = False
        self.head_seen = False       # of the request under way
        self.partial: list | None = None
        self.complete: list[tuple[bytes, bytes, bytes]] = []
        self.first = True            # the behaviour applies to the first request only
        self.stalled_at: float | None = None
        self.error: str | None = None

    def turn(self) -> bool:
        """React to whatever happened; whether anything changed."""
        if self.gone:
            return False
        clock = self.rig.clock
        if self.protocol is None:
            if self.connector.stoppedConnecting:   # the proxy gave the attempt up
                self.gone = True
                self.factory.clientConnectionFailed(self.connector, Failure(UserError()))
                return True
            if self.behaviour == "refuse":
                self.gone = True
                self.factory.clientConnectionFailed(
                    self.connector, Failure(ConnectionRefusedError()))
                return True
            if self.behaviour == "slow_accept":
                waited = clock.seconds() - self.started
                if waited >= CONNECT_TIMEOUT:
                    self.gone = True
                    self.factory.clientConnectionFailed(
                        self.connector, Failure(ConnectTimeoutError()))
                    return True
                if waited < self.rig.case.accept_delay:
                    return False
            self.protocol = self.factory.buildProtocol(None)
            self.transport = StringTransport()
            self.protocol.makeConnection(self.transport)
            return True
        if self.transport.disconnecting:   # the proxy closed it
            self.gone = True
            self.protocol.connectionLost(Failure(ConnectionDone()))
            return True
        changed = self._read()
        return self._act() or changed

    def _read(self) -> bool:
        data = self.transport.value()[self.fed:]
        if not data:
            return False
        if self.behaviour == "stall_read" and self.first:
            if self.stalled_at is None:
                self.stalled_at = self.rig.clock.seconds()
                self.protocol.pauseProducing()    # its socket buffer is full
                return True
            if self.rig.clock.seconds() - self.stalled_at < 1.0:
                return False
            self.protocol.resumeProducing()
            self.first = False
        self.fed += len(data)
        self.h11.receive_data(data)
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                self.error = f"endpoint could not parse the proxy's request: {e!r}"
                self._close(ConnectionLost())
                return True
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                self.head_seen = True
                self.partial = [event.method, event.target, b""]
            elif isinstance(event, h11.Data):
                self.partial[2] += event.data
            elif isinstance(event, h11.EndOfMessage):
                self.complete.append(tuple(self.partial))
                self.partial = None
        return True

    def _act(self) -> bool:
        if not self.head_seen or self.gone:
            return False
        behaviour = self.behaviour if self.first else "ok"
        if behaviour.startswith("early_") and self.h11.our_state is h11.SEND_RESPONSE:
            self.first = False
            self._answer(int(behaviour[6:]))
            return True
        if behaviour == "reset_before_head":
            self._close(ConnectionLost())
            return True
        if behaviour == "close_mid_body":
            self._close(ConnectionDone())
            return True
        if behaviour == "reset_after_head":
            self.protocol.dataReceived(self.h11.send(h11.Response(
                status_code=200, headers=[("Content-Length", "10")])) + b"abc")
            self._close(ConnectionLost())
            return True
        if (self.partial is None and self.complete
                and self.h11.our_state is h11.SEND_RESPONSE):
            self.first = False
            self._answer(503 if behaviour == "ok_503" else 200)
            return True
        return False

    def _answer(self, status: int) -> None:
        body = b"done" if status == 200 else b""
        data = self.h11.send(h11.Response(status_code=status, headers=[
            ("Content-Length", str(len(body)))]))
        data += self.h11.send(h11.Data(body)) if body else b""
        data += self.h11.send(h11.EndOfMessage())
        self.protocol.dataReceived(data)
        if self.h11.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            self.h11.start_next_cycle()
            self.head_seen = False

    def _close(self, reason: Exception) -> None:
        self.gone = True
        self.transport.disconnecting = True
        self.protocol.connectionLost(Failure(reason))


class Rig:
    """The server end, the dispatcher and the pool, with h11 endpoints."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.clock = MemoryReactorClock()
        listener = FakeListener(self.clock)
        config = ServiceConfig(
            "app", tuple(HostPort("127.0.0.1", 8000 + i) for i in range(case.endpoints)),
            protocol="http1", connect_timeout=CONNECT_TIMEOUT, retry_limit=case.retry_limit,
            retry_max_body=case.retry_max_body, response_timeout=case.response_timeout)
        self.backends = BackendSet(config, frozenset(), clock=self.clock, rng=random.Random(0))
        self.proxy = HttpProxy({"app": self.backends}, listener.metrics, self.clock)
        self.proxy.clients["http1"] = H1Client(self.clock, listener.metrics)
        self.metrics = listener.metrics
        self.transport = StringTransport(peerAddress=None)
        self.server = server_on(self.transport, listener, self.proxy)
        data = case.request_bytes()
        bounds = [0, *case.cuts, len(data)]
        self.pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
        self.cancelled = False
        self.client_gone = False
        self.endpoints: list[Endpoint] = []

    def send(self) -> None:
        if self.pieces and not self.client_gone:
            self.server.dataReceived(self.pieces.pop(0))

    def settle(self) -> None:
        """Let every endpoint react until nothing changes (bounded)."""
        for _ in range(200):
            changed = False
            while len(self.endpoints) < len(self.clock.tcpClients):
                index = len(self.endpoints)
                behaviours = self.case.behaviours
                self.endpoints.append(Endpoint(
                    self, index, behaviours[index] if index < len(behaviours) else "ok"))
                changed = True
            for endpoint in self.endpoints:
                changed = endpoint.turn() or changed
            if self.transport.disconnecting and not self.client_gone:
                self.client_gone = True
                self.server.connectionLost(Failure(ConnectionDone()))
                changed = True
            if not changed:
                return
        raise AssertionError("the exchange never settles")

    def run(self) -> None:
        for op in self.case.ops:
            if op[0] == "send":
                self.send()
            elif op[0] == "tick":
                self.clock.advance(op[1])
            elif not self.client_gone:
                self.cancelled = self.client_gone = True
                self.server.connectionLost(Failure(ConnectionLost("client went away")))
            self.settle()
        while self.pieces and not self.client_gone:   # the rest of the request
            self.send()
            self.settle()
        while self.clock.seconds() < HORIZON:
            self.clock.advance(0.5)
            self.settle()

    def client_ended(self) -> bool:
        """The client has its whole response, or its connection is closed."""
        if self.client_gone:
            return True
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method=self.case.method, target="/", headers=[
            ("Host", "app"), ("Content-Length", str(len(self.case.body)))]))
        conn.send(h11.Data(self.case.body))
        conn.send(h11.EndOfMessage())
        data = self.transport.value()
        if not data:   # (h11 reads b"" as the end of the stream)
            return False
        conn.receive_data(data)
        while True:
            event = conn.next_event()
            if isinstance(event, h11.EndOfMessage):
                return True
            if event is h11.NEED_DATA:
                return False


class EveryRequestEndsTests(SynchronousTestCase):

    def check(self, case: Case) -> None:
        rig = Rig(case)
        rig.run()
        where = f"\n{case}\nclient got {rig.transport.value()[:300]!r}"
        self.assertTrue(rig.client_ended(), "the request was left waiting" + where)
        attempts = 0
        for endpoint in rig.endpoints:
            self.assertIsNone(endpoint.error, where)
            if endpoint.protocol is not None and not endpoint.gone:
                self.assertIsNone(endpoint.partial,
                                  "an endpoint was left holding part of a request" + where)
            for method, target, body in endpoint.complete:
                self.assertEqual((method, target), (case.method, b"/r?x=1"), where)
                self.assertEqual(len(body), len(case.body), "a truncated attempt" + where)
                self.assertEqual(body, case.body, where)
            attempts += endpoint.head_seen or bool(endpoint.complete)
        if case.method == b"POST" or case.corrupt:
            self.assertLessEqual(attempts, 1, "a POST or a rejected request was retried" + where)
        errors = {sample.labels["reason"]: sample.value
                  for family in rig.metrics.registry.collect() if family.name == "http_errors"
                  for sample in family.samples if sample.name == "http_errors_total"}
        errors.pop("request header timeout", None)   # a head paused past its limit: 408
        if not case.corrupt:
            self.assertEqual(errors, {}, where)
        else:
            self.assertEqual(sum(len(e.complete) for e in rig.endpoints), 0, where)
            self.assertLessEqual(sum(errors.values()), 1, where)
            answer = rig.transport.value()
            if answer.startswith(b"HTTP/1.1 400 "):   # counted, under the reason it gave
                [reason] = errors
                self.assertIn(b"\r\nl5d-proxy-error: %s\r\n" % reason.encode(), answer, where)

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases())
    def test_every_request_ends(self, case: Case) -> None:
        self.check(case)

    def test_put_body_in_two_halves_to_an_endpoint_answering_503_at_once(self) -> None:
        """Issue 10 item 8: 1,000 of 2,000 bytes, a pause, the rest; the
        endpoint answers 503 before the body is in. No retry can carry the
        whole body: the client gets the 503, and no endpoint sees half a PUT."""
        for behaviour in ("early_503", "reset_before_head", "close_mid_body"):
            body = bytes(range(250)) * 8
            case = Case(b"PUT", body, False, [], [("send",), ("tick", 1.0), ("send",)],
                        [behaviour], 0.5, 2, 2, 65536, None)
            head = len(case.request_bytes()) - 2000
            case.cuts = [head + 1000]
            rig = Rig(case)
            rig.run()
            self.check(case)
            if behaviour == "early_503":
                self.assertTrue(rig.transport.value().startswith(b"HTTP/1.1 503 "))
            else:
                self.assertTrue(rig.transport.value().startswith(b"HTTP/1.1 502 "))
            self.assertEqual(len(rig.endpoints), 1, behaviour)   # not retried

    def test_put_whole_before_the_503_is_retried_with_the_whole_body(self) -> None:
        """The same PUT in one piece: the retry replays all 2,000 bytes."""
        body = bytes(range(250)) * 8
        case = Case(b"PUT", body, False, [], [("send",)], ["ok_503"], 0.5, 2, 2, 65536, None)
        rig = Rig(case)
        rig.run()
        self.check(case)
        self.assertEqual([len(e.complete) for e in rig.endpoints], [1, 1])
        self.assertTrue(rig.transport.value().startswith(b"HTTP/1.1 200 "))
