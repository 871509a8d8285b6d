"""Tests for the libnghttp2 spike (bench/nghttp2_spike.py, issue 16 way in 3):
its sessions against an independent HTTP/2 peer (the ``h2`` library), frames
read back with hyperframe, and the bounded workload the spike measures.

Skipped when cffi or libnghttp2 is missing; under ``CI=true`` a missing
libnghttp2 fails (``.ci/run`` installs ``libnghttp2-14``)."""

from __future__ import annotations

import os

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, WindowUpdateFrame
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from bench import nghttp2_spike
from bench.nghttp2_spike import BODY, REQUEST, RESPONSE, Nghttp2Error, Session
from l5dproxy.http.h2.nghttp2_abi import Nghttp2UnavailableError


def require_nghttp2() -> None:
    try:
        nghttp2_spike.load()
    except Nghttp2UnavailableError as e:
        if "cffi" not in str(e) and os.environ.get("CI") == "true":
            raise AssertionError(f"libnghttp2 is required under CI: {e}") from e
        raise SkipTest(str(e)) from e


def frames(data: bytes) -> list[Frame]:
    """The frames in ``data`` (no connection preface), parsed by hyperframe."""
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def h2_peer(client_side: bool) -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=client_side, header_encoding=None,
                                        validate_outbound_headers=False,
                                        normalize_outbound_headers=False))
    conn.initiate_connection()
    return conn


def connected(session: Session, peer: H2Connection) -> None:
    """Prefaces and SETTINGS / SETTINGS ACK both ways."""
    for _ in range(3):
        session.receive(peer.data_to_send())
        peer.receive_data(session.data_to_send())


class ServerSessionTests(SynchronousTestCase):
    """A server ``Session`` answering the ``h2`` library as client."""

    def setUp(self) -> None:
        require_nghttp2()
        self.server = Session(server=True)
        self.client = h2_peer(client_side=True)
        connected(self.server, self.client)

    def test_request_and_response_on_the_wire(self) -> None:
        """A GET and a POST with a body arrive as head/data/end events with
        the fields as sent; the responses reach h2 as HEADERS without
        END_STREAM and one DATA frame with END_STREAM carrying the body."""
        get = self.client.get_next_available_stream_id()
        self.client.send_headers(get, REQUEST, end_stream=True)
        post = self.client.get_next_available_stream_id()
        post_head = [(b":method", b"POST"), (b":scheme", b"http"),
                     (b":authority", b"example.test"), (b":path", b"/upload"),
                     (b"content-length", b"11"), (b"x-trace", b"a b")]
        self.client.send_headers(post, post_head)
        self.client.send_data(post, b"hello world", end_stream=True)
        events = self.server.receive(self.client.data_to_send())
        self.assertEqual(events, [
            ("head", get, REQUEST, True), ("end", get),
            ("head", post, post_head, False), ("data", post, b"hello world"), ("end", post)])

        self.server.submit_response(get, RESPONSE, BODY)
        self.server.submit_response(post, [(b":status", b"201")])
        out = self.server.data_to_send()
        kinds = [(type(f).__name__, f.stream_id, sorted(f.flags)) for f in frames(out)]
        self.assertEqual(kinds, [
            ("HeadersFrame", get, ["END_HEADERS"]),
            ("HeadersFrame", post, ["END_HEADERS", "END_STREAM"]),
            ("DataFrame", get, ["END_STREAM"]),
        ])
        self.assertEqual(frames(out)[2].data, BODY)

        got = self.client.receive_data(out)
        responses = {e.stream_id: e.headers for e in got if isinstance(e, ResponseReceived)}
        self.assertEqual(responses, {get: RESPONSE, post: [(b":status", b"201")]})
        self.assertEqual([(e.stream_id, e.data) for e in got if isinstance(e, DataReceived)],
                         [(get, BODY)])
        self.assertEqual(sorted(e.stream_id for e in got if isinstance(e, StreamEnded)),
                         [get, post])
        # Both streams closed as their last frames were sent; reported next.
        self.assertEqual(self.server.receive(self.client.data_to_send()),
                         [("close", post, 0), ("close", get, 0)])

    def test_malformed_request_is_reset(self) -> None:
        """A connection-specific field in a request (RFC 9113 8.2.2) is a
        malformed request: nghttp2 resets the stream (PROTOCOL_ERROR), the
        connection and the next request carry on."""
        bad = self.client.get_next_available_stream_id()
        self.client.send_headers(bad, [*REQUEST, (b"connection", b"keep-alive")],
                                 end_stream=True)
        self.assertEqual(self.server.receive(self.client.data_to_send()), [])
        resets = [e for e in self.client.receive_data(self.server.data_to_send())
                  if isinstance(e, StreamReset)]
        self.assertEqual([(e.stream_id, e.error_code) for e in resets], [(bad, 1)])
        good = self.client.get_next_available_stream_id()
        self.client.send_headers(good, REQUEST, end_stream=True)
        self.assertEqual(self.server.receive(self.client.data_to_send()),
                         [("close", bad, 1), ("head", good, REQUEST, True), ("end", good)])
        self.assertTrue(self.server.open)

    def test_connection_error_ends_the_session(self) -> None:
        """A CONTINUATION with no HEADERS before it is a connection error
        (RFC 9113 6.10): a GOAWAY(PROTOCOL_ERROR) is queued and the session
        is no longer open."""
        self.assertTrue(self.server.open)
        self.server.receive(b"\x00\x00\x01\x09\x04\x00\x00\x00\x01x")
        goaways = [(f.error_code, f.last_stream_id) for f in frames(self.server.data_to_send())
                   if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaways, [(1, 0)])
        self.assertFalse(self.server.open)

    def test_no_preface_raises(self) -> None:
        """A client that does not start with the connection preface
        (RFC 9113 3.4) is a fatal error: receive raises."""
        with self.assertRaises(Nghttp2Error):
            Session(server=True).receive(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")

    def test_callback_error_is_raised_with_its_cause(self) -> None:
        """An exception inside a Python callback (here the data provider,
        whose body was taken away) fails the connection and is chained to the
        Nghttp2Error raised."""
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, REQUEST, end_stream=True)
        self.server.receive(self.client.data_to_send())
        self.server.submit_response(sid, RESPONSE, BODY)
        self.server._out.clear()
        with self.assertRaises(Nghttp2Error) as caught:
            self.server.data_to_send()
        self.assertIsInstance(caught.exception.__cause__, KeyError)


class ClientSessionTests(SynchronousTestCase):
    """A client ``Session`` talking to the ``h2`` library as server."""

    def setUp(self) -> None:
        require_nghttp2()
        self.client = Session(server=False)
        self.server = h2_peer(client_side=False)
        out = self.client.data_to_send()
        self.assertTrue(out.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
        self.server.receive_data(out)
        connected(self.client, self.server)

    def test_request_with_body_and_response(self) -> None:
        sid = self.client.submit_request(
            [(b":method", b"PUT"), (b":scheme", b"http"), (b":authority", b"a"),
             (b":path", b"/x")], b"0123456789" * 2000)
        self.assertEqual(sid, 1)
        got = self.server.receive_data(self.client.data_to_send())
        heads = [e.headers for e in got if isinstance(e, RequestReceived)]
        self.assertEqual(heads, [[(b":method", b"PUT"), (b":scheme", b"http"),
                                  (b":authority", b"a"), (b":path", b"/x")]])
        body = b"".join(e.data for e in got if isinstance(e, DataReceived))
        self.assertEqual(body, b"0123456789" * 2000)
        self.assertTrue(any(isinstance(e, StreamEnded) for e in got))

        self.server.send_headers(sid, [(b":status", b"200"), (b"grpc-status", b"0")])
        self.server.send_data(sid, b"ok")
        self.server.send_headers(sid, [(b"x-trailer", b"t")], end_stream=True)
        events = self.client.receive(self.server.data_to_send())
        self.assertEqual(events, [
            ("head", sid, [(b":status", b"200"), (b"grpc-status", b"0")], False),
            ("data", sid, b"ok"),
            ("head", sid, [(b"x-trailer", b"t")], True), ("end", sid),
            ("close", sid, 0)])

    def test_windows_given_back_only_when_consumed(self) -> None:
        """Automatic WINDOW_UPDATEs are off: 40,000 bytes received and not
        consumed send none; consumed, one for the stream and one for the
        connection (past half the 65,535-byte windows)."""
        sid = self.client.submit_request(REQUEST)
        self.server.receive_data(self.client.data_to_send())
        self.server.send_headers(sid, [(b":status", b"200")])
        self.server.send_data(sid, b"x" * 16000)
        self.server.send_data(sid, b"y" * 16000)
        self.server.send_data(sid, b"z" * 8000)
        events = self.client.receive(self.server.data_to_send())
        received = sum(len(e[2]) for e in events if e[0] == "data")
        self.assertEqual(received, 40000)
        self.assertEqual(self.client.data_to_send(), b"")
        self.client.consume(sid, received)
        updates = [(f.stream_id, f.window_increment)
                   for f in frames(self.client.data_to_send())
                   if isinstance(f, WindowUpdateFrame)]
        self.assertEqual(sorted(updates), [(0, 40000), (sid, 40000)])

    def test_reset(self) -> None:
        sid = self.client.submit_request(REQUEST)
        self.server.receive_data(self.client.data_to_send())
        self.client.reset(sid, 8)  # CANCEL
        got = self.server.receive_data(self.client.data_to_send())
        self.assertEqual([(e.stream_id, e.error_code) for e in got
                          if isinstance(e, StreamReset)], [(sid, 8)])


class WorkloadTests(SynchronousTestCase):
    """The bounded workloads the spike compares, on both libraries."""

    def test_nghttp2_workload(self) -> None:
        require_nghttp2()
        cpu, done, received = nghttp2_spike.nghttp2_workload(300, inflight=10)
        self.assertEqual((done, received), (300, 300 * len(BODY)))
        self.assertGreater(cpu, 0.0)

    def test_h2_workload(self) -> None:
        _cpu, done, received = nghttp2_spike.h2_workload(300, inflight=10)
        self.assertEqual((done, received), (300, 300 * len(BODY)))

    def test_post_workloads(self) -> None:
        """POSTs with a body: the servers consume the request bodies."""
        require_nghttp2()
        for workload in (nghttp2_spike.nghttp2_workload, nghttp2_spike.h2_workload):
            _cpu, done, received = workload(200, inflight=10, post=True)
            self.assertEqual((done, received), (200, 200 * len(BODY)))

    def test_compare_interleaves_and_checks(self) -> None:
        require_nghttp2()
        runs = nghttp2_spike.compare(100, repetitions=2)
        self.assertEqual({k: len(v) for k, v in runs.items()}, {"h2": 2, "nghttp2": 2})
        self.assertTrue(all(v > 0 for values in runs.values() for v in values))


class FrameFixtureTests(SynchronousTestCase):
    """The frame reader the tests above rely on."""

    def test_frames(self) -> None:
        data = (HeadersFrame(1, data=b"\x88", flags=["END_HEADERS"]).serialize()
                + DataFrame(1, data=b"ab", flags=["END_STREAM"]).serialize())
        parsed = frames(data)
        self.assertEqual([type(f) for f in parsed], [HeadersFrame, DataFrame])
        self.assertEqual(parsed[1].data, b"ab")
