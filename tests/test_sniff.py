"""Tests for l5dproxy.detect.sniff, the pure first-bytes protocol sniffer."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import ssl
import struct

from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.detect.sniff import H2_PREFACE, Verdict, ended, sniff, starts_like_http1, timed_out

H2 = Verdict("h2", "preface")
HTTP1 = Verdict("http1", "request_line")
NOT_HTTP = Verdict("opaque", "not_http")
PEEK_LIMIT = Verdict("opaque", "peek_limit")
TIMEOUT = Verdict("opaque", "timeout")
EOF = Verdict("opaque", "eof")

PROTOCOLS = {"h2", "http1", "tls", "opaque"}
REASONS = {"preface", "request_line", "client_hello", "not_http", "peek_limit"}


def real_client_hello(server_hostname: str | None) -> bytes:
    """First flight of a real stdlib TLS client, with SNI unless None."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_hostname is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with contextlib.suppress(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def vector(length_bytes: int, body: bytes) -> bytes:
    """A TLS length-prefixed vector."""
    return len(body).to_bytes(length_bytes, "big") + body


def extension(ext_type: int, body: bytes) -> bytes:
    """One TLS extension."""
    return struct.pack("!H", ext_type) + vector(2, body)


def sni_extension(*names: tuple[int, bytes]) -> bytes:
    """A server_name extension holding (name_type, name) entries."""
    entries = b"".join(bytes([kind]) + vector(2, name) for kind, name in names)
    return extension(0, vector(2, entries))


def hand_built_hello(extensions: bytes | None) -> bytes:
    """A minimal ClientHello record; extensions None omits the block."""
    body = b"\x03\x03" + bytes(32) + vector(1, b"") + vector(2, b"\x13\x01")
    body += vector(1, b"\x00")
    if extensions is not None:
        body += vector(2, extensions)
    handshake = b"\x01" + vector(3, body)
    return b"\x16\x03\x01" + vector(2, handshake)


def first_verdict(data: bytes, cuts: list[int], **kw: int) -> tuple[Verdict | None, int]:
    """Feed growing prefixes ending at each cut; first verdict and its length."""
    for end in [*sorted(cuts), len(data)]:
        verdict = sniff(data[:end], **kw)
        if verdict is not None:
            return verdict, end
    return None, len(data)


def byte_at_a_time(data: bytes, **kw: int) -> tuple[Verdict | None, int]:
    """First verdict when bytes arrive one at a time, and after how many."""
    return first_verdict(data, list(range(len(data) + 1)), **kw)


def random_cuts(rng: random.Random, data: bytes) -> list[int]:
    """Random read boundaries within data."""
    if not data:
        return []
    return rng.sample(range(len(data) + 1), rng.randint(0, min(len(data), 6)))


HELLO_SNI = real_client_hello("example.test")
HELLO_NO_SNI = real_client_hello(None)

CORPUS = [
    b"",
    H2_PREFACE,
    H2_PREFACE + b"\x00\x00\x12\x04\x00\x00\x00\x00\x00",
    H2_PREFACE[:10],
    b"PRI * HTTP/2.0\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /submit?x=1 HTTP/1.0\r\nContent-Length: 0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\n",
    b"CONNECT example.test:443 HTTP/1.1\r\n",
    b"GET http://example.test/a?b HTTP/1.1\r\n",
    b"GET / HTTP/1.1\n",
    b"get / http/1.1\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n",
    b"220 smtp.example.test ESMTP\r\n",
    b"\x00\x00\x00\x08\x04\xd2\x16\x2f",
    HELLO_SNI,
    HELLO_NO_SNI,
    HELLO_SNI + b"\x17\x03\x03\x00\x01\x00",
    hand_built_hello(sni_extension((0, b"a.test"))),
    b"GET /" + b"a" * 100,
]


class VerdictTests(SynchronousTestCase):
    """The Verdict value type."""

    def test_defaults_and_equality(self) -> None:
        """sni defaults to None and verdicts compare by value."""
        self.assertIsNone(Verdict("h2", "preface").sni)
        self.assertEqual(Verdict("tls", "client_hello", "a"), Verdict("tls", "client_hello", "a"))
        self.assertNotEqual(Verdict("tls", "client_hello", "a"), Verdict("tls", "client_hello"))

    def test_frozen(self) -> None:
        """Verdicts are immutable so they can be shared and cached."""
        verdict = Verdict("h2", "preface")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            verdict.protocol = "http1"  # type: ignore[misc]

    def test_slots(self) -> None:
        """Verdicts use slots (no per-instance dict)."""
        self.assertFalse(hasattr(Verdict("h2", "preface"), "__dict__"))


class H2Tests(SynchronousTestCase):
    """The HTTP/2 prior-knowledge connection preface."""

    def test_preface_constant(self) -> None:
        """The constant is the RFC 9113 preface."""
        self.assertEqual(H2_PREFACE, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        self.assertEqual(len(H2_PREFACE), 24)

    def test_preface(self) -> None:
        """The exact preface is h2."""
        self.assertEqual(sniff(H2_PREFACE), H2)

    def test_preface_followed_by_frames(self) -> None:
        """Bytes after the preface do not change the verdict."""
        self.assertEqual(sniff(H2_PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"), H2)

    def test_every_proper_prefix_waits(self) -> None:
        """All 24 bytes are needed before saying h2."""
        for n in range(len(H2_PREFACE)):
            self.assertIsNone(sniff(H2_PREFACE[:n]), n)

    def test_pri_line_is_not_http1(self) -> None:
        """The preface's first line is no HTTP/1 request (version 2.0)."""
        self.assertIsNone(sniff(b"PRI * HTTP/2.0\r\n"))
        self.assertIsNone(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n"))

    def test_pri_method_with_http11_is_http1(self) -> None:
        """PRI is a valid token, so PRI with HTTP/1.1 is a request line."""
        self.assertEqual(sniff(b"PRI * HTTP/1.1\r\n"), HTTP1)

    def test_mismatch_at_any_byte(self) -> None:
        """A NUL at any preface position ends h2 there; past ``PRI `` what is
        left started like an HTTP/1 request, which the HTTP/1 end answers."""
        for i in range(len(H2_PREFACE)):
            data = H2_PREFACE[:i] + b"\x00" + H2_PREFACE[i + 1 :]
            expected = HTTP1 if i >= 4 else NOT_HTTP
            self.assertEqual(byte_at_a_time(data), (expected, i + 1), i)

    def test_near_miss_tail(self) -> None:
        """A wrong tail after the PRI line is not h2 but HTTP/1 (``PRI `` is a
        method and a space): the HTTP/1 end answers it, nothing is relayed."""
        self.assertEqual(sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\r"), HTTP1)


class HTTP1Tests(SynchronousTestCase):
    """HTTP/1 is decided on how a request starts (a method token and a
    separator); whether it is valid is the HTTP/1 server end's to say."""

    VALID = (
        b"GET / HTTP/1.1\r\n",
        b"GET /index.html?q=1&r=%20 HTTP/1.1\r\nHost: example.test\r\n\r\n",
        b"POST /api/v1/items HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        b"OPTIONS * HTTP/1.1\r\n",
        b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n",
        b"GET http://example.test:8080/a/b?c=d HTTP/1.1\r\n",
        b"HEAD / HTTP/1.0\r\n",
        b"M-SEARCH * HTTP/1.1\r\n",
        b"get / HTTP/1.1\r\n",
        b"X!#$%&'*+-.^_`|~9 /~!$&'()*+,;=:@[] HTTP/1.1\r\n",
    )

    #: Not valid request lines, but started like one: before the rule these
    #: were relayed opaque (bypassing routes and limits on the first request
    #: while the same bytes later on a connection got a 4xx); now the HTTP/1
    #: end answers them, whatever their position.
    STARTS_LIKE_HTTP1 = (
        b"GET / HTTP/1.1\n",
        b"GET / HTTP/1.1\r\r",
        b"GET  / HTTP/1.1\r\n",
        b"GET /  HTTP/1.1\r\n",
        b"GET / HTTP/1.1 \r\n",
        b"GET\t/ HTTP/1.1\r\n",
        b"GET\x0b/ HTTP/1.1\r\n",
        b"GET\x0c/ HTTP/1.1\r\n",
        b"GET /a\x7fb HTTP/1.1\r\n",
        b"GET /\x80 HTTP/1.1\r\n",
        b"GET / http/1.1\r\n",
        b"GET / HTTP/2.0\r\n",
        b"GET / HTTP/1.2\r\n",
        b"GET / HTTP/1.10\r\n",
        b"GET / HTTP/1\r\n",
        b"GET /\r\n",
        b"GET \x00\x01\x02",
        b"SET key value\r\n",
        b"\r\nGET / HTTP/1.1\r\n",
        b"\nGET / HTTP/1.1\r\n",
        b"\r\n\r\nget /admin HTTP/1.1\r\n",
        b"GET /search?q=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: app\r\n\r\n",
    )

    NOT_HTTP1 = (
        (b" GET / HTTP/1.1\r\n", 1),
        (b"\tGET / HTTP/1.1\r\n", 1),
        (b"G(T / HTTP/1.1\r\n", 2),
        (b"/ HTTP/1.1\r\n", 1),
        (b"GET\r\n", 4),
        (b"GET/ HTTP/1.1\r\n", 4),
        (b"\r\n\x00", 3),
        (b"SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.1\r\n", 4),
    )

    def test_valid_request_lines(self) -> None:
        """Well-formed request lines in every target form are http1."""
        for line in self.VALID:
            self.assertEqual(sniff(line), HTTP1, line)

    def test_decided_at_the_separator(self) -> None:
        """The verdict arrives with the separator after the method token."""
        for line in self.VALID + self.STARTS_LIKE_HTTP1:
            start = len(line) - len(line.lstrip(b"\r\n"))
            expected = next(i for i in range(start, len(line)) if line[i] in b" \t\x0b\x0c") + 1
            self.assertEqual(byte_at_a_time(line), (HTTP1, expected), line)

    def test_invalid_but_started_like_http1(self) -> None:
        """Off-grammar request lines are http1, left to the HTTP/1 end."""
        for line in self.STARTS_LIKE_HTTP1:
            self.assertEqual(sniff(line), HTTP1, line)
            self.assertIs(starts_like_http1(line), True, line)

    def test_not_started_like_http1(self) -> None:
        """No method token and separator: opaque at the first impossible byte."""
        for data, at in self.NOT_HTTP1:
            self.assertEqual(byte_at_a_time(data), (NOT_HTTP, at), data)
            self.assertIs(starts_like_http1(data), False, data)

    def test_partial_start_waits(self) -> None:
        """Empty lines and a method token so far need more bytes."""
        for data in (b"POST", b"\r\n", b"\r\n\r\nGE", b"M-SEARCH", b"PRI * HTTP/2.0\r\n",
                     b"SSH"):
            self.assertIsNone(sniff(data), data)


class TLSTests(SynchronousTestCase):
    """TLS ClientHello detection and SNI extraction."""

    def test_real_client_hello_with_sni(self) -> None:
        """A stdlib ClientHello is tls with its server name."""
        self.assertEqual(sniff(HELLO_SNI), Verdict("tls", "client_hello", "example.test"))

    def test_real_client_hello_without_sni(self) -> None:
        """Without server_hostname there is no SNI."""
        self.assertEqual(sniff(HELLO_NO_SNI), Verdict("tls", "client_hello"))

    def test_decided_with_whole_first_record(self) -> None:
        """TLS waits for the whole first record, then decides."""
        record_len = 5 + int.from_bytes(HELLO_SNI[3:5], "big")
        self.assertEqual(len(HELLO_SNI), record_len)
        self.assertIsNone(sniff(HELLO_SNI[:-1]))
        verdict, at = byte_at_a_time(HELLO_SNI + b"\x17\x03\x03")
        self.assertEqual((verdict.sni if verdict else None, at), ("example.test", record_len))

    def test_peek_limit_inside_record(self) -> None:
        """A valid header cut off by peek_limit is still tls, without SNI."""
        self.assertEqual(sniff(HELLO_SNI[:16], peek_limit=16), Verdict("tls", "client_hello"))
        self.assertEqual(sniff(HELLO_SNI, peek_limit=16), Verdict("tls", "client_hello"))
        self.assertEqual(sniff(HELLO_SNI[:6], peek_limit=6), Verdict("tls", "client_hello"))

    def test_peek_limit_before_handshake_type(self) -> None:
        """Too few bytes to see the handshake type is merely undecided."""
        self.assertEqual(sniff(HELLO_SNI, peek_limit=5), PEEK_LIMIT)

    def test_broken_header_bytes(self) -> None:
        """Each header byte is checked as soon as it arrives."""
        cases = [
            (b"\x17\x03\x03\x00\x10\x01", 1),  # application_data
            (b"\x16\x02\x00\x00\x10\x01", 2),  # SSLv2-ish major version
            (b"\x16\x03\x05\x00\x10\x01", 3),  # unknown minor version
            (b"\x16\x03\x01\x49\x00\x01", 4),  # length far too large
            (b"\x16\x03\x01\x48\x01\x01", 5),  # just above the sane bound
            (b"\x16\x03\x01\x00\x00\x01", 5),  # empty record
            (b"\x16\x03\x01\x00\x10\x02", 6),  # ServerHello
        ]
        for data, at in cases:
            self.assertEqual(byte_at_a_time(data + bytes(16)), (NOT_HTTP, at), data)

    def test_record_versions_and_max_length(self) -> None:
        """Legacy versions 3.0-3.4 and the length bound itself are fine."""
        for minor in range(5):
            self.assertIsNone(sniff(bytes([0x16, 3, minor, 0x48, 0x00, 0x01])))

    def test_hand_built_sni(self) -> None:
        """SNI is found among other extensions and after other name types."""
        exts = extension(10, b"\x00\x02\x00\x1d") + sni_extension(
            (7, b"ignored"), (0, b"Host.Example.TEST")
        )
        verdict = sniff(hand_built_hello(exts))
        self.assertEqual(verdict, Verdict("tls", "client_hello", "Host.Example.TEST"))

    def test_hand_built_without_sni(self) -> None:
        """No extensions, empty extensions or no host_name give sni None."""
        for exts in (None, b"", extension(10, b"\x00\x00"), sni_extension((7, b"x"))):
            self.assertEqual(sniff(hand_built_hello(exts)), Verdict("tls", "client_hello"))

    def test_odd_host_names_are_dropped(self) -> None:
        """Empty, non-ASCII or control-character names are not routing keys."""
        for name in (b"", b"caf\xc3\xa9.test", b"a b", b"a\x00b"):
            exts = sni_extension((0, name))
            self.assertEqual(sniff(hand_built_hello(exts)), Verdict("tls", "client_hello"))

    def test_malformed_bodies_are_tls_without_sni(self) -> None:
        """Garbage after a valid header is tls, sni None, never an error."""
        header = b"\x16\x03\x01\x00\x20\x01"
        for body in (bytes(31), b"\xff" * 31, b"\x00\x00\x01" + bytes(28)):
            self.assertEqual(sniff(header + body), Verdict("tls", "client_hello"))
        self.assertEqual(sniff(b"\x16\x03\x01\x00\x01\x01"), Verdict("tls", "client_hello"))

    def test_fragmented_client_hello(self) -> None:
        """A ClientHello longer than its first record is tls, sni None."""
        record = hand_built_hello(sni_extension((0, b"a.test")))
        cut = 5 + 20
        fragment = record[:3] + (cut - 5).to_bytes(2, "big") + record[5:cut]
        self.assertEqual(sniff(fragment + b"\x16\x03\x01"), Verdict("tls", "client_hello"))

    def test_mutated_body_never_raises(self) -> None:
        """Random corruption of a real ClientHello body stays tls."""
        rng = random.Random(1234)
        for _ in range(300):
            data = bytearray(HELLO_SNI)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(6, len(data))] = rng.randrange(256)
            verdict = sniff(bytes(data))
            self.assertEqual((verdict.protocol, verdict.reason), ("tls", "client_hello"))


class OpaqueTests(SynchronousTestCase):
    """Non-HTTP, non-TLS first bytes become opaque quickly."""

    def test_decided_after_few_bytes(self) -> None:
        """Each case is not_http after exactly the given number of bytes."""
        cases = [
            (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", 1),  # Postgres SSLRequest
            (b"\x80\x01\x00\x00", 1),
            (b"\x16\x03\x03\x00\x10\x02", 6),
            (b"*1\r\n$4\r\nPING\r\n", 3),  # Redis
            (b"SSH-2.0-OpenSSH_9.6\r\n", 4),
            (b"SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.1\r\n", 4),
            (b"\r\n\x16", 3),
            (b" ", 1),
        ]
        for data, at in cases:
            self.assertEqual(byte_at_a_time(data), (NOT_HTTP, at), data)

    def test_empty_waits(self) -> None:
        """No bytes yet means no verdict yet."""
        self.assertIsNone(sniff(b""))


class PeekLimitTests(SynchronousTestCase):
    """Undecided input is cut off at exactly peek_limit bytes."""

    def test_long_request_line_is_http1_at_its_method(self) -> None:
        """A request line longer than peek_limit is http1 as soon as its method
        and space are in: the HTTP/1 end answers it 414, as it would the same
        line later on the connection (it used to be relayed opaque)."""
        data = b"GET /search?q=" + b"x" * 9000 + b" HTTP/1.1\r\nHost: app\r\n\r\n"
        self.assertEqual(byte_at_a_time(data), (HTTP1, 4))
        self.assertEqual(sniff(data), HTTP1)
        self.assertEqual(byte_at_a_time(data, peek_limit=16), (HTTP1, 4))

    def test_method_token_filling_the_window(self) -> None:
        """A token as long as the window could still start a request: http1
        (the HTTP/1 end rejects the method), never relayed opaque."""
        data = b"G" * 100 + b" / HTTP/1.1\r\n"
        self.assertEqual(byte_at_a_time(data, peek_limit=64),
                         (Verdict("http1", "peek_limit"), 64))
        self.assertEqual(sniff(b"\r\n" * 40, peek_limit=64), Verdict("http1", "peek_limit"))

    def test_bytes_past_limit_are_ignored(self) -> None:
        """A single large read gives the same verdict as a trickle."""
        self.assertEqual(sniff(b"GETGETGETG /abc HTTP/1.1\r\n", peek_limit=10),
                         Verdict("http1", "peek_limit"))
        self.assertEqual(sniff(b"\x16\x03\x01\x00" + b"\x00" * 100, peek_limit=4), PEEK_LIMIT)

    def test_h2_needs_24_bytes(self) -> None:
        """A limit below the preface length cannot say h2 (config keeps the
        limit at 64 or more); the preface's ``PRI `` makes it HTTP/1 then."""
        self.assertEqual(sniff(H2_PREFACE, peek_limit=16), HTTP1)
        self.assertEqual(sniff(H2_PREFACE, peek_limit=24), H2)

    def test_zero_and_negative_limits(self) -> None:
        """Zero means decide at once; a negative limit is a caller bug."""
        self.assertEqual(sniff(b"", peek_limit=0), PEEK_LIMIT)
        self.assertEqual(sniff(b"\x00", peek_limit=0), PEEK_LIMIT)
        with self.assertRaises(ValueError):
            sniff(b"", peek_limit=-1)


class TimedOutTests(SynchronousTestCase):
    """The detect-timeout and EOF verdicts."""

    def test_timed_out(self) -> None:
        """Opaque/timeout, unless the bytes could start an HTTP/1 request: the
        HTTP/1 end then times the head out (408) as for any later request;
        or a ClientHello record: tls, so that a terminating listener's
        handshake_timeout applies to a ClientHello sent slowly."""
        for data in (b"", b"\x17\x03\x03", b"\x16\x02", b"\x16\x03\x01\x00\x00"):
            self.assertEqual(timed_out(data), TIMEOUT, data)
        for data in (b"GET /", b"GET", H2_PREFACE[:5], b"\r\n"):
            self.assertEqual(timed_out(data), Verdict("http1", "timeout"), data)
        for n in range(1, len(HELLO_SNI)):
            self.assertEqual(timed_out(HELLO_SNI[:n]), Verdict("tls", "timeout"), n)

    def test_ended(self) -> None:
        """The same on the client's EOF: a cut-short head is the HTTP/1 end's,
        a cut-short ClientHello the TLS end's."""
        for data in (b"", b"\x17\x03\x03", b"\x16\x02"):
            self.assertEqual(ended(data), EOF, data)
        for data in (b"GET /", b"GET", H2_PREFACE[:5]):
            self.assertEqual(ended(data), Verdict("http1", "eof"), data)
        for data in (b"\x16", b"\x16\x03", HELLO_SNI[:5], HELLO_SNI[:100]):
            self.assertEqual(ended(data), Verdict("tls", "eof"), data)

    def test_undecided_tls_agrees_with_sniff(self) -> None:
        """Whatever sniff still waits on as a possible ClientHello (every
        1- and 2-byte input, and each prefix of a ClientHello) is tls when
        detection ends, as it is at the peek limit: the timeout and EOF
        verdicts never call opaque what sniff held back as TLS."""
        inputs = [bytes([a]) for a in range(256)]
        inputs += [bytes([a, b]) for a in range(256) for b in range(256)]
        inputs += [HELLO_SNI[:n] for n in range(1, len(HELLO_SNI))]
        held_back = 0
        for data in inputs:
            if sniff(data) is None and starts_like_http1(data) is False:
                held_back += 1
                self.assertEqual(timed_out(data).protocol, "tls", data)
                self.assertEqual(ended(data).protocol, "tls", data)
        self.assertGreater(held_back, len(HELLO_SNI))


class SplitInvarianceTests(SynchronousTestCase):
    """The verdict depends on the bytes only, never on read boundaries."""

    def test_byte_at_a_time(self) -> None:
        """Trickling one byte at a time matches a single read."""
        for data in CORPUS:
            for limit in (8192, 16):
                whole = sniff(data, peek_limit=limit)
                self.assertEqual(byte_at_a_time(data, peek_limit=limit)[0], whole, data)

    def test_random_splits(self) -> None:
        """Random read boundaries (seeded) match a single read."""
        rng = random.Random(20240601)
        for data in CORPUS:
            whole = sniff(data)
            for _ in range(20):
                cuts = random_cuts(rng, data)
                self.assertEqual(first_verdict(data, cuts)[0], whole, (data, cuts))


class FuzzTests(SynchronousTestCase):
    """Arbitrary bytes never raise and always respect peek_limit."""

    def check(self, data: bytes, limit: int) -> None:
        """Invariants for one input: sane verdict, split-invariant."""
        verdict = sniff(data, peek_limit=limit)
        if verdict is None:
            self.assertLess(len(data), limit, data)
        else:
            self.assertIn(verdict.protocol, PROTOCOLS)
            self.assertIn(verdict.reason, REASONS)
        self.assertEqual(byte_at_a_time(data, peek_limit=limit)[0], verdict, data)

    def test_random_bytes(self) -> None:
        """2000 seeded random strings, biased towards plausible starts."""
        rng = random.Random(5)
        starts = [b"", b"\x16\x03\x01", b"GET ", b"PRI * ", b"\x16\x03\x03\x00\x40\x01"]
        for _ in range(2000):
            data = rng.choice(starts) + rng.randbytes(rng.randint(0, 48))
            self.check(data, rng.choice([4, 16, 33, 8192]))

    def test_mutations_of_valid_inputs(self) -> None:
        """Flips, truncations and insertions of valid inputs."""
        rng = random.Random(6)
        seeds = [H2_PREFACE, HELLO_SNI, HELLO_NO_SNI, *HTTP1Tests.VALID]
        for _ in range(2000):
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                self.mutate(rng, data)
            self.check(bytes(data), rng.choice([8, 24, 64, 8192]))

    @staticmethod
    def mutate(rng: random.Random, data: bytearray) -> None:
        """Apply one random edit in place."""
        pos = rng.randrange(len(data) + 1)
        edit = rng.randrange(3)
        if edit == 0 and pos < len(data):
            data[pos] = rng.randrange(256)
        elif edit == 1:
            del data[pos:]
        else:
            data[pos:pos] = rng.randbytes(rng.randint(1, 3))
