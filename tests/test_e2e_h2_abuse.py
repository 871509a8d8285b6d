"""Abusive HTTP/2 peers against the real ``twistd l5dproxy`` (issue 11).

Raw sockets play the attacker (what no well-behaved client sends), the
proxy runs as a subprocess in front of tests/h2backend.py; every attack is
bounded in count and time, and an honest client is served beside it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.settings import SettingCodes
from twisted.trial.unittest import TestCase

from tests.support import wait_for
from tests.test_e2e_h2 import H2SocketClient, proxy_to, rss_kib, start_h2_backend

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
       (b":authority", b"app.test")]


def read_frames_until_eof(sock: socket.socket, timeout: float) -> list[tuple[int, int, bytes]]:
    """Every frame (type, stream, payload) the peer sends until it closes."""
    deadline = time.monotonic() + timeout
    sock.settimeout(timeout)
    buffer = bytearray()
    while True:
        if time.monotonic() > deadline:
            raise AssertionError("the proxy did not close the connection")
        try:
            chunk = sock.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buffer += chunk
    frames = []
    view = bytes(buffer)
    while len(view) >= 9:
        length = int.from_bytes(view[:3], "big")
        kind, sid = view[3], int.from_bytes(view[5:9], "big") & 0x7FFFFFFF
        frames.append((kind, sid, view[9:9 + length]))
        view = view[9 + length:]
    return frames


def honest_get(port: int, path: bytes = b"/") -> int:
    """One GET on a fresh connection, reading as it comes: the status."""
    return honest_fetch(port, path)[0]


def honest_fetch(port: int, path: bytes) -> tuple[int | None, int]:
    """One GET on a fresh connection, reading as it comes: (status, body bytes)."""
    client = H2SocketClient(port)
    try:
        sid = client.get(path)
        status = None
        received = 0
        while True:
            for event in client.events():
                if isinstance(event, ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, DataReceived):
                    received += len(event.data)
                    client.h2.acknowledge_received_data(event.flow_controlled_length, sid)
                elif isinstance(event, StreamEnded) and event.stream_id == sid:
                    return status, received
            client.flush()
    finally:
        client.close()


class RapidResetTests(TestCase):
    timeout = 120

    def test_rapid_reset_gets_enhance_your_calm(self) -> None:
        """CVE-2023-44487 through the real proxy: 20,000 x (HEADERS GET /
        END_STREAM + RST_STREAM CANCEL) on one h2c connection. Before: every
        request went upstream and was cancelled there, the connection never
        closed. After: GOAWAY(ENHANCE_YOUR_CALM) and a close, within the
        budget (500 points, 100 a second) of upstream work; others are served."""
        backend_port, _log = start_h2_backend(self)
        proxy = proxy_to(self, f"127.0.0.1:{backend_port}")
        port = proxy.port("in")

        h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        h2.initiate_connection()
        for _ in range(20_000):
            sid = h2.get_next_available_stream_id()
            h2.send_headers(sid, GET, end_stream=True)
            h2.reset_stream(sid, ErrorCodes.CANCEL)
        attack = h2.data_to_send()
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.addCleanup(sock.close)

        def send() -> None:
            with contextlib.suppress(OSError):   # the proxy closed first: expected
                sock.sendall(attack)
        sender = threading.Thread(target=send, daemon=True)
        started = time.monotonic()
        sender.start()
        frames = read_frames_until_eof(sock, 30)
        elapsed = time.monotonic() - started
        sender.join(10)

        goaways = [payload for kind, _, payload in frames if kind == 0x7]
        self.assertEqual(len(goaways), 1, frames[-5:])
        self.assertEqual(int.from_bytes(goaways[0][4:8], "big"), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertLess(elapsed, 15)
        self.assertEqual(proxy.metric_value("h2_abuse_total", kind="reset"), 1)
        # Upstream work: the budget, plus its refill over the attack, not 20,000.
        requests = proxy.metric_value("request_total", protocol="h2")
        self.assertLessEqual(requests, 500 + 100 * elapsed + 50)
        # The proxy serves everyone else.
        self.assertEqual(honest_get(port), 200)


class UnreadRepliesTests(TestCase):
    timeout = 180
    status: int | None = None

    def test_ping_flood_from_a_client_that_does_not_read(self) -> None:
        """Kind 2: a client with a small receive buffer sends PINGs and never
        reads (the abuse budget set out of the way). Before: the proxy read
        them all and queued every ACK (+13.5 MB after 1.2 M PINGs). After: it
        stops reading once its write buffer is full, so the client's send
        blocks long before 400,000 PINGs, the proxy's memory stays flat, and
        once the client reads, the connection carries on (a GET is answered)."""
        backend_port, _log = start_h2_backend(self)
        proxy = proxy_to(self, f"127.0.0.1:{backend_port}", abuse_budget=2**31 - 1)
        port = proxy.port("in")
        pid = proxy.process.pid
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.connect(("127.0.0.1", port))
        self.addCleanup(sock.close)
        h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        h2.initiate_connection()
        sock.sendall(h2.data_to_send())
        rss_before = rss_kib(pid)

        ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + b"12345678"
        batch = memoryview(ping * 1000)
        pending = batch
        sock.setblocking(False)
        sent = 0
        blocked_since = None
        while sent < 400_000 * len(ping):
            try:
                n = sock.send(pending)
            except BlockingIOError:
                n = 0
            if n:
                sent += n
                pending = pending[n:] or batch
                blocked_since = None
                continue
            if blocked_since is None:
                blocked_since = time.monotonic()
            elif time.monotonic() - blocked_since > 3:
                break   # the proxy has stopped reading: our send stays blocked
            time.sleep(0.01)
        pings = sent // len(ping)
        self.assertLess(pings, 400_000, "the proxy read every PING")
        grown = rss_kib(pid) - rss_before
        self.assertLess(grown, 8 * 1024, f"RSS grew {grown} KiB for {pings} PINGs")
        self.assertEqual(proxy.metric_value("h2_abuse_total", kind="write_buffer"), 0)

        # The client reads now: the proxy drains, reads again, and serves it.
        sock.setblocking(True)
        sock.settimeout(30)
        reader = threading.Thread(target=self._drain, args=(sock, h2), daemon=True)
        reader.start()
        if pending is not batch:
            sock.sendall(pending[:len(pending) % len(ping)])   # the rest of the last PING
        sid = h2.get_next_available_stream_id()
        h2.send_headers(sid, GET, end_stream=True)
        sock.sendall(h2.data_to_send())
        reader.join(60)
        self.assertEqual(self.status, 200)
        print(f"\n{pings} PINGs sent before the send blocked; RSS grew {grown} KiB")

    def _drain(self, sock: socket.socket, h2: H2Connection) -> None:
        """Read everything (the ACKs, then the response); the response status."""
        while True:
            data = sock.recv(1 << 16)
            if not data:
                return
            for event in h2.receive_data(data):
                if isinstance(event, ResponseReceived):
                    self.status = int(dict(event.headers)[b":status"])
                    return


class StalledStreamsTests(TestCase):
    timeout = 120

    def test_a_stalled_client_does_not_stall_another(self) -> None:
        """Kind 4: a client sets its stream windows to 0 and opens 4 GETs for
        2 MiB each, through the proxy to an h2 endpoint (one shared upstream
        connection). Before: the stalled streams held the upstream
        connection's window (4 x 1 MiB = all 4 MiB of it), and an honest
        client got its headers and no body until the first left. After: the
        honest client's 1 MiB completes while the stalled streams are still
        held, and the proxy holds no more than their stream windows."""
        backend_port, _log = start_h2_backend(self)
        proxy = proxy_to(self, f"127.0.0.1:{backend_port}")
        port = proxy.port("in")
        pid = proxy.process.pid
        self.assertEqual(honest_get(port), 200)   # the upstream connection is up
        rss_before = rss_kib(pid)

        stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.addCleanup(stalled.close)
        h2 = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        h2.initiate_connection()
        h2.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 0})
        sids = []
        for _ in range(4):
            sid = h2.get_next_available_stream_id()
            h2.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"),
                                  (b":path", b"/bytes/2097152"), (b":authority", b"app.test")],
                            end_stream=True)
            sids.append(sid)
        stalled.sendall(h2.data_to_send())
        # Its four response heads arrive (and the upstream sends into the
        # proxy what the streams' windows allow): then it reads nothing more.
        heads = set()
        deadline = time.monotonic() + 20
        while len(heads) < 4 and time.monotonic() < deadline:
            for event in h2.receive_data(stalled.recv(65536)):
                if isinstance(event, ResponseReceived):
                    heads.add(event.stream_id)
            stalled.sendall(h2.data_to_send())
        self.assertEqual(heads, set(sids))
        # The upstream has sent the stalled streams what their windows allow
        # (4 x ~1 MiB), all of the upstream connection's window before the fix.
        wait_for(lambda: proxy.metric_value("tcp_read_bytes_total", peer="dst")
                 >= 4 * 1024 * 1024, 20, "the upstream to fill the stalled streams' windows")

        started = time.monotonic()
        status, received = honest_fetch(port, b"/bytes/1048576")
        elapsed = time.monotonic() - started
        self.assertEqual((status, received), (200, 1048576))
        self.assertLess(elapsed, 10)
        # The stalled streams are still open: nothing reset them or the connection.
        stalled.settimeout(0.5)
        events = []
        with contextlib.suppress(socket.timeout):
            events = h2.receive_data(stalled.recv(65536))
        self.assertFalse([e for e in events if isinstance(e, (StreamReset, ConnectionTerminated))])
        # What the proxy holds for them: their stream windows (1 MiB each, and
        # 64 KiB queued towards the client), well under 4 x 1.1 MiB + slack.
        grown = rss_kib(pid) - rss_before
        self.assertLess(grown, 4 * 1126 + 12 * 1024, f"RSS grew {grown} KiB")
        print(f"\nhonest 1 MiB beside 4 stalled streams: {elapsed:.2f} s; RSS grew {grown} KiB")
