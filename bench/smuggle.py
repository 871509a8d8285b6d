"""Differential check of request framing: the proxy against h11, on the wire.

``python -m bench.smuggle --cases N [--seed S] [--h2 M]`` starts the real
``twistd l5dproxy`` in front of a strict h11 endpoint (a keep-alive pool, one
thread per connection, recording every request it parses) and sends it

* HTTP/1 connections, each carrying 1-3 pipelined requests generated and
  mutated from the known smuggling vectors (CL.TE, TE.CL, TE.TE obfuscations,
  bare LF, obs-fold, duplicate and conflicting Content-Length, odd
  whitespace, non-ASCII bytes, NUL, long lines, chunk-size oddities, a
  missing final CRLF), with a smuggled request line hidden in bodies;
* h2 requests (prior knowledge, the h2 library as client with outbound
  validation off) with generated pseudo-headers and fields, translated by the
  proxy to HTTP/1.

It asserts, per case, against an independent h11 parse of what the client
sent (when that parse accepts it), or against the h2 request as sent:

* every request the endpoint sees is one the proxy meant to send: same
  method, target, Host, end-to-end fields (hop-by-hop and framing left out),
  body bytes and boundaries; the endpoint's strict parser accepts it;
* nothing reaches the endpoint for a request the proxy rejects (from the
  rejected request on, on that connection);
* the endpoint never sees a request the client did not send (no desync
  across the pool: every request it sees is attributed to one a client sent);
* every rejection is a 4xx with ``l5d-proxy-error`` (or a reset/close), and
  ``http_errors_total{reason}`` counts at least the 4xx answered per reason.

Prints the number of cases, how they ended, and every finding; exits 1 when
there is any. ``tests/test_e2e_smuggle.py`` runs a bounded, seeded form.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import h11

#: Fields the proxy may drop or rewrite on the way (hop-by-hop, framing, Host).
NOT_COMPARED = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"content-length", b"host", b"http2-settings",
})

METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS"]


# -- generating HTTP/1 requests ---------------------------------------------------

@dataclass
class Raw:
    """One HTTP/1 request as bytes-to-be, mutated field by field."""

    method: bytes
    target: bytes
    version: bytes = b"HTTP/1.1"
    fields: list[list[bytes]] = field(default_factory=list)   # [name, sep, value]
    eol: bytes = b"\r\n"
    body: bytes = b""            # the body bytes as framed on the wire
    line_sep: bytes = b" "
    notes: list[str] = field(default_factory=list)

    def encode(self) -> bytes:
        out = [self.method, self.line_sep, self.target, self.line_sep, self.version, self.eol]
        for name, sep, value in self.fields:
            out += (name, sep, value, self.eol)
        out.append(self.eol)
        return b"".join(out) + self.body


def chunked(data: bytes, size_format: str = "%x", ext: bytes = b"", end: bytes = b"0\r\n\r\n"
            ) -> bytes:
    out = b""
    for i in range(0, len(data), 7):
        piece = data[i:i + 7]
        out += (size_format % len(piece)).encode() + ext + b"\r\n" + piece + b"\r\n"
    return out + end


TE_VALUES = [b"chunked", b"xchunked", b"chunked, identity", b"identity, chunked", b" chunked",
             b"chunked ", b"\tchunked", b"Chunked", b"CHUNKED", b"chunked\x00", b"chunk",
             b"gzip, chunked", b'"chunked"', b"chunked,", b",chunked", b"chunked\xff"]
TE_NAMES = [b"Transfer-Encoding", b"Transfer-Encoding ", b"Transfer_Encoding",
            b"transfer-encoding", b"Transfer-Encoding\t", b" Transfer-Encoding",
            b"Transfer-Encoding\x00"]
CL_VALUES = [b"+%d", b" %d", b"%d ", b"0x%x", b"0%d", b"%d,%d", b"-%d", b"99999999999999999999",
             b"%d\x00", b"%d.0"]
CHUNK_ODDITIES = [
    ("0x%x", b"", b"0\r\n\r\n"), ("%x", b";ext", b"0\r\n\r\n"), ("%x", b" ;e=v", b"0\r\n\r\n"),
    ("%x ", b"", b"0\r\n\r\n"), ("-%x", b"", b"0\r\n\r\n"), ("%x", b"", b"0\r\n"),
    ("%x", b"", b"0\r\n\r"), ("%x", b"", b"0\n\n"), ("fffffffffffffffffff%x", b"", b"0\r\n\r\n"),
    ("%X", b"", b"0\r\n\r\n"), ("%x", b"", b"0;ext\r\n\r\n"), ("%x", b"", b"0\r\nA: b\r\n\r\n"),
    ("%x", b"", b"000\r\n\r\n"),
]


def smuggled(case: int) -> bytes:
    return b"GET /c%d/smuggled HTTP/1.1\r\nHost: app\r\n\r\n" % case


def mutate(rng: random.Random, raw: Raw, case: int) -> None:
    """Apply one smuggling vector to ``raw``."""
    kind = rng.choice(["cl_te", "te_cl", "te_te", "te_only", "cl_odd", "cl_dup", "bare_lf",
                       "obs_fold", "space", "nonascii", "nul", "long", "chunk_odd",
                       "version", "method", "target", "host"])
    raw.notes.append(kind)
    payload = rng.choice([b"hello", smuggled(case), b"0\r\n\r\n" + smuggled(case)])
    te_name, te_value = rng.choice(TE_NAMES), rng.choice(TE_VALUES)
    fields = raw.fields
    if kind == "cl_te":
        fields[:] = [f for f in fields if f[0].lower() not in (b"content-length",)]
        fields.append([b"Content-Length", b": ", b"%d" % rng.choice([0, 3, len(payload)])])
        fields.append([te_name, b": ", te_value])
        raw.body = chunked(payload)
    elif kind == "te_cl":
        fields.append([te_name, b": ", te_value])
        fields.append([b"Content-Length", b": ", b"%d" % len(payload)])
        raw.body = rng.choice([payload, chunked(payload)])
    elif kind == "te_te":
        fields.append([b"Transfer-Encoding", b": ", b"chunked"])
        fields.append([te_name, b": ", te_value])
        raw.body = chunked(payload)
    elif kind == "te_only":
        fields.append([te_name, b": ", te_value])
        raw.body = rng.choice([chunked(payload), payload])
    elif kind == "cl_odd":
        fmt = rng.choice(CL_VALUES)
        value = fmt % ((len(payload),) * fmt.count(b"%")) if b"%" in fmt else fmt
        fields.append([b"Content-Length", b": ", value])
        raw.body = payload
    elif kind == "cl_dup":
        a = len(payload)
        b = rng.choice([a, 0, a + 1])
        fields.append([b"Content-Length", b": ", b"%d" % a])
        fields.append([rng.choice([b"Content-Length", b"content-length"]), b": ", b"%d" % b])
        raw.body = payload
    elif kind == "bare_lf":
        if rng.random() < 0.5:
            raw.eol = b"\n"
        else:
            fields.insert(0, [b"X-Lf", b": ", b"a\nTransfer-Encoding: chunked"])
            raw.body = chunked(payload)
    elif kind == "obs_fold":
        fields.append(rng.choice([[b"X-Fold", b": ", b"a\r\n b"],
                                  [b"Transfer-Encoding", b": ", b"identity\r\n chunked"],
                                  [b"Content-Length", b": ", b"0\r\n %d" % len(payload)]]))
        raw.body = rng.choice([chunked(payload), payload])
    elif kind == "space":
        target = rng.choice(fields)
        target[1] = rng.choice([b" : ", b":", b":\t", b": \t ", b" :", b":\x0b"])
        if rng.random() < 0.3:
            raw.line_sep = rng.choice([b"  ", b"\t"])
    elif kind == "nonascii":
        spot = rng.choice(["value", "name", "target"])
        if spot == "value":
            fields.append([b"X-Utf8", b": ", "caf\u00e9".encode()])
        elif spot == "name":
            fields.append([b"X-\xffName", b": ", b"v"])
        else:
            raw.target += b"/\xc3\xa9"
    elif kind == "nul":
        if rng.random() < 0.5:
            fields.append([b"X-Nul", b": ", b"a\x00b"])
        else:
            raw.target += b"%00\x00"
    elif kind == "long":
        if rng.random() < 0.5:
            raw.target += b"?q=" + b"x" * rng.choice([100, 9000])
        else:
            fields.append([b"X-Long", b": ", b"y" * rng.choice([1000, 20000, 70000])])
    elif kind == "chunk_odd":
        size_format, ext, end = rng.choice(CHUNK_ODDITIES)
        fields.append([b"Transfer-Encoding", b": ", b"chunked"])
        raw.body = chunked(payload, size_format, ext, end)
        if rng.random() < 0.2:   # chunk data longer than its size
            raw.body = b"3\r\nhello\r\n0\r\n\r\n"
    elif kind == "version":
        raw.version = rng.choice([b"HTTP/1.0", b"HTTP/1.2", b"HTTP/2.0", b"http/1.1",
                                  b"HTTP/1.1 ", b"HTTP/01.1"])
    elif kind == "method":
        raw.method = rng.choice([b"get", b"G\x00T", b"GET /c%d/x" % case, b"M-SEARCH", b"",
                                 b"PRI", b"GET\t"])
    elif kind == "target":
        raw.target = rng.choice([b"http://app/c%d/abs" % case, b"*", b"c%d/rel" % case,
                                 b"/c%d/a b" % case, b"/c%d/#frag" % case,
                                 b"//c%d/double" % case, b"http://other.example/c%d" % case])
    elif kind == "host":
        fields.append(rng.choice([[b"Host", b": ", b"app"], [b"Host", b": ", b"evil"],
                                  [b"Host", b": ", b""], [b"Host", b": ", b"a pp"]]))
        if rng.random() < 0.3:
            fields[:] = [f for f in fields if f[0] != b"Host"]


def generate_case(rng: random.Random, case: int, mutate_first: bool = False,
                  ) -> tuple[bytes, list[list[str]]]:
    """One connection's bytes: 1-3 pipelined requests, most of them mutated.
    Unless ``mutate_first``, a plain GET comes first, so the connection is
    detected as HTTP/1 and the mutated requests meet the HTTP/1 server end
    (whether detection and llhttp agree on a first request is
    ``tests/test_sniff``'s and issue 10 item 1's)."""
    requests = []
    notes = []
    if not mutate_first:
        requests.append(b"GET /c%d/first HTTP/1.1\r\nHost: app\r\n\r\n" % case)
        notes.append(["plain"])
    for k in range(rng.randint(1, 3)):
        method = rng.choice(METHODS)
        raw = Raw(method, b"/c%d/r%d" % (case, k), fields=[[b"Host", b": ", b"app"]])
        if rng.random() < 0.5:
            raw.fields.append([b"X-Case", b": ", b"%d-%d" % (case, k)])
        if method in (b"POST", b"PUT", b"PATCH") and rng.random() < 0.7:
            data = b"body-%d-%d" % (case, k)
            if rng.random() < 0.5:
                raw.fields.append([b"Content-Length", b": ", b"%d" % len(data)])
                raw.body = data
            else:
                raw.fields.append([b"Transfer-Encoding", b": ", b"chunked"])
                raw.body = chunked(data)
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            mutate(rng, raw, case)
        requests.append(raw.encode())
        notes.append(raw.notes)
    # The last word: answered and closed at once by a proxy still in step.
    requests.append(b"GET /c%d/last HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n" % case)
    notes.append(["last"])
    return b"".join(requests), notes


# -- the reference parse ------------------------------------------------------------

@dataclass
class Seen:
    method: bytes
    target: bytes
    host: bytes | None
    fields: list[tuple[bytes, bytes]]
    body: bytes

    def __repr__(self) -> str:
        def cut(b: bytes) -> str:
            return repr(b[:60] + (b"..." if len(b) > 60 else b""))
        fields = ", ".join(f"{cut(n)}: {cut(v)}" for n, v in self.fields)
        return (f"<{cut(self.method)} {cut(self.target)} host={self.host!r} [{fields}] "
                f"body={cut(self.body)}>")

    @classmethod
    def of(cls, event: h11.Request, body: bytes) -> Seen:
        host = None
        fields = []
        for name, value in event.headers:
            if name == b"host":
                host = value
            elif name not in NOT_COMPARED:
                fields.append((name, value))
        return cls(event.method, event.target, host, fields, body)


def h11_parse(data: bytes) -> tuple[list[Seen], str | None]:
    """The requests a strict parser reads from ``data`` (a connection's bytes,
    closed after them), and why it stopped early (None: it read them all)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    conn.receive_data(b"")
    seen: list[Seen] = []
    request, body = None, b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            return seen, f"h11: {e}"
        if event is h11.NEED_DATA:
            return seen, "incomplete" if request is not None else None
        if isinstance(event, h11.ConnectionClosed):
            return seen, None
        if isinstance(event, h11.Request):
            request, body = event, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            seen.append(Seen.of(request, body))
            request = None
            conn.send(h11.Response(status_code=200, headers=[("content-length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return seen, None
            conn.start_next_cycle()


def forwarded(name: bytes) -> bool:
    """A field the proxy forwards, by its name: not one with an underscore,
    which it drops (README, What the proxy rejects; nginx's default)."""
    return b"_" not in name


def origin_form(seen: Seen) -> Seen:
    """What a proxy forwards: for an absolute-form target, origin-form with
    the target's authority as Host (RFC 9112 3.2.2); no field ``forwarded``
    leaves out."""
    if not all(forwarded(n) for n, _ in seen.fields):
        seen = Seen(seen.method, seen.target, seen.host,
                    [(n, v) for n, v in seen.fields if forwarded(n)], seen.body)
    target = seen.target
    if not target.lower().startswith((b"http://", b"https://")):
        return seen
    rest = target.split(b"//", 1)[1]
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    path = rest[cut:] or b"/"
    if path.startswith(b"?"):
        path = b"/" + path
    return Seen(seen.method, path, rest[:cut], seen.fields, seen.body)


# -- the endpoint -------------------------------------------------------------------

class Endpoint:
    """A strict h11 origin on loopback (one thread per connection) recording
    every request it parses, and every parse error."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.errors: list[str] = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(60)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=200_000)
        request, body = None, b""
        try:
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as e:
                    with self.lock:
                        self.errors.append(f"endpoint parse error: {e}")
                    return
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(65536))
                    continue
                if isinstance(event, h11.ConnectionClosed):
                    return
                if isinstance(event, h11.Request):
                    request, body = event, b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    with self.lock:
                        self.seen.append(Seen.of(request, body))
                    answer = request.target[:100]
                    sock.sendall(conn.send(h11.Response(status_code=200, headers=[
                        ("content-length", str(len(answer)))])) + conn.send(h11.Data(answer))
                        + conn.send(h11.EndOfMessage()))
                    if conn.our_state is not h11.DONE:   # closing, or CONNECT: done
                        return
                    conn.start_next_cycle()
        except OSError:
            return
        finally:
            sock.close()

    def take(self) -> tuple[list[Seen], list[str]]:
        with self.lock:
            seen, self.seen = self.seen, []
            errors, self.errors = self.errors, []
        return seen, errors

    def close(self) -> None:
        self.sock.close()


# -- the client side ----------------------------------------------------------------

def read_responses(data: bytes) -> tuple[list[tuple[int, bytes | None]], bool]:
    """(status, l5d-proxy-error) of each whole response in ``data``; and
    whether the bytes ended cleanly (no partial response)."""
    out = []
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0 or not data.startswith(b"HTTP/1."):
            return out, False
        lines = data[:end].split(b"\r\n")
        status = int(lines[0][9:12])
        length = 0
        error = None
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"l5d-proxy-error":
                error = value.strip()
        out.append((status, error))
        data = data[end + 4 + length:]
    return out, True


def exchange(port: int, data: bytes, timeout: float = 10.0, quiet: float = 0.3) -> bytes:
    """Send ``data`` on a new connection and read until the proxy closes it.
    When the proxy waits for more (a body it reads longer than sent), the
    client half-closes after ``quiet`` seconds without a byte."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    received = b""
    try:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        sock.settimeout(quiet)
        with contextlib.suppress(OSError):
            while True:
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    sock.shutdown(socket.SHUT_WR)
                    sock.settimeout(timeout)
                    continue
                if not chunk:
                    break
                received += chunk
        return received
    finally:
        sock.close()


@dataclass
class Report:
    cases: int = 0
    requests: int = 0
    forwarded: int = 0
    rejected: int = 0
    lenient: int = 0            # forwarded where h11 had refused the client's bytes
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    rejections: collections.Counter = field(default_factory=collections.Counter)
    findings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.cases} cases, {self.requests} requests generated: "
                 f"{self.forwarded} forwarded, {self.rejected} answered 4xx by the proxy, "
                 f"{self.lenient} forwarded though h11 refused the client's bytes",
                 "rejections: " + ", ".join(f"{r} x{n}" for r, n in
                                            self.rejections.most_common())]
        lines += [f"FINDING: {f}" for f in self.findings] or ["no findings"]
        return "\n".join(lines)


def check_h1_case(report: Report, endpoint: Endpoint, port: int, case: int, data: bytes,
                  notes: list[list[str]]) -> None:
    report.cases += 1
    report.requests += len(notes)
    reference, _stopped = h11_parse(data)
    answer = exchange(port, data)
    seen, errors = endpoint.take()
    responses, _clean = read_responses(answer)
    label = f"h1 case {case} {notes} {data[:300]!r}"
    for error in errors:
        report.findings.append(f"{label}: {error}")
    # Cases run one at a time: what the endpoint saw meanwhile is this case's,
    # and a request tagged with another case's number is a desync in the pool.
    mine = seen
    for s in seen:
        other = re.search(rb"(?:^|/)c(\d+)(?:/|$)", s.target)
        if other is not None and int(other.group(1)) != case:
            report.findings.append(f"{label}: endpoint saw a request of another client: {s}")
    rejected_at = None
    for i, (status, error) in enumerate(responses):
        if error is not None and (400 <= status < 500 or status == 505):
            report.rejected += 1
            report.rejections[error.decode("latin-1")] += 1
            rejected_at = i
            break
        if error is not None:
            report.findings.append(f"{label}: the proxy answered {status} {error!r}")
    report.forwarded += len(mine)
    report.outcomes["rejected" if rejected_at is not None else
                    "closed" if len(responses) < len(mine) else "answered"] += 1
    if rejected_at is not None and len(mine) > rejected_at:
        report.findings.append(f"{label}: request {rejected_at} was rejected, yet the "
                               f"endpoint saw {mine[rejected_at:]}")
    for i, s in enumerate(mine):
        if b"/smuggled" in s.target and not any(r.target == s.target for r in reference):
            report.findings.append(f"{label}: a request hidden in a body reached the "
                                   f"endpoint: {s}")
        if i < len(reference):
            want = origin_form(reference[i])
            if (s.method, s.target, s.host, s.fields, s.body) != (
                    want.method, want.target, want.host, want.fields, want.body):
                report.findings.append(f"{label}: request {i} differs:\n  sent {want}"
                                       f"\n  seen {s}")
        else:
            report.lenient += 1   # h11 refused here; the proxy read a request


# -- h2 ------------------------------------------------------------------------------

H2_METHODS = [b"GET", b"POST", b"PUT", b"get", b"GET /admin?", b"G T", b"", b"CONNECT",
              b"OPTIONS", b"GET\r\n"]
H2_PATHS = [b"/c%d/r", b"/c%d/r?q=1", b"http://internal.example/c%d", b"*", b"",
            b"c%d/rel", b"/c%d/a b", b"/c%d/\xc3\xa9", b"/c%d/\r\nX: y", b"//c%d"]
H2_AUTHORITIES = [b"app", b"app:80", b"", b"a b", b"app\r\nX-Injected: 1", b"app/path",
                  b"user@app", None]
H2_FIELDS = [(b"x-a", b"v"), (b"x-b", b"v\r\nx-injected: 1"), (b"x-c", b" lead"),
             (b"X-Upper", b"v"), (b"connection", b"close"), (b"transfer-encoding", b"chunked"),
             (b"te", b"trailers"), (b"te", b"gzip"), (b"host", b"other"),
             (b"content-length", b"3"), (b"x-nul", b"a\x00b"), (b"x:colon", b"v"),
             (b"keep-alive", b"5"), (b"upgrade", b"h2c")]


def generate_h2_case(rng: random.Random, case: int) -> tuple[list[tuple[bytes, bytes]], bytes]:
    plain = rng.random() < 0.4   # a well-formed request, to be forwarded as it is
    method = rng.choice(H2_METHODS[:3] if plain else H2_METHODS)
    path = rng.choice(H2_PATHS[:2] if plain else H2_PATHS)
    path = path % case if b"%d" in path else path
    headers = [(b":method", method), (b":scheme", rng.choice([b"http", b"http", b"https",
                                                                 b"ftp"]))]
    if path or rng.random() < 0.5:
        headers.append((b":path", path))
    authority = b"app" if plain else rng.choice(H2_AUTHORITIES)
    if authority is not None:
        headers.append((b":authority", authority))
    if rng.random() < 0.1:
        headers.append((b":weird", b"x"))
    if rng.random() < 0.1:
        headers.insert(len(headers), (b":method", b"DELETE"))
    for _ in range(rng.randint(0, 2)):
        headers.append(rng.choice(H2_FIELDS))
    body = rng.choice([b"", b"", b"abc", b"body-%d" % case])
    return headers, body


def h2_exchange(port: int, headers, body: bytes, timeout: float = 10.0) -> tuple[str, int]:
    """Send one h2 request; ('response', status) or ('reset', code) or ('closed', 0)."""
    import h2.config
    import h2.connection
    import h2.events

    config = h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                       normalize_outbound_headers=False,
                                       validate_inbound_headers=False)
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            conn.send_headers(1, headers, end_stream=not body)
            if body:
                conn.send_data(1, body, end_stream=True)
        except Exception as e:   # the library refused to send it at all
            return f"unsendable {type(e).__name__}", 0
        sock.sendall(conn.data_to_send())
        status = None
        while True:
            data = sock.recv(65536)
            if not data:
                return "closed", 0
            try:
                events = conn.receive_data(data)
            except Exception:
                return "closed", 0
            for event in events:
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.StreamEnded):
                    return "response", status or 0
                elif isinstance(event, h2.events.StreamReset):
                    return ("response", status) if status else ("reset", event.error_code)
                elif isinstance(event, h2.events.ConnectionTerminated):
                    return ("response", status) if status else ("closed", 0)
            out = conn.data_to_send()
            if out:
                sock.sendall(out)
    except OSError:
        return "closed", 0
    finally:
        sock.close()


def check_h2_case(report: Report, endpoint: Endpoint, port: int, case: int,
                  headers, body: bytes) -> None:
    report.cases += 1
    report.requests += 1
    outcome, code = h2_exchange(port, headers, body)
    seen, errors = endpoint.take()
    label = f"h2 case {case} {headers} body={body!r}"
    for error in errors:
        report.findings.append(f"{label}: {error}")
    report.outcomes[f"h2 {outcome}"] += 1
    if outcome.startswith("unsendable"):
        return
    if not seen:
        if outcome == "response" and 400 <= code < 500:
            report.rejected += 1
        return
    report.forwarded += len(seen)
    if len(seen) > 1:
        report.findings.append(f"{label}: the endpoint saw {len(seen)} requests: {seen}")
    pseudo = dict(h for h in headers if h[0].startswith(b":"))
    s = seen[0]
    want_fields = [(n.lower(), v) for n, v in headers
                   if not n.startswith(b":") and n.lower() not in NOT_COMPARED
                   and forwarded(n)]
    problems = []
    if s.method != pseudo.get(b":method"):
        problems.append(f"method {s.method!r}")
    if s.target != pseudo.get(b":path"):
        problems.append(f"target {s.target!r}")
    if s.host != pseudo.get(b":authority"):
        problems.append(f"host {s.host!r}")
    if s.fields != want_fields:
        problems.append(f"fields {s.fields}")
    if s.body != body:
        problems.append(f"body {s.body!r}")
    if problems:
        report.findings.append(f"{label}: forwarded as something else: {', '.join(problems)}")


# -- running it -----------------------------------------------------------------------

def config_text(endpoint: Endpoint) -> str:
    return "\n".join([
        "[admin]", 'listen = "tcp:0:interface=127.0.0.1"', "",
        # forwarded = "off": the endpoint must see exactly the fields the
        # client sent (the forwarding fields have tests of their own).
        "[[listener]]", 'name = "in"', 'listen = "tcp:0:interface=127.0.0.1"',
        'service = "app"', 'forwarded = "off"', "",
        "[[listener]]", 'name = "h2"', 'listen = "tcp:0:interface=127.0.0.1"',
        'service = "app"', 'forwarded = "off"', "",
        "[service.app]", f'endpoints = ["{endpoint.address}"]', 'protocol = "http1"', "",
    ])


def metric_rejections(proxy) -> dict[str, float]:
    out: dict[str, float] = collections.defaultdict(float)
    for (name, labels), value in proxy.metrics().items():
        if name == "http_errors_total":
            out[dict(labels)["reason"]] += value
    return out


def run(proxy, endpoint: Endpoint, cases: int, h2_cases: int, seed: int,
        deadline: float | None = None, mutate_first: bool = False) -> Report:
    """Send ``cases`` HTTP/1 and ``h2_cases`` h2 cases; check each and the metrics."""
    rng = random.Random(seed)
    report = Report()
    h1_port, h2_port = proxy.port("in"), proxy.port("h2")
    for case in range(cases):
        if deadline is not None and time.monotonic() > deadline:
            break
        data, notes = generate_case(rng, case, mutate_first)
        check_h1_case(report, endpoint, h1_port, case, data, notes)
    for case in range(cases, cases + h2_cases):
        if deadline is not None and time.monotonic() > deadline:
            break
        headers, body = generate_h2_case(rng, case)
        check_h2_case(report, endpoint, h2_port, case, headers, body)
    counted = metric_rejections(proxy)
    for reason, n in report.rejections.items():
        if counted.get(reason, 0) < n:
            report.findings.append(f"http_errors_total{{reason={reason!r}}} is "
                                   f"{counted.get(reason, 0)}, {n} were answered")
    return report


class _Cleanups:
    """What ProxyProcess needs of a test case, for the command line."""

    def __init__(self) -> None:
        self.cleanups = []

    def addCleanup(self, f, *args) -> None:
        self.cleanups.append((f, args))

    def close(self) -> None:
        for f, args in reversed(self.cleanups):
            with contextlib.suppress(Exception):
                f(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.smuggle", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="HTTP/1 connections")
    parser.add_argument("--h2", type=int, default=None, help="h2 requests (default: cases/2)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mutate-first", action="store_true",
                        help="mutate the first request of a connection too (detection)")
    args = parser.parse_args(argv)
    from tests.support import ProxyProcess

    holder = _Cleanups()
    endpoint = Endpoint()
    holder.addCleanup(endpoint.close)
    try:
        proxy = ProxyProcess(holder, config_text(endpoint))
        started = time.monotonic()
        report = run(proxy, endpoint, args.cases,
                     args.cases // 2 if args.h2 is None else args.h2, args.seed,
                     mutate_first=args.mutate_first)
        print(report.summary())
        print(f"({time.monotonic() - started:.1f} s, seed {args.seed})")
        return 1 if report.findings else 0
    finally:
        holder.close()


if __name__ == "__main__":
    sys.exit(main())
