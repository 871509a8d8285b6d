"""The ``tls`` bench scenario (bench/tls.py): its table, the configs it gives
HAProxy and l5dproxy (checked by the programs themselves), and one short run
of the scenario end to end (``python -m bench --quick --only tls``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

from bench import tls
from bench.backends import Backends, l5dproxy_config
from tests.support import require_tool, run_l5dproxy

ROOT = Path(__file__).resolve().parent.parent


class TableTests(TestCase):

    def test_medians_and_ratios(self) -> None:
        r = tls.TlsResult()
        for v in (900.0, 1000.0, 1100.0):
            r.add("l5dproxy", "rps", v)
        r.add("haproxy", "rps", 4000.0)
        r.add("l5dproxy", "tls_of_plain", 0.6)
        table = r.table()
        self.assertIn("| keep-alive req/s over TLS (wrk -c50) | 1,000 | 4,000 | 0.25 |", table)
        self.assertIn("|   TLS / plaintext | 0.60 | - |  |", table)
        self.assertEqual(r.to_json()["median"]["l5dproxy"]["rps"], 1000.0)

    def test_not_run(self) -> None:
        self.assertIn("not run: missing wrk", tls.TlsResult(error="missing wrk").table())


class ConfigTests(TestCase):

    def setUp(self) -> None:
        require_tool("openssl")
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir(parents=True)
        self.cert, self.key, self.both = tls.make_certificate(self.dir)
        self.b = Backends(h1=8080, h2c=8081, iperf=5201, big_bytes=0,
                          sink={"l5dproxy": 9000, "haproxy": 9001, "portforward": 9002})

    def test_haproxy_accepts_its_config(self) -> None:
        haproxy = require_tool("haproxy")
        conf = self.dir / "haproxy.cfg"
        conf.write_text(tls.haproxy_tls_config(8443, self.both, self.b, 1000))
        result = subprocess.run([haproxy, "-c", "-f", str(conf)], capture_output=True,
                                text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_l5dproxy_accepts_its_config(self) -> None:
        conf = self.dir / "l5dproxy.toml"
        conf.write_text(l5dproxy_config(4191, 4143, 4144, 4145, 4146, self.b)
                        + tls.l5dproxy_tls_listener(4443, self.cert, self.key))
        result = run_l5dproxy("--config", str(conf), "--check")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class RunTests(TestCase):
    """The scenario once, briefly (1 s per tool, 20 idle connections): each
    target measured, nothing failed. A check of the harness, not figures."""

    timeout = 300

    def test_quick_run(self) -> None:
        from bench.cli import make_settings, parse_args
        from l5dproxy.app.service import LISTEN_BACKLOG

        for tool in ("nginx", "haproxy", "wrk", "h2load", "openssl"):
            require_tool(tool)
        args = ["--quick", "--only", "tls", "--duration", "1", "--hold", "20"]
        # No more new connections than l5dproxy's accept queue holds: however
        # late a proxy starved by a loaded machine accepts, the kernel drops
        # none of them (at 4,000 offered, hundreds were: "handshake_failed").
        settings = make_settings(parse_args(args))
        self.assertLessEqual(settings.handshake_rate * settings.duration, LISTEN_BACKLOG)
        out = Path(self.mktemp()).absolute()
        result = subprocess.run(
            [sys.executable, "-m", "bench", *args, "--json", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=280,
            env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.assertEqual(result.returncode, 0, result.stderr[-3000:])
        self.assertIn("## tls: termination, l5dproxy vs HAProxy", result.stdout)
        doc = json.loads(out.read_text())["tls"]
        self.assertIsNone(doc["error"], doc)
        self.assertEqual(doc["errors"], {}, doc)
        for target in tls.TARGETS:
            median = doc["median"][target]
            # The wrk run is bounded by time (1 s): how many requests it
            # completes depends on the machine (none, when a starved proxy
            # takes longer than that for the 50 handshakes). It gave a figure.
            self.assertGreaterEqual(median["rps"], 0, (target, doc))
            # The h2load run is bounded by count: every new connection made
            # its full handshake and got its GET answered.
            self.assertGreater(median["handshakes"], 0, (target, doc))
            self.assertEqual(median["handshake_failed"], 0, (target, doc))
            self.assertEqual(median["hold_conns"], 20, (target, doc))
        l5d = doc["median"]["l5dproxy"]
        if l5d["plain_rps"]:   # the ratio wherever it is defined (one round: no median)
            self.assertAlmostEqual(l5d["tls_of_plain"], l5d["rps"] / l5d["plain_rps"])
