"""The test helpers themselves: require_tool, config building, metric parsing."""

from __future__ import annotations

import os
import tomllib
from unittest import SkipTest, mock

from twisted.trial.unittest import SynchronousTestCase

from tests.support import build_config, metric_value, parse_metrics, require_tool

MISSING = "l5dproxy-no-such-tool"


class RequireToolTests(SynchronousTestCase):
    def test_found(self) -> None:
        self.assertTrue(os.path.isabs(require_tool("sh")))

    def test_missing_skips(self) -> None:
        with mock.patch.dict(os.environ, {"CI": ""}), self.assertRaises(SkipTest):
            require_tool(MISSING)

    def test_missing_fails_under_ci(self) -> None:
        with mock.patch.dict(os.environ, {"CI": "true"}), \
                self.assertRaisesRegex(AssertionError, f"{MISSING} is required under CI"):
            require_tool(MISSING)


class BuildConfigTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        text = build_config([{"name": "in", "service": "app", "opaque": True}],
                            {"app": {"endpoints": ["127.0.0.1:1", "[::1]:2"]}},
                            detect={"timeout": 0.3, "opaque_ports": [1]},
                            proxy={"drain_timeout": 1})
        data = tomllib.loads(text)
        self.assertEqual(data["listener"], [{"name": "in", "service": "app", "opaque": True,
                                             "listen": "tcp:0:interface=127.0.0.1"}])
        self.assertEqual(data["service"]["app"]["endpoints"], ["127.0.0.1:1", "[::1]:2"])
        self.assertEqual(data["detect"], {"timeout": 0.3, "opaque_ports": [1]})


class MetricsParsingTests(SynchronousTestCase):
    def test_sum_over_matching_labels(self) -> None:
        samples = parse_metrics(
            '# TYPE tcp_open counter\n'
            'tcp_open_total{peer="src",listener="a"} 2.0\n'
            'tcp_open_total{peer="dst",listener="a"} 3.0\n'
            'tcp_open_total{peer="src",listener="b"} 5.0\n')
        self.assertEqual(metric_value(samples, "tcp_open_total"), 10)
        self.assertEqual(metric_value(samples, "tcp_open_total", peer="src"), 7)
        self.assertEqual(metric_value(samples, "tcp_open_total", peer="src", listener="b"), 5)
        self.assertEqual(metric_value(samples, "tcp_open_total", peer="nope"), 0)
        self.assertEqual(samples[("tcp_open_total",
                                  frozenset({"peer": "dst", "listener": "a"}.items()))], 3)
