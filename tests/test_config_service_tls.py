"""``[service.NAME.tls]``: TLS origination settings, checked at parse time
(files read, so --check, the start and a reload refuse a broken one)."""

from __future__ import annotations

import os
import tomllib

import trustme
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.config.parse import ConfigError, parse
from l5dproxy.tls import client as tlsclient


class ServiceTlsTests(SynchronousTestCase):

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(os.path.join(self.dir, "ca.pem"))
        leaf = ca.issue_cert("web.example")
        leaf.cert_chain_pems[0].write_to_path(os.path.join(self.dir, "web.crt"))
        leaf.private_key_pem.write_to_path(os.path.join(self.dir, "web.key"))
        ca.issue_cert("other.example").private_key_pem.write_to_path(
            os.path.join(self.dir, "other.key"))
        self.source = os.path.join(self.dir, "l5dproxy.toml")

    def parse(self, tls: str, service: str = ""):
        text = f'[service.app]\nendpoints = ["127.0.0.1:1"]\n{service}\n[service.app.tls]\n{tls}'
        return parse(tomllib.loads(text), self.source)

    def errors(self, tls: str, service: str = "") -> list[str]:
        with self.assertRaises(ConfigError) as cm:
            self.parse(tls, service)
        return cm.exception.errors

    def test_defaults(self) -> None:
        tls = self.parse("").services["app"].tls
        self.assertIsNotNone(tls)
        self.assertEqual((tls.ca, tls.server_name, tls.alpn, tls.cert, tls.key),
                         (None, None, None, None, None))
        self.assertIsNone(parse(tomllib.loads('[service.app]\nendpoints = ["127.0.0.1:1"]'),
                                self.source).services["app"].tls)

    def test_every_key_paths_relative_to_the_config(self) -> None:
        tls = self.parse('ca = "ca.pem"\nserver_name = "app.internal"\nalpn = ["h2"]\n'
                         'cert = "web.crt"\nkey = "web.key"\n').services["app"].tls
        self.assertEqual(tls.ca, os.path.join(self.dir, "ca.pem"))
        self.assertEqual((tls.server_name, tls.alpn), ("app.internal", ("h2",)))
        self.assertEqual((tls.cert, tls.key),
                         (os.path.join(self.dir, "web.crt"), os.path.join(self.dir, "web.key")))
        # Loaded while parsing: the dial uses what was checked.
        loaded = tlsclient.client_tls_for(tls)
        self.assertEqual(loaded.client_certificate.name, "web.example")

    def test_each_reload_reads_the_files_again(self) -> None:
        a = self.parse('ca = "ca.pem"').services["app"].tls
        b = self.parse('ca = "ca.pem"').services["app"].tls
        self.assertIsNot(tlsclient.client_tls_for(a), tlsclient.client_tls_for(b))

    def test_broken_values_name_file_key_and_reason(self) -> None:
        d = self.dir
        cases = [
            ('ca = "missing.pem"',
             f"{self.source}: service.app.tls.ca: {d}/missing.pem: cannot read: "
             "No such file or directory"),
            ('ca = "web.key"', f"{self.source}: service.app.tls.ca: {d}/web.key: no PEM "
             "certificate in it"),
            ('cert = "web.crt"\nkey = "other.key"',
             f"{self.source}: service.app.tls.key: {d}/other.key: this key does not belong to "
             f"the certificate in {d}/web.crt"),
            ('cert = "web.crt"', f"{self.source}: service.app.tls.key: cert and key go "
             "together (the client certificate and its private key)"),
            ('server_name = "*.example"', f"{self.source}: service.app.tls.server_name: "
             "'*.example': expected a DNS name"),
            ('alpn = []', f"{self.source}: service.app.tls.alpn: expected protocol names"),
            ('alpn = ["h2"]', f"{self.source}: service.app.tls.alpn: protocol = 'http1' "
             "speaks http/1.1: list it"),
            ('sni = "x"', f"{self.source}: service.app.tls.sni: unknown key"),
        ]
        for tls, expected in cases:
            service = 'protocol = "http1"' if "alpn" in tls else ""
            errors = self.errors(tls, service)
            self.assertEqual(len(errors), 1, errors)
            self.assertTrue(errors[0].startswith(expected), (errors[0], expected))

    def test_ip_address_server_name(self) -> None:
        self.assertEqual(self.parse('server_name = "10.0.0.1"').services["app"].tls.server_name,
                         "10.0.0.1")

    def test_not_with_send_proxy_protocol(self) -> None:
        errors = self.errors("", 'send_proxy_protocol = "v1"')
        self.assertEqual(errors, [f"{self.source}: service.app.send_proxy_protocol: not with "
                                  "[service.NAME.tls]: the PROXY header must precede the TLS "
                                  "handshake, which l5dproxy does not do yet"])

    def test_the_target_carries_the_settings(self) -> None:
        """Client ends read TLS from the per-request target (config.Target)."""
        service = self.parse('ca = "ca.pem"').services["app"]
        self.assertIs(service.target.tls, service.tls)
