"""Pure parsing of the load tools' output (wrk, h2load, iperf3) and /proc.

Nothing here starts a process or touches the network, so every function can be
fed captured sample output in a unit test (see tests/test_bench_parsers.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class ParseError(ValueError):
    """The text does not look like the tool's normal output."""


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}


def duration_ms(text: str) -> float:
    """Convert wrk/h2load durations such as ``140.00us``, ``1.63ms``, ``2.05s`` to ms."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(us|ms|s|m|h)\s*", text)
    if not m:
        raise ParseError(f"not a duration: {text!r}")
    return float(m.group(1)) * _TIME_UNITS_MS[m.group(2)]


# --------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests_per_sec: float
    requests: int
    duration_s: float
    latency_ms: dict[str, float]  # "50", "75", "90", "99" -> ms
    non_2xx_3xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        """Socket errors of every kind (connect, read, write, timeout)."""
        return sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    """Parse ``wrk --latency`` output (wrk 4.x)."""
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    total = re.search(r"^\s*([0-9]+) requests in ([0-9.]+\w+),", text, re.M)
    if not rps or not total:
        raise ParseError("no 'Requests/sec' / 'N requests in' lines in wrk output")
    latency: dict[str, float] = {}
    dist = text.split("Latency Distribution", 1)
    if len(dist) == 2:
        for pct, value in re.findall(r"^\s+([0-9.]+)%\s+(\S+)\s*$", dist[1], re.M):
            latency[pct.removesuffix(".000").removesuffix(".0")] = duration_ms(value)
    errors: dict[str, int] = {}
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if sock:
        errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()),
                          strict=True))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return WrkResult(
        requests_per_sec=float(rps.group(1)),
        requests=int(total.group(1)),
        duration_s=duration_ms(total.group(2)) / 1000.0,
        latency_ms=latency,
        non_2xx_3xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=errors,
    )


# ------------------------------------------------------------------------ h2load


@dataclass
class H2loadResult:
    requests_per_sec: float
    duration_s: float
    total: int
    started: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status: dict[str, int]  # "2xx", "3xx", "4xx", "5xx" -> count
    request_time_ms: dict[str, float] = field(default_factory=dict)  # min, max, mean, sd


def parse_h2load(text: str) -> H2loadResult:
    """Parse the summary h2load (nghttp2 1.4x-1.5x) prints at the end of a run."""
    fin = re.search(r"^finished in ([0-9.]+\w+), ([0-9.]+) req/s", text, re.M)
    req = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
        r"(\d+) failed, (\d+) errored, (\d+) timeout",
        text,
        re.M,
    )
    if not fin or not req:
        raise ParseError("no 'finished in' / 'requests:' lines in h2load output")
    status: dict[str, int] = {}
    st = re.search(r"^status codes: (.*)$", text, re.M)
    if st:
        status = {k: int(v) for v, k in re.findall(r"(\d+) (\dxx)", st.group(1))}
    times: dict[str, float] = {}
    tr = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", text, re.M)
    if tr:
        for key, value in zip(("min", "max", "mean", "sd"), tr.groups(), strict=True):
            times[key] = duration_ms(value)
    total, started, done, ok, failed, errored, timeout = map(int, req.groups())
    return H2loadResult(
        requests_per_sec=float(fin.group(2)),
        duration_s=duration_ms(fin.group(1)) / 1000.0,
        total=total,
        started=started,
        done=done,
        succeeded=ok,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status=status,
        request_time_ms=times,
    )


@dataclass
class RequestLog:
    durations_ms: list[float]
    statuses: dict[int, int]


def parse_h2load_log(text: str) -> RequestLog:
    """Parse ``h2load --log-file``: start µs since epoch, status, µs to end of response."""
    durations: list[float] = []
    statuses: dict[int, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 3:
            raise ParseError(f"h2load log line {lineno}: expected 3 tab-separated fields")
        status = int(parts[1])
        statuses[status] = statuses.get(status, 0) + 1
        durations.append(int(parts[2]) / 1000.0)
    return RequestLog(durations_ms=durations, statuses=statuses)


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of an unsorted sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# ------------------------------------------------------------------------ iperf3


@dataclass
class IperfResult:
    received_bps: float
    sent_bps: float
    retransmits: int | None
    duration_s: float

    @property
    def gbits(self) -> float:
        return self.received_bps / 1e9


def parse_iperf3_json(text: str) -> IperfResult:
    """Parse ``iperf3 -c ... -J``. iperf3 reports failures in an "error" key (exit 0 or 1)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(f"iperf3 output is not JSON: {exc}") from exc
    if doc.get("error"):
        raise ParseError(f"iperf3: {doc['error']}")
    end = doc.get("end") or {}
    try:
        received = end["sum_received"]
        sent = end["sum_sent"]
    except KeyError as exc:
        raise ParseError(f"iperf3 JSON lacks end.{exc.args[0]}") from exc
    return IperfResult(
        received_bps=float(received["bits_per_second"]),
        sent_bps=float(sent["bits_per_second"]),
        retransmits=sent.get("retransmits"),
        duration_s=float(received.get("seconds", 0.0)),
    )


# ------------------------------------------------------------------------- /proc


def parse_vmrss_kib(status_text: str) -> int:
    """The VmRSS line of /proc/PID/status, in KiB."""
    m = re.search(r"^VmRSS:\s+(\d+) kB", status_text, re.M)
    if not m:
        raise ParseError("no VmRSS line (process gone or a kernel thread?)")
    return int(m.group(1))


def listening_ports(proc_net_tcp: str) -> set[int]:
    """Local ports in LISTEN state (st == 0A) in the text of /proc/net/tcp or tcp6."""
    ports: set[int] = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == "0A":
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def accept_queue(proc_net_tcp: str, port: int) -> int | None:
    """Connections waiting in ``port``'s accept queue (rx_queue of its LISTEN socket in
    /proc/net/tcp), or None if nothing listens there."""
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if (len(fields) > 4 and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port):
            return int(fields[4].split(":")[1], 16)
    return None


def proc_stat_busy_ticks(proc_stat: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from the ``cpu`` line of /proc/stat."""
    for line in proc_stat.splitlines():
        if line.startswith("cpu "):
            ticks = [int(v) for v in line.split()[1:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
            total = sum(ticks[:8])  # guest time is already counted in user
            return total - idle, total
    raise ParseError("no 'cpu' line in /proc/stat")


def pid_stat_session_ticks(pid_stat: str) -> tuple[int, int]:
    """(session id, utime + stime ticks) from /proc/PID/stat."""
    rest = pid_stat.rsplit(")", 1)[1].split()  # fields after "(comm)", from state on
    return int(rest[3]), int(rest[11]) + int(rest[12])


_EXC_LINE = re.compile(r"^\s+([A-Za-z_][\w.]*(?:Error|Exception|Failure)\b.*)$")


def log_exceptions(log_text: str) -> dict[str, int]:
    """Exception lines of the tracebacks in a twistd log -> how often each occurred.

    Twisted logs a traceback as indented lines after "Unhandled error in Deferred:" or
    "Unhandled Error"; the last one, ``pkg.ExcType: message``, names the exception.
    """
    counts: dict[str, int] = {}
    for line in log_text.splitlines():
        m = _EXC_LINE.match(line)
        if m and not m.group(1).startswith(("File ", "Traceback")):
            counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def prometheus_samples(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Non-zero samples of the metric families ``names`` from a Prometheus text page,
    keyed by the sample line's name and labels as written."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key.split("{", 1)[0] in names:
            with contextlib.suppress(ValueError):
                v = float(value)
                if v:
                    found[key] = v
    return found


def parse_curl_write_out(text: str) -> dict[str, float]:
    """Parse ``curl -w '%{http_code} %{size_download} %{speed_download}'``."""
    parts = text.split()
    if len(parts) != 3:
        raise ParseError(f"unexpected curl -w output: {text!r}")
    code, size, speed = parts
    return {"http_code": float(code), "bytes": float(size), "bytes_per_s": float(speed)}


# ------------------------------------------------------- abuse: our own tools' JSON


def _json_object(text: str, what: str) -> dict[str, Any]:
    """The last line of ``text`` that is a JSON object (the tools print one)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ParseError(f"{what}: not JSON: {exc}") from exc
            if isinstance(doc, dict):
                return doc
    raise ParseError(f"no JSON object in {what} output")


def _int_map(doc: dict[str, Any], key: str, what: str) -> dict[str, int]:
    value = doc.get(key) or {}
    if not isinstance(value, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
        raise ParseError(f"{what}: {key} is not a map of counts")
    return {str(k): int(v) for k, v in value.items()}


@dataclass
class AttackReport:
    """What one ``bench/attackers.py`` run saw (field meanings: that module's docstring)."""

    attack: str
    seconds: float
    opened: int
    connect_failed: int
    closed_by_peer: int
    closed_by_us: int
    throttled: int
    open_at_end: int
    work: int
    work_unit: str
    goaway: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    cpu_s: float = 0.0  # the attacker's own CPU seconds (absent in older reports: 0)
    max_work_per_conn: int = 0  # rapid-reset: most streams on one connection


_ATTACK_COUNTS = ("opened", "connect_failed", "closed_by_peer", "closed_by_us", "throttled",
                  "open_at_end", "work")


def parse_attack_report(text: str) -> AttackReport:
    """The JSON object an attacker prints when it ends. Counts must be non-negative
    integers, and the connections it opened must add up: every one was closed by the
    proxy, closed by the attacker, throttled or still open (``opened`` = their sum)."""
    doc = _json_object(text, "attacker")
    try:
        counts = {k: doc[k] for k in _ATTACK_COUNTS}
        attack, unit, seconds = str(doc["attack"]), str(doc["work_unit"]), float(doc["seconds"])
        cpu_s = float(doc.get("cpu_s", 0.0))
        per_conn = int(doc.get("max_work_per_conn", 0))
    except (KeyError, TypeError, ValueError) as exc:
        raise ParseError(f"attacker report lacks or mangles {exc}") from exc
    for k, v in counts.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ParseError(f"attacker report: {k} = {v!r} is not a count")
    ends = sum(counts[k] for k in ("closed_by_peer", "closed_by_us", "throttled", "open_at_end"))
    if attack != "mcs0-endpoint" and ends != counts["opened"]:
        raise ParseError(f"attacker report: {counts['opened']} connections opened but "
                         f"{ends} accounted for")
    errors = doc.get("errors") or []
    return AttackReport(attack=attack, seconds=seconds, work_unit=unit,
                        goaway=_int_map(doc, "goaway", "attacker report"),
                        statuses=_int_map(doc, "statuses", "attacker report"),
                        errors=[str(e) for e in errors], cpu_s=cpu_s,
                        max_work_per_conn=per_conn, **counts)


@dataclass
class GrpcLoad:
    calls: int
    ok: int
    failed: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    codes: dict[str, int]


def parse_grpc_load(text: str) -> GrpcLoad:
    """``bench/grpcload.py load`` output: ok + failed = calls, and the status-code counts
    add up to calls (``OK`` = ok)."""
    doc = _json_object(text, "grpcload")
    try:
        calls, ok, failed = int(doc["calls"]), int(doc["ok"]), int(doc["failed"])
        rps = float(doc["rps"])
        p50 = None if doc.get("p50_ms") is None else float(doc["p50_ms"])
        p99 = None if doc.get("p99_ms") is None else float(doc["p99_ms"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ParseError(f"grpcload output lacks or mangles {exc}") from exc
    codes = _int_map(doc, "codes", "grpcload")
    if ok + failed != calls or sum(codes.values()) != calls or codes.get("OK", 0) != ok:
        raise ParseError(f"grpcload: counts do not add up: {calls} calls, {ok} ok, "
                         f"{failed} failed, codes {codes}")
    return GrpcLoad(calls=calls, ok=ok, failed=failed, rps=rps, p50_ms=p50, p99_ms=p99,
                    codes=codes)


@dataclass
class Mcs0Stats:
    accepted: int
    open: int
    times: list[float]  # seconds since the endpoint started, one per accepted connection


def parse_mcs0_stats(text: str) -> Mcs0Stats:
    """The no-streams endpoint's stats file: ``{"accepted": N, "open": M, "times": [...]}``
    with one accept time per accepted connection, in order."""
    try:
        doc = json.loads(text)
        accepted, open_now = int(doc["accepted"]), int(doc["open"])
        times = [float(t) for t in doc["times"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ParseError(f"mcs0 endpoint stats: {exc}") from exc
    if len(times) != accepted or times != sorted(times) or not 0 <= open_now <= accepted:
        raise ParseError(f"mcs0 endpoint stats inconsistent: accepted {accepted}, open "
                         f"{open_now}, {len(times)} times")
    return Mcs0Stats(accepted=accepted, open=open_now, times=times)
