"""The differential framing check (bench/smuggle.py), bounded and seeded.

The real ``twistd l5dproxy`` in front of a strict h11 endpoint; HTTP/1
connections of pipelined requests mutated from the known smuggling vectors,
and h2 requests with generated pseudo-headers, each compared with what the
client sent (an independent h11 parse, or the h2 request itself). The longer
form: ``python -m bench.smuggle --cases N``.
"""

from __future__ import annotations

import time

from twisted.trial.unittest import TestCase

from bench.smuggle import Endpoint, config_text, run
from tests.support import ProxyProcess

H1_CASES = 250
H2_CASES = 120
SEED = 10
#: Wall-clock bound of one run (the machine is shared): cases past it are not sent.
BUDGET = 60.0


class DifferentialTests(TestCase):

    def setUp(self) -> None:
        self.endpoint = Endpoint()
        self.addCleanup(self.endpoint.close)
        self.proxy = ProxyProcess(self, config_text(self.endpoint))

    def test_http1(self) -> None:
        report = run(self.proxy, self.endpoint, H1_CASES, 0, SEED,
                     deadline=time.monotonic() + BUDGET)
        print("\n" + report.summary())
        self.assertEqual(report.findings, [])
        self.assertEqual(report.cases, H1_CASES)
        # Not vacuous: both outcomes occur, in numbers.
        self.assertGreater(report.forwarded, H1_CASES)
        self.assertGreater(report.rejected, H1_CASES // 5)

    def test_h2_to_http1(self) -> None:
        report = run(self.proxy, self.endpoint, 0, H2_CASES, SEED,
                     deadline=time.monotonic() + BUDGET)
        print("\n" + report.summary())
        self.assertEqual(report.cases, H2_CASES)
        self.assertGreater(report.forwarded, H2_CASES // 10)   # not vacuous
        self.assertEqual(report.findings, [])

