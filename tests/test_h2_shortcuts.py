"""``ProxyH2Connection``'s CPU shortcuts do what h2's own methods do.

``l5dproxy/http/h2/connection.py`` replaces a few of h2's private methods
with cheaper versions of the same work (``_receive_frame`` without the repr
of every frame, ``_open_streams`` without a property call per stream,
``_get_or_create_stream`` without a KeyError per new stream, no header
validation flags when no header check is on). Here a connection with the
shortcuts and one with h2's own methods in their place (everything else
the same: ``ProxyH2Connection``'s GOAWAY, content-length and closed-stream
bounds, the abuse budget) are fed the same bytes and told to do the same
things, frame sequences drawn by hypothesis, including what a misbehaving
peer sends: frames on streams closed by END_STREAM or RST_STREAM, on streams
old enough to be forgotten, on idle streams, more streams than allowed.
After every step both must have produced the same events, the same bytes
to send, the same exception, the same streams and closed-stream record and
the same abuse points.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.stream import StreamClosedBy
from hpack import Encoder, NeverIndexedHeaderTuple
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.http.h2.abuse import AbuseBudget
from l5dproxy.http.h2.connection import (
    _H2_CONFIG,
    ProxyH2Connection,
    _frame_cost,
    _LengthBlindStream,
    _UncheckedStream,
)

REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"),
           (b":authority", b"a.test")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


class _Stock(ProxyH2Connection):
    """``ProxyH2Connection`` with h2's own methods where it has shortcuts."""

    def __init__(self, config: H2Configuration, closed_kept: int) -> None:
        super().__init__(config, closed_kept)
        self.stream_class = _LengthBlindStream

    _open_streams = H2Connection._open_streams
    _get_or_create_stream = H2Connection._get_or_create_stream

    def _receive_frame(self, frame):
        events = H2Connection._receive_frame(self, frame)
        budget = self.budget
        if budget is not None:
            kind = _frame_cost(frame, events)
            if kind is not None:
                budget.spend(kind)
        return events


def _block(headers) -> bytes:
    """A header block that leaves both decoders' tables alone (never indexed)."""
    return Encoder().encode([NeverIndexedHeaderTuple(n, v) for n, v in headers])


def _frame(op, sid: int) -> bytes:
    kind = op[0]
    if kind == "data":
        f = DataFrame(sid, data=b"x" * op[1])
        if op[2]:
            f.flags.add("END_STREAM")
    elif kind == "headers":   # a request (or trailers) on any stream id
        f = HeadersFrame(sid, data=_block(REQUEST if not op[1] else [(b"x-t", b"1")]))
        f.flags.add("END_HEADERS")
        if op[2]:
            f.flags.add("END_STREAM")
    elif kind == "window":
        f = WindowUpdateFrame(sid, window_increment=op[1])
    elif kind == "rst":
        f = RstStreamFrame(sid, error_code=op[1])
    elif kind == "priority":
        f = PriorityFrame(sid, depends_on=0, stream_weight=op[1])
    elif kind == "ping":
        f = PingFrame(0, opaque_data=b"12345678")
    elif kind == "settings":
        f = SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: op[1]})
    else:   # "continuation": a CONTINUATION nobody asked for
        f = ContinuationFrame(sid, data=b"")
    return f.serialize()


#: Steps: the peer's frames (on a new stream, an existing one, or any id),
#: and what the proxy's side does (respond, reset, acknowledge).
_peer_frames = st.one_of(
    st.tuples(st.just("data"), st.integers(0, 20), st.booleans()),
    st.tuples(st.just("headers"), st.booleans(), st.booleans()),
    st.tuples(st.just("window"), st.integers(1, 1000)),
    st.tuples(st.just("rst"), st.sampled_from([0, 1, 8, 99])),
    st.tuples(st.just("priority"), st.integers(1, 256)),
    st.tuples(st.just("ping")),
    st.tuples(st.just("settings"), st.integers(0, 70000)),
    st.tuples(st.just("continuation")),
)
_targets = st.one_of(st.just("new"), st.integers(0, 12).map(lambda i: ("seen", i)),
                     st.integers(1, 40).map(lambda i: ("id", 2 * i - 1)))
_steps = st.lists(st.one_of(
    st.tuples(st.just("peer"), _peer_frames, _targets),
    st.tuples(st.just("respond"), st.integers(0, 12), st.booleans()),
    st.tuples(st.just("reset"), st.integers(0, 12)),
    st.tuples(st.just("ack"), st.integers(0, 12), st.integers(1, 20)),
), min_size=1, max_size=40)


def _state(conn: ProxyH2Connection, outcome) -> tuple:
    return (outcome, conn.data_to_send(), sorted(conn.streams),
            sorted(conn._closed_streams.items()),
            dict(conn.budget.spent) if conn.budget is not None else None)


class ShortcutsAreH2Tests(SynchronousTestCase):
    """The same bytes in, the same everything out, with and without shortcuts."""

    def _pair(self, max_streams: int):
        conns = []
        clock = Clock()
        for cls in (ProxyH2Connection, _Stock):
            conn = cls(H2Configuration(client_side=False, header_encoding=None, **_H2_CONFIG),
                       4)
            conn.local_settings.max_concurrent_streams = max_streams
            conn.local_settings.acknowledge()
            conn.initiate_connection()
            conn.data_to_send()
            conn.budget = AbuseBudget(10_000, 0, clock)
            conns.append(conn)
        self.assertIs(conns[0].stream_class, _UncheckedStream)
        peer = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        peer.initiate_connection()
        return conns, peer

    def _compare(self, steps, max_streams: int) -> None:
        conns, peer = self._pair(max_streams)
        preface = peer.data_to_send()
        for conn in conns:
            conn.receive_data(preface)
        seen: list[int] = []   # stream ids the peer opened, in order
        next_sid = 1
        for step in steps:
            kind = step[0]
            if kind == "peer":
                op, target = step[1], step[2]
                if target == "new":
                    sid = next_sid
                    next_sid += 2
                    seen.append(sid)
                elif target[0] == "seen":
                    if not seen:
                        continue
                    sid = seen[target[1] % len(seen)]
                else:
                    sid = target[1]
                    if sid >= next_sid:
                        next_sid = sid + 2
                        seen.append(sid)
                if op[0] in ("ping", "settings"):
                    sid = 0
                data = _frame(op, sid)

                def act(conn, data=data):
                    return [repr(e) for e in conn.receive_data(data)]
            else:
                if not seen:
                    continue
                sid = seen[step[1] % len(seen)]
                if kind == "respond":
                    def act(conn, sid=sid, end=step[2]):
                        conn.send_headers(sid, RESPONSE, end_stream=end)
                elif kind == "reset":
                    def act(conn, sid=sid):
                        conn.reset_stream(sid, ErrorCodes.CANCEL)
                else:
                    def act(conn, sid=sid, n=step[2]):
                        conn.acknowledge_received_data(n, sid)
            states = []
            for conn in conns:
                try:
                    outcome = act(conn)
                except ProtocolError as e:
                    outcome = (type(e).__name__, str(e))
                states.append(_state(conn, outcome))
            self.assertEqual(states[0], states[1], f"after {step!r}")
            self.outcomes.append(states[0])
            if kind == "peer" and isinstance(states[0][0], tuple):
                return   # a connection error: nothing more is read

    def setUp(self) -> None:
        self.outcomes: list[tuple] = []

    @settings(max_examples=300, derandomize=True, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(_steps, st.sampled_from([1, 3, 100]))
    def test_same_frames_same_outcome(self, steps, max_streams) -> None:
        self._compare(steps, max_streams)

    def test_many_streams_opened_and_closed(self) -> None:
        """The count and the pruning over many streams, some closed by
        END_STREAM, some by RST_STREAM, some still open, one refused."""
        steps = []
        for i in range(30):
            steps.append(("peer", ("headers", False, i % 3 == 0), "new"))
            if i % 4 == 1:
                steps.append(("reset", i))
            if i % 5 == 2:
                steps.append(("respond", i, True))
        steps.append(("peer", ("data", 3, False), ("seen", 0)))
        steps.append(("peer", ("headers", False, True), ("seen", 1)))
        self._compare(steps, 20)

    def test_frames_on_reset_streams(self) -> None:
        """h2's two ways of answering a frame on a stream the proxy reset:
        still in ``streams`` (StreamClosedError) and already dropped from it
        into the closed-stream record (StreamIDTooLowError): RST_STREAM,
        the connection lives on."""
        new, first, second = "new", ("seen", 0), ("seen", 1)
        steps = [("peer", ("headers", False, False), new), ("reset", 0),
                 # stream 1 is dropped into the record as stream 3 opens
                 ("peer", ("headers", False, False), new), ("reset", 1),
                 ("peer", ("headers", True, True), second),   # trailers on reset 3
                 ("peer", ("window", 5), second),
                 ("peer", ("data", 4, True), second),
                 ("peer", ("headers", False, True), first)]   # a new request on old 1
        self._compare(steps, 100)
        self.assertEqual(self.outcomes[-5][2:4], ([3], [(1, StreamClosedBy.SEND_RST_STREAM)]))
        for outcome in self.outcomes[-4:]:
            self.assertIsInstance(outcome[0], list)   # not a connection error
        self.assertEqual(self.outcomes[-4][1], RstStreamFrame(
            3, error_code=ErrorCodes.STREAM_CLOSED).serialize())
        self.assertEqual(self.outcomes[-1][1], RstStreamFrame(
            1, error_code=ErrorCodes.STREAM_CLOSED).serialize())

    def test_headers_after_the_peers_end_stream(self) -> None:
        """A HEADERS frame on a stream the peer already ended: h2 resets it
        (STREAM_CLOSED) and reports the reset as an event."""
        self._compare([("peer", ("headers", False, True), "new"),
                       ("peer", ("headers", True, False), ("seen", 0))], 100)
        events, sent = self.outcomes[-1][:2]
        self.assertEqual(len(events), 1)
        self.assertTrue(events[0].startswith("<StreamReset stream_id:1, error_code:"), events)
        self.assertEqual(sent, RstStreamFrame(1, error_code=ErrorCodes.STREAM_CLOSED).serialize())

    def test_unchecked_streams_only_without_checks(self) -> None:
        """A connection with any header check on keeps h2's validation flags."""
        for option in _H2_CONFIG:
            config = H2Configuration(client_side=False, header_encoding=None,
                                     **{**_H2_CONFIG, option: True})
            self.assertIs(ProxyH2Connection(config).stream_class, _LengthBlindStream, option)


def _check_field_before(name: bytes, value: bytes) -> None:
    """``translate._check_field`` as it was before its shortcuts (one
    regular expression per value, no remembered names): the reference."""
    import re

    from h2.utilities import CONNECTION_HEADERS

    from l5dproxy.http.h2.translate import MalformedError

    if re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9a-z]+", name) is None:
        raise MalformedError("invalid field name")
    if value and re.search(rb"[\x00-\x08\x0a-\x1f\x7f]|\A[ \t]|[ \t]\Z", value) is not None:
        raise MalformedError("invalid field value")
    if name in CONNECTION_HEADERS:
        raise MalformedError("connection-specific field")
    if name == b"te" and value.lower() != b"trailers":
        raise MalformedError("te other than trailers")


def _verdict(check, name: bytes, value: bytes) -> str:
    from l5dproxy.http.h2.translate import MalformedError

    try:
        check(name, value)
    except MalformedError as e:
        return e.reason
    return "ok"


#: Bytes that matter to the rules: token characters, uppercase, SP, HTAB,
#: the CTLs, DEL, 8-bit.
_field_bytes = st.binary(max_size=12) | st.lists(
    st.sampled_from(b"aZ-_: \t\x00\x01\x08\x09\x0a\x0d\x1f\x7f\x80\xff"), max_size=8).map(bytes)
_ends = st.sampled_from([b"", b"", b" ", b"\t", b"\r", b"\x00"])
#: Values: bytes as above, and visible text with something (or nothing) at its ends.
_values = _field_bytes | st.builds(
    lambda a, text, b: a + text.encode() + b, _ends,
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=8), _ends)
_names = _field_bytes | st.sampled_from(
    [b"te", b"connection", b"keep-alive", b"transfer-encoding", b"upgrade", b"x-a",
     b"proxy-connection", b"host", b"content-length", b"TE"])


class CheckFieldTests(SynchronousTestCase):
    """``translate._check_field`` with remembered names and the value check
    split in three gives every field the verdict, and the reason, that the
    rules gave before, the first time a name is seen and every time after."""

    def setUp(self) -> None:
        from l5dproxy.http.h2 import translate

        self.translate = translate
        saved = set(translate._known_names)
        translate._known_names.clear()

        def restore() -> None:
            translate._known_names.clear()
            translate._known_names.update(saved)

        self.addCleanup(restore)

    @settings(max_examples=500, derandomize=True, database=None, deadline=None)
    @given(st.lists(st.tuples(_names, _values), min_size=1, max_size=6))
    def test_same_verdicts_as_before(self, fields) -> None:
        check = self.translate._check_field
        for name, value in fields:
            self.assertEqual(_verdict(check, name, value),
                             _verdict(_check_field_before, name, value), (name, value))
        for name, _ in fields:
            _verdict(check, name, b"v")   # a well-formed field: its name is remembered
        for name, value in fields:
            self.assertEqual(_verdict(check, name, value),
                             _verdict(_check_field_before, name, value), (name, value))

    def test_remembered_names_are_bounded(self) -> None:
        translate = self.translate
        for i in range(translate._KNOWN_NAMES_MAX + 100):
            translate._check_field(b"x-%d" % i, b"v")
        translate._check_field(b"y" * (translate._KNOWN_NAME_LENGTH + 1), b"v")
        translate._check_field(b"te", b"trailers")
        self.assertEqual(len(translate._known_names), translate._KNOWN_NAMES_MAX)
        self.assertNotIn(b"te", translate._known_names)
        # a remembered name still has its values checked
        self.assertEqual(_verdict(translate._check_field, b"x-1", b"a\r\nb"),
                         "invalid field value")
        self.assertEqual(_verdict(translate._check_field, b"x-1", b" a"), "invalid field value")


class CompletedStreamsTests(SynchronousTestCase):
    """A request carried h2 to h2 through the real ends and dispatcher leaves
    nothing of its own for the cyclic garbage collector: its streams let go
    of their bodies and attempt when they end, so everything it made goes by
    reference counting (not at the collector's next pass, in CPU time paid
    by whichever request triggers it)."""

    def test_no_stream_body_or_attempt_in_cycles(self) -> None:
        import gc

        from h2.events import DataReceived, RequestReceived, StreamEnded
        from twisted.internet.testing import MemoryReactorClock

        from l5dproxy.app.listeners import build_listener
        from l5dproxy.app.sites import http_site
        from l5dproxy.balance.backends import BackendSet
        from l5dproxy.config.model import (
            DetectConfig,
            H2Config,
            HostPort,
            ListenerConfig,
            ServiceConfig,
        )
        from l5dproxy.detect.sniff import Verdict
        from l5dproxy.exchange.message import Body, Request
        from l5dproxy.http.h2.pool import H2Attempt, H2Client
        from l5dproxy.http.h2.server import H2ServerProtocol
        from l5dproxy.http.h2.stream import Stream
        from l5dproxy.net.connection import InboundConnection
        from l5dproxy.route.dispatcher import HttpProxy
        from l5dproxy.telemetry import Metrics
        from tests.fakes import Transport

        clock = MemoryReactorClock()
        metrics = Metrics()
        service = ServiceConfig("app", (HostPort("127.0.0.1", 8080),), protocol="h2")
        backends = {"app": BackendSet(service, frozenset(), clock=clock)}
        listener = build_listener(ListenerConfig("inbound", "tcp:0", "app"), DetectConfig(),
                                  backends, metrics, clock, log_connections=False)
        proxy = HttpProxy(backends, metrics, clock)
        proxy.clients["h2"] = H2Client(clock, settings=H2Config(), metrics=metrics)
        down = Transport()
        conn = InboundConnection(listener.site, down, 0.0, listener)
        conn.detected(Verdict("h2", "preface"))
        server = H2ServerProtocol(conn, proxy, H2Config(), http_site(listener))
        server.makeConnection(down)
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        endpoint = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        endpoint.initiate_connection()
        upstream: list = []
        ended = []

        def pump() -> None:
            for _ in range(20):
                moved = False
                out = client.data_to_send()
                if out:
                    moved = True
                    server.dataReceived(out)
                back = down.value()
                if back:
                    down.clear()
                    moved = True
                    for e in client.receive_data(back):
                        if isinstance(e, StreamEnded):
                            ended.append(e.stream_id)
                        elif isinstance(e, DataReceived):
                            client.acknowledge_received_data(e.flow_controlled_length,
                                                             e.stream_id)
                if not upstream and clock.tcpClients:
                    protocol = clock.tcpClients[0][2].buildProtocol(None)
                    upstream.extend([protocol, Transport()])
                    protocol.makeConnection(upstream[1])
                    moved = True
                if upstream:
                    up = upstream[1].value()
                    if up:
                        upstream[1].clear()
                        moved = True
                        for e in endpoint.receive_data(up):
                            if isinstance(e, RequestReceived):
                                endpoint.send_headers(e.stream_id, RESPONSE)
                                endpoint.send_data(e.stream_id, b"hello\n", end_stream=True)
                    answer = endpoint.data_to_send()
                    if answer:
                        moved = True
                        upstream[0].dataReceived(answer)
                if not moved:
                    return

        get = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
               (b":authority", b"a.test")]
        client.send_headers(1, get, end_stream=True)   # connections and pools made
        pump()
        gc.collect()
        self.addCleanup(gc.enable)
        self.addCleanup(gc.set_debug, 0)
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        for _ in range(5):
            for _ in range(4):
                client.send_headers(client.get_next_available_stream_id(), get,
                                    end_stream=True)
            pump()
        gc.collect()
        kinds = {type(o) for o in gc.garbage}
        del gc.garbage[:]
        self.assertEqual(len(ended), 21)
        self.assertEqual(kinds & {Stream, Body, Request, H2Attempt}, set())
