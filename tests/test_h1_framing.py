"""l5dproxy.http.h1.framing against h11: what the single copies write, h11
reads back as the same body, trailers and Connection options.

The chunk writers and the Connection token parser were written twice (server
and client end, ARCH-PLAN 1.3); these properties hold the one copy to an
independent HTTP/1.1 implementation. Seeded (derandomized) and bounded.
"""

from __future__ import annotations

import h11
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from l5dproxy.exchange.message import ResponseHead
from l5dproxy.http.h1.framing import (
    LAST_CHUNK,
    SMALL_CHUNK,
    chunk_head,
    connection_tokens,
    error_head,
    frame_chunk,
    interim_head,
    last_chunk,
    reason_phrase,
    status_line,
)
from l5dproxy.http.headers import HOP_BY_HOP

BOUNDED = settings(max_examples=150, deadline=None, derandomize=True)

_TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(alphabet=_TCHAR, min_size=1, max_size=12).map(str.encode)
#: Field values: visible ASCII and inner spaces, no leading/trailing space.
values = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e),
                 max_size=16).map(str.encode)
#: Trailer names: ordinary tokens, plus hop-by-hop names the server end drops.
trailer_names = st.one_of(tokens, st.sampled_from(sorted(HOP_BY_HOP - {b"transfer-encoding",
                                                                         b"te", b"trailer"})))
trailer_sections = st.lists(st.tuples(trailer_names, values), max_size=5)
#: Chunks: small ones (framed whole) and a few past SMALL_CHUNK (head + data).
chunks = st.lists(st.one_of(st.binary(min_size=1, max_size=64),
                            st.integers(SMALL_CHUNK, SMALL_CHUNK + 100).map(lambda n: b"x" * n)),
                  max_size=4)


def _chunked(parts: list[bytes]) -> bytes:
    """The body as the ends write it: small chunks whole, large ones as
    head, data, CRLF."""
    out = []
    for data in parts:
        if len(data) < SMALL_CHUNK:
            out.append(frame_chunk(data))
        else:
            out += (chunk_head(len(data)), data, b"\r\n")
    return b"".join(out)


def _read(conn: h11.Connection, data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Feed ``data`` to ``conn``; the body and trailers h11 read."""
    conn.receive_data(data)
    body = []
    trailers: list[tuple[bytes, bytes]] | None = None
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Data):
            body.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            trailers = [(n, v) for n, v in event.headers]
            break
        elif event is h11.NEED_DATA:
            raise AssertionError("h11 wants more: the message did not end")
    return b"".join(body), trailers


class ChunkedDifferentialTests(unittest.TestCase):
    """h11 parses a chunked message framed by frame_chunk/chunk_head/last_chunk."""

    @BOUNDED
    @given(chunks, trailer_sections)
    def test_request_body_and_trailers(self, parts, trailers) -> None:
        """The client end's request: every trailer forwarded as received."""
        head = b"POST /x HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        server = h11.Connection(h11.SERVER)
        body, got = _read(server, head + _chunked(parts) + last_chunk(trailers, frozenset()))
        self.assertEqual(body, b"".join(parts))
        self.assertEqual(got, [(n.lower(), v) for n, v in trailers])

    @BOUNDED
    @given(chunks, trailer_sections)
    def test_response_body_and_trailers_drop_hop_by_hop(self, parts, trailers) -> None:
        """The server end's response: hop-by-hop trailer fields dropped."""
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
        head = status_line(200, b"") + b"transfer-encoding: chunked\r\n\r\n"
        body, got = _read(client, head + _chunked(parts) + last_chunk(trailers, HOP_BY_HOP))
        self.assertEqual(body, b"".join(parts))
        self.assertEqual(got, [(n.lower(), v) for n, v in trailers
                               if n.lower() not in HOP_BY_HOP])

    def test_no_trailers_is_the_bare_last_chunk(self) -> None:
        self.assertEqual(last_chunk(None, HOP_BY_HOP), b"0\r\n\r\n")
        self.assertEqual(last_chunk([], frozenset()), LAST_CHUNK)
        self.assertEqual(frame_chunk(b"hello"), b"5\r\nhello\r\n")
        self.assertEqual(chunk_head(SMALL_CHUNK), b"4000\r\n")


class ConnectionTokenTests(unittest.TestCase):
    """connection_tokens: the options a Connection value names (RFC 9110 7.6.1)."""

    @BOUNDED
    @given(st.lists(st.tuples(st.one_of(tokens, st.sampled_from(
        [b"close", b"Keep-Alive", b"UPGRADE", b""])), st.sampled_from([b"", b" ", b"\t", b"  "])),
        max_size=6))
    def test_tokens_lowercased_in_order_without_own_options(self, elements) -> None:
        """List elements (RFC 9110 5.6.1) with optional whitespace and empty
        elements; close, keep-alive and upgrade left out."""
        value = b",".join(ows + token + ows for token, ows in elements)
        expected = [t.lower() for t, _ in elements
                    if t and t.lower() not in (b"close", b"keep-alive", b"upgrade")]
        self.assertEqual(connection_tokens(value), expected)


class StatusLineTests(unittest.TestCase):

    @BOUNDED
    @given(st.integers(200, 599), st.one_of(st.just(b""), tokens))
    def test_h11_reads_the_status_line(self, status, reason) -> None:
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
        client.receive_data(status_line(status, reason) + b"content-length: 0\r\n\r\n")
        event = client.next_event()
        self.assertIsInstance(event, h11.Response)
        self.assertEqual(event.status_code, status)
        self.assertEqual(event.reason, reason or reason_phrase(status))

    @BOUNDED
    @given(st.integers(400, 599), st.text(alphabet=_TCHAR + " ", max_size=30).map(str.encode),
           st.booleans(), st.sampled_from(["1.0", "1.1"]))
    def test_h11_reads_the_error_head(self, status, reason, close, version) -> None:
        """The proxy's own answer: status line from status_line, the
        l5d-proxy-error field, an empty body, the connection's fate."""
        client = h11.Connection(h11.CLIENT)
        # h11 sends HTTP/1.1 only; ``version`` changes what error_head writes.
        client.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
        client.receive_data(error_head(status, reason, close, version))
        event = client.next_event()
        self.assertIsInstance(event, h11.Response)
        self.assertEqual(event.status_code, status)
        self.assertEqual(event.reason, reason_phrase(status))
        fields = dict(event.headers)
        self.assertEqual(fields[b"l5d-proxy-error"], reason.strip())
        self.assertEqual(fields[b"content-length"], b"0")
        self.assertEqual(fields.get(b"connection"),
                         b"close" if close else (b"keep-alive" if version == "1.0" else None))
        self.assertIsInstance(client.next_event(), h11.EndOfMessage)

    @BOUNDED
    @given(st.sampled_from([100, 102, 103]), st.one_of(st.just(b""), tokens),
           st.lists(st.tuples(trailer_names, values), max_size=4))
    def test_h11_reads_the_interim_head(self, status, reason, fields) -> None:
        """A forwarded 1xx: h11 reads an informational response with its
        end-to-end fields, the hop-by-hop ones dropped."""
        client = h11.Connection(h11.CLIENT)
        client.send(h11.Request(method="GET", target="/", headers=[("host", "a")]))
        client.receive_data(interim_head(ResponseHead(status, fields, reason)))
        event = client.next_event()
        self.assertIsInstance(event, h11.InformationalResponse)
        self.assertEqual(event.status_code, status)
        self.assertEqual(event.reason, reason or reason_phrase(status))
        self.assertEqual(list(event.headers),
                         [(n.lower(), v) for n, v in fields if n.lower() not in HOP_BY_HOP])
