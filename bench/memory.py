"""Memory measurements of a proxy process: RSS idle, with many idle connections, and
peak RSS while a large body streams through it (fast and slow reader)."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import Supervisor, fd_count, rss_kib, which
from bench.tools import ParseError, accept_queue, parse_curl_write_out, parse_h2load

HOST = "127.0.0.1"


class RssSampler:
    """Samples a process's VmRSS in a thread; ``peak_kib`` is the maximum seen."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ParseError):
                self.peak_kib = max(self.peak_kib, rss_kib(self.pid))
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError, ParseError):
            self.peak_kib = max(self.peak_kib, rss_kib(self.pid))


@dataclass
class HoldResult:
    wanted: int
    opened: int = 0
    rss_before_kib: int = 0
    rss_with_kib: int = 0
    fds_before: int = 0
    fds_with: int = 0
    closed_by_peer: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def per_conn_kib(self) -> float:
        return (self.rss_with_kib - self.rss_before_kib) / self.opened if self.opened else 0.0


def _wait_accepted(pid: int, port: int, relayed_fds: int, timeout: float) -> None:
    """Wait until the listener on ``port`` has accepted everything queued: either ``pid``
    has ``relayed_fds`` open (a relay holds 2 per connection) or, checked more rarely
    because /proc/net/tcp gets long, the listener's accept queue is empty."""
    deadline = time.monotonic() + timeout
    tries = 0
    while time.monotonic() < deadline:
        if fd_count(pid) >= relayed_fds:
            return
        tries += 1
        if tries % 10 == 0 and not accept_queue(Path("/proc/net/tcp").read_text(), port):
            return
        time.sleep(0.002)


def _wait_stable_fds(pid: int, target: int, timeout: float, quiet: float = 1.0) -> int:
    """Wait until the fd count reaches ``target`` or stops changing for ``quiet`` s."""
    deadline = time.monotonic() + timeout
    last, since = fd_count(pid), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        n = fd_count(pid)
        if n >= target:
            return n
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return last


def hold_connections(pid: int, port: int, n: int, batch: int = 32) -> HoldResult:
    """Open ``n`` idle client connections to ``port`` (served by ``pid``), in batches paced
    by the proxy's accept progress, then compare RSS. Batches stay under Twisted's default
    listen backlog of 50: a full accept queue drops SYNs, costing a 1 s retransmit each.
    Sockets close with RST (SO_LINGER 0) so no TIME_WAIT piles up on our side."""
    res = HoldResult(wanted=n)
    time.sleep(0.5)
    res.rss_before_kib, res.fds_before = rss_kib(pid), fd_count(pid)
    socks: list[socket.socket] = []
    linger = struct.pack("ii", 1, 0)
    try:
        while len(socks) < n:
            for _ in range(min(batch, n - len(socks))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                s.settimeout(5.0)
                try:
                    s.connect((HOST, port))
                except OSError as exc:
                    s.close()
                    res.errors.append(f"connect #{len(socks) + 1}: {exc}")
                    break
                socks.append(s)
            if res.errors:
                break
            _wait_accepted(pid, port, res.fds_before + 2 * len(socks), timeout=10.0)
        res.opened = len(socks)
        # Relays open one upstream connection per client: expect about 2 fds per connection.
        res.fds_with = _wait_stable_fds(pid, res.fds_before + 2 * len(socks), timeout=30.0)
        time.sleep(0.5)
        res.rss_with_kib = rss_kib(pid)
        res.closed_by_peer = _count_closed(socks)
    finally:
        for s in socks:
            s.close()
    # Let the proxy tear down (and the next measurement start from a calm process).
    deadline = time.monotonic() + 15.0
    while fd_count(pid) > res.fds_before + 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    return res


def _count_closed(socks: list[socket.socket]) -> int:
    """Sockets the peer already closed (readable at EOF/RST) -- should be 0 for idle holds."""
    poller = select.poll()
    by_fd = {}
    for s in socks:
        poller.register(s.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        by_fd[s.fileno()] = s
    closed = 0
    for fd, _ev in poller.poll(0):
        try:
            data = by_fd[fd].recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
            closed += data == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


@dataclass
class StreamResult:
    rss_before_kib: int = 0
    peak_kib: int = 0
    bytes: float = 0.0
    bytes_per_s: float = 0.0
    http_code: int = 0
    error: str | None = None

    @property
    def delta_kib(self) -> int:
        return self.peak_kib - self.rss_before_kib


def stream_body(sup: Supervisor, pid: int | None, url: str, limit_rate: str | None = None,
                max_time: float | None = None) -> StreamResult:
    """Download ``url`` with curl to /dev/null while sampling ``pid``'s RSS."""
    argv = [str(which("curl")), "-sS", "-o", "/dev/null",
            "-w", "%{http_code} %{size_download} %{speed_download}"]
    if limit_rate:
        argv += ["--limit-rate", limit_rate]
    if max_time:
        argv += ["--max-time", f"{max_time:g}"]
    argv.append(url)
    res = StreamResult()
    if pid is not None:
        res.rss_before_kib = rss_kib(pid)
    sampler = RssSampler(pid) if pid is not None else None
    with sampler or contextlib.nullcontext():
        run = sup.run(argv, timeout=(max_time or 300) + 30)
    if sampler is not None:
        res.peak_kib = sampler.peak_kib
    try:
        parsed = parse_curl_write_out(run.stdout)
    except ParseError as exc:
        res.error = f"{exc}; curl exit {run.returncode}: {run.stderr.strip()}"
        return res
    res.bytes, res.bytes_per_s = parsed["bytes"], parsed["bytes_per_s"]
    res.http_code = int(parsed["http_code"])
    # Exit 28 (--max-time) is the intended stop of the slow (rate-limited) reader only.
    if run.returncode != 0 and not (run.returncode == 28 and limit_rate):
        res.error = f"curl exit {run.returncode}: {run.stderr.strip()}"
    elif res.http_code != 200:
        res.error = f"HTTP status {res.http_code}"
    return res


@dataclass
class LongConnResult:
    """One h2 connection carrying ``streams`` requests: RSS before, peak while it was open
    (sampled every 10 ms; the connection's state is largest at its end) and 1 s after it
    closed."""

    streams: int
    rss_before_kib: int = 0
    peak_kib: int = 0
    rss_after_kib: int = 0
    succeeded: int = 0
    failed: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def growth_kib(self) -> int:
        return self.peak_kib - self.rss_before_kib

    @property
    def held_after_kib(self) -> int:
        return self.rss_after_kib - self.rss_before_kib


def long_h2_connection(sup: Supervisor, pid: int, port: int, streams: int,
                       inflight: int = 10) -> LongConnResult:
    """``h2load -c1 -m{inflight} -n {streams}`` over h2c to ``port`` (issue 17: state a
    proxy keeps per connection for its whole life, e.g. a record of every closed stream,
    grows with the streams it has carried). Growth = peak RSS while the connection was
    open minus RSS before, in KiB."""
    res = LongConnResult(streams=streams)
    time.sleep(0.5)
    res.rss_before_kib = rss_kib(pid)
    with RssSampler(pid) as sampler:
        run = sup.run([str(which("h2load")), "-c1", f"-m{inflight}", "-n", str(streams),
                       f"http://{HOST}:{port}/"], timeout=60 + streams / 100)
    res.peak_kib = sampler.peak_kib
    res.seconds = run.seconds
    time.sleep(1.0)
    res.rss_after_kib = rss_kib(pid)
    try:
        r = parse_h2load(run.stdout)
    except ParseError as exc:
        res.error = f"{exc}; h2load exit {run.returncode}: {run.stderr.strip()[-300:]}"
        return res
    res.succeeded, res.failed = r.succeeded, r.failed
    if r.succeeded < streams:
        res.error = f"h2load: {r.succeeded} of {streams} streams succeeded ({r.failed} failed)"
    return res
