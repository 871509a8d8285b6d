"""l5dproxy.app.lean: OpenSSL stays out of a process whose config names no TLS."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from twisted.trial.unittest import TestCase

from l5dproxy.app.lean import config_needs_tls

PLAIN = b"""
[[listener]]
name = "in"
listen = "tcp:4143:interface=127.0.0.1"
service = "app"
[service.app]
endpoints = ["127.0.0.1:8080"]
"""

TLS = PLAIN.replace(b'"tcp:4143:interface=127.0.0.1"',
                    b'"ssl:4143:privateKey=k.pem:certKey=c.pem"')


def _run(config: bytes, tmp: str, env: dict | None = None) -> str:
    path = os.path.join(tmp, "c.toml")
    with open(path, "wb") as f:
        f.write(config)
    code = textwrap.dedent(f"""
        import sys
        from l5dproxy.app import lean
        print("blocked" if lean.skip_openssl_unless_needed({path!r}) else "allowed")
        import twisted.internet.endpoints, twisted.internet.tcp, twisted.web.server
        from twisted.internet import reactor
        from l5dproxy.config.checks import check_endpoint
        from l5dproxy.config.parse import load
        load({path!r})
        print("OpenSSL" in sys.modules)
        print(check_endpoint("ssl:4143:privateKey=k.pem:certKey=c.pem"))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if done.returncode:
        raise AssertionError(done.stderr)
    return done.stdout


class LeanTests(TestCase):
    def test_needs_tls(self) -> None:
        self.assertFalse(config_needs_tls(PLAIN))
        self.assertTrue(config_needs_tls(TLS))
        self.assertTrue(config_needs_tls(b"[TLS]\n"))

    def test_plain_config_keeps_openssl_out(self) -> None:
        out = _run(PLAIN, self._tmp()).splitlines()
        self.assertEqual(out[:2], ["blocked", "False"])
        self.assertIn("restart it to use TLS", out[2])

    def test_tls_config_keeps_it(self) -> None:
        out = _run(PLAIN + b"# tls\n", self._tmp()).splitlines()
        self.assertEqual(out[0], "allowed")

    def test_environment_keeps_it(self) -> None:
        out = _run(PLAIN, self._tmp(), {"L5DPROXY_OPENSSL": "1"}).splitlines()
        self.assertEqual(out[:2], ["allowed", "True"])

    def _tmp(self) -> str:
        path = self.mktemp()
        os.makedirs(path)
        return path
