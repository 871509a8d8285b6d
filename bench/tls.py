"""The ``tls`` scenario (issue 13 "Performance"): TLS termination, l5dproxy beside HAProxy.

Both terminate TLS with the same certificate (ECDSA P-256, made with ``openssl req``)
in front of the harness's nginx (plain HTTP/1.1), each on a proxy of its own:

* ``keep-alive req/s``: ``wrk -t1 -c50`` small GETs over TLS (``https://``), and the
  same through l5dproxy's plaintext listener (same process), so the table shows TLS
  as a fraction of plaintext (issue 13's target: at least 0.5);
* ``new TLS conns/s``: ``h2load --h1`` in rate mode (``-r``/``--rate-period``), every
  connection new (one full handshake, one GET, closed): no connection reuse; session
  tickets and HAProxy's session cache are off, so each is a full handshake on both;
* ``KiB per idle TLS conn``: RSS growth of the proxy holding ``hold`` TLS connections
  that finished their handshake and send nothing (``bench/tlshold.py``), divided by
  the number held, measured first, on the fresh process.

Each cell is the median over the rounds; ``ratio`` is l5dproxy / HAProxy.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.backends import Backends, Target, start_l5dproxy, wait_tcp
from bench.procs import StartError, Supervisor, free_port, raise_nofile, rss_kib, which
from bench.scenarios import Sample, Settings, run_wrk
from bench.tools import ParseError, parse_h2load

HOST = "127.0.0.1"
BENCH_DIR = Path(__file__).resolve().parent

#: (key, label, format, higher is better)
METRICS = (
    ("rps", "keep-alive req/s over TLS (wrk -c50)", "{:,.0f}", True),
    ("p99_ms", "  p99 ms", "{:.2f}", False),
    ("plain_rps", "keep-alive req/s plaintext, same proxy", "{:,.0f}", True),
    ("tls_of_plain", "  TLS / plaintext", "{:.2f}", True),
    ("handshakes", "new TLS conns/s (h2load --h1 -r, 1 GET each)", "{:,.0f}", True),
    ("handshake_failed", "  failed", "{:,.0f}", False),
    ("hold_per_conn_kib", "KiB per idle TLS conn", "{:.1f}", False),
    ("hold_conns", "  idle TLS conns held", "{:,.0f}", True),
)
TARGETS = ("l5dproxy", "haproxy")
#: New connections per handshake run at most.
MAX_HANDSHAKES = 5000


@dataclass
class TlsResult:
    """Samples per target and metric, over the rounds; errors and notes per target."""

    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    def add(self, target: str, key: str, value: float) -> None:
        self.samples.setdefault(target, {}).setdefault(key, []).append(value)

    def median(self, target: str, key: str) -> float | None:
        values = self.samples.get(target, {}).get(key)
        return statistics.median(values) if values else None

    def table(self) -> str:
        title = "## tls: termination, l5dproxy vs HAProxy (same certificate)"
        if self.error:
            return f"{title}\n\nnot run: {self.error}"
        lines = [title, "", "| metric | l5dproxy | haproxy | l5dproxy / haproxy |",
                 "| --- | ---: | ---: | ---: |"]
        for key, label, fmt, _ in METRICS:
            cells = []
            for t in TARGETS:
                v = self.median(t, key)
                cells.append(fmt.format(v) if v is not None else "-")
            a, b = self.median("l5dproxy", key), self.median("haproxy", key)
            ratio = f"{a / b:.2f}" if a is not None and b else "-"
            if key in ("plain_rps", "tls_of_plain", "hold_conns", "handshake_failed"):
                ratio = ""
            lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
        for t, errs in self.errors.items():
            for e in errs:
                lines.append(f"\n{t}: {e}")
        for n in self.notes:
            lines.append(f"\n{n}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "errors": self.errors, "notes": self.notes,
                "error": self.error,
                "median": {t: {k: self.median(t, k) for k, *_ in METRICS} for t in TARGETS}}


# ----------------------------------------------------------------------- setup

def make_certificate(workdir: Path) -> tuple[Path, Path, Path]:
    """A self-signed ECDSA P-256 certificate for localhost/127.0.0.1: (cert, key,
    cert+key in one file, as HAProxy's ``crt`` takes it)."""
    openssl = which("openssl")
    if openssl is None:
        raise StartError("openssl not found (apt-get install openssl)")
    cert, key, both = (workdir / n for n in ("tls-cert.pem", "tls-key.pem", "tls-both.pem"))
    subprocess.run([str(openssl), "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, both


def l5dproxy_tls_listener(port: int, cert: Path, key: Path) -> str:
    """The extra listener of the bench's l5dproxy: TLS terminated, then HTTP/1 to nginx."""
    return f"""
[[listener]]
name = "tls"
listen = "tcp:{port}:interface={HOST}"
service = "backend"

[listener.tls]
certificates = [{{ cert = "{cert}", key = "{key}" }}]
alpn = ["http/1.1"]
"""


def haproxy_tls_config(port: int, both: Path, b: Backends, maxconn: int) -> str:
    """HAProxy (one thread) terminating TLS on ``port``, HTTP/1 to nginx; no session
    cache and no tickets, as l5dproxy (every new connection a full handshake)."""
    return f"""# generated by bench/tls.py
global
    nbthread 1
    maxconn {maxconn}
    tune.ssl.cachesize 0
    ssl-default-bind-options no-tls-tickets
    log stderr format short local0 err

defaults
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-request 300s
    maxconn {maxconn}

frontend tls
    mode http
    bind {HOST}:{port} ssl crt {both} alpn http/1.1
    default_backend nginx_h1

backend nginx_h1
    mode http
    http-reuse always
    server s1 {HOST}:{b.h1}
"""


@dataclass
class TlsTarget:
    name: str
    target: Target
    tls: int  # the TLS port
    plain: int | None = None  # a plaintext HTTP/1 port of the same process


def start_targets(sup: Supervisor, b: Backends, ready_timeout: float,
                  cert: Path, key: Path, both: Path) -> dict[str, TlsTarget | str]:
    """Each target, or why it is not available."""
    out: dict[str, TlsTarget | str] = {}
    port = free_port()
    t = start_l5dproxy(sup, b, ready_timeout, name="l5dproxy-tls",
                       extra_config=l5dproxy_tls_listener(port, cert, key))
    if t.available:
        try:
            wait_tcp(t.children[0], port)
            out["l5dproxy"] = TlsTarget("l5dproxy", t, port, t.h1)
        except StartError as exc:
            out["l5dproxy"] = f"its TLS listener did not open: {exc}"
    else:
        out["l5dproxy"] = t.why_unavailable()
    haproxy = which("haproxy")
    if haproxy is None:
        out["haproxy"] = "haproxy not found (apt-get install haproxy)"
        return out
    port = free_port()
    conf = sup.workdir / "haproxy-tls.cfg"
    conf.write_text(haproxy_tls_config(port, both, b, max(1000, (raise_nofile() - 200) // 2)))
    child = sup.start("haproxy-tls", [str(haproxy), "-db", "-f", str(conf)])
    target = Target("haproxy")
    target.children.append(child)
    target.pid = child.pid
    try:
        wait_tcp(child, port)
        out["haproxy"] = TlsTarget("haproxy", target, port)
    except StartError as exc:
        out["haproxy"] = f"haproxy did not start: {exc}"
    return out


# ----------------------------------------------------------------------- runs

def run_handshakes(sup: Supervisor, port: int, seconds: float, rate: int = 4000) -> Sample:
    """``h2load --h1`` creating ``rate`` connections/s (offered, in 20 periods of 50 ms a
    second) for ``seconds`` (``MAX_HANDSHAKES`` connections at most), each one full
    handshake and one GET, then closed. The achieved rate is what the proxy sustained
    (the run ends when every one is done)."""
    h2load = which("h2load")
    if h2load is None:
        return Sample(error="h2load not found")
    per_period = max(1, rate // 20)
    # At most MAX_HANDSHAKES: a target that manages a tenth of the offered rate
    # must not stretch the run tenfold.
    total = max(per_period, min(int(rate * seconds), MAX_HANDSHAKES))
    run = sup.run([str(h2load), "--h1", "-r", str(per_period), "--rate-period", "50ms",
                   "-c", str(total), "-n", str(total), f"https://{HOST}:{port}/"],
                  timeout=seconds * 20 + 60)
    try:
        r = parse_h2load(run.stdout)
    except ParseError as exc:
        return Sample(error=f"h2load: {exc}: {run.stderr.strip()[-300:]}")
    return Sample(metrics={"handshakes": r.requests_per_sec, "handshake_failed":
                           float(r.failed + r.errored)})


def hold_tls(sup: Supervisor, pid: int, port: int, count: int,
             timeout: float = 120.0) -> Sample:
    """RSS of ``pid`` before and with ``count`` idle TLS connections to ``port``
    (``bench/tlshold.py`` holds them, each after its handshake)."""
    before = rss_kib(pid)
    proc = subprocess.Popen([sys.executable, str(BENCH_DIR / "tlshold.py"), HOST, str(port),
                             str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "held N" once every handshake is done
        if not line.startswith("held "):
            return Sample(error=f"tlshold: {line.strip()} {proc.stderr.read()[-300:]}")
        held = int(line.split()[1])
        time.sleep(1.0)  # let the proxy settle (buffers of the last handshakes freed)
        with_conns = rss_kib(pid)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    per_conn = (with_conns - before) / held if held else 0.0
    return Sample(metrics={"hold_per_conn_kib": per_conn, "hold_conns": float(held)})


def run_tls(sup: Supervisor, b: Backends, s: Settings, ready_timeout: float,
            log: Any = print) -> TlsResult:
    result = TlsResult()
    missing = [p for p in ("wrk", "h2load", "openssl") if which(p) is None]
    if missing:
        result.error = f"missing {', '.join(missing)}"
        return result
    if not b.h1:
        result.error = "nginx is not running"
        return result
    try:
        cert, key, both = make_certificate(sup.workdir)
    except (StartError, subprocess.SubprocessError, OSError) as exc:
        result.error = f"no certificate: {exc}"
        return result
    targets = start_targets(sup, b, ready_timeout, cert, key, both)
    for name, t in targets.items():
        if isinstance(t, str):
            result.errors.setdefault(name, []).append(f"not available: {t}")
            log(f"tls: {name} NOT available: {t}")
    ready = [t for t in targets.values() if not isinstance(t, str)]
    try:
        # Idle connections first, on fresh processes: after the load rounds the
        # allocators hold memory freed by thousands of closed connections, and new
        # ones fit in it without growing RSS (seen: 0.1 KiB per connection).
        hold = min(s.hold_connections, 2000)
        for t in ready:
            pid = t.target.pid
            if pid is None:
                continue
            sample = hold_tls(sup, pid, t.tls, hold)
            _record(result, t.name, sample)
            log(f"tls {t.name:<9} hold: {sample.metrics or sample.error}")
        for r in range(s.rounds):
            order = ready[r % len(ready):] + ready[:r % len(ready)] if ready else []
            for t in order:
                _round(sup, t, s, result, log, r)
    finally:
        for t in ready:
            for child in t.target.children:
                sup.stop(child)
    result.notes.append(
        "ECDSA P-256 certificate, TLS 1.3 (the client's default), no session resumption; "
        "HTTP/1.1 to nginx behind both; one HAProxy thread, one l5dproxy process.")
    return result


def _round(sup: Supervisor, t: TlsTarget, s: Settings, result: TlsResult, log: Any,
           r: int) -> None:
    tls = run_wrk_https(sup, t.tls, s)
    _record(result, t.name, tls)
    if t.plain:
        plain = run_wrk(sup, t.plain, s)
        if plain.error is None and tls.error is None and plain.metrics.get("rps"):
            result.add(t.name, "plain_rps", plain.metrics["rps"])
            result.add(t.name, "tls_of_plain", tls.metrics["rps"] / plain.metrics["rps"])
    hs = run_handshakes(sup, t.tls, s.duration, s.handshake_rate)
    _record(result, t.name, hs)
    log(f"round {r + 1}/{s.rounds} tls {t.name:<9} {tls.metrics or tls.error} "
        f"{hs.metrics or hs.error}")


def run_wrk_https(sup: Supervisor, port: int, s: Settings) -> Sample:
    """``run_wrk`` over TLS (wrk does not verify the certificate)."""
    sample = run_wrk(sup, port, s, scheme="https")
    return Sample(metrics={k: v for k, v in sample.metrics.items() if k in ("rps", "p99_ms")},
                  error=sample.error, notes=sample.notes)


def _record(result: TlsResult, target: str, sample: Sample) -> None:
    if sample.error:
        result.errors.setdefault(target, []).append(sample.error)
    for k, v in sample.metrics.items():
        result.add(target, k, v)
