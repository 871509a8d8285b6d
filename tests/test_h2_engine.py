"""``[h2] engine``: the codec engines behind ``codec.H2Codec``, picked and compared.

The rest of the h2 suite (test_h2, test_h2_abuse, test_e2e_h2,
test_e2e_h2_abuse) runs against whichever engine ``[h2] engine`` or
``$L5DPROXY_H2_ENGINE`` names; CI runs it once per engine (README's test
command). Here: the key, how it resolves, the start-up refusal, and a
differential test that feeds the same requests and responses through the
server end on both engines and compares what each side receives.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from unittest import mock

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.app.service import ProxyService
from l5dproxy.config.model import H2Config
from l5dproxy.config.parse import ConfigError, parse
from l5dproxy.detect.sniff import Verdict
from l5dproxy.exchange.message import Body, Response, ResponseHead
from l5dproxy.http.h2 import codec, nghttp2_abi
from l5dproxy.http.h2.server import H2ServerProtocol
from l5dproxy.net.connection import InboundConnection
from tests.fakes import FakeDispatcher, Transport, make_listener, site

BASE = ('[[listener]]\nname = "in"\nlisten = "tcp:0"\nservice = "app"\n'
        '[service.app]\nendpoints = ["127.0.0.1:1"]\n')


def unavailable():
    raise nghttp2_abi.Nghttp2UnavailableError("libnghttp2 not found (test)")


class EngineKeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        # Resolved names are cached per process; these tests change what loads.
        self.patch(codec, "_resolved", {})
        env = mock.patch.dict(os.environ)
        env.start()
        self.addCleanup(env.stop)
        os.environ.pop(codec.ENGINE_ENV, None)

    def test_key_parsed_default_auto(self) -> None:
        self.assertEqual(parse(tomllib.loads(BASE), "f.toml").h2.engine, "auto")
        for name in ("auto", "nghttp2", "h2"):
            config = parse(tomllib.loads(BASE + f'[h2]\nengine = "{name}"\n'), "f.toml")
            self.assertEqual(config.h2.engine, name)

    def test_bad_key_fails_with_key_and_reason(self) -> None:
        for text, reason in (('"c"', "must be one of auto, nghttp2, h2"), ("1", "expected")):
            with self.assertRaises(ConfigError) as caught:
                parse(tomllib.loads(BASE + f"[h2]\nengine = {text}\n"), "f.toml")
            line = " ".join(caught.exception.errors)
            self.assertIn("engine", line)
            self.assertIn(reason, line)

    def test_resolution(self) -> None:
        """h2 is h2; auto is nghttp2 where libnghttp2 loads (CI installs it),
        else h2; nghttp2 where it does not load is an error naming what is
        missing; the environment variable overrides the key."""
        self.assertEqual(codec.resolve_engine("h2"), "h2")
        self.assertEqual(codec.resolve_engine("nghttp2"), "nghttp2")
        self.assertEqual(codec.resolve_engine("auto"), "nghttp2")
        with self.assertRaises(ValueError):
            codec.resolve_engine("c")
        self.patch(codec, "_resolved", {})
        self.patch(nghttp2_abi, "load", unavailable)
        self.assertEqual(codec.resolve_engine("auto"), "h2")
        with self.assertRaises(nghttp2_abi.Nghttp2UnavailableError) as caught:
            codec.resolve_engine("nghttp2")
        self.assertIn("libnghttp2 not found", str(caught.exception))
        os.environ[codec.ENGINE_ENV] = "h2"
        self.assertEqual(codec.resolve_engine("nghttp2"), "h2")

    def test_codecs_of_each_engine(self) -> None:
        from l5dproxy.http.h2.connection import ProxyH2Connection
        from l5dproxy.http.h2.nghttp2 import Nghttp2Codec

        for name, cls in (("h2", ProxyH2Connection), ("nghttp2", Nghttp2Codec)):
            s = H2Config(engine=name)
            self.assertIsInstance(codec.server_codec(s), cls)
            self.assertIsInstance(codec.client_codec(s), cls)

    def test_start_refused_where_nghttp2_does_not_load(self) -> None:
        config = parse(tomllib.loads(BASE + '[h2]\nengine = "nghttp2"\n'), "f.toml")
        self.patch(nghttp2_abi, "load", unavailable)
        with self.assertRaises(SystemExit) as caught:
            ProxyService(config, MemoryReactorClock())
        self.assertEqual(str(caught.exception.code),
                         "l5dproxy: f.toml: [h2] engine: libnghttp2 not found (test)")
        auto = dataclasses.replace(config, h2=dataclasses.replace(config.h2, engine="auto"))
        self.assertEqual(ProxyService(auto, MemoryReactorClock()).h2_engine, "h2")


# -- differential: the same exchanges through the server end on each engine ---

GET = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/p"),
       (b":authority", b"svc.test")]

names = st.binary(min_size=1, max_size=8).map(
    lambda b: b"x-" + bytes(97 + c % 26 for c in b))
values = st.binary(max_size=40).map(lambda b: bytes(32 + c % 95 for c in b).strip())
fields = st.lists(st.tuples(names, values), max_size=6)
chunks = st.lists(st.integers(min_value=0, max_value=40_000), max_size=4)
#: How many bytes each read of the server end gets (0: whatever was sent).
reads = st.sampled_from([0, 0, 1, 7, 10, 100, 4096])
#: True: the response comes, whole and at once, while the request is still
#: open (the server end then resets the stream, NO_ERROR, RFC 9113 8.1).
early = st.booleans()
exchanges = st.tuples(fields, chunks, fields, fields, chunks, fields, reads, early)


def run(engine: str, exchange) -> dict:
    """One request and its response through an ``H2ServerProtocol`` on
    ``engine``, an h2 client as the peer; what the dispatcher got and
    what the client got."""
    (req_fields, req_chunks, req_trailers, resp_fields, resp_chunks, resp_trailers,
     read, early) = exchange
    if early:
        req_trailers = []
    clock = MemoryReactorClock()
    listener = make_listener(clock)
    dispatcher = FakeDispatcher()
    transport = Transport()
    conn = InboundConnection(listener.site, transport, 0.0, listener)
    conn.detected(Verdict("h2", "preface"))
    server = H2ServerProtocol(conn, dispatcher, H2Config(engine=engine), site(conn.listener))
    server.makeConnection(transport)
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    events: list = []

    def pump() -> None:
        for _ in range(200):
            out = client.data_to_send()
            for i in range(0, len(out), read or len(out) or 1):
                server.dataReceived(out[i:i + (read or len(out))])
            back = transport.take()
            for e in client.receive_data(back) if back else ():
                events.append(e)
                if isinstance(e, DataReceived):
                    client.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            clock.advance(0)
            if not out and not back:
                return

    pump()
    sid = client.get_next_available_stream_id()
    body_out = b"".join(bytes([65 + i]) * n for i, n in enumerate(req_chunks))
    client.send_headers(sid, GET + req_fields,
                        end_stream=not body_out and not req_trailers and not early)
    sent = 0
    while sent < len(body_out):
        window = min(client.local_flow_control_window(sid), client.max_outbound_frame_size)
        if window:
            n = min(window, len(body_out) - sent)
            client.send_data(sid, body_out[sent:sent + n],
                             end_stream=sent + n == len(body_out) and not req_trailers
                             and not early)
            sent += n
        pump()
    if req_trailers:
        client.send_headers(sid, req_trailers, end_stream=True)
    pump()
    [(request, _, d)] = dispatcher.calls
    got = bytearray()
    trailers: list = []

    class Sink:
        def body_data(self, data):
            got.extend(data)

        def body_end(self, fields):
            got.extend(b"|end")
            trailers.append(fields)

        def body_error(self, reason):
            got.extend(b"|error")

    request.body.consume(Sink())
    pump()
    body = Body()
    if early:   # whole at once (a load-shed answer, a small error response)
        for i, n in enumerate(resp_chunks):
            body.write(bytes([97 + i]) * n)
        body.finish(list(resp_trailers) or None)
        d.callback(Response(ResponseHead(200, list(resp_fields)), body))
    else:
        d.callback(Response(ResponseHead(200, list(resp_fields)), body))
        for i, n in enumerate(resp_chunks):
            body.write(bytes([97 + i]) * n)
            pump()
        body.finish(list(resp_trailers) or None)
    pump()
    heads = [e.headers for e in events if isinstance(e, ResponseReceived)]
    return {
        "request": (request.head.method, request.head.target, request.head.headers,
                    bytes(got), trailers),
        "response": (heads,
                     b"".join(e.data for e in events if isinstance(e, DataReceived)),
                     [e.headers for e in events if isinstance(e, TrailersReceived)],
                     [e.stream_id for e in events if isinstance(e, StreamEnded)],
                     [type(e).__name__ for e in events if getattr(e, "stream_id", 0) == sid]),
        "open": (server.streams, transport.disconnecting),
        # What the abuse budget was told of: the peer's SETTINGS only.
        "budget": server.budget.spent,
    }


class DifferentialTests(SynchronousTestCase):
    @settings(max_examples=40, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(exchanges)
    def test_both_engines_deliver_the_same(self, exchange) -> None:
        """Reads of any size (frames cut anywhere), request header fields,
        bodies in chunks (responses past the client's windows), trailer
        sections both ways, a response while the request is still open:
        what the dispatcher receives and what the
        client receives (head, body bytes, trailers, the end) and what the
        abuse budget is told are the same on nghttp2 as on h2, and both ends
        forget the stream."""
        h2 = run("h2", exchange)
        self.assertEqual(run("nghttp2", exchange), h2)
        self.assertEqual(h2["open"], ({}, False))
        self.assertEqual(h2["budget"], {"settings": 1})
        self.assertEqual(h2["request"][3].endswith(b"|end"), not exchange[-1])
        if exchange[-1]:   # the response, whole, then RST_STREAM(NO_ERROR)
            self.assertEqual(h2["response"][4][-2:], ["StreamEnded", "StreamReset"])
        self.assertEqual(len(h2["response"][3]), 1)


class CodecOrderTests(SynchronousTestCase):
    def test_reset_after_a_response_keeps_the_response(self) -> None:
        """A response ending the stream, then RST_STREAM(NO_ERROR) for the
        request still open (a load-shed answer, tests.test_e2e_limits):
        the peer gets the response first on both engines (nghttp2 alone
        would send its RST_STREAM first and drop the response)."""
        for engine in ("h2", "nghttp2"):
            server = codec.server_codec(H2Config(engine=engine))
            client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
            client.initiate_connection()
            server.receive_data(client.data_to_send())
            client.receive_data(server.data_to_send())
            client.send_headers(1, GET)
            client.send_data(1, b"xx")
            server.receive_data(client.data_to_send())
            server.send_headers(1, [(b":status", b"200")], end_stream=True)
            server.reset_stream(1, ErrorCodes.NO_ERROR)
            events = client.receive_data(server.data_to_send())
            self.assertEqual([type(e).__name__ for e in events],
                             ["ResponseReceived", "StreamEnded", "StreamReset"], engine)
            self.assertEqual(events[-1].error_code, ErrorCodes.NO_ERROR)


# -- a strict peer: the client codec's resets mid-flight never break it ------

#: (what, a number picking a stream or a size): the client codec opens
#: requests (bodiless, or with a body it may not finish), resets them, and
#: its bytes reach the peer whole or cut anywhere; the peer answers, resets,
#: and its bytes come back; each side's output may lag the other's.
peer_ops = st.lists(st.tuples(
    st.sampled_from(["open", "open", "open_body", "finish", "reset", "reset", "to_peer",
                     "to_peer_part", "from_peer", "answer", "answer", "peer_reset"]),
    st.integers(0, 60)), max_size=120)


def strict_peer_run(engine: str, program, limit: int) -> str | None:
    """``program`` between a client codec on ``engine`` (used as the
    client end uses it: streams up to the peer's MAX_CONCURRENT_STREAMS,
    received DATA acknowledged) and an h2 server allowing ``limit``
    streams. The first connection error either side sees, or None."""
    c = codec.client_codec(H2Config(engine=engine))
    s = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    s.local_settings = Settings(client=False,
                                initial_values={SettingCodes.MAX_CONCURRENT_STREAMS: limit})
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    to_peer = bytearray()
    from_peer = bytearray()
    held: list[int] = []        # streams the client end holds
    unfinished: list[int] = []  # of those, requests whose body goes on
    asked: list[int] = []       # requests the peer has not answered

    def forget(sid: int) -> None:
        for group in (held, unfinished):
            if sid in group:
                group.remove(sid)

    for op, k in program:
        to_peer += c.data_to_send()
        if op in ("open", "open_body"):
            if c.remote_max_concurrent_streams - len(held) > 0:
                sid = c.get_next_available_stream_id()
                c.send_headers(sid, GET, end_stream=op == "open")
                held.append(sid)
                if op == "open_body":
                    c.send_data(sid, b"x" * (k * 50))
                    unfinished.append(sid)
        elif op == "finish" and unfinished:
            sid = unfinished.pop(k % len(unfinished))
            c.send_data(sid, b"y" * k, end_stream=True)
        elif op == "reset" and held:
            sid = held[k % len(held)]
            forget(sid)
            c.reset_stream(sid, ErrorCodes.CANCEL)
        elif op in ("to_peer", "to_peer_part"):
            n = len(to_peer) if op == "to_peer" else min(len(to_peer), k * 7)
            data = bytes(to_peer[:n])
            del to_peer[:n]
            try:
                events = s.receive_data(data)
            except ProtocolError as e:
                return f"peer: {e!r}"
            for e in events:
                if isinstance(e, ConnectionTerminated):
                    return f"peer got {e}"
                if isinstance(e, RequestReceived):
                    asked.append(e.stream_id)
                elif isinstance(e, StreamReset) and e.stream_id in asked:
                    asked.remove(e.stream_id)
                elif isinstance(e, DataReceived):
                    s.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
            from_peer += s.data_to_send()
        elif op == "from_peer":
            data = bytes(from_peer)
            from_peer.clear()
            try:
                events = c.receive_data(data)
            except ProtocolError as e:
                return f"client: {e!r}"
            for e in events:
                if isinstance(e, ConnectionTerminated):
                    return f"client got {e}"
                if isinstance(e, DataReceived):
                    c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
                elif isinstance(e, StreamReset) or (
                        isinstance(e, StreamEnded) and e.stream_id not in unfinished):
                    forget(e.stream_id)
        elif op in ("answer", "peer_reset") and asked:
            sid = asked.pop(k % len(asked))
            try:
                if op == "answer":
                    s.send_headers(sid, [(b":status", b"200")])
                    s.send_data(sid, b"z" * (k * 40), end_stream=True)
                else:
                    s.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            except StreamClosedError:   # reset by the client meanwhile
                pass
            from_peer += s.data_to_send()
    return None


class StrictPeerTests(SynchronousTestCase):
    @settings(max_examples=60, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(peer_ops, st.sampled_from([1, 2, 100]))
    def test_resets_mid_flight_never_break_a_strict_peer(self, program, limit) -> None:
        """The client codec resets streams at any point (before the peer
        saw the request, while its answer is on the way, with the request
        body unfinished), reads arrive cut anywhere and late: h2 as the
        peer (it ends the connection on a frame for a stream it holds closed,
        an idle stream, a stream over its limit) never sees a connection
        error, nor does the codec, on either engine."""
        for engine in ("h2", "nghttp2"):
            self.assertIsNone(strict_peer_run(engine, program, limit), engine)
