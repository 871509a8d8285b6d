"""The h2 ends against peers that make them work for nothing (issue 11, kind 1).

A real h2 ``H2Connection`` (or raw hyperframe frames) plays the peer, the end
under test sits on a ``StringTransport``; what is asserted is on the wire
(the GOAWAY and its code, RST_STREAM, the close) and in the metrics.
"""

from __future__ import annotations

import dataclasses
import tomllib

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import (
    DataFrame,
    GoAwayFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.config.model import H2Config, HttpConfig
from l5dproxy.config.parse import ConfigError, parse
from l5dproxy.detect.sniff import Verdict
from l5dproxy.exchange.message import Body, ProxyError, Request, RequestHead, Response, ResponseHead
from l5dproxy.http.h2.pool import H2Client
from l5dproxy.http.h2.server import H2ServerProtocol
from l5dproxy.net.connection import InboundConnection
from l5dproxy.net.writebound import WriteBound
from l5dproxy.telemetry import Metrics
from tests.fakes import Endpoint, FakeDispatcher, Transport, make_listener, send, site
from tests.test_h2 import GET, raw_frames

#: Twisted reads at most this much per dataReceived.
READ = 65536


def goaways(frames) -> list[GoAwayFrame]:
    return [f for f in frames if isinstance(f, GoAwayFrame)]


def samples(metrics: Metrics, name: str) -> dict[str, float]:
    out = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            if sample.name == name:
                out[sample.labels.get("kind", "")] = sample.value
    return out


class ServerAbuseTests(SynchronousTestCase):
    settings = H2Config(max_concurrent_streams=100, abuse_budget=500,
                          abuse_refill_per_second=100.0)

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.listener = make_listener(self.clock)
        self.dispatcher = FakeDispatcher()
        self.transport = Transport()
        conn = InboundConnection(self.listener.site, self.transport, 0.0, self.listener)
        conn.detected(Verdict("h2", "preface"))
        self.server = H2ServerProtocol(conn, self.dispatcher, self.settings, site(conn.listener))
        self.server.makeConnection(self.transport)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        self.feed(self.client.data_to_send())
        self.transport.clear()

    def feed(self, data: bytes) -> list:
        """``data`` to the server as Twisted would read it; the frames written back."""
        for i in range(0, len(data), READ):
            if self.transport.disconnecting:
                break
            self.server.dataReceived(data[i:i + READ])
        return raw_frames(self.transport.take())

    def assert_calmed(self, frames, kind: str) -> None:
        [goaway] = goaways(frames)
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(samples(self.listener.metrics, "h2_abuse_total"), {kind: 1.0})
        self.assertEqual(self.server.streams, {})

    def test_rapid_reset_is_cut_off(self) -> None:
        """CVE-2023-44487: 20,000 x (HEADERS GET END_STREAM + RST_STREAM
        CANCEL). Before: every request dispatched and cancelled, the
        connection never closed. After: GOAWAY(ENHANCE_YOUR_CALM) once the
        budget (500) is spent; no more than that was dispatched."""
        for _ in range(20_000):
            sid = self.client.get_next_available_stream_id()
            self.client.send_headers(sid, GET, end_stream=True)
            self.client.reset_stream(sid, ErrorCodes.CANCEL)
        frames = self.feed(self.client.data_to_send())
        self.assert_calmed(frames, "reset")
        self.assertLessEqual(len(self.dispatcher.calls), 501)
        self.assertEqual(len(self.dispatcher.cancelled), len(self.dispatcher.calls))
        # The GOAWAY names the last stream the server looked at, not 2**31-1.
        self.assertLess(goaways(frames)[0].last_stream_id, 2 * 20_000)

    def test_refused_streams_are_cut_off(self) -> None:
        """Streams opened past MAX_CONCURRENT_STREAMS are refused, and count."""
        self.client.remote_settings.max_concurrent_streams = 2**31 - 1
        for _ in range(700):
            self.client.send_headers(self.client.get_next_available_stream_id(), GET,
                                     end_stream=True)
        frames = self.feed(self.client.data_to_send())
        self.assert_calmed(frames, "refused")
        self.assertEqual(len(self.dispatcher.calls), 100)

    def flood(self, frame_of, count: int = 2000) -> list:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [(b":method", b"POST"), *GET[1:]])
        data = self.client.data_to_send()
        for i in range(count):
            data += frame_of(sid, i).serialize()
        return self.feed(data)

    def test_ping_flood_is_cut_off(self) -> None:
        frames = self.flood(lambda sid, i: PingFrame(0, opaque_data=i.to_bytes(8, "big")))
        self.assert_calmed(frames, "ping")

    def test_settings_flood_is_cut_off(self) -> None:
        frames = self.flood(lambda sid, i: SettingsFrame(0, settings={0x4: 65535}))
        self.assert_calmed(frames, "settings")

    def test_priority_flood_is_cut_off(self) -> None:
        frames = self.flood(lambda sid, i: PriorityFrame(sid + 2, depends_on=sid,
                                                         stream_weight=i % 256))
        self.assert_calmed(frames, "priority")

    def test_empty_data_flood_is_cut_off(self) -> None:
        frames = self.flood(lambda sid, i: DataFrame(sid, data=b""))
        self.assert_calmed(frames, "empty_data")

    def test_window_update_on_closed_stream_is_cut_off(self) -> None:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, GET, end_stream=True)
        self.feed(self.client.data_to_send())
        self.dispatcher.calls[0][2].callback(Response(ResponseHead(200, []), Body.empty()))
        self.transport.clear()
        data = b"".join(WindowUpdateFrame(sid, window_increment=1).serialize()
                        for _ in range(2000))
        frames = self.feed(data)
        self.assert_calmed(frames, "no_effect")

    def made_you_reset(self, violation, post: bool = True, count: int = 3000) -> list:
        """MadeYouReset (CVE-2025-8671): each stream is dispatched first (its
        own read), then the client sends ``violation(sid)``, bytes that make
        the *proxy* reset the stream (a stream error the peer caused)."""
        frames = []
        for _ in range(count):
            if self.transport.disconnecting:
                break
            sid = self.client.get_next_available_stream_id()
            if post:
                self.client.send_headers(sid, [(b":method", b"POST"), *GET[1:],
                                               (b"content-length", b"1")])
            else:
                self.client.send_headers(sid, GET, end_stream=True)
            frames += self.feed(self.client.data_to_send())   # dispatched first
            frames += self.feed(violation(sid))               # then the stream error
        return frames

    def assert_made_you_reset_cut_off(self, frames) -> None:
        self.assert_calmed(frames, "reset")
        self.assertLessEqual(len(self.dispatcher.calls), 501)
        self.assertEqual(len(self.dispatcher.cancelled), len(self.dispatcher.calls))

    def test_data_past_content_length_is_cut_off(self) -> None:
        """content-length: 1, then DATA "xy": RST_STREAM(PROTOCOL_ERROR) by
        the proxy each time. Before: 3,000 streams dispatched, no GOAWAY."""
        frames = self.made_you_reset(lambda sid: DataFrame(sid, data=b"xy").serialize())
        self.assertTrue(any(isinstance(f, RstStreamFrame) and f.error_code ==
                            ErrorCodes.PROTOCOL_ERROR for f in frames))
        self.assert_made_you_reset_cut_off(frames)

    def test_end_short_of_content_length_is_cut_off(self) -> None:
        """content-length: 1, then an empty DATA with END_STREAM."""
        frames = self.made_you_reset(
            lambda sid: DataFrame(sid, data=b"", flags=["END_STREAM"]).serialize())
        self.assert_made_you_reset_cut_off(frames)

    def test_malformed_trailers_are_cut_off(self) -> None:
        """A trailer section with a pseudo-header field (RFC 9113 8.1.1)."""
        self.client.config.validate_outbound_headers = False
        self.client.config.normalize_outbound_headers = False

        def violation(sid: int) -> bytes:
            self.client.send_data(sid, b"x")
            self.client.send_headers(sid, [(b":path", b"/x")], end_stream=True)
            return self.client.data_to_send()
        frames = self.made_you_reset(violation)
        self.assert_made_you_reset_cut_off(frames)

    def test_stream_window_overflow_is_cut_off(self) -> None:
        """WINDOW_UPDATE past 2**31-1 on a stream: h2 resets it (FLOW_CONTROL_ERROR)."""
        frames = self.made_you_reset(
            lambda sid: WindowUpdateFrame(sid, window_increment=2**31 - 1).serialize(),
            post=False)
        self.assert_made_you_reset_cut_off(frames)

    def test_honest_client_with_resets_is_served(self) -> None:
        """A client that completes at least half of its streams may reset the
        rest (cancellations, deadlines), at any volume, and PING now and then."""
        for n in range(1200):   # 600 resets: more than the budget (500)
            sid = self.client.get_next_available_stream_id()
            self.client.send_headers(sid, GET, end_stream=True)
            self.feed(self.client.data_to_send())
            if n % 2:
                self.client.reset_stream(sid, ErrorCodes.CANCEL)
            else:
                self.dispatcher.calls[-1][2].callback(
                    Response(ResponseHead(200, []), Body.empty()))
            if n % 10 == 0:
                self.client.ping(n.to_bytes(8, "big"))
            frames = self.feed(self.client.data_to_send())
            self.client.receive_data(b"".join(f.serialize() for f in frames))
            self.assertEqual(goaways(frames), [])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(len(self.dispatcher.calls), 1200)
        self.assertEqual(samples(self.listener.metrics, "h2_abuse_total"), {})

    def test_budget_refills_with_time(self) -> None:
        """400 PINGs, 5 s, 400 PINGs: within 100 a second, never cut off."""
        for _ in range(2):
            frames = self.feed(b"".join(PingFrame(0).serialize() for _ in range(400)))
            self.assertEqual(goaways(frames), [])
            self.assertEqual(len([f for f in frames if isinstance(f, PingFrame)]), 400)
            self.clock.advance(5)
        self.assertFalse(self.transport.disconnecting)

    def test_budget_from_config(self) -> None:
        """``[h2] abuse_budget`` is the size: 10 resets pass, the 11th does not."""
        self.server.budget.size = self.server.budget.points = 10
        for _ in range(11):
            sid = self.client.get_next_available_stream_id()
            self.client.send_headers(sid, GET, end_stream=True)
            self.client.reset_stream(sid, ErrorCodes.CANCEL)
        frames = self.feed(self.client.data_to_send())
        self.assert_calmed(frames, "reset")
        self.assertEqual(len(self.dispatcher.calls), 11)


class ClientAbuseTests(SynchronousTestCase):
    """A misbehaving endpoint: the client end applies the same budget."""

    def test_endpoint_ping_flood_is_cut_off(self) -> None:
        reactor = MemoryReactorClock()
        metrics = Metrics()
        client = H2Client(reactor, settings=H2Config(abuse_budget=100), metrics=metrics)
        head = RequestHead(b"GET", b"/x", b"svc.test", [])
        d = send(client, Endpoint(), Request(head, Body.empty()))
        _host, _port, factory, _timeout, _ = reactor.tcpClients[0]
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        server.initiate_connection()
        protocol.dataReceived(server.data_to_send())
        server.receive_data(transport.take())
        flood = b"".join(PingFrame(0).serialize() for _ in range(300))
        protocol.dataReceived(server.data_to_send() + flood)
        [goaway] = goaways(raw_frames(transport.take()))
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(transport.disconnecting)
        failure = self.failureResultOf(d, ProxyError)
        self.assertEqual(failure.value.status, 502)
        self.assertEqual(samples(metrics, "h2_abuse_total"), {"ping": 1.0})



class ConfigTests(SynchronousTestCase):
    BASE = ('[[listener]]\nname = "in"\nlisten = "tcp:0"\nservice = "app"\n'
            '[service.app]\nendpoints = ["127.0.0.1:1"]\n')

    def test_abuse_keys(self) -> None:
        c = parse(tomllib.loads(self.BASE + "[h2]\nabuse_budget = 20\n"
                                "abuse_refill_per_second = 2.5\n"), "f.toml")
        settings = H2Config(**dataclasses.asdict(c.h2))
        self.assertEqual((settings.abuse_budget, settings.abuse_refill_per_second), (20, 2.5))
        defaults = parse(tomllib.loads(self.BASE), "f.toml").h2
        self.assertEqual((defaults.abuse_budget, defaults.abuse_refill_per_second), (500, 100.0))

    def test_bad_abuse_keys(self) -> None:
        for text, reason in (("abuse_budget = 0", "between 1"),
                             ("abuse_refill_per_second = -1", "0 or more"),
                             ("abuse_budget = 1.5", "expected")):
            with self.assertRaises(ConfigError) as caught:
                parse(tomllib.loads(self.BASE + "[h2]\n" + text + "\n"), "f.toml")
            self.assertIn(reason, " ".join(caught.exception.errors))


class WriteBoundTests(SynchronousTestCase):
    """Kind 2: replies queued to a peer that does not read (l5dproxy.net.writebound)."""

    def test_bound_alone(self) -> None:
        calls: list[str] = []
        bound = WriteBound(lambda: calls.append("pause"), lambda: calls.append("resume"),
                           lambda: calls.append("overflow"), limit=100)
        bound.wrote(1000)            # not full: nothing counts
        bound.full()
        bound.full()
        bound.wrote(60)
        bound.drained()              # emptied: reading again, count reset
        bound.full()
        bound.wrote(60)
        self.assertEqual(calls, ["pause", "resume", "pause"])
        bound.wrote(41)
        bound.wrote(500)
        bound.drained()              # crossed: never read again
        self.assertEqual(calls, ["pause", "resume", "pause", "overflow"])

    def server(self, budget: int = 2**31 - 1):
        clock = MemoryReactorClock()
        listener = make_listener(clock)
        transport = Transport()
        conn = InboundConnection(listener.site, transport, 0.0, listener)
        conn.detected(Verdict("h2", "preface"))
        dispatcher = FakeDispatcher()
        server = H2ServerProtocol(conn, dispatcher, H2Config(abuse_budget=budget),
                                  site(conn.listener))
        server.makeConnection(transport)
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        client.initiate_connection()
        server.dataReceived(client.data_to_send())
        transport.clear()
        return server, transport, listener, dispatcher, client

    def test_h2_server_stops_reading_while_its_buffer_is_full(self) -> None:
        server, transport, _, _, _ = self.server()
        server.pauseProducing()     # what Twisted does past its bufferSize (64 KiB)
        self.assertEqual(transport.producerState, "paused")
        server.resumeProducing()    # the buffer drained
        self.assertEqual(transport.producerState, "producing")

    def test_h2_server_closes_past_the_hard_bound(self) -> None:
        """PINGs already read are answered while reading is paused: past the
        hard bound the connection is aborted and counted."""
        server, transport, listener, _, _ = self.server()
        server._bound.limit = 17 * 1000
        server.pauseProducing()
        server.dataReceived(b"".join(PingFrame(0).serialize() for _ in range(999)))
        self.assertFalse(transport.disconnecting)
        server.dataReceived(PingFrame(0).serialize() * 2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(samples(listener.metrics, "h2_abuse_total"), {"write_buffer": 1.0})

    def test_h2_server_bound_counts_response_headers(self) -> None:
        """Response heads keep coming from upstream while the client does not
        read (nothing it sends is read): they count, and past the hard bound
        the connection is aborted, with no more than the bound and one head
        written meanwhile."""
        server, transport, listener, dispatcher, client = self.server()
        for _ in range(16):
            client.send_headers(client.get_next_available_stream_id(), GET, end_stream=True)
        server.dataReceived(client.data_to_send())
        transport.clear()
        server._bound.limit = 200_000
        server.pauseProducing()
        big = [(b"x-big-%d" % i, b"v" * 16000) for i in range(2)]
        for _, _, d in dispatcher.calls:
            if transport.disconnecting:
                break
            d.callback(Response(ResponseHead(200, big), Body()))
        self.assertTrue(transport.disconnecting)
        self.assertLessEqual(len(transport.value()), 200_000 + 33_000)
        self.assertEqual(samples(listener.metrics, "h2_abuse_total"), {"write_buffer": 1.0})

    def test_h1_server_stops_reading_and_closes_past_the_hard_bound(self) -> None:
        from l5dproxy.http.h1.server import H1Server

        clock = MemoryReactorClock()
        listener = make_listener(clock)
        transport = Transport()
        conn = InboundConnection(listener.site, transport, 0.0, listener)
        conn.detected(Verdict("http1", "request line"))
        dispatcher = FakeDispatcher()
        server = H1Server(conn, dispatcher, HttpConfig(), site(conn.listener))
        server.makeConnection(transport)
        server.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        server.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        server._bound.limit = 10_000
        server.pauseProducing()
        server.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 4)
        for _ in range(4):
            if transport.disconnecting or not dispatcher.calls:
                break
            _, _, d = dispatcher.calls.pop(0)
            body = Body()
            d.callback(Response(ResponseHead(200, [(b"content-length", b"6000")]), body))
            body.write(b"r" * 6000)
            body.finish()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(listener.metrics.http_errors_total.labels(
            "inbound", listener.name, "write buffer limit")._value.get(), 1)
