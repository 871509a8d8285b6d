"""The ``workers`` scenario: how l5dproxy's throughput grows with ``--workers N``.

One ``twistd -n l5dproxy --workers N`` per N (1, 2, the powers of two up to
``os.cpu_count()`` and that count itself; ``--quick``: 1 and 2), all started at
once with the l5dproxy target's config on ports of their own, measured only
once every worker's admin ``/ready`` answers 200. Each round runs, for every
N in an order rotated from round to round, the ``h1`` scenario's wrk (the same
settings) and then ``iperf3 -R`` (server -> client) through the opaque
listener. The table shows the median per N and the ratio to N=1.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.procs import CpuMeter, CpuWindow, Supervisor, which
from bench.scenarios import (
    MetricSpec,
    Sample,
    Settings,
    add_cpu_per_request,
    run_iperf,
    run_wrk,
)


def worker_counts(cpus: int | None, quick: bool = False) -> tuple[int, ...]:
    """1 and 2 always; then the powers of two up to ``cpus`` and ``cpus`` itself."""
    if quick:
        return (1, 2)
    top = max(2, cpus or 1)
    counts = {1, 2, top}
    k = 4
    while k < top:
        counts.add(k)
        k *= 2
    return tuple(sorted(counts))


# (metric key, spec, which run yields it)
METRICS: tuple[tuple[MetricSpec, str], ...] = (
    (MetricSpec("rps", "h1 req/s (wrk -t1 -c50)"), "h1"),
    (MetricSpec("p99_ms", "h1 p99 ms", "{:.3f}", higher_is_better=False), "h1"),
    (MetricSpec("cpu_us_per_req", "h1 CPU µs/request, all workers", "{:.1f}",
                higher_is_better=False), "h1"),
    (MetricSpec("socket_errors", "h1 socket errors + non-2xx", ratio=False,
                higher_is_better=False), "h1"),
    (MetricSpec("gbits", "tcp -R Gbit/s (iperf3 -R)", "{:.2f}"), "tcp_r"),
)
RUNS = {"h1": ("wrk",), "tcp_r": ("iperf3",)}


@dataclass
class WorkersSection:
    counts: tuple[int, ...]
    samples: dict[str, dict[int, list[Sample]]] = field(default_factory=dict)  # run -> N
    skipped: dict[int, str] = field(default_factory=dict)  # N -> why not measured
    missing: dict[str, str] = field(default_factory=dict)  # run -> "missing wrk"

    def add(self, run: str, n: int, sample: Sample) -> None:
        self.samples.setdefault(run, {}).setdefault(n, []).append(sample)

    def all_samples(self) -> list[Sample]:
        return [s for per_n in self.samples.values() for ss in per_n.values() for s in ss]

    def median(self, run: str, n: int, key: str) -> float | None:
        values = [s.metrics[key] for s in self.samples.get(run, {}).get(n, [])
                  if key in s.metrics and not math.isnan(s.metrics[key])]
        return statistics.median(values) if values else None

    def cell(self, run: str, n: int) -> str:
        if n in self.skipped or run in self.missing:
            return "skip"
        if any(s.error for s in self.samples.get(run, {}).get(n, [])):
            return "ERR"
        return "-"

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for spec, run in METRICS:
            if spec.key == "socket_errors":
                values = {n: _sum_or_none(self.median(run, n, "socket_errors"),
                                          self.median(run, n, "non_2xx"))
                          for n in self.counts}
            else:
                values = {n: self.median(run, n, spec.key) for n in self.counts}
            base = values.get(1)
            ratios = {n: (values[n] / base if spec.ratio and values[n] is not None
                          and base else None) for n in self.counts if n != 1}
            rows.append({"run": run, "key": spec.key, "label": spec.label, "fmt": spec.fmt,
                         "values": values, "over_n1": ratios})
        return rows

    def table(self) -> str:
        if not self.samples and not self.skipped:
            return ""
        header = ["l5dproxy --workers N", *(f"N={n}" for n in self.counts),
                  *(f"N={n}/N=1" for n in self.counts if n != 1)]
        lines = []
        for row in self.rows():
            cells = [row["label"]]
            for n in self.counts:
                v = row["values"][n]
                cells.append(row["fmt"].format(v) if v is not None else self.cell(row["run"], n))
            for n in self.counts:
                if n != 1:
                    r = row["over_n1"][n]
                    cells.append(f"{r:.2f}" if r is not None else "")
            lines.append(cells)
        widths = [max(len(c) for c in col) for col in zip(header, *lines, strict=True)]

        def fmt(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                     for i, (c, w) in enumerate(zip(cells, widths,
                                                                    strict=True))) + " |"

        sep = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":"
                             for i, w in enumerate(widths)) + "|"
        return "\n".join([fmt(header), sep, *(fmt(c) for c in lines)])

    def footer(self) -> list[str]:
        out = [f"workers: --workers {n} not measured: {why}" for n, why in self.skipped.items()]
        out += [f"workers: {run} not run: {why}" for run, why in self.missing.items()]
        for run, per_n in self.samples.items():
            for n, samples in per_n.items():
                for msg, k in Counter(s.error for s in samples if s.error).items():
                    out.append(f"[workers/{run}/N={n}] ERROR x{k}: {_short(msg)}")
                for msg, k in Counter(m for s in samples for m in s.notes).items():
                    out.append(f"[workers/{run}/N={n}] x{k}: {_short(msg)}")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "counts": list(self.counts),
            "skipped": {str(n): why for n, why in self.skipped.items()},
            "missing": self.missing,
            "runs": {run: {str(n): {"samples": [asdict(s) for s in ss]}
                           for n, ss in per_n.items()}
                     for run, per_n in self.samples.items()},
            "table": [{k: ({str(n): v for n, v in row[k].items()}
                           if isinstance(row[k], dict) else row[k])
                       for k in ("run", "key", "label", "values", "over_n1")}
                      for row in self.rows()],
        }


def _sum_or_none(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _short(msg: str, limit: int = 300) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def measure(sup: Supervisor, ws: Any, run: str, s: Settings) -> Sample:
    """One wrk (``h1``) or ``iperf3 -R`` (``tcp_r``) run against worker set ``ws``, with
    the CPU its processes used and a check that all N workers ran throughout."""
    cpu = CpuWindow([ws.child.pid])
    cpu.start()
    meter = CpuMeter(sup)
    meter.start()
    try:
        sample = (run_wrk(sup, ws.h1, s) if run == "h1"
                  else run_iperf(sup, ws.tcp, s, reverse=True))
    except Exception as exc:  # a harness bug must not lose the other runs
        sample = Sample(error=f"{type(exc).__name__}: {exc}")
    sample.metrics["other_cpu_pct"] = meter.other_pct()
    add_cpu_per_request(sample, cpu.stop())
    if len(cpu.before) != ws.n or len(cpu.after) != ws.n or not cpu.same_processes:
        sample.notes.append(f"{len(cpu.before)} processes before the run, {len(cpu.after)} "
                            f"after (expected {ws.n} workers, same pids): a worker died or "
                            "restarted")
    if not ws.available:
        sample.notes.append(f"--workers {ws.n} died during the run: {ws.why_unavailable()}")
    return sample


def missing_tools() -> dict[str, str]:
    out = {}
    for run, progs in RUNS.items():
        gone = [p for p in progs if which(p) is None]
        if gone:
            out[run] = f"missing {', '.join(gone)}"
    return out
