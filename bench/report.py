"""Collect samples, reduce them to medians, and render the table (Markdown) and JSON."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.scenarios import MetricSpec, Sample
from bench.workers import WorkersSection

TARGETS = ("direct", "l5dproxy", "haproxy", "portforward")
SUBJECT = "l5dproxy"
RATIO_BASES = ("direct", "haproxy", "portforward")
OTHER_CPU_WARN = 10.0  # % of all CPUs used by foreign processes during a run


@dataclass
class Section:
    name: str
    title: str
    metrics: tuple[MetricSpec, ...]
    samples: dict[str, list[Sample]] = field(default_factory=dict)  # target -> samples
    skipped: dict[str, str] = field(default_factory=dict)  # target -> why not measured

    def add(self, target: str, sample: Sample) -> None:
        self.samples.setdefault(target, []).append(sample)

    def median(self, target: str, key: str) -> float | None:
        values = [s.metrics[key] for s in self.samples.get(target, [])
                  if key in s.metrics and not math.isnan(s.metrics[key])]
        return statistics.median(values) if values else None

    def errors(self, target: str) -> list[str]:
        return [s.error for s in self.samples.get(target, []) if s.error]

    def notes(self, target: str) -> list[str]:
        return [n for s in self.samples.get(target, []) for n in s.notes]


@dataclass
class Row:
    section: str
    title: str
    key: str
    label: str
    fmt: str
    values: dict[str, float | None]
    ratios: dict[str, float | None]
    cells: dict[str, str]  # target -> text when there is no value (ERR, skipped)


@dataclass
class Report:
    meta: dict[str, Any]
    settings: dict[str, Any]
    targets: dict[str, dict[str, Any]]
    sections: list[Section]
    ceiling: dict[str, list[float]] = field(default_factory=dict)  # "m10" -> samples
    health: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> findings
    workers: WorkersSection | None = None  # the workers scenario (its own table)
    abuse: Any = None  # bench.abuse.AbuseResult: the abuse scenario (its own tables)
    abuse_each: Any = None  # bench.abuse.AbuseEach: every attacker alone
    soak: Any = None  # bench.abuse.SoakResult
    tls: Any = None  # bench.tls.TlsResult: the tls scenario (its own table)
    profiles: list[Any] = field(default_factory=list)  # bench.pyspy.ProfileSummary

    def ceiling_median(self, key: str = "m10") -> float | None:
        values = self.ceiling.get(key)
        return statistics.median(values) if values else None

    # ------------------------------------------------------------------ rows

    def rows(self) -> list[Row]:
        rows: list[Row] = []
        for sec in self.sections:
            for spec in sec.metrics:
                values: dict[str, float | None] = {}
                cells: dict[str, str] = {}
                for t in TARGETS:
                    if spec.key.endswith("_added_ms"):
                        base_key = spec.key.replace("_added_ms", "_ms")
                        v, d = sec.median(t, base_key), sec.median("direct", base_key)
                        values[t] = v - d if v is not None and d is not None else None
                    else:
                        values[t] = sec.median(t, spec.key)
                    if values[t] is None:
                        if t in sec.skipped:
                            cells[t] = "skip"
                        elif sec.errors(t):
                            cells[t] = "ERR"
                        else:
                            cells[t] = "-"
                ratios: dict[str, float | None] = {}
                subject = values.get(SUBJECT)
                for base in RATIO_BASES:
                    b = values.get(base)
                    ratios[base] = (subject / b if spec.ratio and subject is not None
                                    and b not in (None, 0) else None)
                ceiling = self.ceiling_median()
                ratios["ceiling"] = (subject / ceiling if sec.name == "h2c" and spec.key == "rps"
                                     and subject is not None and ceiling else None)
                rows.append(Row(sec.name, sec.title, spec.key, spec.label, spec.fmt, values,
                                ratios, cells))
        return rows

    # ----------------------------------------------------------------- table

    def table(self) -> str:
        header = ["scenario", "metric", *TARGETS, "l5d/direct", "l5d/haproxy", "l5d/pf",
                  "l5d/ceiling"]
        lines: list[list[str]] = []
        last = None
        for row in self.rows():
            if all(v is None for v in row.values.values()) and not row.cells:
                continue
            name = row.section if row.section != last else ""
            last = row.section
            cells = [name, row.label]
            for t in TARGETS:
                v = row.values[t]
                cells.append(row.fmt.format(v) if v is not None else row.cells.get(t, "-"))
            for base in (*RATIO_BASES, "ceiling"):
                r = row.ratios[base]
                cells.append(f"{r:.2f}" if r is not None else "")
            lines.append(cells)
        widths = [max(len(c) for c in col) for col in zip(header, *lines, strict=True)]

        def fmt(cells: list[str]) -> str:
            out = []
            for i, (c, w) in enumerate(zip(cells, widths, strict=True)):
                out.append(c.ljust(w) if i < 2 else c.rjust(w))
            return "| " + " | ".join(out) + " |"

        text = [fmt(header), "|" + "|".join(
            ("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":") for i, w in enumerate(widths)
        ) + "|"]
        text += [fmt(c) for c in lines]
        return "\n".join(text)

    def footer(self) -> str:
        out: list[str] = []
        c10, c1 = self.ceiling_median("m10"), self.ceiling_median("m1")
        if c10 is not None:
            out.append(
                f"h2 in-memory ceiling (h2 {self.meta.get('h2_version', '?')}): "
                f"{c10:,.0f} round trips/s with 10 in flight"
                + (f", {c1:,.0f} with 1 in flight" if c1 is not None else "")
                + " (one core, no I/O)."
            )
        every = [smp for sec in self.sections for samples in sec.samples.values()
                 for smp in samples]
        if self.workers is not None:
            every += self.workers.all_samples()
        other = [v for smp in every
                 if not math.isnan(v := smp.metrics.get("other_cpu_pct", math.nan))]
        if other:
            busy = sum(v > OTHER_CPU_WARN for v in other)
            out.append(
                f"CPU used by processes outside the benchmark during load runs: median "
                f"{statistics.median(other):.0f}%, max {max(other):.0f}% of all CPUs"
                + (f" -- {busy} of {len(other)} runs above {OTHER_CPU_WARN:.0f}%: those "
                   "figures are disturbed (per-run values: other_cpu_pct in the JSON)"
                   if busy else "")
            )
        for name, info in self.targets.items():
            if not info.get("available", True):
                out.append(f"{name}: NOT MEASURED -- {info.get('error')}")
        for name, h in self.health.items():
            for key, v in sorted(h.get("metrics", {}).items()):
                out.append(f"{name} /metrics after the run: {key} = {v:g}")
            for key, v in sorted(h.get("failed_responses", {}).items()):
                out.append(f"{name} /metrics after the run: {key} = {v:g}")
            for exc, n in sorted(h.get("log_exceptions", {}).items(), key=lambda kv: -kv[1]):
                out.append(f"{name} log: {n} x {_short(exc, 200)}")
            for err in h.get("metrics_error", []):
                out.append(f"{name} /metrics after the run: {err}")
            if h.get("requests_per_worker"):
                counts = h["requests_per_worker"]
                total = sum(counts) or 1
                out.append(f"{name}: requests per worker over the whole run: " + ", ".join(
                    f"{c:,.0f} ({100 * c / total:.0f} %)" for c in counts))
        if self.workers is not None:
            out += self.workers.footer()
        for sec in self.sections:
            for t in TARGETS:
                if t in sec.skipped:
                    continue
                for msg, n in Counter(sec.errors(t)).items():
                    out.append(f"[{sec.name}/{t}] ERROR x{n}: {_short(msg)}")
                for msg, n in Counter(sec.notes(t)).items():
                    out.append(f"[{sec.name}/{t}] x{n}: {_short(msg)}")
        return "\n".join(out)

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        sections: dict[str, Any] = {}
        for sec in self.sections:
            per_target: dict[str, Any] = {}
            for t in TARGETS:
                samples = sec.samples.get(t, [])
                if not samples and t not in sec.skipped:
                    continue
                keys = sorted({k for s in samples for k in s.metrics})
                per_target[t] = {
                    "median": {k: sec.median(t, k) for k in keys},
                    "samples": [asdict(s) for s in samples],
                    "skipped": sec.skipped.get(t),
                }
            sections[sec.name] = {"title": sec.title, "targets": per_target}
        return {
            "meta": self.meta,
            "settings": self.settings,
            "targets": self.targets,
            "ceiling": {k: {"median": self.ceiling_median(k), "samples": v}
                        for k, v in self.ceiling.items()},
            "health": self.health,
            "scenarios": sections,
            "workers": self.workers.to_json() if self.workers is not None else None,
            "abuse": self.abuse.to_json() if self.abuse is not None else None,
            "tls": self.tls.to_json() if self.tls is not None else None,
            "abuse_each": self.abuse_each.to_json() if self.abuse_each is not None else None,
            "soak": self.soak.to_json() if self.soak is not None else None,
            "profiles": [p.to_json() for p in self.profiles],
            "table": [
                {"scenario": r.section, "metric": r.key, "label": r.label,
                 "values": r.values, "l5dproxy_over": r.ratios}
                for r in self.rows()
            ],
        }

    def write_json(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = _finite(self.to_json())
        path.write_text(json.dumps(doc, indent=2, default=str, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    """NaN/inf -> null, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def _short(msg: str, limit: int = 300) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."
