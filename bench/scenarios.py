"""Load scenarios: each drives one external tool against one port and returns a Sample.

A scenario knows which listener kind it uses (h1, h2c or tcp), which programs it
needs, and which metrics it yields (with how the report should show them).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.procs import Supervisor, ToolRun, which
from bench.tools import (
    ParseError,
    parse_h2load,
    parse_h2load_log,
    parse_iperf3_json,
    parse_wrk,
    percentile,
)

HOST = "127.0.0.1"


@dataclass
class Settings:
    rounds: int = 3
    duration: float = 10.0  # seconds of load per tool run
    warmup: float = 1.0  # seconds of unmeasured load per target before round 1
    wrk_connections: int = 50
    h2_clients: int = 10
    h2_streams: int = 10
    iperf_seconds: int = 5
    latency_seconds: float = 5.0  # measured seconds of the paced run
    latency_rate: int = 1000  # total requests/s of the paced run
    latency_clients: int = 10
    latency_warmup: float = 1.0
    hold_connections: int = 10_000
    worker_counts: tuple[int, ...] = ()  # l5dproxy --workers N for the workers scenario
    big_bytes: int = 1 << 30
    slow_rate: str = "20M"  # curl --limit-rate of the slow reader
    slow_seconds: float = 5.0
    ceiling_seconds: float = 3.0
    long_conn_streams: int = 100_000  # streams over one h2 connection (memory scenario)
    handshake_rate: int = 4000  # new TLS connections/s offered (tls scenario)
    abuse_seconds: float = 30.0  # how long the attackers of the abuse scenario run
    abuse_attacks: tuple[str, ...] = ()  # only these attackers (default: all)
    abuse_proxy: str = "l5dproxy"  # or "haproxy", as a reference
    abuse_each: bool = False  # also every attacker alone, each on a fresh proxy
    soak_seconds: float = 600.0


@dataclass
class Sample:
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class MetricSpec:
    key: str
    label: str
    fmt: str = "{:,.0f}"
    ratio: bool = True  # show l5dproxy/other ratios for this row
    higher_is_better: bool = True


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    kind: str  # listener kind: "h1", "h2c" or "tcp"
    needs: tuple[str, ...]
    run: Callable[[Supervisor, int, Settings], Sample]
    metrics: tuple[MetricSpec, ...]
    # Seconds from the tool's start to the start of what it counts (its warm-up): the
    # target's CPU is read from then on, so CPU per request divides like by like.
    measured_after: Callable[[Settings], float] = lambda s: 0.0


# The headline figure of the h1, h2c and latency scenarios (issue 16): the target's
# own CPU (every process of it) per request completed. Less noisy than req/s on a
# shared machine, and comparable between a saturated run and a paced one.
CPU_PER_REQUEST = MetricSpec("cpu_us_per_req", "CPU µs/request (lower is better)", "{:.1f}",
                             higher_is_better=False)


def add_cpu_per_request(sample: Sample, cpu_s: float | None) -> None:
    """Record ``cpu_s`` (CPU seconds the target used during the run) in ``sample`` as
    ``cpu_s`` and, given the requests the tool completed (``requests``), as
    ``cpu_us_per_req`` = 1e6 * cpu_s / requests. Nothing when either is unknown."""
    if cpu_s is None:
        return
    sample.metrics["cpu_s"] = cpu_s
    requests = sample.metrics.get("requests")
    if requests:
        sample.metrics["cpu_us_per_req"] = 1e6 * cpu_s / requests


_counter = itertools.count()


def _tool_failure(run: ToolRun, exc: Exception | None = None) -> str:
    err = (run.stderr.strip() or run.stdout.strip()).splitlines()[-3:]
    reason = f"{exc}; " if exc else ""
    return f"{reason}{run.argv[0].rsplit('/', 1)[-1]} exit {run.returncode}: {' | '.join(err)}"


def run_wrk(sup: Supervisor, port: int, s: Settings, scheme: str = "http") -> Sample:
    secs = max(1, round(s.duration))
    run = sup.run(
        [str(which("wrk")), "-t1", f"-c{s.wrk_connections}", f"-d{secs}s", "--latency",
         f"{scheme}://{HOST}:{port}/"],
        timeout=secs + 30,
    )
    try:
        r = parse_wrk(run.stdout)
    except ParseError as exc:
        return Sample(error=_tool_failure(run, exc))
    sample = Sample(metrics={
        "rps": r.requests_per_sec,
        "p50_ms": r.latency_ms.get("50", float("nan")),
        "p99_ms": r.latency_ms.get("99", float("nan")),
        "non_2xx": float(r.non_2xx_3xx),
        "socket_errors": float(r.errors),
        "requests": float(r.requests),
    })
    if r.errors or r.non_2xx_3xx:
        sample.notes.append(f"wrk: {r.non_2xx_3xx} non-2xx/3xx, socket errors {r.socket_errors}")
    return sample


def run_h2load(sup: Supervisor, port: int, s: Settings) -> Sample:
    run = sup.run(
        [str(which("h2load")), "-c", str(s.h2_clients), "-m", str(s.h2_streams),
         "-D", f"{s.duration:g}", f"http://{HOST}:{port}/"],
        timeout=s.duration + 30,
    )
    try:
        r = parse_h2load(run.stdout)
    except ParseError as exc:
        return Sample(error=_tool_failure(run, exc))
    non2xx = sum(v for k, v in r.status.items() if k != "2xx")
    sample = Sample(metrics={
        "rps": r.requests_per_sec,
        "succeeded": float(r.succeeded),
        "failed": float(r.failed),
        "non_2xx": float(non2xx),
        "requests": float(r.done),
    })
    if r.failed or non2xx or r.succeeded == 0:
        sample.notes.append(
            f"h2load: {r.succeeded} succeeded, {r.failed} failed ({r.errored} errored, "
            f"{r.timeout} timeout), status {r.status}"
        )
    return sample


def run_iperf(sup: Supervisor, port: int, s: Settings, reverse: bool = False) -> Sample:
    """iperf3 client -> server, or server -> client with ``reverse`` (``-R``)."""
    secs = s.iperf_seconds
    run = sup.run(
        [str(which("iperf3")), "-c", HOST, "-p", str(port), "-t", str(secs), "-J",
         *(["-R"] if reverse else [])],
        timeout=secs + 30,
    )
    try:
        r = parse_iperf3_json(run.stdout)
    except ParseError as exc:
        return Sample(error=_tool_failure(run, exc))
    return Sample(metrics={"gbits": r.gbits})


def _run_paced(sup: Supervisor, port: int, s: Settings, h1: bool,
               rate: int | None = None) -> Sample:
    """h2load at a fixed total rate (``rate``, default ``s.latency_rate``; ``--rps`` is per
    client); latency from --log-file. Requests of the warm-up are not counted."""
    log = sup.workdir / f"latency-{next(_counter)}.tsv"
    per_client = max(1, (rate or s.latency_rate) // s.latency_clients)
    argv = [str(which("h2load")), "-c", str(s.latency_clients), "-m", "1",
            "--rps", str(per_client), "-D", f"{s.latency_seconds:g}",
            "--warm-up-time", f"{round(s.latency_warmup * 1000)}ms", "--log-file", str(log),
            f"http://{HOST}:{port}/"]
    if h1:
        argv.insert(1, "--h1")
    run = sup.run(argv, timeout=s.latency_seconds + s.latency_warmup + 30)
    try:
        summary = parse_h2load(run.stdout)
        reqlog = parse_h2load_log(log.read_text() if log.exists() else "")
    except (ParseError, ValueError) as exc:
        return Sample(error=_tool_failure(run, exc))
    finally:
        log.unlink(missing_ok=True)
    if not reqlog.durations_ms:
        return Sample(error=_tool_failure(run, ParseError("no request completed")))
    d = reqlog.durations_ms
    sample = Sample(metrics={
        "p50_ms": percentile(d, 50),
        "p99_ms": percentile(d, 99),
        "p999_ms": percentile(d, 99.9),
        "rps": summary.requests_per_sec,
        "failed": float(summary.failed),
        "requests": float(summary.done),
    })
    if summary.failed:
        sample.notes.append(f"h2load paced: {summary.failed} failed of {summary.total}")
    return sample


def run_latency_h1(sup: Supervisor, port: int, s: Settings) -> Sample:
    return _run_paced(sup, port, s, h1=True)


def run_latency_h1_3k(sup: Supervisor, port: int, s: Settings) -> Sample:
    return _run_paced(sup, port, s, h1=True, rate=LATENCY_RATE_3K)


def run_latency_h2c(sup: Supervisor, port: int, s: Settings) -> Sample:
    return _run_paced(sup, port, s, h1=False)


def _latency_warmup(s: Settings) -> float:
    return s.latency_warmup


LATENCY_RATE_3K = 3000  # total req/s of latency_h1_3k (issue 16's second latency row)

_LAT = (
    CPU_PER_REQUEST,
    MetricSpec("p50_ms", "p50 ms", "{:.3f}", higher_is_better=False),
    MetricSpec("p99_ms", "p99 ms", "{:.3f}", higher_is_better=False),
    MetricSpec("p50_added_ms", "p50 added ms", "{:+.3f}", ratio=False, higher_is_better=False),
    MetricSpec("p99_added_ms", "p99 added ms", "{:+.3f}", ratio=False, higher_is_better=False),
    MetricSpec("rps", "achieved req/s", ratio=False),
    MetricSpec("failed", "failed", ratio=False, higher_is_better=False),
)

SCENARIOS: dict[str, Scenario] = {
    sc.name: sc
    for sc in (
        Scenario(
            "h1", "HTTP/1.1 keep-alive GET (wrk -t1 -c50)", "h1", ("wrk",), run_wrk,
            (
                CPU_PER_REQUEST,
                MetricSpec("rps", "req/s"),
                MetricSpec("p50_ms", "p50 ms", "{:.3f}", higher_is_better=False),
                MetricSpec("p99_ms", "p99 ms", "{:.3f}", higher_is_better=False),
                MetricSpec("non_2xx", "non-2xx/3xx", ratio=False, higher_is_better=False),
                MetricSpec("socket_errors", "socket errors", ratio=False,
                           higher_is_better=False),
            ),
        ),
        Scenario(
            "h2c", "h2c GET multiplexed (h2load -c10 -m10)", "h2c", ("h2load",), run_h2load,
            (
                CPU_PER_REQUEST,
                MetricSpec("rps", "req/s"),
                MetricSpec("succeeded", "succeeded", ratio=False),
                MetricSpec("failed", "failed", ratio=False, higher_is_better=False),
            ),
        ),
        Scenario(
            "tcp", "opaque TCP bulk (iperf3)", "tcp", ("iperf3",), run_iperf,
            (MetricSpec("gbits", "Gbit/s", "{:.2f}"),),
        ),
        Scenario(
            "latency_h1", "HTTP/1.1 at a fixed rate (h2load --h1 --rps)", "h1", ("h2load",),
            run_latency_h1, _LAT, _latency_warmup,
        ),
        Scenario(
            "latency_h1_3k", f"HTTP/1.1 at {LATENCY_RATE_3K:,} req/s (h2load --h1 --rps)",
            "h1", ("h2load",), run_latency_h1_3k, _LAT, _latency_warmup,
        ),
        Scenario(
            "latency_h2c", "h2c at a fixed rate (h2load --rps)", "h2c", ("h2load",),
            run_latency_h2c, _LAT, _latency_warmup,
        ),
    )
}
