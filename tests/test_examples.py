"""The client's-address examples under conf/examples/ pass ``--check``
(README points to them as the examples of its keys)."""

from __future__ import annotations

import os

from twisted.trial.unittest import TestCase

from tests.support import run_l5dproxy

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "conf", "examples")


class ExamplesTests(TestCase):
    def test_examples_check(self) -> None:
        for name in ("client-address.toml", "transparent.toml"):
            path = os.path.join(EXAMPLES, name)
            result = run_l5dproxy("--config", path, "--check")
            self.assertEqual((result.returncode, result.stdout.strip()), (0, f"{path}: ok"),
                             result.stderr)

    def test_client_address_example_names_every_key(self) -> None:
        """The keys of issue 14 each appear in the example README names."""
        with open(os.path.join(EXAMPLES, "client-address.toml")) as f:
            text = f.read()
        with open(os.path.join(EXAMPLES, "transparent.toml")) as f:
            text += f.read()
        for key in ("proxy_protocol", "proxy_protocol_timeout", "forwarded",
                    "trusted_proxies", "send_proxy_protocol", "transparent"):
            self.assertIn(f"\n{key} = ", text)
        self.assertIn('\nservice = "original_dst"', text)
