"""The harness's CPU per request (issue 16's headline figure) and the latency_h1_3k
scenario: CPU accounting from /proc, where it goes in the table, and what the paced
run asks h2load for. No load tool runs: the tools' outputs are canned."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from bench import cli, scenarios
from bench.backends import Target
from bench.procs import Child, CpuWindow, Supervisor, ToolRun, cpu_seconds_between
from bench.report import Report, Section
from bench.scenarios import (
    CPU_PER_REQUEST,
    SCENARIOS,
    Sample,
    Settings,
    add_cpu_per_request,
)

H2LOAD_PACED = """\
starting benchmark...
spawning thread #0: 10 total client(s). Timing-based test with 1s of warm-up time and \
5s of main duration for measurements.
Application protocol: http/1.1

finished in 5.00s, 2999.80 req/s, 380.81KB/s
requests: 14999 total, 15009 started, 14999 done, 14999 succeeded, 0 failed, 0 errored, \
0 timeout
status codes: 14999 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 1.86MB (1949870) total, 1.30MB (1364909) headers (space savings 0.00%), \
102.53KB (104993) data
                     min         max         mean         sd        +/- sd
time for request:      301us      4.12ms       612us       201us    90.12%
"""


class CpuAccountingTests(SynchronousTestCase):
    def test_cpu_seconds_between(self) -> None:
        before = {10: 100, 11: 50, 12: 7}
        after = {10: 160, 11: 90, 13: 500}  # 12 exited, 13 is new: neither counted
        self.assertEqual(cpu_seconds_between(before, after, hz=100), 1.0)
        self.assertEqual(cpu_seconds_between({}, after, hz=100), 0.0)

    def test_add_cpu_per_request(self) -> None:
        sample = Sample(metrics={"requests": 50_000.0})
        add_cpu_per_request(sample, 6.0)
        self.assertEqual(sample.metrics["cpu_s"], 6.0)
        self.assertEqual(sample.metrics["cpu_us_per_req"], 120.0)

    def test_no_requests_no_figure(self) -> None:
        sample = Sample(metrics={"requests": 0.0})
        add_cpu_per_request(sample, 2.0)
        self.assertEqual(sample.metrics, {"requests": 0.0, "cpu_s": 2.0})
        sample = Sample(metrics={"requests": 10.0})
        add_cpu_per_request(sample, None)  # the window never began
        self.assertEqual(sample.metrics, {"requests": 10.0})

    def test_window_reads_the_session(self) -> None:
        # This test's own session: the running process is in it, so it is counted.
        window = CpuWindow([os.getsid(0)])
        window.start()
        used = window.stop()
        self.assertIn(os.getpid(), window.before)
        self.assertTrue(window.same_processes or os.getpid() in window.after)
        self.assertIsNotNone(used)
        assert used is not None
        self.assertGreaterEqual(used, 0.0)

    def test_window_that_never_began(self) -> None:
        window = CpuWindow([os.getsid(0)])
        window.start(delay=3600.0)  # past the run: stop cancels it
        self.assertIsNone(window.stop())

    def test_unknown_session(self) -> None:
        window = CpuWindow([2**22 + 12345])  # above the kernel's pid_max: no such session
        window.start()
        self.assertIsNone(window.stop())


class HeadlineRowTests(SynchronousTestCase):
    """cpu_us_per_req is the first row of h1, h2c and every latency scenario."""

    def test_first_metric(self) -> None:
        for name in ("h1", "h2c", "latency_h1", "latency_h1_3k", "latency_h2c"):
            self.assertEqual(SCENARIOS[name].metrics[0], CPU_PER_REQUEST, name)
        self.assertNotIn(CPU_PER_REQUEST, SCENARIOS["tcp"].metrics)

    def test_table_and_ratios(self) -> None:
        sec = Section("h1", SCENARIOS["h1"].title, SCENARIOS["h1"].metrics)
        for target, cpu, rps in (("direct", 20.0, 30_000.0), ("l5dproxy", 120.0, 7_000.0),
                                 ("haproxy", 30.0, 27_000.0), ("portforward", 60.0, 11_000.0)):
            sec.add(target, Sample(metrics={"cpu_us_per_req": cpu, "rps": rps}))
        report = Report(meta={}, settings={}, targets={}, sections=[sec])
        first = report.rows()[0]
        self.assertEqual(first.key, "cpu_us_per_req")
        self.assertEqual(first.ratios["haproxy"], 4.0)  # lower is better: 4x the CPU
        self.assertEqual(first.ratios["portforward"], 2.0)
        self.assertEqual(first.ratios["direct"], 6.0)
        lines = report.table().splitlines()
        cells = [c.strip() for c in lines[2].strip("|").split("|")]
        self.assertEqual(cells[:8], ["h1", "CPU µs/request (lower is better)", "20.0", "120.0",
                                     "30.0", "60.0", "6.00", "4.00"])
        self.assertIn("| req/s", lines[3].replace("|    ", "| "))
        doc = report.to_json()
        self.assertEqual(doc["table"][0]["metric"], "cpu_us_per_req")
        self.assertEqual(doc["scenarios"]["h1"]["targets"]["l5dproxy"]["median"]
                         ["cpu_us_per_req"], 120.0)


class FakeSupervisor(Supervisor):
    """Runs no tool: records the argv and answers with canned output (and writes the
    canned h2load request log where --log-file points)."""

    def __init__(self, workdir: Path, stdout: str, log: str = "") -> None:
        super().__init__(workdir)
        self.argvs: list[list[str]] = []
        self.stdout = stdout
        self.log = log

    def run(self, argv: Sequence[str], timeout: float) -> ToolRun:
        argv = list(argv)
        self.argvs.append(argv)
        if "--log-file" in argv:
            Path(argv[argv.index("--log-file") + 1]).write_text(self.log)
        return ToolRun(list(argv), 0, self.stdout, "", 0.0)


def _paced_log(n: int) -> str:
    return "".join(f"1795574708438960\t200\t{300 + i}\n" for i in range(n))


class Latency3kTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.workdir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.workdir)

    def test_rate_and_requests(self) -> None:
        sup = FakeSupervisor(self.workdir, H2LOAD_PACED, _paced_log(100))
        sample = SCENARIOS["latency_h1_3k"].run(sup, 4143, Settings())
        argv = sup.argvs[0]
        self.assertIn("--h1", argv)
        # 3,000 req/s in total over 10 clients (--rps is per client).
        self.assertEqual(argv[argv.index("-c") + 1], "10")
        self.assertEqual(argv[argv.index("--rps") + 1], "300")
        self.assertEqual(sample.metrics["requests"], 14999.0)
        self.assertEqual(sample.metrics["p50_ms"], 0.349)

    def test_other_latency_rows_keep_1000(self) -> None:
        sup = FakeSupervisor(self.workdir, H2LOAD_PACED, _paced_log(10))
        SCENARIOS["latency_h1"].run(sup, 4143, Settings())
        SCENARIOS["latency_h2c"].run(sup, 4143, Settings())
        for argv in sup.argvs:
            self.assertEqual(argv[argv.index("--rps") + 1], "100")
        self.assertNotIn("--h1", sup.argvs[1])

    def test_cpu_window_starts_after_warm_up(self) -> None:
        s = Settings(latency_warmup=1.5)
        for name in ("latency_h1", "latency_h1_3k", "latency_h2c"):
            self.assertEqual(SCENARIOS[name].measured_after(s), 1.5)
        for name in ("h1", "h2c"):
            self.assertEqual(SCENARIOS[name].measured_after(s), 0.0)

    def test_in_the_default_run_and_only(self) -> None:
        self.assertIn("latency_h1_3k", cli.DEFAULT_SECTIONS)
        args = cli.parse_args(["--only", "h1", "latency_h1_3k"])
        self.assertEqual(args.only, ["h1", "latency_h1_3k"])
        readme = (Path(scenarios.__file__).parent / "README.md").read_text()
        self.assertIn("latency_h1_3k", readme)


class HarnessCpuTests(SynchronousTestCase):
    """Harness._run_scenario measures the target's processes around the tool run."""

    def test_scenario_sample_gets_cpu_per_request(self) -> None:
        workdir = Path(tempfile.mkdtemp())
        self.addCleanup(workdir.rmdir)
        sup = Supervisor(workdir)

        def fake_run(sup: Supervisor, port: int, s: Settings) -> Sample:
            return Sample(metrics={"requests": 1000.0, "rps": 500.0})

        sc = scenarios.Scenario("h1", "fake", "h1", (), fake_run, SCENARIOS["h1"].metrics)
        self.patch(cli, "SCENARIOS", {"h1": sc})
        h = cli.Harness(sup, Settings(rounds=1), ["h1"], [], 1.0)

        class Proc:  # the test's own session stands for a target's process group
            pid = os.getsid(0)

            def poll(self) -> None:
                return None

        target = Target("l5dproxy", h1=4143)
        target.children.append(Child("l5dproxy", [], Proc(), None))  # type: ignore[arg-type]
        h.targets = {"l5dproxy": target, "haproxy": Target("haproxy", error="skipped")}
        h._run_scenario(h.sections[0], 0)
        [sample] = h.sections[0].samples["l5dproxy"]
        self.assertIn("cpu_s", sample.metrics)
        self.assertAlmostEqual(sample.metrics["cpu_us_per_req"],
                               1e6 * sample.metrics["cpu_s"] / 1000.0)
        self.assertEqual(h.sections[0].skipped["haproxy"], "skipped")
