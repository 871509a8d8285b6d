"""The harness's command line: start everything, run the rounds, print and save the report.

    python -m bench [--quick] [--rounds N] [--json PATH] [--only SCENARIO ...]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import abuse, backends, tls
from bench import pyspy as pyspy_mod
from bench.backends import Backends, Target, WorkerSet, pid_for
from bench.h2ceiling import h2_round_trips
from bench.memory import hold_connections, long_h2_connection, stream_body
from bench.procs import (
    CpuMeter,
    CpuWindow,
    StartError,
    Supervisor,
    free_port,
    install_exit_signals,
    missing_programs,
    raise_nofile,
    rss_kib,
    session_processes,
    twistd_path,
    wait_until,
    which,
)
from bench.report import TARGETS, Report, Section
from bench.scenarios import (
    CPU_PER_REQUEST,
    SCENARIOS,
    MetricSpec,
    Sample,
    Scenario,
    Settings,
    add_cpu_per_request,
)
from bench.tools import ParseError, log_exceptions, prometheus_samples
from bench.workers import WorkersSection, measure, missing_tools, worker_counts

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_JSON = BENCH_DIR / "results" / "latest.json"
PROFILE_DIR = BENCH_DIR / "results"  # --profile's raw folded stacks
PROFILED = ("h1", "h2c")  # the scenarios --profile records l5dproxy under
EXTRA_SECTIONS = ("memory", "ceiling", "workers", "tls", "abuse", "soak")
ALL_SECTIONS = (*SCENARIOS, *EXTRA_SECTIONS)
# Run only when named with --only: an attacked proxy and a 10-minute soak are not part
# of the comparison run (nor of --quick).
OPT_IN_SECTIONS = ("abuse", "soak")
DEFAULT_SECTIONS = tuple(s for s in ALL_SECTIONS if s not in OPT_IN_SECTIONS)
MIB = 1024.0
# l5dproxy metric families looked at after the run (non-zero samples are reported).
HEALTH_METRICS = ("http_errors_total", "endpoint_connect_errors_total", "tcp_open_connections")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark l5dproxy against direct, HAProxy and Twisted portforward.",
    )
    p.add_argument("--quick", action="store_true",
                   help="one short round, scaled-down memory tests (under a minute)")
    p.add_argument("--rounds", type=int, help="rounds of every load scenario (default 3)")
    p.add_argument("--duration", type=int, help="seconds per load-tool run (default 10)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON,
                   help=f"where to write the JSON results (default {DEFAULT_JSON})")
    p.add_argument("--only", nargs="+", choices=ALL_SECTIONS, metavar="SCENARIO",
                   help=f"run only these: {', '.join(ALL_SECTIONS)} (abuse and soak "
                   "run only when named here)")
    p.add_argument("--skip-target", nargs="+", default=[], choices=TARGETS[1:],
                   metavar="TARGET", help="do not start these proxies")
    p.add_argument("--hold", type=int, help="idle connections for the memory test "
                   "(default 10000; --quick 1000)")
    p.add_argument("--big-mib", type=int, help="size of the streamed body in MiB "
                   "(default 1024; --quick 64)")
    p.add_argument("--h2-conn-streams", type=int, help="streams over one long-lived h2 "
                   "connection in the memory test (default 100000; --quick 20000)")
    p.add_argument("--abuse-seconds", type=float,
                   help="how long the attackers of the abuse scenario run (default 30; at "
                   "least 5 + --duration + 2)")
    p.add_argument("--abuse-attacks", nargs="+", metavar="ATTACK",
                   choices=[a.kind for a in abuse.ABUSE_ATTACKS],
                   help="run only these attackers in the abuse scenario: "
                   + ", ".join(a.kind for a in abuse.ABUSE_ATTACKS))
    p.add_argument("--abuse-proxy", choices=("l5dproxy", "haproxy"),
                   help="the proxy the abuse scenario attacks (default l5dproxy; haproxy "
                   "as a reference on the same machine)")
    p.add_argument("--abuse-each", action="store_true",
                   help="after the abuse scenario, run every attacker alone, each on a "
                   "fresh proxy (a line per attacker)")
    p.add_argument("--soak-seconds", type=float, help="length of the soak scenario "
                   "(default 600)")
    p.add_argument("--ready-timeout", type=float, default=30.0,
                   help="seconds to wait for l5dproxy's /ready")
    p.add_argument("--keep-tmp", action="store_true",
                   help="keep the temp dir (configs and server logs) and print its path")
    p.add_argument("--profile", action="store_true",
                   help="in round 1, one more h1 and h2c run against l5dproxy recorded with "
                   f"py-spy (not counted in the table); raw stacks kept in {PROFILE_DIR}, "
                   "a summary printed and in the JSON")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings(rounds=1, duration=2, warmup=0, iperf_seconds=1, latency_seconds=1,
                     latency_warmup=0.5,
                     hold_connections=1000, big_bytes=64 << 20, slow_seconds=1.0,
                     ceiling_seconds=1.0, long_conn_streams=20_000,
                     # Connections no more than l5dproxy's accept queue (1,024)
                     # holds: a proxy starved on a loaded machine, accepting
                     # late, still gets every one (4,000/s overflowed it).
                     handshake_rate=200)
    else:
        s = Settings()
    if args.rounds is not None:
        s.rounds = max(1, args.rounds)
    if args.duration is not None:
        s.duration = max(1, args.duration)
        s.iperf_seconds = max(1, args.duration // 2)
    if args.hold is not None:
        s.hold_connections = max(1, args.hold)
    s.worker_counts = worker_counts(os.cpu_count(), quick=args.quick)
    if args.h2_conn_streams is not None:
        s.long_conn_streams = max(1, args.h2_conn_streams)
    if args.abuse_seconds is not None:
        s.abuse_seconds = max(1.0, args.abuse_seconds)
    if args.abuse_attacks:
        s.abuse_attacks = tuple(args.abuse_attacks)
    s.abuse_each = args.abuse_each
    if args.abuse_proxy:
        s.abuse_proxy = args.abuse_proxy
    if args.soak_seconds is not None:
        s.soak_seconds = max(10.0, args.soak_seconds)
    if args.big_mib is not None:
        s.big_bytes = max(1, args.big_mib) << 20
    return s


# --------------------------------------------------------------------- metadata


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"? ({exc})"
    text = (out.stdout.strip() or out.stderr.strip()).splitlines()
    return text[0].strip() if text else "?"


def collect_meta() -> dict[str, Any]:
    versions: dict[str, str] = {}
    for prog, flag in (("nginx", "-v"), ("haproxy", "-v"), ("wrk", "-v"),
                       ("h2load", "--version"), ("iperf3", "--version"), ("curl", "--version")):
        path = which(prog)
        versions[prog] = _first_line([path, flag]) if path else "missing"
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "loadavg_start": os.getloadavg(),
        "tools": versions,
    }
    for mod in ("twisted", "h2", "l5dproxy"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            meta[f"{mod}_version"] = version(mod if mod != "twisted" else "Twisted")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        repo = BENCH_DIR.parent
        meta["git_head"] = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
                                          capture_output=True, text=True,
                                          timeout=10).stdout.strip()
    return meta


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


# ------------------------------------------------------------------- sections


def memory_metrics(s: Settings) -> tuple[MetricSpec, ...]:
    big = f"{s.big_bytes / (1 << 30):g} GiB" if s.big_bytes >= 1 << 30 else \
        f"{s.big_bytes >> 20} MiB"
    low = {"higher_is_better": False}
    return (
        MetricSpec("rss_start_mib", "RSS at start MiB", "{:.1f}", **low),
        MetricSpec("dl_mbps", f"{big} download MB/s", "{:,.0f}"),
        MetricSpec("dl_peak_mib", f"peak RSS, {big} download MiB", "{:.1f}", **low),
        MetricSpec("dl_growth_mib", "RSS growth, download MiB", "{:.1f}", ratio=False, **low),
        MetricSpec("slow_peak_mib", f"peak RSS, slow reader {s.slow_rate}B/s MiB", "{:.1f}",
                   **low),
        MetricSpec("slow_growth_mib", "RSS growth, slow reader MiB", "{:.1f}", ratio=False,
                   **low),
        MetricSpec("rss_idle_mib", "RSS idle after load MiB", "{:.1f}", **low),
        MetricSpec("hold_conns", "idle conns held", ratio=False),
        MetricSpec("hold_rss_mib", "RSS with idle conns MiB", "{:.1f}", **low),
        MetricSpec("hold_per_conn_kib", "KiB per idle conn", "{:.1f}", **low),
        MetricSpec("hold_closed", "idle conns dropped", ratio=False, **low),
        MetricSpec("h2conn_growth_mib",
                   f"RSS growth, 1 h2 conn x {s.long_conn_streams:,} streams MiB", "{:.1f}",
                   **low),
        MetricSpec("h2conn_held_mib", "  of which held 1 s after it closed MiB", "{:.1f}",
                   ratio=False, **low),
    )


# ----------------------------------------------------------------------- run


class Harness:
    def __init__(self, sup: Supervisor, settings: Settings, selected: list[str],
                 skip_targets: list[str], ready_timeout: float,
                 pyspy: str | None = None) -> None:
        self.sup = sup
        self.pyspy = pyspy  # --profile: the py-spy to record l5dproxy with
        self.profiles: list[pyspy_mod.ProfileSummary] = []
        self.s = settings
        self.selected = selected
        self.skip_targets = skip_targets
        self.ready_timeout = ready_timeout
        self.targets: dict[str, Target] = {}
        self.rss_start: dict[str, int] = {}
        self.b: Backends | None = None
        self.sections = [Section(name, sc.title, sc.metrics)
                         for name, sc in SCENARIOS.items() if name in selected]
        if "memory" in selected:
            self.sections.append(Section("memory", "proxy memory (VmRSS)",
                                         memory_metrics(settings)))
        self.ceiling: dict[str, list[float]] = {}
        self.health: dict[str, dict[str, Any]] = {}
        self.workers = WorkersSection(settings.worker_counts) if "workers" in selected else None
        self.worker_sets: dict[int, WorkerSet] = {}
        self.abuse: abuse.AbuseResult | None = None
        self.abuse_each: abuse.AbuseEach | None = None
        self.soak: abuse.SoakResult | None = None
        self.tls: tls.TlsResult | None = None

    # -- startup -------------------------------------------------------------

    def start(self) -> None:
        sup = self.sup
        b = Backends(h1=0, h2c=0, iperf=0, big_bytes=self.s.big_bytes)
        direct = Target("direct")
        try:
            nginx, b.h1, b.h2c = backends.start_nginx(sup, self.s.big_bytes)
            direct.h1, direct.h2c = b.h1, b.h2c
            direct.children.append(nginx)  # "direct" costs nginx's CPU (master and worker)
            log(f"nginx up: h1 :{b.h1}, h2c :{b.h2c}")
        except StartError as exc:
            log(f"nginx failed, no HTTP scenarios: {exc}")
        try:
            _, b.iperf = backends.start_iperf_server(sup)
            direct.tcp = b.iperf
            log(f"iperf3 -s up on :{b.iperf}")
        except StartError as exc:
            log(f"iperf3 server failed, no TCP scenario: {exc}")
        # Sink ports are picked even if the sink fails, so the proxies' configs stay valid.
        b.sink = {name: free_port() for name in ("l5dproxy", "haproxy", "portforward")}
        try:
            backends.start_sink(sup, b.sink)
        except StartError as exc:
            log(f"connection sink failed, the idle-connection test will fail: {exc}")
        self.b = b
        self.targets["direct"] = direct
        starters = {
            "l5dproxy": lambda: backends.start_l5dproxy(sup, b, self.ready_timeout),
            "haproxy": lambda: backends.start_haproxy(sup, b),
            "portforward": lambda: backends.start_portforward(sup, b),
        }
        # The workers scenario and the ceiling need none of the three proxies.
        needed = any(name in SCENARIOS or name == "memory" for name in self.selected)
        for name, start in starters.items():
            if not needed:
                continue
            if name in self.skip_targets:
                self.targets[name] = Target(name, error="skipped (--skip-target)")
                continue
            target = start()
            self.targets[name] = target
            if target.available:
                log(f"{name} up: h1 :{target.h1}, h2c :{target.h2c}, tcp :{target.tcp}, "
                    f"hold :{target.hold} (pid {target.pid})")
            else:
                log(f"{name} NOT available: {target.why_unavailable()}")
        if self.workers is not None:
            self._start_workers(b)
        time.sleep(0.5)
        for name, t in self.targets.items():
            pid = pid_for(t, "h1")
            if t.available and pid is not None:
                with contextlib.suppress(OSError, ValueError):
                    self.rss_start[name] = rss_kib(pid)

    def _start_workers(self, b: Backends) -> None:
        assert self.workers is not None
        counts = self.workers.counts
        log(f"starting l5dproxy --workers N for N in {', '.join(map(str, counts))} ...")
        self.worker_sets = backends.start_worker_sets(self.sup, b, list(counts),
                                                      self.ready_timeout)
        for n, ws in self.worker_sets.items():
            if ws.available:
                log(f"l5dproxy --workers {n} up: h1 :{ws.h1}, tcp :{ws.tcp}, admin "
                    f":{ws.admin}..{ws.admin + n - 1}, every worker /ready")
            else:
                self.workers.skipped[n] = ws.why_unavailable()
                log(f"l5dproxy --workers {n} NOT available: {ws.why_unavailable()}")

    # -- rounds ----------------------------------------------------------------

    def _order(self, round_index: int) -> list[Target]:
        names = list(TARGETS)
        k = round_index % len(names)
        return [self.targets[n] for n in names[k:] + names[:k] if n in self.targets]

    def _port(self, target: Target, kind: str) -> int | None:
        return getattr(target, kind)

    def warmup(self) -> None:
        if self.s.warmup <= 0:
            return
        short = dataclasses.replace(self.s, duration=max(1, round(self.s.warmup)))
        for t in self._order(0):
            for name, kind in (("h1", "h1"), ("h2c", "h2c")):
                port = self._port(t, kind)
                sc = SCENARIOS[name]
                if t.available and port and all(which(p) for p in sc.needs):
                    sc.run(self.sup, port, short)
        if which("wrk"):
            for ws in self.worker_sets.values():
                if ws.available:
                    SCENARIOS["h1"].run(self.sup, ws.h1, short)
        log("warm-up done")

    def run_rounds(self) -> None:
        for r in range(self.s.rounds):
            for sec in self.sections:
                if sec.name in SCENARIOS:
                    self._run_scenario(sec, r)
            if self.workers is not None:
                self._run_workers(r)
            if "ceiling" in self.selected:
                self._run_ceiling(r)

    def _run_scenario(self, sec: Section, r: int) -> None:
        sc = SCENARIOS[sec.name]
        missing = [p for p in sc.needs if which(p) is None]
        for t in self._order(r):
            port = self._port(t, sc.kind)
            if missing:
                sec.skipped[t.name] = f"missing {', '.join(missing)}"
                continue
            if not t.available or not port:
                sec.skipped[t.name] = t.why_unavailable() if not t.available else "no listener"
                continue
            # The target's own CPU (every process it is made of) over what the tool counts.
            cpu = CpuWindow([c.pid for c in t.children]) if t.children and (
                CPU_PER_REQUEST in sc.metrics) else None
            if cpu is not None:
                cpu.start(delay=sc.measured_after(self.s))
            meter = CpuMeter(self.sup)
            meter.start()
            try:
                sample = sc.run(self.sup, port, self.s)
            except Exception as exc:  # a harness bug must not lose the other targets
                sample = Sample(error=f"{type(exc).__name__}: {exc}")
            # Not a table row: tells (in the JSON and under the table) whether something
            # outside the benchmark was using the CPUs during this run.
            sample.metrics["other_cpu_pct"] = meter.other_pct()
            if cpu is not None:
                add_cpu_per_request(sample, cpu.stop())
                if cpu.before and not cpu.same_processes:
                    sample.notes.append(
                        f"{t.name}: processes {sorted(cpu.before)} before the run, "
                        f"{sorted(cpu.after)} after: CPU counts only those there throughout")
            if not t.available:
                sample.notes.append(f"{t.name} died during the run: {t.why_unavailable()}")
            sec.add(t.name, sample)
            shown = ", ".join(f"{k}={v:,.3f}" for k, v in sample.metrics.items())
            log(f"round {r + 1}/{self.s.rounds} {sec.name:<11} {t.name:<11} "
                f"{shown or 'ERROR: ' + str(sample.error)}")
        if self.pyspy is not None and r == 0 and sc.name in PROFILED:
            self.profiles.append(self._profile(sc))

    def _profile(self, sc: Scenario) -> pyspy_mod.ProfileSummary:
        """One more run of ``sc`` against l5dproxy, recorded by py-spy (its pauses cost the
        proxy CPU, so the run is not one of the samples); the summary of where it went."""
        assert self.pyspy is not None
        t = self.targets.get("l5dproxy")
        port = self._port(t, sc.kind) if t is not None else None
        failed = pyspy_mod.ProfileSummary(sc.name, "", 0, [], [], [])
        if t is None or not t.available or not port or t.pid is None:
            failed.error = ("l5dproxy is not running: " + t.why_unavailable() if t is not None
                            else "l5dproxy was not started")
            return failed
        if any(which(p) is None for p in sc.needs):
            failed.error = f"missing {', '.join(sc.needs)}"
            return failed
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        out = PROFILE_DIR / f"profile-{sc.name}-{stamp}.txt"
        processes = session_processes(*(c.pid for c in t.children))
        argv = pyspy_mod.record_argv(self.pyspy, t.pid, self.s.duration + 10, out,
                                     subprocesses=len(processes) > 1)
        spy = self.sup.start(f"py-spy-{sc.name}", argv)
        try:
            wait_until(lambda: "Sampling process" in _read(spy.log_path), spy, 15.0,
                       "py-spy to attach")
        except StartError as exc:
            self.sup.stop(spy)
            failed.error = f"py-spy did not start: {exc}\n{pyspy_mod.PTRACE_HELP}"
            return failed
        cpu = CpuWindow([c.pid for c in t.children])
        cpu.start()
        try:
            sample = sc.run(self.sup, port, self.s)
        except Exception as exc:
            sample = Sample(error=f"{type(exc).__name__}: {exc}")
        add_cpu_per_request(sample, cpu.stop())
        # py-spy writes what it has sampled on SIGINT (its Ctrl-C) and exits.
        with contextlib.suppress(ProcessLookupError):
            os.kill(spy.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.proc.wait(timeout=30)
        self.sup.stop(spy)
        try:
            summary = pyspy_mod.summarise(pyspy_mod.parse_folded(out.read_text()), sc.name,
                                          str(out))
        except (OSError, ParseError) as exc:
            failed.error = f"no profile from py-spy ({exc}): {spy.log_tail(5)}"
            return failed
        summary.run = {k: sample.metrics[k] for k in ("rps", "cpu_us_per_req")
                       if k in sample.metrics}
        if sample.error:
            summary.error = f"the profiled run failed: {sample.error}"
        log(f"profile of l5dproxy under {sc.name}: {summary.samples:,} samples in {out}")
        return summary

    def _run_workers(self, r: int) -> None:
        """wrk, then iperf3 -R, against every --workers N, the order of N rotated."""
        assert self.workers is not None
        counts = list(self.workers.counts)
        k = r % len(counts)
        order = counts[k:] + counts[:k]
        self.workers.missing = missing_tools()
        for run in ("h1", "tcp_r"):
            if run in self.workers.missing:
                continue
            for n in order:
                ws = self.worker_sets.get(n)
                if ws is None or n in self.workers.skipped:
                    continue
                if not ws.available:
                    self.workers.skipped[n] = ws.why_unavailable()
                    continue
                sample = measure(self.sup, ws, run, self.s)
                self.workers.add(run, n, sample)
                shown = ", ".join(f"{key}={sample.metrics[key]:,.3f}" for key in
                                  ("rps", "p99_ms", "cpu_us_per_req", "gbits", "other_cpu_pct")
                                  if key in sample.metrics)
                log(f"round {r + 1}/{self.s.rounds} workers {run:<5} N={n:<3} "
                    f"{shown or 'ERROR: ' + str(sample.error)}")

    def _run_ceiling(self, r: int) -> None:
        try:
            for m in (10, 1):
                rate = h2_round_trips(self.s.ceiling_seconds, inflight=m)
                self.ceiling.setdefault(f"m{m}", []).append(rate)
            log(f"round {r + 1}/{self.s.rounds} h2 ceiling: {self.ceiling['m10'][-1]:,.0f} "
                f"rt/s (m=10), {self.ceiling['m1'][-1]:,.0f} (m=1)")
        except ImportError as exc:
            log(f"h2 ceiling skipped: {exc}")

    # -- memory ----------------------------------------------------------------

    def run_memory(self) -> None:
        sec = next((s for s in self.sections if s.name == "memory"), None)
        if sec is None:
            return
        for t in self._order(0):
            if not t.available:
                sec.skipped[t.name] = t.why_unavailable()
                continue
            sample = Sample()
            try:
                self._memory_target(t, sample)
            except Exception as exc:  # e.g. the proxy died: /proc/PID is gone
                sample.error = f"{type(exc).__name__}: {exc}"
            if not t.available:
                sample.notes.append(f"{t.name} died during the memory test: "
                                    f"{t.why_unavailable()}")
            sec.add(t.name, sample)

    def _memory_target(self, t: Target, sample: Sample) -> None:
        s = self.s
        m = sample.metrics
        if t.h1:
            pid = pid_for(t, "h1")
            url = f"http://127.0.0.1:{t.h1}/big"
            # Up to 3 downloads (median speed, largest RSS): single ones vary a lot here.
            speeds: list[float] = []
            for _ in range(min(3, s.rounds)):
                # A generous deadline (>= 50 MB/s): a stuck proxy must not stall the run.
                dl = stream_body(self.sup, pid, url, max_time=10 + s.big_bytes / 50e6)
                if dl.error:
                    sample.notes.append(f"download: {dl.error}")
                if dl.bytes < s.big_bytes:
                    sample.notes.append(f"download: got {dl.bytes:.0f} of {s.big_bytes} bytes")
                else:
                    speeds.append(dl.bytes_per_s / 1e6)
                if pid is not None and dl.peak_kib:
                    m["dl_peak_mib"] = max(m.get("dl_peak_mib", 0.0), dl.peak_kib / MIB)
                    m["dl_growth_mib"] = max(m.get("dl_growth_mib", 0.0), dl.delta_kib / MIB)
            if speeds:
                m["dl_mbps"] = statistics.median(speeds)
            if pid is not None:
                slow = stream_body(self.sup, pid, url, limit_rate=s.slow_rate,
                                   max_time=s.slow_seconds)
                if slow.bytes:
                    m["slow_peak_mib"] = slow.peak_kib / MIB
                    m["slow_growth_mib"] = slow.delta_kib / MIB
                if slow.error:
                    sample.notes.append(f"slow reader: {slow.error}")
            log(f"memory {t.name}: download {m.get('dl_mbps', 0):,.0f} MB/s, peak RSS "
                f"{m.get('dl_peak_mib', 0):.1f} MiB, slow-reader peak "
                f"{m.get('slow_peak_mib', 0):.1f} MiB")
        if t.name != "direct":
            if t.name in self.rss_start:
                m["rss_start_mib"] = self.rss_start[t.name] / MIB
            pid = pid_for(t, "hold")
            if pid is not None and t.hold:
                m["rss_idle_mib"] = rss_kib(pid) / MIB
                n = min(s.hold_connections, max(1, (raise_nofile() - 512) // 2))
                log(f"memory {t.name}: opening {n} idle connections ...")
                h = hold_connections(pid, t.hold, n)
                m["hold_conns"] = float(h.opened)
                m["hold_rss_mib"] = h.rss_with_kib / MIB
                m["rss_idle_mib"] = h.rss_before_kib / MIB
                m["hold_per_conn_kib"] = h.per_conn_kib
                m["hold_closed"] = float(h.closed_by_peer)
                if h.errors:
                    sample.notes.append(f"hold: {h.errors[0]} (and {len(h.errors) - 1} more)")
                if h.opened < n:
                    sample.notes.append(f"hold: only {h.opened} of {n} connections opened")
                if h.closed_by_peer:
                    sample.notes.append(f"hold: {h.closed_by_peer} idle connections were "
                                        "closed by the proxy")
                log(f"memory {t.name}: {h.opened} conns, {h.per_conn_kib:.1f} KiB/conn, "
                    f"fds {h.fds_before}->{h.fds_with}")
            pid = pid_for(t, "h2c")
            if pid is not None and t.h2c and which("h2load"):
                # Issue 17: what one long-lived h2 connection costs after many streams.
                lc = long_h2_connection(self.sup, pid, t.h2c, s.long_conn_streams)
                m["h2conn_growth_mib"] = lc.growth_kib / MIB
                m["h2conn_held_mib"] = lc.held_after_kib / MIB
                if lc.error:
                    sample.notes.append(f"long h2 connection: {lc.error}")
                log(f"memory {t.name}: 1 h2 connection x {lc.streams:,} streams in "
                    f"{lc.seconds:.1f} s: RSS {lc.rss_before_kib / MIB:.1f} -> peak "
                    f"{lc.peak_kib / MIB:.1f} MiB, {lc.rss_after_kib / MIB:.1f} after close")

    # -- tls (an l5dproxy and a HAProxy of its own) ------------------------------

    def run_tls(self) -> None:
        if "tls" in self.selected and self.b is not None:
            self.tls = tls.run_tls(self.sup, self.b, self.s, self.ready_timeout, log)

    # -- abuse and soak (an l5dproxy of their own each) --------------------------

    def run_abuse(self) -> None:
        if "abuse" in self.selected and self.b is not None:
            missing = [p for p in ("wrk", "h2load") if which(p) is None]
            if missing:
                self.abuse = abuse.AbuseResult(error=f"missing {', '.join(missing)}")
            else:
                self.abuse = abuse.run_abuse(self.sup, self.b, self.s.duration,
                                             self.s.abuse_seconds, self.ready_timeout,
                                             self.s.abuse_attacks, self.s.abuse_proxy)
                if self.s.abuse_each:
                    self.abuse_each = abuse.run_abuse_each(
                        self.sup, self.b, self.s.duration, self.s.abuse_seconds,
                        self.ready_timeout, self.s.abuse_attacks, self.s.abuse_proxy)
        if "soak" in self.selected and self.b is not None:
            if which("h2load") is None:
                self.soak = abuse.SoakResult(error="missing h2load")
            else:
                self.soak = abuse.run_soak(self.sup, self.b, self.s.soak_seconds,
                                           self.ready_timeout)

    # -- proxy health ------------------------------------------------------------

    def collect_health(self) -> None:
        """What l5dproxy itself says after the run: error counters and still-open
        connections from /metrics, and the exceptions in its log."""
        t = self.targets.get("l5dproxy")
        if t is not None and t.children:
            self.health["l5dproxy"] = _health(t.children[0], [t.admin] if t.admin else [])
        for n, ws in self.worker_sets.items():
            if ws.child is not None and ws.error is None:
                self.health[f"l5dproxy --workers {n}"] = _health(
                    ws.child, [ws.admin + i for i in range(n)])

    # -- report ----------------------------------------------------------------

    def report(self, meta: dict[str, Any]) -> Report:
        meta["loadavg_end"] = os.getloadavg()
        targets = {
            name: {"available": t.available, "error": t.error if t.error else
                   (None if t.available else t.why_unavailable()),
                   "ports": {"h1": t.h1, "h2c": t.h2c, "tcp": t.tcp, "hold": t.hold}}
            for name, t in self.targets.items()
        }
        return Report(meta=meta, settings=dataclasses.asdict(self.s), targets=targets,
                      sections=self.sections, ceiling=self.ceiling, health=self.health,
                      workers=self.workers, abuse=self.abuse, abuse_each=self.abuse_each,
                      soak=self.soak, tls=self.tls, profiles=self.profiles)


def _read(path: Path | None) -> str:
    try:
        return path.read_text(errors="replace") if path is not None else ""
    except OSError:
        return ""


def _health(child: Any, admin_ports: list[int]) -> dict[str, Any]:
    """What an l5dproxy process (every worker of it) says after the run: error counters and
    still-open connections from each admin port's /metrics, and the exceptions in its log."""
    health: dict[str, Any] = {"metrics": {}, "failed_responses": {}}
    per_worker: list[float] = []
    for i, port in enumerate(admin_ports):
        if not child.alive():
            break
        prefix = f"worker {i}: " if len(admin_ports) > 1 else ""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode(errors="replace")
        except OSError as exc:
            health.setdefault("metrics_error", []).append(f"{prefix}{exc}")
            continue
        # Upstream (peer="dst") connections stay open in the keep-alive pool; a client
        # (peer="src") connection open after every client is gone is stuck.
        for k, v in prometheus_samples(text, HEALTH_METRICS).items():
            if 'peer="dst"' not in k:
                health["metrics"][prefix + k] = v
        for k, v in prometheus_samples(text, ("response_total",)).items():
            if 'classification="failure"' in k or 'status_code="5' in k:
                health["failed_responses"][prefix + k] = v
        per_worker.append(sum(prometheus_samples(text, ("request_total",)).values()))
    if len(admin_ports) > 1 and per_worker:
        health["requests_per_worker"] = per_worker
    if child.log_path is not None and child.log_path.exists():
        health["log_exceptions"] = log_exceptions(child.log_path.read_text(errors="replace"))
    return health


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = make_settings(args)
    selected = list(args.only or DEFAULT_SECTIONS)
    pyspy: str | None = None
    if args.profile:
        if not any(name in selected for name in PROFILED):
            log(f"--profile records l5dproxy under {' and '.join(PROFILED)}: add one of them "
                "to --only")
            return 2
        try:
            pyspy = pyspy_mod.require_pyspy()
        except pyspy_mod.ProfileError as exc:
            log(str(exc))
            return 2
        log(f"--profile: {pyspy}")

    install_exit_signals()
    nofile = raise_nofile()

    missing = missing_programs()
    if missing:
        log("missing programs: " + ", ".join(missing) + "\n    install them with: "
            "apt-get install -y " + " ".join(sorted(set(missing.values()))))
    if twistd_path() is None:
        log("twistd not found: run the harness with the venv's python (Twisted installed)")
    log(f"RLIMIT_NOFILE {nofile}; settings: {settings}")

    workdir = Path(tempfile.mkdtemp(prefix="l5dbench-"))
    workdir.chmod(0o755)  # nginx workers (nobody) read the big file from here
    meta = collect_meta()
    interrupted = False
    try:
        with Supervisor(workdir) as sup:
            h = Harness(sup, settings, selected, args.skip_target, args.ready_timeout,
                        pyspy)
            try:
                h.start()
                h.warmup()
                h.run_rounds()
                h.run_memory()
                h.run_tls()
                h.run_abuse()
                h.collect_health()
            except KeyboardInterrupt:
                interrupted = True
                log("interrupted: stopping children, reporting what was measured")
            report = h.report(meta)
            report.meta["interrupted"] = interrupted
            report.meta["workdir"] = str(workdir) if args.keep_tmp else None
    finally:
        if args.keep_tmp:
            log(f"configs and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    if report.sections:
        print(report.table())
    if report.workers is not None:
        print()
        print(report.workers.table())
    for extra in (report.tls, report.abuse, report.abuse_each, report.soak):
        if extra is not None:
            print()
            print(extra.table())
    for prof in report.profiles:
        print()
        print(prof.table())
    footer = report.footer()
    if footer:
        print()
        print(footer)
    report.write_json(args.json)
    log(f"JSON written to {args.json}")
    return 130 if interrupted else 0
