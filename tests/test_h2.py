"""The HTTP/2 codec ends, frame by frame.

In the style of Twisted's test_http2: a real h2 ``H2Connection`` plays the
peer (it builds the frames and parses what comes out), the end under test
sits on a ``StringTransport``, and a fake dispatcher or a fake upstream
stands in for the rest of the proxy. Raw hyperframe frames cover what a
well-behaved peer would never send.
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    WindowUpdateFrame,
)
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.app.listeners import build_listener
from l5dproxy.app.sites import http_site
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import DetectConfig, H2Config, HostPort, ListenerConfig, ServiceConfig
from l5dproxy.detect.sniff import Verdict
from l5dproxy.exchange.contracts import RequestContext
from l5dproxy.exchange.message import (
    Body,
    ProxyError,
    Request,
    RequestHead,
    Response,
    ResponseHead,
)
from l5dproxy.http.h2.connection import (
    ENCODER_TABLE_SIZE,
    StreamResetError,
    closed_streams_kept,
)
from l5dproxy.http.h2.pool import H2Client
from l5dproxy.http.h2.server import LINGER_SECONDS, H2ServerProtocol
from l5dproxy.http.h2.translate import (
    h2_request_headers,
    h2_response_headers,
    request_head_from_h2,
    response_head_from_h2,
)
from l5dproxy.net.connection import InboundConnection
from l5dproxy.route import classify as grpc
from l5dproxy.telemetry import Metrics
from tests.fakes import (
    DEFAULT_TARGET,
    LOOSE,
    Endpoint,
    FakeClient,
    FakeConnection,
    FakeDispatcher,
    FakeListener,
    H2ClientRig,
    Sink,
    Source,
    Transport,
    dispatch,
    make_listener,
    send,
    site,
)

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a?b=1"),
       (b":authority", b"svc.test")]
POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/upload"),
        (b":authority", b"svc.test")]
GRPC = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/pkg.Svc/Call"),
        (b":authority", b"svc.test"), (b"content-type", b"application/grpc"),
        (b"te", b"trailers")]


# -- doubles ------------------------------------------------------------------

class ClosedCodec:
    """A codec end as it is once closed on this side (its GOAWAY sent, the
    transport not gone yet): whatever would send a frame refuses with
    ``ProtocolError`` (``codec.H2Codec``); the rest is the wrapped codec's."""

    closed = True

    def __init__(self, codec) -> None:
        self._codec = codec

    def _refuse(self, *args, **kwargs) -> None:
        raise ProtocolError("connection closed")

    send_headers = send_data = end_stream = reset_stream = close_connection = _refuse

    def __getattr__(self, name: str):
        return getattr(self._codec, name)


def send_chunks(conn: H2Connection, sid: int, data: bytes, end: bool = False) -> None:
    """Send ``data`` in frames of the largest allowed size."""
    size = conn.max_outbound_frame_size
    for i in range(0, len(data), size):
        conn.send_data(sid, data[i:i + size], end_stream=end and i + size >= len(data))


def raw_frames(data: bytes) -> list[Frame]:
    """Parse frames with hyperframe (no h2 state), for exact assertions."""
    frames = []
    view = memoryview(data)
    while view:
        frame, length = Frame.parse_frame_header(view[:9])
        frame.parse_body(view[9:9 + length])
        frames.append(frame)
        view = view[9 + length:]
    return frames


# -- the server end -----------------------------------------------------------

class ServerHarness(SynchronousTestCase):
    """A server end on a StringTransport, a real h2 client as its peer."""

    client_options: dict = {}

    settings = H2Config(max_concurrent_streams=4, max_header_list_size=4096,
                          initial_window_size=65535, connection_window_size=65535)

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = make_listener(self.clock)
        self.dispatcher = FakeDispatcher()
        self.transport = Transport()
        conn = InboundConnection(self.listener.site, self.transport, 0.0, self.listener)
        conn.detected(Verdict("h2", "preface"))
        self.conn = conn
        self.server = H2ServerProtocol(conn, self.dispatcher, self.settings, site(conn.listener))
        self.server.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None,
                                                   **self.client_options))
        self.client.initiate_connection()
        self.events = []
        self.flush()

    def flush(self):
        """Exchange bytes both ways until both sides are quiet; the client's events."""
        events = []
        for _ in range(20):
            out = self.client.data_to_send()
            if out:
                self.server.dataReceived(out)
            back = self.transport.take()
            if back:
                events.extend(self.client.receive_data(back))
            if not out and not back:
                break
        self.events.extend(events)
        return events

    def send_raw(self, data: bytes) -> list[Frame]:
        """Feed raw bytes to the server; the frames it writes back."""
        self.flush()
        self.server.dataReceived(data)
        return raw_frames(self.transport.take())

    def request(self, headers=GET, end=True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end)
        self.flush()
        return sid

    def respond(self, index: int, status: int = 200, headers=(), body: Body | None = None):
        body = body if body is not None else Body.empty()
        self.dispatcher.calls[index][2].callback(
            Response(ResponseHead(status, list(headers)), body))
        return body

    def of(self, kind, events=None):
        return [e for e in (self.events if events is None else events) if isinstance(e, kind)]



class ServerTests(ServerHarness):
    def test_settings_advertised(self) -> None:
        """The server's SETTINGS carry the configured limits."""
        changed = self.of(RemoteSettingsChanged)[0].changed_settings
        self.assertEqual(changed[SettingCodes.MAX_CONCURRENT_STREAMS].new_value, 4)
        self.assertEqual(changed[SettingCodes.MAX_HEADER_LIST_SIZE].new_value, 4096)

    def test_request_and_response_with_trailers(self) -> None:
        sid = self.request([*GET, (b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"x-thing", b"1")])
        [(request, context, _)] = self.dispatcher.calls
        head = request.head
        self.assertEqual((head.method, head.target, head.authority, head.scheme, head.version),
                         (b"GET", b"/a?b=1", b"svc.test", b"http", "2"))
        self.assertEqual(head.headers, [(b"x-thing", b"1"), (b"cookie", b"a=1; b=2")])
        self.assertTrue(request.body.is_empty)
        self.assertEqual(context.protocol, "h2")
        body = Body()
        self.respond(0, 200, [(b"Content-Type", b"text/plain"), (b"Connection", b"close")],
                     body)
        body.write(b"hello ")
        body.write(b"world")
        body.finish([(b"x-checksum", b"42")])
        events = self.flush()
        [response] = self.of(ResponseReceived, events)
        self.assertEqual(response.headers, [(b":status", b"200"),
                                            (b"content-type", b"text/plain")])
        self.assertEqual(b"".join(e.data for e in self.of(DataReceived, events)),
                         b"hello world")
        [trailers] = self.of(TrailersReceived, events)
        self.assertEqual(trailers.headers, [(b"x-checksum", b"42")])
        self.assertEqual([e.stream_id for e in self.of(StreamEnded, events)], [sid])
        self.assertEqual(self.server.streams, {})

    def test_empty_response_ends_on_headers(self) -> None:
        self.request()
        self.respond(0, 204)
        frames = raw_frames(self.transport.value())
        self.flush()
        [headers] = [f for f in frames if f.type == 0x1]
        self.assertIn("END_STREAM", headers.flags)
        self.assertFalse([f for f in frames if isinstance(f, DataFrame)])

    def test_concurrent_streams_answered_out_of_order(self) -> None:
        sids = [self.request() for _ in range(3)]
        self.assertEqual(len(self.dispatcher.calls), 3)
        for index in (2, 0, 1):
            body = Body()
            self.respond(index, 200, [], body)
            body.write(f"stream {sids[index]}".encode())
            body.finish()
        events = self.flush()
        by_stream: dict[int, bytes] = {}
        for e in self.of(DataReceived, events):
            by_stream[e.stream_id] = by_stream.get(e.stream_id, b"") + e.data
        self.assertEqual(by_stream, {sid: f"stream {sid}".encode() for sid in sids})

    def test_request_body_acked_only_when_consumed(self) -> None:
        """A paused consumer holds its stream's window until it resumes; the
        connection's comes back at once (issue 11 kind 4: a stalled stream
        must not stall the others on its connection)."""
        sid = self.request(POST, end=False)
        [(request, _, _)] = self.dispatcher.calls
        sink = Sink(request.body, paused=True)
        send_chunks(self.client, sid, b"x" * 40000)
        events = self.flush()
        self.assertEqual(len(sink.bytes), 40000)
        updated = {e.stream_id: e.delta for e in self.of(WindowUpdated, events)}
        self.assertEqual(updated, {0: 40000})
        self.assertEqual(self.client.local_flow_control_window(sid), 65535 - 40000)
        request.body.resume()
        events = self.flush()
        updated = {e.stream_id: e.delta for e in self.of(WindowUpdated, events)}
        self.assertEqual(updated, {sid: 40000})
        self.client.end_stream(sid)
        self.flush()
        self.assertTrue(sink.ended)

    def test_request_body_acked_once_per_read(self) -> None:
        """DATA frames of one read are acknowledged together: one
        WINDOW_UPDATE per stream and one for the connection."""
        sid = self.request(POST, end=False)
        [(request, _, _)] = self.dispatcher.calls
        sink = Sink(request.body)
        for _ in range(4):
            self.client.send_data(sid, b"z" * 9000)
        events = self.flush()
        self.assertEqual(len(sink.bytes), 36000)
        updated = [(e.stream_id, e.delta) for e in self.of(WindowUpdated, events)]
        self.assertEqual(sorted(updated), [(0, 36000), (sid, 36000)])

    def test_small_complete_response_in_one_data_frame(self) -> None:
        """A response whose body is complete when it is handed over goes out
        as HEADERS and one DATA carrying END_STREAM."""
        self.request()
        body = Body()
        body.write(b"hello\n")
        body.finish()
        self.respond(0, 200, [], body)
        events = self.flush()
        [data] = self.of(DataReceived, events)
        self.assertEqual(data.data, b"hello\n")
        self.assertIsNotNone(data.stream_ended)

    def test_padding_counts_in_flow_control(self) -> None:
        sid = self.request(POST, end=False)
        [(request, _, _)] = self.dispatcher.calls
        sink = Sink(request.body)
        for _ in range(3):
            self.client.send_data(sid, b"y" * 12000, pad_length=255)
        events = self.flush()
        self.assertEqual(len(sink.bytes), 36000)
        updated = {e.stream_id: e.delta for e in self.of(WindowUpdated, events)}
        self.assertEqual(updated[sid], 36000 + 3 * 256)

    def test_send_respects_window_and_frame_size(self) -> None:
        self.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 1000})
        self.flush()
        sid = self.request()
        body = Body()
        source = Source(body)
        self.respond(0, 200, [], body)
        body.write(b"a" * 5000)
        frames = raw_frames(self.transport.value())
        events = self.flush()
        self.assertEqual(sum(len(f.data) for f in frames if isinstance(f, DataFrame)), 1000)
        self.assertEqual(sum(len(e.data) for e in self.of(DataReceived, events)), 1000)
        # The peer opens the window: the rest goes, in frames no larger than allowed.
        self.client.increment_flow_control_window(100000, stream_id=sid)
        self.client.acknowledge_received_data(1000, sid)
        out = self.client.data_to_send()
        self.server.dataReceived(out)
        frames = raw_frames(self.transport.value())
        self.flush()
        data_frames = [f for f in frames if isinstance(f, DataFrame)]
        self.assertEqual(sum(len(f.data) for f in data_frames), 4000)
        body.write(b"b" * 40000)
        frames = raw_frames(self.transport.value())
        self.flush()
        sizes = [len(f.data) for f in frames if isinstance(f, DataFrame)]
        self.assertEqual(sum(sizes), 40000)
        self.assertLessEqual(max(sizes), 16384)
        self.assertEqual(source.paused, 0)

    def test_closed_window_pauses_the_response_body(self) -> None:
        self.client.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        self.flush()
        sid = self.request()
        body = Body()
        source = Source(body)
        self.respond(0, 200, [], body)
        for _ in range(5):
            body.write(b"z" * 16384)
        self.assertEqual(source.paused, 1)
        self.client.increment_flow_control_window(200000, stream_id=sid)
        self.client.increment_flow_control_window(200000)
        self.flush()
        self.assertEqual(source.resumed, 1)

    def test_transport_backpressure_stops_sending(self) -> None:
        self.request()
        body = Body()
        self.respond(0, 200, [], body)
        self.flush()
        self.server.pauseProducing()
        body.write(b"q" * 1000)
        self.assertEqual(raw_frames(self.transport.value()), [])
        self.server.resumeProducing()
        frames = raw_frames(self.transport.value())
        self.assertEqual([len(f.data) for f in frames if isinstance(f, DataFrame)], [1000])

    def test_client_reset_cancels_dispatch(self) -> None:
        sid = self.request()
        self.client.reset_stream(sid, ErrorCodes.CANCEL)
        self.flush()
        self.assertEqual(len(self.dispatcher.cancelled), 1)
        self.assertEqual(self.server.streams, {})

    def test_client_reset_cancels_response_and_request_bodies(self) -> None:
        sid = self.request(POST, end=False)
        [(request, _, _)] = self.dispatcher.calls
        sink = Sink(request.body)
        body = Body()
        source = Source(body)
        self.respond(0, 200, [], body)
        body.write(b"partial")
        self.flush()
        self.client.reset_stream(sid, ErrorCodes.CANCEL)
        self.flush()
        self.assertEqual(source.stopped, 1)
        self.assertIsInstance(sink.error, StreamResetError)
        self.assertEqual(sink.error.code, ErrorCodes.CANCEL)

    def test_upstream_reset_resets_client_stream(self) -> None:
        sid = self.request()
        body = Body()
        self.respond(0, 200, [], body)
        body.write(b"partial")
        body.fail(StreamResetError(ErrorCodes.INTERNAL_ERROR))
        events = self.flush()
        [reset] = self.of(StreamReset, events)
        self.assertEqual((reset.stream_id, reset.error_code), (sid, ErrorCodes.INTERNAL_ERROR))

    def test_streams_over_the_limit_are_refused(self) -> None:
        for _ in range(4):
            self.request()
        # A client that has not seen (or ignores) the limit opens a fifth.
        self.client.remote_settings = Settings(client=False)
        sid = self.request()
        [reset] = self.of(StreamReset)
        self.assertEqual((reset.stream_id, reset.error_code), (sid, ErrorCodes.REFUSED_STREAM))
        self.assertEqual(len(self.dispatcher.calls), 4)
        # The connection lives on: a slot frees, a new stream is served.
        self.respond(0)
        self.flush()
        self.request()
        self.assertEqual(len(self.dispatcher.calls), 5)
        self.assertFalse(self.transport.disconnecting)

    def test_oversized_header_list_gets_431(self) -> None:
        self.request([*GET, (b"x-big", b"v" * 5000)])
        self.assertEqual(self.dispatcher.calls, [])
        [response] = self.of(ResponseReceived)
        headers = dict(response.headers)
        self.assertEqual(headers[b":status"], b"431")
        self.assertIn(b"l5d-proxy-error", headers)

    def test_grpc_proxy_error_is_trailers_only(self) -> None:
        sid = self.request(GRPC, end=False)
        self.dispatcher.calls[0][2].errback(ProxyError.unavailable("no endpoints"))
        events = self.flush()
        [response] = self.of(ResponseReceived, events)
        headers = dict(response.headers)
        self.assertEqual(headers[b":status"], b"200")
        self.assertEqual(headers[b"grpc-status"], b"14")
        self.assertEqual(headers[b"l5d-proxy-error"], b"no endpoints")
        self.assertEqual(response.stream_ended.stream_id, sid)
        self.assertEqual(self.of(DataReceived, events), [])

    def test_unexpected_dispatch_error_is_502(self) -> None:
        self.request()
        self.dispatcher.calls[0][2].errback(RuntimeError("bug"))
        [response] = self.of(ResponseReceived, self.flush())
        self.assertEqual(dict(response.headers)[b":status"], b"502")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_protocol_error_goaway(self) -> None:
        """DATA on stream 0 is a connection error: GOAWAY PROTOCOL_ERROR, then close."""
        frame = DataFrame(1, data=b"x")
        frame.stream_id = 0
        # hyperframe refuses to serialize stream 0 DATA; build the bytes by hand.
        body = b"x"
        raw = len(body).to_bytes(3, "big") + b"\x00\x00" + (0).to_bytes(4, "big") + body
        frames = self.send_raw(raw)
        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual([g.error_code for g in goaways], [ErrorCodes.PROTOCOL_ERROR])
        self.assertTrue(self.transport.disconnecting)

    def test_oversized_frame_goaway(self) -> None:
        self.request(POST, end=False)
        header = (20000).to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big")
        frames = self.send_raw(header + b"\x00" * 20000)
        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual([g.error_code for g in goaways], [ErrorCodes.FRAME_SIZE_ERROR])
        self.assertEqual(len(self.dispatcher.cancelled), 1)

    def test_window_update_overflow_goaway(self) -> None:
        frame = WindowUpdateFrame(0, window_increment=2**31 - 1)
        frames = self.send_raw(frame.serialize())
        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual([g.error_code for g in goaways], [ErrorCodes.FLOW_CONTROL_ERROR])

    def test_drain_sends_goaway_and_finishes_in_flight(self) -> None:
        sid = self.request()
        self.conn.drain()
        frames = raw_frames(self.transport.value())
        events = self.flush()
        [goaway] = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual((goaway.error_code, goaway.last_stream_id), (0, sid))
        self.assertEqual(len(self.of(ConnectionTerminated, events)), 1)
        self.assertFalse(self.transport.disconnecting)
        # The in-flight stream still gets its answer, then the connection closes.
        body = Body()
        self.respond(0, 200, [], body)
        body.write(b"done")
        body.finish()
        out = self.transport.take()
        self.clock.advance(0)
        self.assertIn(b"done", out)
        self.assertTrue(self.transport.disconnecting)

    def test_drain_idle_closes_at_once(self) -> None:
        self.conn.drain()
        frames = raw_frames(self.transport.value())
        self.assertEqual([f.error_code for f in frames if isinstance(f, GoAwayFrame)], [0])
        self.assertTrue(self.transport.disconnecting)

    def test_drain_lingers_after_its_fin(self) -> None:
        """A half-closeable transport gets a FIN, not a close: what the client
        still sends is dropped unparsed, and the connection is aborted only if
        the client has not closed after the linger period."""
        half_closed = []
        self.transport.loseWriteConnection = lambda: half_closed.append(True)
        self.conn.drain()
        self.assertEqual(half_closed, [True])
        self.assertFalse(self.transport.disconnecting)
        self.client.increment_flow_control_window(1000)
        self.server.dataReceived(self.client.data_to_send() + b"not even a frame")
        goaways = [f for f in raw_frames(self.transport.value()) if isinstance(f, GoAwayFrame)]
        self.assertEqual(len(goaways), 1)
        self.clock.advance(LINGER_SECONDS)
        self.assertTrue(self.transport.disconnecting)

    def test_connection_lost_cancels_everything(self) -> None:
        self.request()
        self.request(POST, end=False)
        sink = Sink(self.dispatcher.calls[1][0].body)
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.dispatcher.cancelled), 2)
        self.assertIsNotNone(sink.error)
        self.assertNotIn(self.conn, self.listener.connections)

    def test_bytes_counted(self) -> None:
        self.request()
        self.respond(0)
        self.flush()
        self.assertGreater(self.conn.bytes_read, 24)
        self.assertGreater(self.conn.bytes_written, 0)

    def test_error_before_request_body_ends_resets_no_error(self) -> None:
        sid = self.request(POST, end=False)
        send_chunks(self.client, sid, b"x" * 20000)
        self.flush()
        self.dispatcher.calls[0][2].errback(ProxyError.unavailable("no endpoints"))
        events = self.flush()
        [response] = self.of(ResponseReceived, events)
        self.assertEqual(dict(response.headers)[b":status"], b"503")
        [reset] = self.of(StreamReset, events)
        self.assertEqual((reset.stream_id, reset.error_code), (sid, ErrorCodes.NO_ERROR))
        self.assertEqual(self.server.streams, {})

    # -- a failure on one stream stays on that stream --

    def streaming_responses(self, n: int = 2, size: int = 70000):
        """``n`` GETs answered with ``size`` bytes each, more than the
        connection window: every stream ends up waiting for a window."""
        sids = [self.request() for _ in range(n)]
        bodies = []
        for index in range(n):
            body = Body()
            bodies.append((body, Source(body)))
            self.respond(index, 200, [], body)
            body.write(b"r" * size)
        self.flush()
        self.assertEqual(set(self.server._blocked), set(sids))
        return sids, bodies

    def received(self, events) -> dict[int, int]:
        got: dict[int, int] = {}
        for e in self.of(DataReceived, events):
            got[e.stream_id] = got.get(e.stream_id, 0) + len(e.data)
            self.client.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        return got

    def test_client_reset_while_response_streams_in_one_read_with_window_update(self) -> None:
        """The client gives back window (stream and connection) and then
        resets the stream, all in one read: the window events come first and
        send on the stream h2 already has closed. Only that stream ends."""
        (s1, s3), [(_, source1), (body3, _)] = self.streaming_responses()
        self.client.increment_flow_control_window(1000, s1)
        self.client.increment_flow_control_window(65535)
        self.client.reset_stream(s1, ErrorCodes.CANCEL)
        self.server.dataReceived(self.client.data_to_send())   # must not raise
        self.assertEqual(source1.stopped, 1)
        self.assertNotIn(s1, self.server.streams)
        self.assertFalse(self.transport.disconnecting)
        # The other stream on the connection completes.
        body3.finish()
        for _ in range(10):
            self.received(self.flush())
        self.assertEqual(sum(len(e.data) for e in self.of(DataReceived) if e.stream_id == s3),
                         70000)
        self.assertEqual([e.stream_id for e in self.of(StreamEnded)], [s3])
        self.assertEqual(self.server.streams, {})

    def test_client_goaway_in_flight_streams_still_answered(self) -> None:
        """A client's GOAWAY (h2load at the end of a run) with streams in
        flight, frames after it in the same read, and responses arriving
        after it: all answered, nothing raised, nothing left unhandled."""
        s1 = self.request()
        s3 = self.request()
        goaway = GoAwayFrame(0, last_stream_id=0, error_code=0).serialize()
        window = WindowUpdateFrame(0, window_increment=1000).serialize()
        reset = RstStreamFrame(s3, error_code=ErrorCodes.CANCEL).serialize()
        self.server.dataReceived(goaway + window + reset)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.dispatcher.cancelled), 1)
        body = Body()
        self.respond(0, 200, [], body)
        body.write(b"after goaway")
        body.finish()
        events = self.flush()
        self.assertEqual([e.stream_id for e in self.of(ResponseReceived, events)], [s1])
        self.assertEqual(b"".join(e.data for e in self.of(DataReceived, events)),
                         b"after goaway")
        self.assertEqual([e.stream_id for e in self.of(StreamEnded, events)], [s1])
        self.assertEqual(self.server.streams, {})

    def test_refused_send_ends_only_that_stream(self) -> None:
        """Any refusal by h2 on a stream (here: the connection CLOSED in h2's
        view) ends that stream locally; the caller (the upstream's
        dataReceived) sees no exception, the other stream is untouched."""
        s1 = self.request()
        s3 = self.request()
        codec = self.server.h2
        self.server.h2 = ClosedCodec(codec)
        body = Body()
        source = Source(body)
        self.respond(0, 200, [], body)
        body.write(b"more")
        self.assertEqual(source.stopped, 1)
        self.assertNotIn(s1, self.server.streams)
        self.assertIn(s3, self.server.streams)
        self.server.h2 = codec
        self.respond(1)
        events = self.flush()
        self.assertEqual([e.stream_id for e in self.of(ResponseReceived, events)], [s3])
        self.assertEqual([e.stream_id for e in self.of(StreamEnded, events)], [s3])

    def test_response_write_failure_resets_only_that_stream(self) -> None:
        """A bug while writing a response: that stream is reset with
        INTERNAL_ERROR, logged once, nothing left unhandled in the Deferred."""
        s1 = self.request()
        s3 = self.request()
        real = self.server._start_outbound

        def broken(stream, headers, body):
            if stream.sid == s1:
                raise RuntimeError("bug")
            real(stream, headers, body)
        self.server._start_outbound = broken
        d = self.dispatcher.calls[0][2]
        self.respond(0)
        self.respond(1)
        events = self.flush()
        self.assertIsNone(self.successResultOf(d))
        [reset] = self.of(StreamReset, events)
        self.assertEqual((reset.stream_id, reset.error_code), (s1, ErrorCodes.INTERNAL_ERROR))
        self.assertEqual([e.stream_id for e in self.of(ResponseReceived, events)], [s3])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(self.transport.disconnecting)


    def test_garbage_never_raises(self) -> None:
        """Random frames after a valid start: GOAWAY or nothing, never an exception."""
        import random
        rng = random.Random(4)
        goaways = 0
        for _ in range(300):
            transport = Transport()
            conn = InboundConnection(self.listener.site, transport, 0.0, self.listener)
            conn.detected(Verdict("h2", "preface"))
            server = H2ServerProtocol(conn, self.dispatcher, self.settings, site(conn.listener))
            server.makeConnection(transport)
            client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
            client.initiate_connection()
            client.send_headers(1, POST)
            server.dataReceived(client.data_to_send())
            kind = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, rng.randrange(256)])
            length = rng.choice([0, 1, 4, 8, rng.randrange(64)])
            frame = (length.to_bytes(3, "big") + bytes([kind, rng.randrange(256)])
                     + rng.choice([0, 1, 2, 3, 2**31 - 1]).to_bytes(4, "big")
                     + rng.randbytes(length))
            server.dataReceived(frame)
            goaways += transport.disconnecting
            server.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(0 < goaways < 300, goaways)

class MalformedRequestTests(ServerHarness):
    """RFC 9113 8.1.1: a malformed request is a stream error (RST_STREAM
    PROTOCOL_ERROR), never dispatched, counted in http_errors_total; the
    connection and its other streams live on."""

    client_options = LOOSE

    def errors(self, reason: str) -> float:
        return self.listener.metrics.registry.get_sample_value("http_errors_total", {
            "direction": "inbound", "listener": "inbound", "reason": reason}) or 0

    def assert_reset(self, sid: int, code=ErrorCodes.PROTOCOL_ERROR) -> None:
        resets = [e.error_code for e in self.of(StreamReset) if e.stream_id == sid]
        self.assertEqual(resets, [code])

    def test_pseudo_headers_and_fields_checked(self) -> None:
        def block(method=b"GET", path=b"/", authority=b"app.test", scheme=b"http", extra=()):
            return [(b":method", method), (b":scheme", scheme), (b":path", path),
                    (b":authority", authority), *extra]
        cases = [
            (block(method=b"GET /admin?", path=b"/public"), "invalid :method"),
            (block(method=b""), "invalid :method"),
            (block(path=b"http://internal.example/admin"), "invalid :path"),
            (block(path=b"*"), "invalid :path"),
            (block(path=b"/a b"), "invalid :path"),
            (block(path=b"/a\r\nx: y"), "invalid :path"),
            (block(path=b"/\xff"), "invalid :path"),
            (block(authority=b"user@app.test"), "invalid :authority"),
            (block(authority=b"app.test/admin"), "invalid :authority"),
            (block(authority=b""), "invalid :authority"),
            (block(scheme=b"ht tp"), "invalid :scheme"),
            (block(extra=[(b"x", b"a\r\nb")]), "invalid field value"),
            (block(extra=[(b"x", b"a\x00")]), "invalid field value"),
            (block(extra=[(b"x", b" a")]), "invalid field value"),
            (block(extra=[(b"X-Upper", b"1")]), "invalid field name"),
            (block(extra=[(b"x y", b"1")]), "invalid field name"),
            (block(extra=[(b"connection", b"close")]), "connection-specific field"),
            (block(extra=[(b"transfer-encoding", b"chunked")]), "connection-specific field"),
            (block(extra=[(b"te", b"gzip")]), "te other than trailers"),
            (block(extra=[(b"host", b"other.test")]), "host differs from :authority"),
            (block(extra=[(b"content-length", b"1"), (b"content-length", b"2")]),
             "more than one content-length"),
            (block(extra=[(b"content-length", b"-1")]), "invalid content-length"),
            ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
              (b":authority", b"a"), (b":protocol", b"websocket")], "unknown pseudo-header"),
            ([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
             "missing :authority"),
        ]
        for headers, reason in cases:
            before = self.errors(reason)
            sid = self.request(headers)
            self.assert_reset(sid)
            self.assertEqual(self.errors(reason), before + 1, (headers, reason))
        self.assertEqual(self.dispatcher.calls, [])
        self.assertFalse(self.transport.disconnecting)
        # OPTIONS * is the one non-origin-form target; the connection serves on.
        self.request(block(method=b"OPTIONS", path=b"*"))
        self.request(block(extra=[(b"te", b"trailers"), (b"host", b"app.test")]))
        heads = [call[0].head for call in self.dispatcher.calls]
        self.assertEqual([(h.method, h.target) for h in heads],
                         [(b"OPTIONS", b"*"), (b"GET", b"/")])
        self.assertEqual(heads[1].headers, [(b"te", b"trailers")])

    def test_connect_answered_405(self) -> None:
        sid = self.request([(b":method", b"CONNECT"), (b":authority", b"db.internal:5432")])
        [response] = self.of(ResponseReceived)
        headers = dict(response.headers)
        self.assertEqual((response.stream_id, headers[b":status"]), (sid, b"405"))
        self.assertEqual(headers[b"l5d-proxy-error"], b"CONNECT not allowed")
        self.assertEqual(self.dispatcher.calls, [])
        self.assertEqual(self.errors("CONNECT not allowed"), 1)

    def test_content_length_without_data(self) -> None:
        """HEADERS(POST, content-length: 20, END_STREAM): never dispatched."""
        sid = self.request([*POST, (b"content-length", b"20")], end=True)
        self.assert_reset(sid)
        self.assertEqual(self.dispatcher.calls, [])
        self.assertEqual(self.errors("content-length mismatch"), 1)
        sid = self.request([*POST, (b"content-length", b"0")], end=True)
        self.assertEqual(len(self.dispatcher.calls), 1)

    def dispatched_body(self, length: bytes):
        sid = self.request([*POST, (b"content-length", length)], end=False)
        [(request, _, _)] = self.dispatcher.calls
        self.assertEqual(request.body.length, int(length))
        return sid, Sink(request.body)

    def test_data_short_of_content_length(self) -> None:
        sid, sink = self.dispatched_body(b"20")
        self.client.send_data(sid, b"12345", end_stream=True)
        self.flush()
        self.assert_reset(sid)
        self.assertEqual(sink.bytes, b"12345")
        self.assertFalse(sink.ended)
        self.assertIsInstance(sink.error, ValueError)
        self.assertEqual(len(self.dispatcher.cancelled), 1)
        self.assertEqual(self.errors("content-length mismatch"), 1)
        self.assertEqual(self.server.streams, {})

    def test_data_past_content_length(self) -> None:
        sid, sink = self.dispatched_body(b"5")
        self.client.send_data(sid, b"abc")
        self.client.send_data(sid, b"def")
        self.flush()
        self.assert_reset(sid)
        self.assertEqual(sink.bytes, b"abc")   # not a byte past the declared length
        self.assertIsNotNone(sink.error)
        self.assertEqual(len(self.dispatcher.cancelled), 1)

    def test_trailers_short_of_content_length(self) -> None:
        sid, sink = self.dispatched_body(b"20")
        self.client.send_data(sid, b"12345")
        self.client.send_headers(sid, [(b"x-checksum", b"1")], end_stream=True)
        self.flush()
        self.assert_reset(sid)
        self.assertIsNotNone(sink.error)
        self.assertFalse(sink.ended)

    def test_exact_content_length_passes(self) -> None:
        sid, sink = self.dispatched_body(b"6")
        self.client.send_data(sid, b"abc")
        self.client.send_data(sid, b"def", end_stream=True)
        self.flush()
        self.assertEqual((sink.bytes, sink.ended, sink.error), (b"abcdef", True, None))
        self.assertEqual(self.of(StreamReset), [])

    def test_malformed_trailers(self) -> None:
        for trailers in ([(b":status", b"200")], [(b"x", b"a\nb")], [(b"Grpc-Status", b"0")]):
            sid = self.request(POST, end=False)
            request = self.dispatcher.calls[-1][0]
            sink = Sink(request.body)
            self.client.send_data(sid, b"x")
            self.client.send_headers(sid, trailers, end_stream=True)
            self.flush()
            self.assert_reset(sid)
            self.assertIsNotNone(sink.error, trailers)
            self.assertFalse(sink.ended)
        self.assertFalse(self.transport.disconnecting)

    def test_other_streams_unaffected(self) -> None:
        """A malformed stream next to a sound one: only it is reset."""
        good, sink = self.dispatched_body(b"4")
        bad = self.request([*POST, (b"content-length", b"9")], end=False)
        self.client.send_data(bad, b"1", end_stream=True)
        self.client.send_data(good, b"1234", end_stream=True)
        self.flush()
        self.assert_reset(bad)
        self.assertEqual((sink.bytes, sink.ended), (b"1234", True))
        self.respond(0, 200, [], Body.empty())
        self.flush()
        [response] = [e for e in self.of(ResponseReceived) if e.stream_id == good]
        self.assertEqual(dict(response.headers)[b":status"], b"200")


# -- the client end -----------------------------------------------------------

class H2BoundedStateTests(SynchronousTestCase):
    """What a connection keeps does not grow with the streams it carried
    (issue 17), on the server end and the client end, and frames for
    closed streams, recent or long gone, are handled as RFC 9113 5.1 says."""

    client_options = ServerTests.client_options
    settings = ServerTests.settings
    setUp = ServerTests.setUp
    flush = ServerTests.flush
    send_raw = ServerTests.send_raw
    request = ServerTests.request
    respond = ServerTests.respond
    of = ServerTests.of

    def exchange(self, n: int) -> list[int]:
        """``n`` GETs, one after the other, each answered 200 with no body."""
        sids = []
        for _ in range(n):
            sids.append(self.request())
            self.respond(len(self.dispatcher.calls) - 1)
            self.flush()
        return sids

    def test_closed_stream_record_is_bounded_server_end(self) -> None:
        """1,000 streams on one client connection: the proxy remembers the
        ends of the last ``closed_streams_kept`` only, and h2's stream map
        and the proxy's hold no closed stream past the next one opened."""
        self.exchange(1000)
        kept = closed_streams_kept(self.settings)
        self.assertEqual(kept, 128)
        self.assertLessEqual(self.server.h2.closed_streams_recorded(), kept)
        self.assertEqual(self.server.streams, {})
        self.request()
        self.assertEqual(self.server.h2.streams_held(), 1)
        self.assertFalse(self.transport.disconnecting)

    def test_frames_for_closed_streams_keep_the_connection(self) -> None:
        """Frames a client sent before it saw a stream end, for one that
        ended just now or for one that ended 500 streams ago (no longer
        remembered): DATA is answered RST_STREAM(STREAM_CLOSED) and its
        bytes are given back to the connection window; WINDOW_UPDATE and
        RST_STREAM are ignored; trailers on a stream the proxy reset get a
        RST_STREAM. No GOAWAY, and the next stream is served."""
        [old] = self.exchange(1)
        self.exchange(500)
        reset = self.request(POST, end=False)   # answered before its body: reset NO_ERROR
        self.respond(len(self.dispatcher.calls) - 1)
        [ended] = self.exchange(1)
        [event] = [e for e in self.of(StreamReset) if e.stream_id == reset]
        self.assertEqual(event.error_code, ErrorCodes.NO_ERROR)
        self.assertFalse(any(isinstance(f, GoAwayFrame)
                             for f in raw_frames(self.transport.value())))
        for sid in (old, reset, ended):
            # 30,000 bytes each, 90,000 in all: past the connection window
            # (65,535) unless the closed streams' bytes are given back.
            frames = self.send_raw(DataFrame(sid, data=b"d" * 15000).serialize() * 2)
            self.assertIn((RstStreamFrame, sid, ErrorCodes.STREAM_CLOSED),
                          [(type(f), f.stream_id, getattr(f, "error_code", None))
                           for f in frames])
            self.assertEqual({(type(f), f.stream_id) for f in frames}
                             - {(RstStreamFrame, sid), (WindowUpdateFrame, 0)}, set(), sid)
            for frame in (WindowUpdateFrame(sid, window_increment=1000),
                          RstStreamFrame(sid, error_code=ErrorCodes.CANCEL)):
                self.assertEqual(self.send_raw(frame.serialize()), [], (sid, frame))
        trailers = HeadersFrame(reset, data=self.client.encoder.encode([(b"x-t", b"1")]),
                                flags=["END_STREAM", "END_HEADERS"])
        frames = self.send_raw(trailers.serialize())
        self.assertEqual([(type(f), f.stream_id, f.error_code) for f in frames],
                         [(RstStreamFrame, reset, ErrorCodes.STREAM_CLOSED)])
        self.assertFalse(self.transport.disconnecting)
        self.exchange(1)
        self.assertEqual(self.of(ResponseReceived)[-1].stream_id, ended + 2)

    def test_headers_on_a_stream_ended_long_ago_end_the_connection(self) -> None:
        """A HEADERS frame for a stream that ended 500 streams ago is a
        connection error (RFC 9113 5.1 allows it for frames long after the
        end): GOAWAY(PROTOCOL_ERROR), as h2 treats a closed stream whose end
        it no longer knows."""
        [old] = self.exchange(1)
        self.exchange(500)
        frame = HeadersFrame(old, data=self.client.encoder.encode(GET),
                             flags=["END_STREAM", "END_HEADERS"])
        frames = self.send_raw(frame.serialize())
        self.assertEqual([f.error_code for f in frames if isinstance(f, GoAwayFrame)],
                         [ErrorCodes.PROTOCOL_ERROR])
        self.assertTrue(self.transport.disconnecting)

    def test_encoder_table_bounded_whatever_the_client_allows(self) -> None:
        """A client allowing a 1 MiB HPACK table, then 200 responses each
        with a field value never sent before: the proxy's encoder announces
        and keeps a table of at most ``ENCODER_TABLE_SIZE`` bytes."""
        self.client.update_settings({SettingCodes.HEADER_TABLE_SIZE: 1 << 20})
        self.flush()
        self.assertEqual(self.client.decoder.max_allowed_table_size, 1 << 20)
        for n in range(200):
            self.request()
            self.respond(n, 200, [(b"x-n", b"%d-" % n + b"v" * 100)])
            self.flush()
        self.assertEqual([dict(e.headers)[b"x-n"][:4] for e in self.of(ResponseReceived)][-1],
                         b"199-")
        self.assertLessEqual(self.client.decoder.header_table_size, ENCODER_TABLE_SIZE)
        self.assertLessEqual(self.server.h2.encoder_table_size, ENCODER_TABLE_SIZE)


class ClientTests(H2ClientRig, SynchronousTestCase):

    def test_streams_multiplex_up_to_the_peer_limit(self) -> None:
        ds = [self.send() for _ in range(3)]
        self.assertEqual(len(self.reactor.tcpClients), 1)
        _server, _, _ = self.connect(max_streams=2)
        self.pump()
        events = [e for e in self.seen[0] if isinstance(e, RequestReceived)]
        self.assertEqual([e.stream_id for e in events], [1, 3])
        self.assertEqual(dict(events[0].headers)[b":path"], b"/x")
        self.assertNotIn(b"connection", dict(events[0].headers))
        # The third waits for room: a second connection opens for it.
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.connect(max_streams=2)
        events = [e for e in self.seen[1] if isinstance(e, RequestReceived)]
        self.assertEqual([e.stream_id for e in events], [1])
        self.assertFalse(any(d.called for d in ds))

    def test_response_body_and_trailers(self) -> None:
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200"), (b"content-type", b"application/grpc")])
        server.send_data(1, b"abc")
        server.send_headers(1, [(b"grpc-status", b"0")], end_stream=True)
        self.pump()
        response = self.successResultOf(d)
        self.assertEqual(response.head.status, 200)
        sink = Sink(response.body)
        self.assertEqual((sink.bytes, sink.ended, sink.trailers),
                         (b"abc", True, [(b"grpc-status", b"0")]))

    def resets(self, index: int = 0) -> list:
        return [(e.stream_id, e.error_code) for e in self.seen[index]
                if isinstance(e, StreamReset)]

    def test_malformed_response_head_is_502(self) -> None:
        """A response head an HTTP/1 client could not be given as it is: the
        upstream stream is reset (PROTOCOL_ERROR), the request fails with 502,
        the connection serves on."""
        blocks = [
            [(b":status", b"2_00")], [(b":status", b"+200")], [(b":status", b"20")],
            [(b":status", b"99999")], [(b":status", b"200"), (b"x", b"a\r\nb")],
            [(b":status", b"200"), (b"x", b"a\x0bb")], [(b":status", b"200"), (b"X-A", b"1")],
            [(b":status", b"200"), (b"transfer-encoding", b"chunked")],
            [(b":status", b"200"), (b"content-length", b"2"), (b"content-length", b"3")],
            [(b"x", b"1"), (b":status", b"200")],
        ]
        ds = [self.send() for _ in blocks]
        server, transport, _ = self.connect()
        self.pump()
        for i, block in enumerate(blocks):   # streams left open: each can be reset
            server.send_headers(1 + 2 * i, block)
        self.pump()
        for d, block in zip(ds, blocks, strict=True):
            error = self.failureResultOf(d, ProxyError).value
            self.assertEqual(error.status, 502, block)
            self.assertTrue(error.reason.startswith("invalid response: "), error.reason)
        self.assertEqual(self.resets(), [(1 + 2 * i, ErrorCodes.PROTOCOL_ERROR)
                                         for i in range(len(blocks))])
        self.assertFalse(transport.disconnecting)

    def test_response_short_of_content_length_in_one_read_is_502(self) -> None:
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200"), (b"content-length", b"10")])
        server.send_data(1, b"12345", end_stream=True)
        self.pump()
        error = self.failureResultOf(d, ProxyError).value
        self.assertEqual((error.status, error.reason),
                         (502, "invalid response: content-length mismatch"))

    def test_response_content_length_without_data(self) -> None:
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200"), (b"content-length", b"10")],
                            end_stream=True)
        self.pump()
        self.assertEqual(self.failureResultOf(d, ProxyError).value.status, 502)

    def test_response_past_content_length_fails_its_body(self) -> None:
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200"), (b"content-length", b"4")])
        server.send_data(1, b"ab")
        self.pump()
        sink = Sink(self.successResultOf(d).body)
        server.send_data(1, b"cdef")
        self.pump()
        self.assertEqual(sink.bytes, b"ab")
        self.assertFalse(sink.ended)
        self.assertIsNotNone(sink.error)
        self.assertEqual(self.resets(), [(1, ErrorCodes.PROTOCOL_ERROR)])

    def test_bodiless_responses_may_declare_a_length(self) -> None:
        """RFC 9113 8.1.1: a response to HEAD, a 204 and a 304 carry no
        content whatever their content-length says."""
        head = self.send(RequestHead(b"HEAD", b"/x", b"svc.test"))
        d304 = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200"), (b"content-length", b"100")])
        server.send_data(1, b"", end_stream=True)
        server.send_headers(3, [(b":status", b"304"), (b"content-length", b"100")],
                            end_stream=True)
        self.pump()
        for d in (head, d304):
            sink = Sink(self.successResultOf(d).body)
            self.assertEqual((sink.bytes, sink.ended, sink.error), (b"", True, None))
        self.assertEqual(self.resets(), [])

    def test_malformed_response_trailers(self) -> None:
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200")])
        server.send_data(1, b"ab")
        self.pump()
        sink = Sink(self.successResultOf(d).body)
        server.send_headers(1, [(b":status", b"200")], end_stream=True)
        self.pump()
        self.assertIsNotNone(sink.error)
        self.assertFalse(sink.ended)

    def test_request_body_and_trailers_sent(self) -> None:
        body = Body()
        head = RequestHead(b"POST", b"/pkg.Svc/Call", b"svc.test",
                           [(b"content-type", b"application/grpc")])
        self.send(head, body)
        _server, _, _ = self.connect()
        body.write(b"payload")
        body.finish([(b"x-trailer", b"1")])
        self.pump()
        events = self.seen[0]
        [request] = [e for e in events if isinstance(e, RequestReceived)]
        self.assertEqual(dict(request.headers)[b"te"], b"trailers")
        self.assertEqual(b"".join(e.data for e in events if isinstance(e, DataReceived)),
                         b"payload")
        [trailers] = [e for e in events if isinstance(e, TrailersReceived)]
        self.assertEqual(trailers.headers, [(b"x-trailer", b"1")])

    def test_cancel_resets_upstream_stream(self) -> None:
        d = self.send()
        self.connect()
        self.pump()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        [reset] = [e for e in self.pump() if isinstance(e, StreamReset)]
        self.assertEqual(reset.error_code, ErrorCodes.CANCEL)

    def test_response_body_cancel_resets_upstream_stream(self) -> None:
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200")])
        self.pump()
        response = self.successResultOf(d)
        response.body.cancel()
        [reset] = [e for e in self.pump() if isinstance(e, StreamReset)]
        self.assertEqual(reset.error_code, ErrorCodes.CANCEL)

    def test_upstream_reset_before_response_fails_request(self) -> None:
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
        self.pump()
        failure = self.failureResultOf(d, ProxyError)
        self.assertEqual(failure.value.status, 502)

    def test_upstream_reset_after_response_fails_body(self) -> None:
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200")])
        self.pump()
        sink = Sink(self.successResultOf(d).body)
        server.reset_stream(1, ErrorCodes.INTERNAL_ERROR)
        self.pump()
        self.assertIsInstance(sink.error, StreamResetError)
        self.assertEqual(sink.error.code, ErrorCodes.INTERNAL_ERROR)

    def test_response_acked_only_when_consumed(self) -> None:
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200")])
        self.pump()
        sink = Sink(self.successResultOf(d).body, paused=True)
        send_chunks(server, 1, b"d" * 40000)
        events = self.pump()
        self.assertEqual(len(sink.bytes), 40000)
        updated = {e.stream_id: e.delta for e in events if isinstance(e, WindowUpdated)}
        self.assertEqual(updated, {0: 40000})   # the connection's at once
        sink.body.resume()
        events = self.pump()
        updated = {e.stream_id: e.delta for e in events if isinstance(e, WindowUpdated)}
        self.assertEqual(updated, {1: 40000})   # the stream's once consumed

    def test_ended_response_acked_on_the_connection_only(self) -> None:
        """Response DATA that came with END_STREAM is given back on the
        connection window alone; the stream's own window no longer matters."""
        d = self.send()
        server, _, _ = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200")])
        server.send_data(1, b"e" * 16000)
        server.send_data(1, b"e" * 16000)
        server.send_data(1, b"e" * 8000, end_stream=True)
        events = self.pump()
        sink = Sink(self.successResultOf(d).body)
        self.assertEqual((len(sink.bytes), sink.ended), (40000, True))
        updated = [(e.stream_id, e.delta) for e in events if isinstance(e, WindowUpdated)]
        self.assertEqual(updated, [(0, 40000)])

    def test_goaway_lets_in_flight_finish_and_retries_the_rest(self) -> None:
        d1, d2 = self.send(), self.send()
        server, transport, _protocol = self.connect()
        self.pump()
        server.close_connection(last_stream_id=1)
        self.pump()
        # Stream 3 was never processed: it goes to a new connection.
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.connect()
        events = [e for e in self.seen[1] if isinstance(e, RequestReceived)]
        self.assertEqual(len(events), 1)
        # Stream 1 still completes on the old connection (raw frames: the
        # h2 server object went CLOSED when it sent the GOAWAY).
        server.state_machine.state = type(server.state_machine.state).SERVER_OPEN
        server.send_headers(1, [(b":status", b"200")])
        server.send_data(1, b"late", end_stream=True)
        self.pump()
        sink = Sink(self.successResultOf(d1).body)
        self.assertEqual((sink.bytes, sink.ended), (b"late", True))
        self.assertTrue(transport.disconnecting)
        self.assertFalse(d2.called)

    def test_connect_failure_fails_waiting_requests(self) -> None:
        d = self.send()
        _, _, factory, _, _ = self.reactor.tcpClients[0]
        from twisted.internet.error import ConnectionRefusedError
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        failure = self.failureResultOf(d, ProxyError)
        self.assertEqual(failure.value.grpc_status, 14)

    def test_connection_lost_fails_streams(self) -> None:
        d1, d2 = self.send(), self.send()
        server, _, protocol = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200")])
        self.pump()
        sink = Sink(self.successResultOf(d1).body)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(sink.error)
        self.assertEqual(self.failureResultOf(d2, ProxyError).value.status, 502)
        # A new request opens a new connection.
        self.send()
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_upstream_reset_while_request_body_streams_in_one_read(self) -> None:
        """The endpoint's WINDOW_UPDATEs (stream and connection) then
        RST_STREAM in one read, while a request body waits for a window: the
        window events send on the stream h2 already has closed. Only that
        request fails; the connection carries on."""
        body = Body()
        source = Source(body)
        head = RequestHead(b"POST", b"/upload", b"svc.test")
        d1 = self.send(head, body)
        d3 = self.send()
        server, transport, protocol = self.connect()
        body.write(b"u" * 70000)          # past both windows of 65535
        self.pump()
        self.assertIn(1, protocol._blocked)
        server.increment_flow_control_window(1000, 1)
        server.increment_flow_control_window(65535)
        server.reset_stream(1, ErrorCodes.CANCEL)
        protocol.dataReceived(server.data_to_send())    # must not raise
        self.assertEqual(self.failureResultOf(d1, ProxyError).value.status, 502)
        self.assertEqual(source.stopped, 1)
        self.assertFalse(transport.disconnecting)
        server.send_headers(3, [(b":status", b"200")], end_stream=True)
        self.pump()
        self.assertEqual(self.successResultOf(d3).head.status, 200)
        # The same connection takes the next request.
        d5 = self.send()
        self.pump()
        server.send_headers(5, [(b":status", b"204")], end_stream=True)
        self.pump()
        self.assertEqual(self.successResultOf(d5).head.status, 204)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_goaway_and_spared_streams_frames_in_one_read(self) -> None:
        """GOAWAY followed by the DATA of a stream it spares, in one read
        (an endpoint closing down gracefully): the spared streams finish,
        including a request body still streaming; the rest go elsewhere."""
        body = Body()
        d1 = self.send(RequestHead(b"POST", b"/upload", b"svc.test"), body)
        d3, d5 = self.send(), self.send()
        server, transport, protocol = self.connect()
        self.pump()
        server.send_headers(1, [(b":status", b"200")])
        server.send_headers(3, [(b":status", b"200")])
        self.pump()
        server.send_data(1, b"one")
        server.send_data(3, b"three", end_stream=True)
        goaway = GoAwayFrame(0, last_stream_id=3, error_code=0).serialize()
        protocol.dataReceived(goaway + server.data_to_send())
        self.assertFalse(transport.disconnecting)
        sink1 = Sink(self.successResultOf(d1).body)
        sink3 = Sink(self.successResultOf(d3).body)
        self.assertEqual((sink1.bytes, sink3.bytes, sink3.ended), (b"one", b"three", True))
        # The request body of the spared stream still goes out, then it ends.
        body.write(b"request")
        body.finish()
        events = self.pump()
        self.assertEqual(b"".join(e.data for e in events if isinstance(e, DataReceived)),
                         b"request")
        server.send_data(1, b"!", end_stream=True)
        self.pump()
        self.assertEqual((sink1.bytes, sink1.ended), (b"one!", True))
        self.assertTrue(transport.disconnecting)
        # Stream 5 was not processed: it went to a new connection.
        self.assertFalse(d5.called)
        self.assertEqual(len(self.reactor.tcpClients), 2)


# -- both ends wired together ----------------------------------------------------

class H2ClientBoundedStateTests(SynchronousTestCase):
    """The client end's connection to an endpoint keeps no more for having
    carried many streams (issue 17)."""

    settings = ClientTests.settings
    setUp = ClientTests.setUp
    connect = ClientTests.connect
    pump = ClientTests.pump

    def exchange(self, server, n: int, first: int = 0) -> None:
        for i in range(first, first + n):
            head = RequestHead(b"GET", b"/item/%d/" % i + b"p" * 100, b"svc.test", [])
            d = send(self.client, Endpoint(), Request(head, Body.empty()))
            self.pump()
            [sid] = [e.stream_id for e in self.seen[0][-3:] if isinstance(e, RequestReceived)]
            server.send_headers(sid, [(b":status", b"204")], end_stream=True)
            self.pump()
            self.assertEqual(self.successResultOf(d).head.status, 204)

    def test_closed_stream_record_is_bounded_client_end(self) -> None:
        send(self.client, Endpoint(), Request(
            RequestHead(b"GET", b"/", b"svc.test", []), Body.empty()))
        server, _, protocol = self.connect()
        server.send_headers(1, [(b":status", b"204")], end_stream=True)
        self.pump()
        self.exchange(server, 1000)
        self.assertEqual(len(self.reactor.tcpClients), 1)   # all on one connection
        self.assertLessEqual(protocol.h2.closed_streams_recorded(),
                             closed_streams_kept(self.settings))
        self.assertLessEqual(protocol.h2.streams_held(), 1)
        self.assertEqual(protocol.streams, {})

    def test_encoder_table_bounded_whatever_the_endpoint_allows(self) -> None:
        """An endpoint allowing a 1 MiB HPACK table, then 200 requests with
        paths never sent before: the client end announces and keeps a table
        of at most ``ENCODER_TABLE_SIZE`` bytes."""
        send(self.client, Endpoint(), Request(
            RequestHead(b"GET", b"/", b"svc.test", []), Body.empty()))
        server, _, protocol = self.connect()
        server.update_settings({SettingCodes.HEADER_TABLE_SIZE: 1 << 20})
        server.send_headers(1, [(b":status", b"204")], end_stream=True)
        self.pump()
        self.assertEqual(server.decoder.max_allowed_table_size, 1 << 20)
        self.exchange(server, 200)
        self.assertLessEqual(server.decoder.header_table_size, ENCODER_TABLE_SIZE)
        self.assertLessEqual(protocol.h2.encoder_table_size, ENCODER_TABLE_SIZE)


class DirectForwarder:
    """The dispatcher reduced to forwarding every request to the h2 client
    end, as HttpProxy does it: the server end calls ``dispatch_to``, which
    uses the client end's ``send``."""

    def __init__(self, client: H2Client) -> None:
        self.client = client

    def dispatch_to(self, request: Request, context, waiter, token):
        return _DirectCall(self.client, request, waiter, token)


class _DirectCall:
    def __init__(self, client: H2Client, request: Request, waiter, token) -> None:
        self.waiter, self.token = waiter, token
        self.delivered = False
        self.handle = None
        handle = client.send(DEFAULT_TARGET, Endpoint(), request, self)
        if not self.delivered:
            self.handle = handle

    def attempt_responded(self, response: Response) -> None:
        self.delivered = True
        self.waiter.dispatch_responded(self.token, response)

    def attempt_failed(self, failure: Failure) -> None:
        self.delivered = True
        self.waiter.dispatch_failed(self.token, failure)

    def cancel(self) -> None:
        if not self.delivered:
            self.delivered = True
            self.handle.cancel()


class WiredTests(SynchronousTestCase):
    """Two client connections on server ends, their streams forwarded over
    one shared upstream connection by the client end, as in the proxy: what
    one client does to its streams must never break the other's."""

    settings = H2Config(initial_window_size=65535, connection_window_size=65535)
    forwarder = DirectForwarder

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = make_listener(self.clock)
        self.upstream = H2Client(self.clock, settings=self.settings)
        self.forwarder = type(self).forwarder(self.upstream)
        self.downs = [self.client_connection() for _ in range(2)]
        self.endpoint = None

    def client_connection(self):
        transport = Transport()
        conn = InboundConnection(self.listener.site, transport, 0.0, self.listener)
        conn.detected(Verdict("h2", "preface"))
        server = H2ServerProtocol(conn, self.forwarder, self.settings, site(conn.listener))
        server.makeConnection(transport)
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        return {"client": client, "server": server, "transport": transport, "events": []}

    def connect_endpoint(self):
        _host, _port, factory, _timeout, _ = self.clock.tcpClients[0]
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        h2.initiate_connection()
        self.endpoint = {"h2": h2, "protocol": protocol, "transport": transport,
                         "events": []}

    def pump(self) -> None:
        """Move bytes on every connection until all are quiet."""
        for _ in range(50):
            moved = False
            for down in self.downs:
                out = down["client"].data_to_send()
                if out and not down["transport"].disconnecting:
                    moved = True
                    down["server"].dataReceived(out)
                back = down["transport"].take()
                if back:
                    moved = True
                    for e in down["client"].receive_data(back):
                        down["events"].append(e)
                        if isinstance(e, DataReceived):
                            down["client"].acknowledge_received_data(
                                e.flow_controlled_length, e.stream_id)
            if self.endpoint is None and self.clock.tcpClients:
                self.connect_endpoint()
                moved = True
            ep = self.endpoint
            if ep is not None:
                up = ep["transport"].take()
                if up:
                    moved = True
                    ep["events"].extend(ep["h2"].receive_data(up))
                down_bytes = ep["h2"].data_to_send()
                if down_bytes:
                    moved = True
                    ep["protocol"].dataReceived(down_bytes)   # must never raise
            if not moved:
                return

    def get(self, down) -> int:
        client = down["client"]
        sid = client.get_next_available_stream_id()
        client.send_headers(sid, GET, end_stream=True)
        return sid

    def upstream_sids(self) -> list[int]:
        return [e.stream_id for e in self.endpoint["events"]
                if isinstance(e, RequestReceived)]

    def body_of(self, down, sid: int) -> tuple[bytes, bool]:
        events = [e for e in down["events"] if getattr(e, "stream_id", None) == sid]
        data = b"".join(e.data for e in events if isinstance(e, DataReceived))
        return data, any(isinstance(e, StreamEnded) for e in events)

    def test_client_goaway_with_streams_in_flight(self) -> None:
        """Client A says GOAWAY (h2load at the end of a run) while its stream
        and client B's share the upstream connection; the upstream's answer
        for A comes after: the upstream connection survives, B completes,
        and the next request reuses it."""
        a, b = self.downs
        sa, sb = self.get(a), self.get(b)
        self.pump()
        up_a, up_b = self.upstream_sids()
        h2 = self.endpoint["h2"]
        h2.send_headers(up_b, [(b":status", b"200")])
        h2.send_data(up_b, b"b-part ")
        self.pump()
        a["server"].dataReceived(GoAwayFrame(0, last_stream_id=0).serialize())
        h2.send_headers(up_a, [(b":status", b"200")])
        h2.send_data(up_a, b"for a", end_stream=True)
        h2.send_data(up_b, b"b-rest", end_stream=True)
        self.pump()
        self.assertEqual(self.body_of(b, sb), (b"b-part b-rest", True))
        self.assertEqual(self.body_of(a, sa), (b"for a", True))
        self.assertFalse(self.endpoint["transport"].disconnecting)
        # A leaves; B's next request goes over the same upstream connection.
        a["server"].connectionLost(Failure(ConnectionDone()))
        sb2 = self.get(b)
        self.pump()
        h2.send_headers(self.upstream_sids()[-1], [(b":status", b"200")])
        h2.send_data(self.upstream_sids()[-1], b"again", end_stream=True)
        self.pump()
        self.assertEqual(self.body_of(b, sb2), (b"again", True))
        self.assertEqual(len(self.clock.tcpClients), 1)

    def test_client_reset_while_upstream_response_streams(self) -> None:
        """Client A resets its stream while the upstream response streams:
        the upstream stream is cancelled, B's stream on the same upstream
        connection completes."""
        a, b = self.downs
        sa, sb = self.get(a), self.get(b)
        self.pump()
        up_a, up_b = self.upstream_sids()
        h2 = self.endpoint["h2"]
        for sid in (up_a, up_b):
            h2.send_headers(sid, [(b":status", b"200")])
            h2.send_data(sid, b"x" * 16000)
        self.pump()
        a["client"].reset_stream(sa, ErrorCodes.CANCEL)
        # The upstream keeps sending for A before it sees the CANCEL.
        h2.send_data(up_a, b"x" * 16000)
        h2.send_data(up_b, b"y" * 16000, end_stream=True)
        self.endpoint["protocol"].dataReceived(h2.data_to_send())
        self.pump()
        resets = [e for e in self.endpoint["events"] if isinstance(e, StreamReset)]
        self.assertEqual([(e.stream_id, e.error_code) for e in resets],
                         [(up_a, ErrorCodes.CANCEL)])
        data, ended = self.body_of(b, sb)
        self.assertEqual((len(data), ended), (32000, True))
        self.assertFalse(self.endpoint["transport"].disconnecting)
        self.assertEqual(self.upstream.pools[("", "127.0.0.1:9000")].connections,
                         [self.endpoint["protocol"]])

    def test_client_connection_closed_in_h2s_view_only_fails_its_stream(self) -> None:
        """Client A's connection refuses frames (CLOSED in h2's view, without
        the transport gone yet) when the upstream's DATA for it arrives: A's
        stream ends there, the upstream stream is cancelled, B completes."""
        a, b = self.downs
        sa, sb = self.get(a), self.get(b)
        self.pump()
        up_a, up_b = self.upstream_sids()
        h2 = self.endpoint["h2"]
        for sid in (up_a, up_b):
            h2.send_headers(sid, [(b":status", b"200")])
        self.pump()
        a["server"].h2 = ClosedCodec(a["server"].h2)
        h2.send_data(up_a, b"lost")
        h2.send_data(up_b, b"kept", end_stream=True)
        self.pump()
        self.assertEqual(self.body_of(b, sb), (b"kept", True))
        self.assertNotIn(sa, a["server"].streams)
        resets = [e for e in self.endpoint["events"] if isinstance(e, StreamReset)]
        self.assertEqual([(e.stream_id, e.error_code) for e in resets],
                         [(up_a, ErrorCodes.CANCEL)])
        self.assertFalse(self.endpoint["transport"].disconnecting)


# -- translation and gRPC helpers -----------------------------------------------

class TranslationTests(SynchronousTestCase):
    def test_request_head_from_h2(self) -> None:
        head = request_head_from_h2([(b":method", b"GET"), (b":path", b"/"),
                                     (b":scheme", b"https"), (b"host", b"h.test"),
                                     (b"te", b"trailers")])
        self.assertEqual((head.authority, head.scheme, head.headers),
                         (b"h.test", b"https", [(b"te", b"trailers")]))
        self.assertRaises(ValueError, request_head_from_h2, [(b":path", b"/")])

    def test_h1_head_to_h2(self) -> None:
        head = RequestHead(b"POST", b"/p", b"h.test", [
            (b"Content-Type", b"application/grpc"), (b"Connection", b"keep-alive"),
            (b"Keep-Alive", b"5"), (b"Transfer-Encoding", b"chunked"), (b"TE", b"gzip"),
            (b"Upgrade", b"h2c"), (b"X-A", b"1")], scheme=b"http", version="1.1")
        self.assertEqual(h2_request_headers(head), [
            (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p"),
            (b":authority", b"h.test"), (b"content-type", b"application/grpc"),
            (b"x-a", b"1"), (b"te", b"trailers")])

    def test_response_translation(self) -> None:
        head = ResponseHead(200, [(b"Connection", b"close"), (b"Transfer-Encoding", b"chunked"),
                                  (b"X-B", b"2")])
        headers = h2_response_headers(head)
        self.assertEqual(headers, [(b":status", b"200"), (b"x-b", b"2")])
        back = response_head_from_h2(headers)
        self.assertEqual((back.status, back.headers), (200, [(b"x-b", b"2")]))


class GrpcTests(SynchronousTestCase):
    def test_parse_timeout(self) -> None:
        self.assertEqual(grpc.parse_timeout(b"1S"), 1.0)
        self.assertEqual(grpc.parse_timeout(b"250m"), 0.25)
        self.assertEqual(grpc.parse_timeout(b"2M"), 120.0)
        self.assertAlmostEqual(grpc.parse_timeout(b"100u"), 1e-4)
        for bad in (None, b"", b"S", b"1x", b"123456789S", b"-1S"):
            self.assertIsNone(grpc.parse_timeout(bad), bad)

    def test_classification(self) -> None:
        self.assertEqual(grpc.classify(200, 0, True), "success")
        self.assertEqual(grpc.classify(200, 5, True), "success")
        for status in (2, 4, 7, 13, 14, 15, None):
            self.assertEqual(grpc.classify(200, status, True), "failure", status)
        self.assertEqual(grpc.classify(503, None, False), "failure")
        self.assertEqual(grpc.classify(404, None, False), "success")


class DispatcherGrpcTests(SynchronousTestCase):
    """gRPC in the dispatcher: the failure set, a missing status, grpc-timeout."""

    def setUp(self) -> None:
        from l5dproxy.route.dispatcher import HttpProxy
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        config = ServiceConfig("app", (HostPort("127.0.0.1", 8080),), protocol="h2")
        self.h2 = FakeClient()
        self.proxy = HttpProxy({"app": BackendSet(config, frozenset(), clock=self.clock)},
                               self.metrics, self.clock, {"h2": self.h2})
        self.listener = FakeListener(config=ListenerConfig("in", "tcp:0", "app"))
        self.connection = FakeConnection()

    def call(self, headers=()):
        head = RequestHead(b"POST", b"/pkg.Svc/M", b"svc", [
            (b"content-type", b"application/grpc"), *headers], version="2")
        context = RequestContext(http_site(self.listener), self.connection, "h2")
        return dispatch(self.proxy, Request(head, Body.empty()), context)

    def answered(self, trailers, head_headers=()):
        self.call()
        body = Body()
        self.h2.calls[-1][2].callback(Response(ResponseHead(200, list(head_headers)), body))
        body.finish(trailers)

    def count(self, grpc_status: str, classification: str, status_code: str = "200",
              error: str = "") -> float | None:
        return self.metrics.registry.get_sample_value("response_total", {
            "direction": "inbound", "listener": "in", "service": "app", "authority": "other",
            "protocol": "h2", "status_code": status_code, "grpc_status": grpc_status,
            "tls": "no_identity", "client_id": "", "no_tls_reason": "no_tls_from_remote",
            "classification": classification, "error": error})

    def test_failure_set(self) -> None:
        self.answered([(b"grpc-status", b"0")])
        self.answered([(b"grpc-status", b"5")])       # NOT_FOUND: not a failure
        self.answered([(b"grpc-status", b"13")])
        self.answered(None, [(b"grpc-status", b"7")])  # trailers-only
        self.answered(None)                            # no status at all: UNKNOWN
        self.assertEqual(self.count("0", "success"), 1)
        self.assertEqual(self.count("5", "success"), 1)
        self.assertEqual(self.count("13", "failure"), 1)
        self.assertEqual(self.count("7", "failure"), 1)
        self.assertEqual(self.count("", "failure"), 1)

    def test_grpc_timeout_bounds_the_request(self) -> None:
        d = self.call([(b"grpc-timeout", b"200m")])
        self.clock.advance(0.19)
        self.assertNoResult(d)
        self.clock.advance(0.02)
        err = self.failureResultOf(d, ProxyError).value
        self.assertEqual(err.grpc_status, 4)
        self.assertEqual(self.h2.cancelled, 1)
        self.assertEqual(self.count("4", "failure", error="response timeout"), 1)



class InboundValidationTests(SynchronousTestCase):
    """The ends' inbound header checks (``request_head_from_h2``,
    ``response_head_from_h2``, ``trailers_from_h2``) refuse everything
    stock h2 with its validation on refuses, requests, responses and
    trailers alike, and more: what RFC 9110's grammar for the pseudo-header
    values and fields forbids (``STRICTER``), which h2 lets through."""

    REQUESTS = [
        GET,
        GRPC,
        [*GET, (b"cookie", b"a=1"), (b"cookie", b"b=2")],
        [*GET, (b"x-empty", b"")],
        [*GET, (b"x-del", b"a\x7fb")],
        [*GET, (b"te", b"Trailers")],
        [*GET, (b"te", b"gzip")],
        [*GET, (b"X-Upper", b"1")],
        [*GET, (b"x name", b"1")],
        [*GET, (b"x:name", b"1")],
        [*GET, (b"x-\xe9", b"1")],
        [*GET, (b"", b"1")],
        [*GET, (b"x-crlf", b"a\r\nb")],
        [*GET, (b"x-nul", b"a\x00b")],
        [*GET, (b"x-lead", b" a")],
        [*GET, (b"x-trail", b"a\t")],
        [*GET, (b"connection", b"keep-alive")],
        [*GET, (b"upgrade", b"h2c")],
        [*GET, (b"transfer-encoding", b"chunked")],
        [*GET, (b"host", b"svc.test")],
        [*GET, (b"host", b"other.test")],
        [*GET, (b"host", b"svc.test"), (b"host", b"svc.test")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b""), (b":authority", b"a")],
        [(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")],
        [(b":scheme", b"http"), (b":path", b"/"), (b":authority", b"a")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")],
        [(b":method", b"GET"), (b"x", b"1"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"a")],
        [*GET, (b":path", b"/again")],
        [*GET, (b":foo", b"1")],
        [*GET, (b":status", b"200")],
        [*GET, (b":protocol", b"websocket")],
        [(b":method", b"CONNECT"), (b":authority", b"a:443")],
        [(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")],
        [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"http"),
         (b":path", b"/ws"), (b":authority", b"a")],
        # What h2 lets through and the proxy does not (RFC 9110, RFC 3986):
        [(b":method", b"GET /admin?"), (b":scheme", b"http"), (b":path", b"/public"),
         (b":authority", b"a")],
        [(b":method", b"GET"), (b":scheme", b"http"),
         (b":path", b"http://internal.example/admin"), (b":authority", b"a")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"*"), (b":authority", b"a")],
        [(b":method", b"OPTIONS"), (b":scheme", b"http"), (b":path", b"*"),
         (b":authority", b"a")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a b"), (b":authority", b"a")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a#f"), (b":authority", b"a")],
        [(b":method", b"GET"), (b":scheme", b"ht tp"), (b":path", b"/"), (b":authority", b"a")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"u@a")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"a/b")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
         (b":authority", b"[::1]:8080")],
        [*GET, (b"x(y", b"1")],
        [*GET, (b"x-ctl", b"a\x01b")],
        [*GET, (b"content-length", b"1"), (b"content-length", b"1")],
        [*GET, (b"content-length", b"+1")],
    ]
    #: Refused by the proxy, accepted by h2: the RFC 9110 grammar of the
    #: pseudo-header values and fields (h2 checks presence and order only),
    #: and h2's content-length checks, which the proxy makes in ``Body``.
    STRICTER = {
        b"GET /admin?", b"http://internal.example/admin", b"*", b"/a b", b"/a#f", b"ht tp",
        b"u@a", b"a/b", b"x(y", b"a\x01b", b"a\x7fb", b"+1", b"content-length",
    }
    RESPONSES = [
        [(b":status", b"200")],
        [(b":status", b"200"), (b"content-type", b"text/plain"), (b"set-cookie", b"a=1")],
        [(b":status", b"103"), (b"link", b"</s.css>")],
        [(b"content-type", b"text/plain")],
        [(b":status", b"200"), (b":path", b"/")],
        [(b":status", b"200"), (b":status", b"204")],
        [(b"x", b"1"), (b":status", b"200")],
        [(b":status", b"200"), (b"Content-Type", b"x")],
        [(b":status", b"200"), (b"keep-alive", b"5")],
        [(b":status", b"200"), (b"x", b"a\nb")],
        [(b":status", b"200"), (b"x", b"a ")],
        [(b":status", b"200"), (b"te", b"trailers")],
        [(b":status", b"200"), (b"host", b"a"), (b"host", b"b")],
        [(b":status", b"2_00")],
        [(b":status", b"+200")],
        [(b":status", b" 200")],
        [(b":status", b"20")],
        [(b":status", b"99999")],
        [(b":status", b"600")],
        [(b":status", b"200"), (b"x", b"a\x0bb")],
    ]
    TRAILERS = [
        [(b"grpc-status", b"0")],
        [(b"grpc-status", b"0"), (b"grpc-message", b"")],
        [(b":status", b"200")],
        [(b"Grpc-Status", b"0")],
        [(b"grpc-message", b"a\r")],
        [(b"connection", b"close")],
        [(b"grpc-status", b"0"), (b"x-bad", b"\x00")],
    ]

    @staticmethod
    def _pair(receiver_client: bool):
        loose = {"validate_outbound_headers": False, "normalize_outbound_headers": False}
        sender = H2Connection(H2Configuration(client_side=not receiver_client,
                                              header_encoding=None, **loose))
        receiver = H2Connection(H2Configuration(client_side=receiver_client,
                                                header_encoding=None))
        sender.initiate_connection()
        receiver.initiate_connection()
        receiver.receive_data(sender.data_to_send())
        sender.receive_data(receiver.data_to_send())
        receiver.receive_data(sender.data_to_send())
        return sender, receiver

    def _stock_refuses(self, kind: str, block) -> bool:
        """Whether stock h2, validation on, refuses the block."""
        from h2.exceptions import ProtocolError

        if kind == "request":
            sender, receiver = self._pair(receiver_client=False)
            sender.send_headers(1, block, end_stream=True)
        else:
            server, client = self._pair(receiver_client=True)
            client.send_headers(1, GET, end_stream=True)
            server.receive_data(client.data_to_send())
            sender, receiver = server, client
            if kind == "response":
                sender.send_headers(1, block, end_stream=block[0] != (b":status", b"103"))
            else:
                sender.send_headers(1, [(b":status", b"200")])
                sender.send_headers(1, block, end_stream=True)
        try:
            receiver.receive_data(sender.data_to_send())
        except ProtocolError:
            return True
        return False

    @staticmethod
    def _ours_refuses(kind: str, block) -> bool:
        from l5dproxy.http.h2.translate import MalformedError, trailers_from_h2

        translate = {"request": request_head_from_h2, "response": response_head_from_h2,
                     "trailers": trailers_from_h2}[kind]
        if kind == "response" and block and block[0] == (b":status", b"103"):
            return False   # an interim response: dropped by the client end, not translated
        try:
            translate(block)
        except MalformedError:
            return True
        return False

    def test_refuses_what_h2_refuses_and_more(self) -> None:
        cases = ([("request", b) for b in self.REQUESTS]
                 + [("response", b) for b in self.RESPONSES]
                 + [("trailers", b) for b in self.TRAILERS])
        refused = stricter = 0
        for kind, block in cases:
            stock = self._stock_refuses(kind, block)
            ours = self._ours_refuses(kind, block)
            refused += stock
            if stock:
                self.assertTrue(ours, (kind, block))
            elif ours:
                # Refused by the proxy only: a rule of RFC 9110's grammar, or
                # CONNECT (answered 405), or a :status h2 does not check.
                values = {x for field in block for x in field}
                self.assertTrue(values & self.STRICTER or (b":method", b"CONNECT") in block
                                or (kind == "response" and block[0][0] == b":status")
                                or kind == "trailers", (kind, block))
                stricter += 1
        self.assertGreater(refused, 25)
        self.assertGreater(stricter, 15)


# -- h2 to an HTTP/1 endpoint, through the dispatcher and the h1 client end ----

class H2ToH1:
    """An h2 client -> H2ServerProtocol -> HttpProxy -> H1Client -> HTTP/1
    endpoints on StringTransports, for what an HTTP/1 endpoint receives."""

    def __init__(self) -> None:
        from l5dproxy.http.h1.pool import H1Client
        from l5dproxy.route.dispatcher import HttpProxy

        self.clock = MemoryReactorClock()
        service = ServiceConfig("app", (HostPort("127.0.0.1", 8080),), protocol="http1",
                                retry_limit=0)
        backends = {"app": BackendSet(service, frozenset(), clock=self.clock)}
        metrics = Metrics()
        self.listener = build_listener(ListenerConfig("inbound", "tcp:0", "app"), DetectConfig(),
                                       backends, metrics, self.clock, log_connections=False)
        proxy = HttpProxy(backends, metrics, self.clock)
        proxy.clients["http1"] = H1Client(self.clock, metrics)
        self.transport = Transport()
        conn = InboundConnection(self.listener.site, self.transport, 0.0, self.listener)
        conn.detected(Verdict("h2", "preface"))
        self.server = H2ServerProtocol(conn, proxy, H2Config(), site(conn.listener))
        self.server.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None,
                                                   **LOOSE))
        self.client.initiate_connection()
        self.events: list = []
        self.endpoints: list[tuple[object, StringTransport]] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(20):
            out = self.client.data_to_send()
            if out:
                self.server.dataReceived(out)
            while len(self.endpoints) < len(self.clock.tcpClients):
                factory = self.clock.tcpClients[len(self.endpoints)][2]
                protocol = factory.buildProtocol(None)
                transport = StringTransport()
                protocol.makeConnection(transport)
                self.endpoints.append((protocol, transport))
            back = self.transport.take()
            if back:
                self.events.extend(self.client.receive_data(back))
            if not out and not back:
                return

    def send(self, headers, data: bytes | None = None, end: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end and data is None)
        if data is not None:
            self.client.send_data(sid, data, end_stream=end)
        self.pump()
        return sid

    def reset_code(self, sid: int):
        codes = [e.error_code for e in self.events
                 if isinstance(e, StreamReset) and e.stream_id == sid]
        return codes[0] if codes else None

    def status(self, sid: int) -> bytes | None:
        for e in self.events:
            if isinstance(e, ResponseReceived) and e.stream_id == sid:
                return dict(e.headers)[b":status"]
        return None

    def upstream_bytes(self) -> list[bytes]:
        return [transport.value() for _, transport in self.endpoints]


def h11_requests(data: bytes) -> list[tuple[bytes, bytes, list, bytes]]:
    """Parse what an HTTP/1 endpoint received with h11, strictly: each
    request's (method, target, fields, body). Raises if h11 refuses it."""
    import h11

    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    out = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            if event is h11.PAUSED and conn.our_state is h11.SEND_RESPONSE:
                conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
                continue
            return out
        if isinstance(event, h11.Request):
            out.append([event.method, event.target, list(event.headers), b""])
        elif isinstance(event, h11.Data):
            out[-1][3] += event.data
        elif isinstance(event, h11.EndOfMessage):
            out[-1] = tuple(out[-1])


class H2ToH1Tests(SynchronousTestCase):
    """What an HTTP/1 endpoint receives from h2 clients."""

    def test_issue_inputs_never_reach_the_endpoint(self) -> None:
        rig = H2ToH1()
        bad = [
            [(b":method", b"GET /admin?"), (b":scheme", b"http"), (b":path", b"/public"),
             (b":authority", b"app.test")],
            [(b":method", b"GET"), (b":scheme", b"http"),
             (b":path", b"http://internal.example/admin"), (b":authority", b"app.test")],
        ]
        for headers in bad:
            sid = rig.send(headers)
            self.assertEqual(rig.reset_code(sid), ErrorCodes.PROTOCOL_ERROR)
        self.assertEqual(rig.upstream_bytes(), [])
        sid = rig.send(GET)
        self.assertEqual(h11_requests(rig.upstream_bytes()[0])[0][:2], (b"GET", b"/a?b=1"))

    def test_content_length_without_data_does_not_desync_the_pool(self) -> None:
        """The issue's input: HEADERS(POST, content-length: 20, END_STREAM) to
        an HTTP/1 service is reset and never sent; the next request on the
        pooled connection is read as a request, not as the POST's body."""
        rig = H2ToH1()
        sid = rig.send(GET)
        protocol, transport = rig.endpoints[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        rig.pump()
        transport.clear()
        bad = rig.send([*POST, (b"content-length", b"20")])
        self.assertEqual(rig.reset_code(bad), ErrorCodes.PROTOCOL_ERROR)
        sid = rig.send(GET)
        self.assertEqual(len(rig.endpoints), 1)   # the pooled connection
        [(method, target, _, body)] = h11_requests(transport.value())
        self.assertEqual((method, target, body), (b"GET", b"/a?b=1", b""))
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        rig.pump()
        self.assertEqual(rig.status(sid), b"200")

    def test_short_body_aborts_its_upstream_connection(self) -> None:
        """DATA short of content-length: the request already on its way is
        aborted with its connection, which is never pooled again."""
        rig = H2ToH1()
        sid = rig.send([*POST, (b"content-length", b"20")], b"only ten b", end=False)
        _, transport = rig.endpoints[0]
        self.assertIn(b"content-length: 20\r\n", transport.value())
        rig.client.send_data(sid, b"", end_stream=True)
        rig.pump()
        self.assertEqual(rig.reset_code(sid), ErrorCodes.PROTOCOL_ERROR)
        self.assertTrue(transport.disconnecting)
        rig.send(GET)
        self.assertEqual(len(rig.endpoints), 2)   # a new connection for the next one

    def test_h1_response_short_of_content_length_resets(self) -> None:
        """An HTTP/1 endpoint's response that closes short of its
        Content-Length: the h2 client gets a reset, never END_STREAM."""
        from twisted.internet.error import ConnectionDone

        rig = H2ToH1()
        sid = rig.send(GET)
        protocol, _ = rig.endpoints[0]
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nfour")
        protocol.connectionLost(Failure(ConnectionDone()))
        rig.pump()
        self.assertEqual(rig.status(sid), b"200")
        self.assertIsNotNone(rig.reset_code(sid))
        self.assertFalse([e for e in rig.events
                          if isinstance(e, StreamEnded) and e.stream_id == sid])

    def test_underscore_field_names_dropped_and_counted(self) -> None:
        """``transfer_encoding``, ``content_length``, ``x_real_ip``: names a
        CGI/WSGI endpoint reads as ``Transfer-Encoding`` etc. never reach
        it (nginx's underscores_in_headers off); the rest of the request does."""
        rig = H2ToH1()
        rig.send([*POST, (b"transfer_encoding", b"chunked"), (b"content_length", b"5"),
                  (b"x_real_ip", b"10.0.0.1"), (b"x-real-ip", b"1.2.3.4")], b"hello")
        [(method, _, fields, body)] = h11_requests(rig.upstream_bytes()[0])
        self.assertEqual((method, body), (b"POST", b"hello"))
        self.assertFalse([n for n, _ in fields if b"_" in n], fields)
        self.assertIn((b"x-real-ip", b"1.2.3.4"), fields)
        self.assertEqual(rig.listener.metrics.registry.get_sample_value(
            "http_errors_total", {"direction": "inbound", "listener": "inbound",
                                  "reason": "underscore in field name"}), 3)

    def test_te_trailers_kept(self) -> None:
        """An h2 gRPC request reaches an HTTP/1 endpoint with TE: trailers,
        named in Connection (RFC 9110 7.6.1, 10.1.4)."""
        rig = H2ToH1()
        rig.send(GRPC, b"\x00\x00\x00\x00\x00")
        data = rig.upstream_bytes()[0]
        [(_, _, fields, body)] = h11_requests(data)
        self.assertIn((b"te", b"trailers"), fields)
        self.assertIn((b"connection", b"te"), fields)
        self.assertEqual(body, b"\x00\x00\x00\x00\x00")


#: Sound parts of an h2 request head, then parts the known smuggling and
#: translation vectors use (request-line injection, absolute-form, CR/LF,
#: NUL, whitespace, uppercase, connection-specific fields, userinfo, ...).
_GOOD = {
    "method": [b"GET", b"POST", b"OPTIONS", b"PUT", b"M-SEARCH", b"DELETE"],
    "path": [b"/", b"/a?b=c", b"//x", b"/%zz", b"/?q=a|b", b"/a/../b"],
    "authority": [b"app.test", b"app.test:8080", b"[::1]:80", b"%41pp", b"h:"],
    "name": [b"x-a", b"accept", b"cookie", b"te", b"content-type", b"x-b"],
    "value": [b"1", b"", b"a\tb", b"trailers", b"\xff", b"text/plain; q=1"],
}
_BAD = [b"GET /admin?", b"G\tT", b"", b"GET\r\n", b"CONNECT", b"g\xc3\xa9t", b"*",
        b"/a b", b"/a#f", b"http://internal.example/admin", b"a", b"/\xff", b"/a\r\nx: y",
        b"u@app", b"a b", b"a/b", b"a\r\nx: y", b"X-A", b"x a", b"x:a", b"connection",
        b"host", b"transfer-encoding", b"content-length", b"upgrade", b"x\xe9", b" 1", b"1 ",
        b"a\r\nb", b"a\nb", b"a\x00b", b"a\x7fb", b"Trailers", b"gzip", b"0", b"app.test",
        b"keep-alive"]


class H2ToH1PropertyTests(SynchronousTestCase):
    """Generated h2 request heads to an HTTP/1 endpoint (sound heads with
    up to three parts replaced by a known vector or random bytes): each is
    either refused (RST_STREAM PROTOCOL_ERROR or a 4xx, nothing upstream)
    or reaches the endpoint as bytes h11 parses into exactly the method,
    target and fields the h2 request carried."""

    def test_refused_or_received_exactly(self) -> None:
        from hypothesis import HealthCheck, given, settings
        from hypothesis import strategies as st

        outcomes = {"refused": 0, "received": 0}
        rig = H2ToH1()   # one client connection and one pool for every example
        part = {k: st.sampled_from(v) for k, v in _GOOD.items()}
        vector = st.one_of(st.sampled_from(_BAD), st.binary(max_size=12))
        slot = st.sampled_from(["method", "path", "authority", "name", "value"])

        @settings(max_examples=300, derandomize=True, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(method=part["method"], path=part["path"], authority=part["authority"],
               fields=st.lists(st.tuples(part["name"], part["value"]), max_size=3),
               mutations=st.lists(st.tuples(slot, vector, st.integers(0, 3)), max_size=3))
        def check(method, path, authority, fields, mutations):
            fields = [list(f) for f in fields]
            for where, value, index in mutations:
                if where == "method":
                    method = value
                elif where == "path":
                    path = value
                elif where == "authority":
                    authority = value
                elif fields:
                    fields[index % len(fields)][where == "value"] = value
                else:
                    fields.append([value, b"1"] if where == "name" else [b"x-v", value])
            fields = [tuple(f) for f in fields]
            for _, transport in rig.endpoints:
                transport.clear()
            headers = [(b":method", method), (b":scheme", b"http"), (b":path", path),
                       (b":authority", authority), *fields]
            sid = rig.send(headers)
            sent = [(p, t.value()) for p, t in rig.endpoints if t.value()]
            if rig.reset_code(sid) is not None or (rig.status(sid) or b"2")[:1] == b"4":
                self.assertEqual(sent, [], headers)
                outcomes["refused"] += 1
                return
            outcomes["received"] += 1
            [(endpoint, data)] = sent
            [(got_method, target, got_fields, body)] = h11_requests(data)
            # Answered, so that the connection goes back to the pool and the
            # next example's request follows on it.
            endpoint.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            rig.pump()
            self.assertEqual(rig.status(sid), b"200")
            self.assertEqual((got_method, target, body), (method, path, b""), headers)
            expected = [(b"host", authority)]
            cookies = []
            for name, value in fields:
                if name == b"cookie":
                    cookies.append(value)
                elif name == b"te":
                    expected.append((b"te", b"trailers"))
                elif name != b"host":
                    expected.append((name, value))
            if cookies:   # crumbs joined (RFC 9113 8.2.3), empty ones dropped
                expected.append((b"cookie", b"; ".join(c for c in cookies if c)))
            if any(n == b"te" for n, _ in fields):
                expected.append((b"connection", b"te"))
            if method in (b"POST", b"PUT", b"PATCH") and b"content-length" not in dict(fields):
                expected.append((b"content-length", b"0"))
            # The client's address, added by the proxy (l5dproxy.route.forwarded).
            expected += [(b"x-forwarded-for", b"127.0.0.1"), (b"x-forwarded-proto", b"http")]
            self.assertEqual(sorted(got_fields), sorted(expected), headers)

        check()
        # Both ways were taken, many times (the figures are stable: derandomized),
        # and every request sent went over the one pooled connection.
        self.assertGreater(outcomes["refused"], 80, outcomes)
        self.assertGreater(outcomes["received"], 80, outcomes)
        self.assertEqual(len(rig.endpoints), 1)
