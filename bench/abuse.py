"""The ``abuse`` and ``soak`` scenarios (issue 11): attackers against l5dproxy while
honest HTTP/1.1, h2c and gRPC clients are measured beside them.

Both start an l5dproxy of their own (``twistd -n l5dproxy``, the harness's config
plus a ``grpc`` listener in front of a grpcio server and an ``mcs0`` listener in
front of an h2 endpoint whose SETTINGS say MAX_CONCURRENT_STREAMS = 0), so the
figures start from a fresh process. The attackers are ``bench/attackers.py``
processes, the gRPC client and server ``bench/grpcload.py`` processes; every one
is bounded in time and started under the harness's Supervisor.

``abuse``: a quiet run (the three honest clients for ``duration`` s), then an
attacked run: every attacker for ``abuse_seconds``, the honest clients measured for
``duration`` s from ``ABUSE_RAMP`` s in. Figures: honest req/s and p99, quiet beside
attacked; the proxy's CPU and RSS; per attacker what became of its connections.
Targets (issue 11): honest req/s at least 0.8 of the quiet run, RSS growth under
20 MiB, every attacker connection closed or throttled.

``soak``: ``soak_seconds`` of paced honest traffic and smaller attackers in cycles of
``SOAK_CYCLE`` s; RSS is read after each cycle. Targets: after the warm-up, RSS flat
within 5 MiB; no honest request failed.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.backends import HOST, Backends, Target, start_l5dproxy
from bench.procs import (
    Child,
    CpuMeter,
    StartError,
    Supervisor,
    free_port,
    pid_stat_ticks,
    rss_kib,
    wait_tcp,
    which,
)
from bench.tools import (
    AttackReport,
    ParseError,
    parse_attack_report,
    parse_grpc_load,
    parse_h2load,
    parse_h2load_log,
    parse_mcs0_stats,
    parse_wrk,
    percentile,
    prometheus_samples,
)

BENCH_DIR = Path(__file__).resolve().parent
MIB = 1024.0
ABUSE_RAMP = 5.0  # seconds of attack before the honest clients are measured
SOAK_CYCLE = 30.0
THROUGHPUT_TARGET = 0.8
RSS_GROWTH_TARGET_MIB = 20.0
SOAK_FLAT_MIB = 5.0
# Upstream connections to the no-streams endpoint we call bounded: per request, one try
# and l5dproxy's default 2 retries (issue 11 saw hundreds per request).
MCS0_DIALS_PER_REQUEST = 3
# Rapid reset reconnects when closed, so connections are always open at its end: what
# counts is that the proxy closed them, each before it had carried this many resets
# (issue 11's input: 20,000 on one connection; Envoy checks after 500 streams). A
# connection the proxy merely reads slowly (busy cancelling streams) is the fault, not
# a throttle. A PING flood may be throttled (the proxy stops reading it), zero-window
# streams held at no cost.
RAPID_RESET_MAX_PER_CONN = 5_000
# l5dproxy metric families shown after the attack (non-zero samples), where they exist.
ABUSE_METRICS = ("h2_abuse_total", "connection_limit_total", "load_shed_total",
                 "http_errors_total", "tcp_open_connections", "endpoint_connect_errors_total")


@dataclass(frozen=True)
class Attack:
    kind: str
    listener: str  # which l5dproxy listener: h1, h2c, mcs0
    args: tuple[str, ...] = ()
    label: str = ""


# The inputs, at the sizes it names.
ABUSE_ATTACKS = (
    Attack("rapid-reset", "h2c", ("--conns", "2", "--burst", "100", "--rate", "1000"),
           "HEADERS+RST_STREAM(CANCEL), 2 conns x 1,000/s"),
    Attack("ping-flood", "h2c", ("--conns", "1", "--rate", "50000"),
           "50,000 PINGs/s, 4 KiB rcvbuf, never reads"),
    Attack("zero-window", "h2c", ("--conns", "2", "--streams", "4", "--path", "/big"),
           "window 0, 4 GET /big per conn, 2 conns"),
    Attack("mcs0-client", "mcs0", ("--interval", "1", "--wait", "8"),
           "1 req/s to an endpoint with MAX_CONCURRENT_STREAMS=0"),
    Attack("slowloris-h1", "h1", ("--conns", "5000", "--interval", "5", "--batch", "200"),
           "5,000 partial heads, 1 byte/5 s each"),
    Attack("slowloris-h2", "h2c", ("--conns", "500", "--batch", "100"),
           "500 h2 client prefaces (24 bytes), then silence"),
    Attack("conn-flood", "h1", ("--conns", "2000", "--rate", "1000", "--batch", "50"),
           "silent conns at 1,000/s, 2,000 held (oldest RST)"),
)
# Smaller, for the soak's repeated cycles.
SOAK_ATTACKS = (
    Attack("rapid-reset", "h2c", ("--conns", "1", "--burst", "50", "--rate", "500")),
    Attack("ping-flood", "h2c", ("--conns", "1", "--rate", "20000")),
    Attack("zero-window", "h2c", ("--conns", "1", "--streams", "4", "--path", "/big")),
    Attack("mcs0-client", "mcs0", ("--interval", "2", "--wait", "8")),
    Attack("slowloris-h1", "h1", ("--conns", "500", "--interval", "5")),
    Attack("slowloris-h2", "h2c", ("--conns", "50")),
    Attack("conn-flood", "h1", ("--conns", "200", "--rate", "200", "--batch", "20")),
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the rig


@dataclass
class Rig:
    """The abuse proxy and what is behind its extra listeners."""

    target: Target
    ports: dict[str, int]  # h1, h2c, grpc, mcs0
    mcs0_stats: Path
    helpers: list[Child] = field(default_factory=list)  # grpc server, 0-streams endpoint

    def stop(self, sup: Supervisor) -> None:
        for child in [*self.target.children, *self.helpers]:
            sup.stop(child)

    @property
    def pid(self) -> int:
        assert self.target.pid is not None
        return self.target.pid


def abuse_config_extra(grpc_listen: int, grpc_backend: int, mcs0_listen: int,
                       mcs0_backend: int) -> str:
    return f"""
[[listener]]
name = "grpc"
listen = "tcp:{grpc_listen}:interface={HOST}"
service = "grpc"

[[listener]]
name = "mcs0"
listen = "tcp:{mcs0_listen}:interface={HOST}"
service = "mcs0"

[service.grpc]
endpoints = ["{HOST}:{grpc_backend}"]
protocol = "h2"

[service.mcs0]
endpoints = ["{HOST}:{mcs0_backend}"]
protocol = "h2"
"""


def start_rig(sup: Supervisor, b: Backends, name: str, ready_timeout: float,
              lifetime: float, proxy: str = "l5dproxy") -> Rig:
    """grpc server, no-streams endpoint and an l5dproxy (or, ``proxy="haproxy"``, HAProxy
    as a reference) in front of them and nginx.
    ``lifetime`` bounds the helper servers (the Supervisor kills them before that)."""
    grpc_port, mcs0_port = free_port(), free_port()
    stats = sup.workdir / f"{name}-mcs0.json"
    g = sup.start(f"{name}-grpc-server", [sys.executable, str(BENCH_DIR / "grpcload.py"),
                                          "serve", "--port", str(grpc_port),
                                          "--seconds", f"{lifetime:g}"])
    m = sup.start(f"{name}-mcs0-endpoint", [sys.executable, str(BENCH_DIR / "attackers.py"),
                                            "mcs0-endpoint", "--port", str(mcs0_port),
                                            "--seconds", f"{lifetime:g}", "--stats", str(stats)])
    wait_tcp(g, grpc_port)
    wait_tcp(m, mcs0_port)
    grpc_listen, mcs0_listen = free_port(), free_port()
    if proxy == "haproxy":
        t = _start_haproxy(sup, b, name, grpc_listen, grpc_port, mcs0_listen, mcs0_port)
    else:
        extra = abuse_config_extra(grpc_listen, grpc_port, mcs0_listen, mcs0_port)
        t = start_l5dproxy(sup, b, ready_timeout, name=name, extra_config=extra)
    if not t.available:
        for child in (*t.children, g, m):
            sup.stop(child)
        raise StartError(t.why_unavailable())
    assert t.h1 and t.h2c
    return Rig(t, {"h1": t.h1, "h2c": t.h2c, "grpc": grpc_listen, "mcs0": mcs0_listen}, stats,
               [g, m])


def haproxy_abuse_config(ports: dict[str, int], b: Backends, grpc_backend: int,
                         mcs0_backend: int, maxconn: int) -> str:
    """HAProxy (one thread) with the same four listeners, as a reference: HTTP/1 to nginx,
    h2c to nginx h2c, h2c to the grpcio server and to the 0-streams endpoint; client
    timeouts like l5dproxy's defaults (10 s for a request head, 60 s idle)."""
    def fe(name: str, backend_port: int, h2: bool, server_h2: bool) -> str:
        return f"""
frontend fe_{name}
    mode http
    bind {HOST}:{ports[name]}{' proto h2' if h2 else ''}
    default_backend be_{name}

backend be_{name}
    mode http
    http-reuse always
    server s1 {HOST}:{backend_port}{' proto h2' if server_h2 else ''}
"""
    return f"""# generated by bench/abuse.py
global
    nbthread 1
    maxconn {maxconn}
    log stderr format short local0 err

defaults
    timeout connect 5s
    timeout http-request 10s
    timeout client 60s
    timeout server 60s
    maxconn {maxconn}
""" + "".join((fe("h1", b.h1, False, False), fe("h2c", b.h2c, True, True),
               fe("grpc", grpc_backend, True, True), fe("mcs0", mcs0_backend, True, True)))


def _start_haproxy(sup: Supervisor, b: Backends, name: str, grpc_listen: int,
                   grpc_backend: int, mcs0_listen: int, mcs0_backend: int) -> Target:
    from bench.procs import raise_nofile

    t = Target(name)
    haproxy = which("haproxy")
    if haproxy is None:
        t.error = "haproxy not found (apt-get install haproxy)"
        return t
    ports = {"h1": free_port(), "h2c": free_port(), "grpc": grpc_listen, "mcs0": mcs0_listen}
    conf = sup.workdir / f"{name}.cfg"
    conf.write_text(haproxy_abuse_config(ports, b, grpc_backend, mcs0_backend,
                                         max(1000, (raise_nofile() - 200) // 2)))
    child = sup.start(name, [haproxy, "-db", "-f", str(conf)])
    t.children.append(child)
    t.pid = child.pid
    try:
        for port in ports.values():
            wait_tcp(child, port)
    except StartError as exc:
        t.error = f"haproxy did not start: {exc}"
        return t
    t.h1, t.h2c = ports["h1"], ports["h2c"]
    return t


# ------------------------------------------------------------------ honest clients


@dataclass
class Honest:
    """What one honest client measured in one run."""

    rps: float | None = None
    p99_ms: float | None = None
    ok: int = 0
    failed: int = 0
    error: str | None = None


def _wrk(sup: Supervisor, port: int, seconds: float, conns: int) -> Honest:
    secs = max(1, round(seconds))
    run = sup.run([str(which("wrk")), "-t1", f"-c{conns}", f"-d{secs}s", "--latency",
                   "--timeout", "5s", f"http://{HOST}:{port}/"], timeout=secs + 30)
    try:
        r = parse_wrk(run.stdout)
    except ParseError as exc:
        return Honest(error=f"wrk: {exc}: {run.stderr.strip()[-200:]}")
    bad = r.non_2xx_3xx + r.errors
    return Honest(rps=r.requests_per_sec, p99_ms=r.latency_ms.get("99") if r.requests else None,
                  ok=r.requests - r.non_2xx_3xx, failed=bad)


def _h2load(sup: Supervisor, port: int, seconds: float, clients: int, streams: int,
            h1: bool = False, rps: int = 0) -> Honest:
    """h2load for ``seconds``; p99 from its per-request log. ``rps``: per client (paced)."""
    logf = sup.workdir / f"honest-{time.monotonic_ns()}.tsv"
    argv = [str(which("h2load")), *(["--h1"] if h1 else []), "-c", str(clients), "-m",
            str(streams), "-D", str(max(1, round(seconds))), "--log-file", str(logf),
            *(["--rps", str(rps)] if rps else []), f"http://{HOST}:{port}/"]
    run = sup.run(argv, timeout=seconds + 30)
    try:
        r = parse_h2load(run.stdout)
        reqlog = parse_h2load_log(logf.read_text() if logf.exists() else "")
    except (ParseError, ValueError) as exc:
        return Honest(error=f"h2load: {exc}: {run.stderr.strip()[-200:]}")
    finally:
        logf.unlink(missing_ok=True)
    non2xx = sum(v for k, v in r.status.items() if k != "2xx")
    return Honest(rps=r.requests_per_sec,
                  p99_ms=percentile(reqlog.durations_ms, 99) if reqlog.durations_ms else None,
                  ok=r.succeeded - non2xx, failed=r.failed + non2xx)


def _grpc(sup: Supervisor, port: int, seconds: float, concurrency: int,
          rate: float = 0.0) -> Honest:
    run = sup.run([sys.executable, str(BENCH_DIR / "grpcload.py"), "load", "--port", str(port),
                   "--seconds", f"{seconds:g}", "--concurrency", str(concurrency),
                   "--rate", f"{rate:g}"], timeout=seconds + 60)
    try:
        r = parse_grpc_load(run.stdout)
    except ParseError as exc:
        return Honest(error=f"grpcload: {exc}: {run.stderr.strip()[-200:]}")
    return Honest(rps=r.rps, p99_ms=r.p99_ms, ok=r.ok, failed=r.failed)


HONEST = ("h1", "h2c", "grpc")
SOAK_PACE = {"h1": 200, "h2c": 200, "grpc": 100}  # requests/s of the paced honest clients
HONEST_LABELS = {"h1": "HTTP/1.1 (wrk -t1 -c10)", "h2c": "h2c (h2load -c2 -m10)",
                 "grpc": "gRPC unary (grpcio, 4 threads)"}


def run_honest(sup: Supervisor, rig: Rig, seconds: float, paced: bool = False
               ) -> dict[str, Honest]:
    """The three honest clients at once for ``seconds``: closed loop, or (``paced``, for the
    soak) at 200 (h1), 200 (h2c) and 100 (gRPC) requests/s."""
    p = rig.ports
    jobs = {
        "h1": (lambda: _h2load(sup, p["h1"], seconds, 4, 1, h1=True, rps=50)) if paced
        else (lambda: _wrk(sup, p["h1"], seconds, 10)),
        "h2c": (lambda: _h2load(sup, p["h2c"], seconds, 2, 1, rps=100)) if paced
        else (lambda: _h2load(sup, p["h2c"], seconds, 2, 10)),
        "grpc": (lambda: _grpc(sup, p["grpc"], seconds, 2, rate=100)) if paced
        else (lambda: _grpc(sup, p["grpc"], seconds, 4)),
    }
    return _parallel(jobs)


def _parallel(jobs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def one(name: str, fn: Any) -> None:
        try:
            out[name] = fn()
        except Exception as exc:  # a harness bug must not lose the other clients
            out[name] = Honest(error=f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=one, args=kv, daemon=True) for kv in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# ------------------------------------------------------------------ attackers


def run_attackers(sup: Supervisor, rig: Rig, attacks: tuple[Attack, ...], seconds: float
                  ) -> dict[str, AttackReport | str]:
    """Every attacker at once for ``seconds``; kind -> its report (or why it has none)."""

    def job(a: Attack) -> Any:
        def go() -> AttackReport | str:
            run = sup.run([sys.executable, str(BENCH_DIR / "attackers.py"), a.kind, "--port",
                           str(rig.ports[a.listener]), "--seconds", f"{seconds:g}", *a.args],
                          timeout=seconds + 60)
            try:
                return parse_attack_report(run.stdout)
            except ParseError as exc:
                return f"{exc}; exit {run.returncode}: {run.stderr.strip()[-300:]}"
        return go

    return _parallel({a.kind: job(a) for a in attacks})


class Sampler:
    """RSS (KiB) of one process every ``interval`` s, with the time of each reading."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ParseError):
                self.samples.append((time.monotonic() - t0, rss_kib(self.pid)))
            self._stop.wait(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_kib(self) -> int:
        return max((k for _, k in self.samples), default=0)


def cpu_seconds(pid: int) -> float:
    import os

    return pid_stat_ticks(pid) / os.sysconf("SC_CLK_TCK")


def scrape(admin: int | None) -> dict[str, float]:
    if admin is None:
        return {}
    try:
        with urllib.request.urlopen(f"http://{HOST}:{admin}/metrics", timeout=5) as resp:
            text = resp.read().decode(errors="replace")
    except OSError:
        return {}
    return {k: v for k, v in prometheus_samples(text, ABUSE_METRICS).items()
            if 'peer="dst"' not in k}


# ------------------------------------------------------------------ abuse


@dataclass
class AbuseResult:
    """Everything the abuse scenario measured (``table()`` renders it)."""

    proxy: str = "l5dproxy"
    quiet: dict[str, Honest] = field(default_factory=dict)
    attacked: dict[str, Honest] = field(default_factory=dict)
    attackers: dict[str, AttackReport | str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    cpu_quiet_pct: float | None = None
    cpu_attacked_pct: float | None = None
    other_cpu_quiet_pct: float | None = None  # processes outside the benchmark, % of all CPUs
    other_cpu_attacked_pct: float | None = None
    rss_start_mib: float | None = None
    rss_quiet_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_after_mib: float | None = None
    mcs0_dials: int | None = None
    mcs0_dials_after: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    settings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def attackers_cpu_pct(self) -> float | None:
        reps = [r for r in self.attackers.values() if isinstance(r, AttackReport)]
        secs = self.settings.get("abuse_seconds")
        if not reps or not secs:
            return None
        return 100 * sum(r.cpu_s for r in reps) / secs

    @property
    def rss_growth_mib(self) -> float | None:
        if self.rss_peak_mib is None or self.rss_quiet_mib is None:
            return None
        return self.rss_peak_mib - self.rss_quiet_mib

    def honest_ratio(self, name: str) -> float | None:
        q, a = self.quiet.get(name), self.attacked.get(name)
        if q is None or a is None or not q.rps or a.rps is None:
            return None
        return a.rps / q.rps

    def attacker_met(self, kind: str) -> bool | None:
        rep = self.attackers.get(kind)
        if not isinstance(rep, AttackReport):
            return None
        if kind == "mcs0-client":
            if self.mcs0_dials is None:
                return None
            return (rep.statuses.get("no answer", 0) == 0 and not self.mcs0_dials_after
                    and self.mcs0_dials <= MCS0_DIALS_PER_REQUEST * rep.work)
        if kind == "rapid-reset":
            return rep.closed_by_peer > 0 and rep.max_work_per_conn <= RAPID_RESET_MAX_PER_CONN
        return rep.opened > 0 and rep.open_at_end == 0

    def table(self) -> str:
        yes = {True: "met", False: "NOT met", None: "?"}
        out = [f"abuse ({self.proxy}): honest clients, quiet run beside attacked run "
               f"({self.settings.get('duration', 0):g} s each; attack "
               f"{self.settings.get('abuse_seconds', 0):g} s)", "",
               "| honest client | quiet req/s | attacked req/s | attacked/quiet | "
               "quiet p99 ms | attacked p99 ms | failed quiet / attacked | target >= 0.80 |",
               "|---|---:|---:|---:|---:|---:|---:|---|"]
        for name in HONEST:
            q, a = self.quiet.get(name, Honest()), self.attacked.get(name, Honest())
            r = self.honest_ratio(name)
            out.append(f"| {HONEST_LABELS[name]} | {_f(q.rps)} | {_f(a.rps)} | "
                       f"{_f(r, '{:.2f}')} | {_f(q.p99_ms, '{:.1f}')} | "
                       f"{_f(a.p99_ms, '{:.1f}')} | {q.failed} / {a.failed} | "
                       f"{yes[None if r is None else r >= THROUGHPUT_TARGET]} |")
        g = self.rss_growth_mib
        out += ["", "| proxy | quiet | attacked | target |", "|---|---:|---:|---|",
                f"| CPU, % of one core | {_f(self.cpu_quiet_pct, '{:.0f}')} | "
                f"{_f(self.cpu_attacked_pct, '{:.0f}')} | - |",
                f"| attackers' own CPU, % of one core | - | {_f(self.attackers_cpu_pct, '{:.0f}')} "
                f"| - |",
                f"| CPU of processes outside the benchmark, % of all CPUs | "
                f"{_f(self.other_cpu_quiet_pct, '{:.0f}')} | "
                f"{_f(self.other_cpu_attacked_pct, '{:.0f}')} | > 10: disturbed |",
                f"| RSS MiB (start {_f(self.rss_start_mib, '{:.1f}')}) | "
                f"{_f(self.rss_quiet_mib, '{:.1f}')} after | "
                f"{_f(self.rss_peak_mib, '{:.1f}')} peak, {_f(self.rss_after_mib, '{:.1f}')} "
                f"after | growth {_f(g, '{:+.1f}')} MiB < {RSS_GROWTH_TARGET_MIB:g}: "
                f"{yes[None if g is None else g < RSS_GROWTH_TARGET_MIB]} |",
                "", "| attacker | what | work sent | conns opened | closed by proxy | "
                "throttled | open at end | GOAWAY | target: closed (or throttled) |",
                "|---|---|---:|---:|---:|---:|---:|---|---|"]
        for kind, rep in self.attackers.items():
            label = self.labels.get(kind, "")
            if not isinstance(rep, AttackReport):
                out.append(f"| {kind} | {label} | ERR | | | | | | ? |")
                continue
            extra = ""
            if kind == "mcs0-client":
                extra = (f"; answers {_dict(rep.statuses)}; endpoint dialled "
                         f"{_f(self.mcs0_dials)} times, {_f(self.mcs0_dials_after)} after the "
                         f"client left (bound {MCS0_DIALS_PER_REQUEST} per request, 0 after)")
            elif kind == "rapid-reset":
                extra = (f"; the proxy took at most {rep.max_work_per_conn:,} streams on a "
                         f"connection it closed (bound {RAPID_RESET_MAX_PER_CONN:,})")
            elif rep.statuses:
                extra = f"; answers {_dict(rep.statuses)}"
            out.append(f"| {kind} | {label}{extra} | {rep.work:,} {rep.work_unit} | "
                       f"{rep.opened:,} | {rep.closed_by_peer:,} | {rep.throttled:,} | "
                       f"{rep.open_at_end:,} | {_dict(rep.goaway) or '-'} | "
                       f"{yes[self.attacker_met(kind)]} |")
        if self.metrics:
            out += ["", f"{self.proxy} /metrics after the attack: " + ", ".join(
                f"{k} = {v:g}" for k, v in sorted(self.metrics.items()))]
        if self.error:
            out.append(f"ERROR: {self.error}")
        out += self.notes
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        doc = asdict(self)
        doc["rss_growth_mib"] = self.rss_growth_mib
        doc["honest_ratio"] = {n: self.honest_ratio(n) for n in HONEST}
        doc["attacker_met"] = {k: self.attacker_met(k) for k in self.attackers}
        return doc


def _f(v: float | int | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def _dict(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items()))


def _honest_notes(res: list[str], phase: str, honest: dict[str, Honest]) -> None:
    for name, h in honest.items():
        if h.error:
            res.append(f"{phase} {name}: {h.error}")
        elif not h.ok:
            res.append(f"{phase} {name}: no request completed ({h.failed} counted as failed "
                       "by the client; connections that never got an answer are not)")


def run_abuse(sup: Supervisor, b: Backends, duration: float, abuse_seconds: float,
              ready_timeout: float, only: tuple[str, ...] = (),
              proxy: str = "l5dproxy", name: str = "") -> AbuseResult:
    """The quiet run, then the attacked run; ``only``: these attackers (default all);
    ``proxy``: l5dproxy, or haproxy as a reference."""
    attacks = tuple(a for a in ABUSE_ATTACKS if not only or a.kind in only)
    res = AbuseResult(labels={a.kind: a.label for a in attacks}, proxy=proxy)
    attack_s = max(abuse_seconds, ABUSE_RAMP + duration + 2)
    res.settings = {"duration": duration, "abuse_seconds": attack_s, "ramp": ABUSE_RAMP}
    try:
        rig = start_rig(sup, b, name or f"{proxy}-abuse", ready_timeout,
                        lifetime=attack_s + duration + 600, proxy=proxy)
    except StartError as exc:
        res.error = f"abuse rig did not start: {exc}"
        return res
    pid = rig.pid
    log(f"abuse: {proxy} pid {pid}, listeners {rig.ports}")
    time.sleep(0.5)
    res.rss_start_mib = rss_kib(pid) / MIB

    c0, t0 = cpu_seconds(pid), time.monotonic()
    meter = CpuMeter(sup)
    meter.start()
    res.quiet = run_honest(sup, rig, duration)
    res.cpu_quiet_pct = 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
    res.other_cpu_quiet_pct = meter.other_pct()
    _honest_notes(res.notes, "quiet", res.quiet)
    log("abuse quiet: " + ", ".join(f"{k} {_f(v.rps)} req/s" for k, v in res.quiet.items()))
    time.sleep(1.0)
    res.rss_quiet_mib = rss_kib(pid) / MIB

    dials0 = _dials(rig)
    holder: dict[str, Any] = {}
    attack_thread = threading.Thread(
        target=lambda: holder.update(run_attackers(sup, rig, attacks, attack_s)),
        daemon=True)
    log(f"abuse: {len(attacks)} attackers for {attack_s:g} s")
    with Sampler(pid) as sampler:
        attack_thread.start()
        time.sleep(ABUSE_RAMP)
        c0, t0 = cpu_seconds(pid), time.monotonic()
        meter.start()
        res.attacked = run_honest(sup, rig, duration)
        res.cpu_attacked_pct = 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - t0)
        res.other_cpu_attacked_pct = meter.other_pct()
        attack_thread.join(attack_s + 120)
        dials_end = _dials(rig)
        time.sleep(2.0)
    res.attackers = {a.kind: holder.get(a.kind, "no report") for a in attacks}
    _honest_notes(res.notes, "attacked", res.attacked)
    res.rss_peak_mib = sampler.peak_kib / MIB
    with contextlib.suppress(OSError, ParseError):
        res.rss_after_mib = rss_kib(pid) / MIB
    if dials0 is not None and dials_end is not None:
        res.mcs0_dials = dials_end - dials0
        after = _dials(rig)
        res.mcs0_dials_after = None if after is None else after - dials_end
    res.metrics = scrape(rig.target.admin)
    if not rig.target.available:
        res.notes.append(f"{proxy} died: {rig.target.why_unavailable()}")
    for kind, rep in res.attackers.items():
        if isinstance(rep, AttackReport) and rep.errors:
            res.notes.append(f"{kind}: {rep.errors[0]} ({rep.connect_failed} connects failed)")
        elif not isinstance(rep, AttackReport):
            res.notes.append(f"{kind}: {rep}")
    log("abuse attacked: " + ", ".join(f"{k} {_f(v.rps)} req/s"
                                       for k, v in res.attacked.items()))
    rig.stop(sup)
    return res


@dataclass
class AbuseEach:
    """The abuse scenario once per attacker, each on a fresh proxy (``--abuse-each``):
    which kind of attack still costs the honest clients, memory or connections."""

    proxy: str = "l5dproxy"
    results: dict[str, AbuseResult] = field(default_factory=dict)

    def table(self) -> str:
        yes = {True: "met", False: "NOT met", None: "?"}
        out = [f"abuse, one attacker at a time ({self.proxy}, a fresh proxy each): "
               "attacked/quiet req/s", "",
               "| attacker | h1 | h2c | gRPC | RSS growth MiB | proxy CPU % | "
               "closed by proxy / opened | attacker | all targets |",
               "|---|---:|---:|---:|---:|---:|---:|---|---|"]
        for kind, r in self.results.items():
            rep = r.attackers.get(kind)
            ratios = [r.honest_ratio(n) for n in HONEST]
            g = r.rss_growth_mib
            conns = (f"{rep.closed_by_peer:,} / {rep.opened:,}"
                     if isinstance(rep, AttackReport) else "ERR")
            met = r.attacker_met(kind)
            every = [met, g is not None and g < RSS_GROWTH_TARGET_MIB,
                     *(x is not None and x >= THROUGHPUT_TARGET for x in ratios)]
            out.append(f"| {kind} | " + " | ".join(_f(x, "{:.2f}") for x in ratios)
                       + f" | {_f(g, '{:+.1f}')} | {_f(r.cpu_attacked_pct, '{:.0f}')} | "
                       f"{conns} | {yes[met]} | {yes[all(every)]} |")
        notes = [f"{kind}: {n}" for kind, r in self.results.items()
                 for n in ([r.error] if r.error else []) + r.notes]
        return "\n".join(out + notes)

    def to_json(self) -> dict[str, Any]:
        return {"proxy": self.proxy, "results": {k: v.to_json() for k, v in
                                                 self.results.items()}}


def run_abuse_each(sup: Supervisor, b: Backends, duration: float, abuse_seconds: float,
                   ready_timeout: float, only: tuple[str, ...] = (),
                   proxy: str = "l5dproxy") -> AbuseEach:
    each = AbuseEach(proxy=proxy)
    for a in ABUSE_ATTACKS:
        if only and a.kind not in only:
            continue
        log(f"abuse, {a.kind} alone")
        each.results[a.kind] = run_abuse(sup, b, duration, abuse_seconds, ready_timeout,
                                         (a.kind,), proxy, name=f"{proxy}-abuse-{a.kind}")
    return each


def _dials(rig: Rig) -> int | None:
    try:
        return parse_mcs0_stats(rig.mcs0_stats.read_text()).accepted
    except (OSError, ParseError):
        return None


# ------------------------------------------------------------------ soak


@dataclass
class SoakResult:
    seconds: float = 0.0
    warmup_s: float = 0.0
    cycles: int = 0
    rss_cycle_end_mib: list[tuple[float, float]] = field(default_factory=list)  # (t, MiB)
    rss_peak_mib: float | None = None
    rss_start_mib: float | None = None
    honest_ok: dict[str, int] = field(default_factory=dict)
    honest_offered: dict[str, int] = field(default_factory=dict)  # pace x seconds
    honest_failed: dict[str, int] = field(default_factory=dict)
    attackers_closed: dict[str, int] = field(default_factory=dict)
    attackers_open_at_end: dict[str, int] = field(default_factory=dict)
    cpu_pct: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def after_warmup(self) -> list[float]:
        return [m for t, m in self.rss_cycle_end_mib if t >= self.warmup_s]

    @property
    def spread_mib(self) -> float | None:
        v = self.after_warmup()
        return max(v) - min(v) if len(v) >= 2 else None

    def table(self) -> str:
        v = self.after_warmup()
        spread = self.spread_mib
        failed = sum(self.honest_failed.values())
        out = [f"soak: {self.seconds:.0f} s, {self.cycles} cycles of {SOAK_CYCLE:g} s "
               f"(paced honest h1/h2c/gRPC + attackers), warm-up {self.warmup_s:.0f} s", "",
               "| figure | value | target |", "|---|---:|---|",
               f"| RSS at start MiB | {_f(self.rss_start_mib, '{:.1f}')} | - |",
               "| RSS after each cycle, after warm-up MiB | "
               + (" ".join(f"{m:.1f}" for m in v) or "-") + " | - |",
               f"| spread (max - min) MiB | {_f(spread, '{:.1f}')} | <= {SOAK_FLAT_MIB:g}: "
               + ("?" if spread is None else "met" if spread <= SOAK_FLAT_MIB else "NOT met")
               + " |",
               f"| last - first after warm-up MiB | "
               f"{_f(v[-1] - v[0] if len(v) >= 2 else None, '{:+.1f}')} | - |",
               f"| peak RSS MiB | {_f(self.rss_peak_mib, '{:.1f}')} | - |",
               f"| CPU, % of one core | {_f(self.cpu_pct, '{:.0f}')} | - |",
               "| honest requests ok (of those the pace offered) | "
               + ", ".join(f"{k} {v:,} ({self.honest_offered.get(k, 0):,})"
                           for k, v in sorted(self.honest_ok.items())) + " | - |",
               f"| honest requests failed | {_dict(self.honest_failed) or '0'} | 0: "
               + ("met" if failed == 0 else "NOT met") + " |",
               f"| attacker conns closed by proxy | {_dict(self.attackers_closed)} | - |",
               f"| attacker conns open at a cycle's end | "
               f"{_dict(self.attackers_open_at_end)} | - |"]
        if self.metrics:
            out += ["", "l5dproxy /metrics after the soak: " + ", ".join(
                f"{k} = {v:g}" for k, v in sorted(self.metrics.items()))]
        if self.error:
            out.append(f"ERROR: {self.error}")
        out += self.notes[:20]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        from dataclasses import asdict

        doc = asdict(self)
        doc["spread_mib"] = self.spread_mib
        return doc


def run_soak(sup: Supervisor, b: Backends, soak_seconds: float,
             ready_timeout: float) -> SoakResult:
    res = SoakResult(seconds=soak_seconds, warmup_s=min(120.0, max(SOAK_CYCLE, soak_seconds / 5)))
    try:
        rig = start_rig(sup, b, "l5dproxy-soak", ready_timeout, lifetime=soak_seconds + 600)
    except StartError as exc:
        res.error = f"soak rig did not start: {exc}"
        return res
    pid = rig.pid
    time.sleep(0.5)
    res.rss_start_mib = rss_kib(pid) / MIB
    start = time.monotonic()
    c0 = cpu_seconds(pid)
    with Sampler(pid, interval=1.0) as sampler:
        while (left := soak_seconds - (time.monotonic() - start)) >= 5:
            cycle = min(SOAK_CYCLE, left)
            holder: dict[str, Any] = {}
            th = threading.Thread(
                target=lambda c=cycle, h=holder: h.update(run_attackers(sup, rig, SOAK_ATTACKS, c)),
                daemon=True)
            th.start()
            honest = run_honest(sup, rig, cycle, paced=True)
            th.join(cycle + 120)
            res.cycles += 1
            for name, h in honest.items():
                res.honest_ok[name] = res.honest_ok.get(name, 0) + h.ok
                res.honest_offered[name] = (res.honest_offered.get(name, 0)
                                            + round(SOAK_PACE[name] * max(1, round(cycle))))
                if h.failed:
                    res.honest_failed[name] = res.honest_failed.get(name, 0) + h.failed
                if h.error:
                    res.honest_failed[name] = res.honest_failed.get(name, 0)
                    res.notes.append(f"cycle {res.cycles} {name}: {h.error}")
            for kind, rep in holder.items():
                if isinstance(rep, AttackReport):
                    res.attackers_closed[kind] = (res.attackers_closed.get(kind, 0)
                                                  + rep.closed_by_peer)
                    res.attackers_open_at_end[kind] = (res.attackers_open_at_end.get(kind, 0)
                                                       + rep.open_at_end)
                else:
                    res.notes.append(f"cycle {res.cycles} {kind}: {rep}")
            time.sleep(1.0)
            if not rig.target.available:
                res.error = f"l5dproxy died: {rig.target.why_unavailable()}"
                break
            t = time.monotonic() - start
            m = rss_kib(pid) / MIB
            res.rss_cycle_end_mib.append((round(t, 1), m))
            log(f"soak cycle {res.cycles} at {t:.0f} s: RSS {m:.1f} MiB, honest failed "
                f"{sum(h.failed for h in honest.values())}")
    res.seconds = time.monotonic() - start
    res.cpu_pct = 100 * (cpu_seconds(pid) - c0) / res.seconds if rig.target.available else None
    res.rss_peak_mib = sampler.peak_kib / MIB
    res.metrics = scrape(rig.target.admin)
    rig.stop(sup)
    return res
