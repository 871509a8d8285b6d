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


SNI = PLAIN.replace(b"[service.app]", b'[[listener.route]]\nsni = "db.*"\nservice = "db"\n'
                    b'[service.db]\nendpoints = ["127.0.0.1:5432"]\n[service.app]')


class LeanServiceTests(TestCase):
    """The running service, not only the config, keeps OpenSSL out: TLS
    termination (app/tlsterm.py, l5dproxy.tls) is imported only for a config
    with [listener.tls]; SNI passthrough (tcp/sni.py) needs no OpenSSL."""

    def test_sni_routes_without_openssl(self) -> None:
        tmp = self.mktemp()
        os.makedirs(tmp)
        path = os.path.join(tmp, "c.toml")
        with open(path, "wb") as f:
            f.write(SNI)
        code = textwrap.dedent(f"""
            import sys
            from l5dproxy.app import lean
            print("blocked" if lean.skip_openssl_unless_needed({path!r}) else "allowed")
            from twisted.internet import reactor
            from l5dproxy.app.service import ProxyService
            from l5dproxy.config.parse import load
            service = ProxyService(load({path!r}), reactor)
            print("tls" in service.listeners[0].handlers)
            print(sorted(m for m in sys.modules
                         if m.split(".")[0] in ("OpenSSL", "cryptography", "service_identity")
                         or m in ("l5dproxy.tls.server", "l5dproxy.tls.certs",
                                  "l5dproxy.app.tlsterm", "l5dproxy.detect.terminate")))
        """)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(done.stdout.splitlines(), ["blocked", "True", "[]"])
