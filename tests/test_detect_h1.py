"""Detection and the HTTP/1 server end decide a request the same way,
whatever its position on the connection (issue 10, item 1).

A request head is sent through the production path (listener -> detect ->
``H1Server``, StringTransport) once as the first bytes of a connection and
once as the second request of a keep-alive connection: the answer the
client gets, what reaches the dispatcher (the endpoint's view: method,
target, authority, headers, body) and what ``http_errors_total`` counts must
be the same. Heads that do not start like an HTTP/1 request (the sniffer's
one rule) are relayed opaque byte for byte instead.
"""

from __future__ import annotations

import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.exposition import generate_latest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.app.listeners import build_listener
from l5dproxy.app.sites import HttpSites
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import DetectConfig, HostPort, HttpConfig, ListenerConfig, ServiceConfig
from l5dproxy.exchange.message import Body, ProxyError, Response, ResponseHead
from l5dproxy.http.h1.server import h1_handler
from l5dproxy.telemetry import Metrics
from tests.fakes import DeferredDispatcher
from tests.support import parse_metrics
from tests.test_detect import Recorder, SwitchableTransport

#: Bounded and reproducible (set L5D_HYPOTHESIS_EXAMPLES for a longer run).
SETTINGS = settings(max_examples=int(os.environ.get("L5D_HYPOTHESIS_EXAMPLES", "300")),
                    derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
PEEK_LIMIT = 256          # small, so that generated heads cross it
MAX_REQUEST_LINE = 512
MAX_HEADER_BYTES = 1024
FIRST = b"GET /first HTTP/1.1\r\nHost: app\r\n\r\n"

# The rule, spelled out independently of l5dproxy.detect.sniff: empty lines, a
# method token, a separator (and not an SSH identification string); or, when
# detection ends first (the peek window is full, the client half-closes),
# bytes that could still become that.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_STARTS_LIKE_HTTP1 = re.compile(rb"[\r\n]*" + _TOKEN + rb"+[ \t\x0b\x0c]")
_COULD_START = re.compile(rb"[\r\n]*" + _TOKEN + rb"*")


def http1_by_rule(data: bytes, eof: bool) -> bool:
    if data.startswith(b"SSH-"):
        return False
    if _STARTS_LIKE_HTTP1.match(data):
        return True
    window = data[:PEEK_LIMIT]
    return bool(window and _COULD_START.fullmatch(window)
                and (eof or len(data) >= PEEK_LIMIT))


class Endpoint(DeferredDispatcher):
    """The dispatcher: records each request as an endpoint would see it
    (head and whole body) and answers 200 once the body has ended."""

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def dispatch(self, request, context):
        d = defer.Deferred()
        head = request.head
        record = [head.method, head.target, head.authority, tuple(head.headers),
                  head.version, b""]
        self.seen.append(record)

        class Sink:
            def body_data(self, data: bytes) -> None:
                record[5] += data

            def body_end(self, trailers) -> None:
                record.append(tuple(trailers or ()))
                body = Body(2)
                body.write(b"ok")
                body.finish()
                d.callback(Response(ResponseHead(200, [(b"content-length", b"2")]), body))

            def body_error(self, reason: Exception) -> None:
                record.append("body failed")
                d.errback(ProxyError.bad_gateway("body failed"))

        request.body.consume(Sink())
        return d


class Run:
    """One client connection to a detect listener."""

    def __init__(self) -> None:
        self.clock = MemoryReactorClock()
        self.metrics = Metrics()
        self.endpoint = Endpoint()
        self.relayed: list[Recorder] = []
        service = ServiceConfig("app", (HostPort("127.0.0.1", 8080),))
        detect = DetectConfig(timeout=10.0, peek_limit=PEEK_LIMIT)
        config = ListenerConfig("inbound", "tcp:0", "app")

        def relay(conn) -> Recorder:
            recorder = Recorder(conn)
            self.relayed.append(recorder)
            return recorder

        handlers = dict.fromkeys(("h2", "tls", "opaque"), relay)
        # The timeouts are [http]'s defaults (10 s and 60 s).
        handlers["http1"] = h1_handler(
            self.endpoint, HttpConfig(max_request_line=MAX_REQUEST_LINE,
                                      max_header_bytes=MAX_HEADER_BYTES), HttpSites())
        self.listener = build_listener(config, detect, {"app": BackendSet(service, ())},
                                       self.metrics, self.clock, log_connections=False,
                                       handlers=handlers)
        self.transport = SwitchableTransport()
        protocol = self.listener.buildProtocol(self.transport.getPeer())
        self.transport.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes, cuts: list[int]) -> None:
        start = 0
        for cut in [*sorted(c for c in cuts if 0 < c < len(data)), len(data)]:
            if cut > start:
                self.transport.deliver(data[start:cut])
                start = cut

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    def errors(self) -> dict[str, float]:
        samples = parse_metrics(generate_latest(self.metrics.registry).decode())
        return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
                if name == "http_errors_total" and value}

    def verdict(self) -> tuple[str, str] | None:
        samples = parse_metrics(generate_latest(self.metrics.registry).decode())
        for (name, labels), value in samples.items():
            if name == "protocol_detect_total" and value:
                labels = dict(labels)
                return labels["protocol"], labels["reason"]
        return None


# -- generated request heads --------------------------------------------------

# Each part of a head: usual values, and the odd ones smuggling lives in.
METHODS = ([b"GET", b"POST", b"PUT", b"OPTIONS", b"DELETE"],
           [b"get", b"Get", b"PRI", b"CONNECT", b"M-SEARCH", b"G(T", b"SET", b"X" * 300, b"",
            b"SSH-2.0-x", b"\xc3\xa9"])
SEPARATORS = ([b" "], [b"  ", b"\t", b"\x0b", b"\r", b""])
TARGETS = ([b"/", b"/search?q=", b"/admin"],
           [b"*", b"http://app/admin", b"/\xff", b"/a b", b"", b"app:443", b"/%00", b"/\x7f"])
VERSIONS = ([b"HTTP/1.1", b"HTTP/1.0"],
            [b"HTTP/2.0", b"http/1.1", b"HTTP/1.10", b"HTTP/1", b""])
EOLS = ([b"\r\n"], [b"\n", b"\r", b" \r\n"])
FIELDS = ([b"Host: app", b"X-A: 1", b"Content-Length: 5", b"Connection: x-secret",
           b"X-Secret: 1", b"Accept: */*"],
          [b"Host: other", b"Content-Length: 0", b"Content-Length: +5", b"Content-Length: 5, 5",
           b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip",
           b"Transfer-Encoding:  chunked", b"Transfer-Encoding: chunked, gzip",
           b"Transfer-Encoding: xchunked", b"Connection: close", b" X-Fold: 2", b"X-Bad : 1",
           b"X-Ctl: \x01", b"X-U: \xc3\xa9", b"Expect: 100-continue", b"Upgrade: websocket",
           b"NoColon"])
BODIES = ([b"", b"hello"], [b"5\r\nhello\r\n0\r\n\r\n", b"0\r\n\r\n", b"zz\r\n"])


def pick(draw, name: str, odd_parts: set[str]) -> bytes:
    """A usual value, or an odd one when ``name`` is among ``odd_parts``."""
    usual, odd = PARTS[name]
    return draw(st.sampled_from(odd if name in odd_parts else usual))


PARTS = {"lead": ([b""], [b"\r\n", b"\n"]), "method": METHODS, "sep1": SEPARATORS,
         "target": TARGETS, "sep2": SEPARATORS, "version": VERSIONS, "eol": EOLS,
         "field": FIELDS, "field_eol": EOLS, "end": EOLS, "body": BODIES}


@st.composite
def request_heads(draw) -> bytes:
    """A request head assembled from the known smuggling vectors' parts
    (bare LF and CR, odd whitespace, obs-fold, CL.TE, TE.TE, non-ASCII,
    long lines and fields): up to three of its parts odd, then sometimes
    mutated (bytes set, cut, inserted)."""
    odd = draw(st.sets(st.sampled_from(sorted(PARTS)), max_size=3))
    parts = [pick(draw, name, odd) for name in ("lead", "method", "sep1")]
    target = pick(draw, "target", odd)
    if target.startswith(b"/search"):
        target += b"x" * draw(st.sampled_from([0, 10, PEEK_LIMIT, MAX_REQUEST_LINE + 10]))
    parts += [target] + [pick(draw, name, odd) for name in ("sep2", "version", "eol")]
    fields = [b"Host: app"] + [pick(draw, "field", odd) for _ in range(draw(st.integers(0, 3)))]
    for field in draw(st.permutations(fields)):
        parts += [field, pick(draw, "field_eol", odd)]
    if draw(st.booleans()):
        parts += [b"X-Big: ", b"b" * draw(st.sampled_from([10, PEEK_LIMIT, MAX_HEADER_BYTES])),
                  b"\r\n"]
    parts += [pick(draw, "end", odd), pick(draw, "body", odd)]
    data = bytearray(b"".join(parts))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):
        pos = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["set", "cut", "insert"]))
        if edit == "set" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[pos:pos + draw(st.integers(1, 8))]
        else:
            data[pos:pos] = draw(st.sampled_from([b" ", b"\r", b"\n", b"\t", b"\x00", b"\xff",
                                                   b"\r\n", b":", b","]))
    return bytes(data)


class FirstOrSecondTests(SynchronousTestCase):
    """The property: a head's answer does not depend on its position."""

    def answer(self, head: bytes, cuts: list[int], first: bool, eof: bool):
        run = Run()
        if not first:
            run.send(FIRST, [])
            out = run.take()
            self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
            self.assertEqual(len(run.endpoint.seen), 1)
            del run.endpoint.seen[0]
        run.send(head, cuts)
        if eof:
            run.transport.deliver_eof()
        relayed = b"".join(r.data for r in run.relayed)
        return run, (run.take(), run.endpoint.seen, run.errors(),
                     run.transport.disconnecting), relayed

    @settings(SETTINGS)
    @given(head=request_heads(), cuts=st.lists(st.integers(1, 2000), max_size=3),
           eof=st.booleans())
    def test_same_answer_first_or_second(self, head: bytes, cuts: list[int],
                                         eof: bool) -> None:
        run, first, relayed = self.answer(head, cuts, True, eof)
        if not http1_by_rule(head, eof):
            # Not HTTP/1 by the rule: relayed byte for byte, nothing answered.
            if run.verdict() != ("opaque", "not_http") and not eof:
                self.assertIn(run.verdict(), (None, ("tls", "client_hello")), head)
            if run.verdict() is not None and run.verdict()[0] == "opaque":
                self.assertEqual(relayed, head)
            self.assertEqual(first[:3], (b"", [], {}), head)
            return
        self.assertEqual(run.verdict()[0], "http1", head)
        self.assertEqual(relayed, b"")
        _, second, _ = self.answer(head, cuts, False, eof)
        self.assertEqual(first, second, head)


class IssueInputTests(SynchronousTestCase):
    """The inputs of issue 10, item 1, first and second on a connection."""

    LONG_LINE = b"GET /search?q=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: app\r\n\r\n"

    def check(self, head: bytes, status: bytes, reason: bytes) -> None:
        for first in (True, False):
            run = Run()
            if not first:
                run.send(FIRST, [])
                run.take()
                run.endpoint.seen.clear()
            run.send(head, [])
            out = run.take()
            self.assertTrue(out.startswith(b"HTTP/1.1 " + status), (first, out))
            self.assertIn(b"l5d-proxy-error: " + reason + b"\r\n", out)
            self.assertIn(b"connection: close\r\n", out)
            self.assertTrue(run.transport.disconnecting)
            self.assertEqual(run.endpoint.seen, [])
            self.assertEqual(run.relayed, [])
            self.assertEqual(run.errors(), {reason.decode(): 1.0})

    def test_request_line_past_peek_limit_is_414(self) -> None:
        self.check(self.LONG_LINE, b"414", b"request target too long")

    def test_header_block_past_peek_limit_is_431(self) -> None:
        head = (b"GET / HTTP/1.1\r\nHost: app\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n")
        self.check(head, b"431", b"request header fields too large")

    def test_lowercase_method_is_400(self) -> None:
        self.check(b"get /admin HTTP/1.1\r\nHost: app\r\n\r\n", b"400",
                   b"Invalid method encountered")

    def test_bare_lf_is_400(self) -> None:
        self.check(b"GET /admin HTTP/1.1\nHost: app\n\n", b"400",
                   b"Expected CRLF after version")

    def test_tab_separator_is_400(self) -> None:
        self.check(b"GET\t/admin HTTP/1.1\r\nHost: app\r\n\r\n", b"400",
                   b"Expected space after method")

    def test_non_ascii_target_is_400(self) -> None:
        self.check(b"GET /\xff HTTP/1.1\r\nHost: app\r\n\r\n", b"400",
                   b"Invalid char in url path")

    def test_method_then_garbage_is_400(self) -> None:
        self.check(b"GET \x00\x01\x02\x03\r\n\r\n", b"400", b"Unexpected start char in url")

    def test_stall_mid_request_line_is_408(self) -> None:
        """A client that sends part of a request line and stops gets 408 from
        the request-header timeout, first or second, never a TCP relay."""
        for head in (b"GET /adm", b"GET"):
            for first in (True, False):
                run = Run()
                if not first:
                    run.send(FIRST, [])
                    run.take()
                run.send(head, [])
                run.clock.advance(10.0)   # the detect timeout (first only)
                run.clock.advance(10.0)   # the request-header timeout
                out = run.take()
                self.assertTrue(out.startswith(b"HTTP/1.1 408 "), (head, first, out))
                self.assertEqual(run.relayed, [])
                self.assertEqual(run.errors(), {"request header timeout": 1.0})

    def test_eof_mid_request_line_sends_nothing_on(self) -> None:
        for head in (b"GET /adm", b"GET"):
            for first in (True, False):
                run = Run()
                if not first:
                    run.send(FIRST, [])
                    run.take()
                    run.endpoint.seen.clear()
                run.send(head, [])
                run.transport.deliver_eof()
                self.assertEqual(run.take(), b"")
                self.assertEqual((run.endpoint.seen, run.relayed), ([], []))
                self.assertTrue(run.transport.disconnecting)
