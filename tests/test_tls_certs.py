"""l5dproxy.tls.certs and l5dproxy.tls.identity: loading, SNI choice, reload, identities."""

from __future__ import annotations

import datetime
import os

import trustme
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial import unittest
from zope.interface import implementer

from l5dproxy.tls.certs import (
    CertificateError,
    CertificateStore,
    choose,
    load_pair,
    name_matches,
)
from l5dproxy.tls.identity import allowed, compile_patterns, peer_identity
from tests.fakes import FakeConnection
from tests.tlsfixtures import issue_uri_cert, write_pair


def _write(path: str, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return path


class LoadTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.ca = trustme.CA()

    def test_pair_with_chain_names_and_expiry(self) -> None:
        intermediate = self.ca.create_child_ca()
        not_after = datetime.datetime(2031, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)
        leaf = intermediate.issue_cert("API.example.com", "*.example.org",
                                       not_after=not_after)
        cert, key = write_pair(leaf, self.dir, "api")
        pair = load_pair(cert, key)
        self.assertEqual(pair.dns_names, ("api.example.com", "*.example.org"))
        self.assertEqual(pair.name, "api.example.com")
        self.assertEqual(len(pair.chain), 1)
        self.assertEqual(pair.chain[0].subject, intermediate._certificate.subject)
        self.assertEqual(pair.not_after, not_after.timestamp())
        self.assertEqual(pair.openssl_certificate.to_cryptography(), pair.certificate)

    def test_errors_name_the_file_and_reason(self) -> None:
        cert, key = write_pair(self.ca.issue_cert("a.example.com"), self.dir, "a")
        _, other_key = write_pair(self.ca.issue_cert("b.example.com"), self.dir, "b")
        missing = os.path.join(self.dir, "missing.pem")
        garbage = _write(os.path.join(self.dir, "garbage.pem"), b"not a certificate\n")
        cases = [
            ((missing, key), missing, "No such file"),
            ((garbage, key), garbage, "not a PEM certificate"),
            ((cert, garbage), garbage, "not a PEM private key"),
            ((cert, cert), cert, "not a PEM private key"),
            ((cert, other_key), other_key, "does not belong to the certificate"),
        ]
        for (c, k), path, reason in cases:
            with self.assertRaises(CertificateError) as caught:
                load_pair(c, k)
            self.assertEqual(caught.exception.path, path)
            self.assertIn(reason, caught.exception.reason)
            self.assertTrue(str(caught.exception).startswith(f"{path}: "))

    def test_encrypted_key_is_refused_with_a_reason(self) -> None:
        from cryptography.hazmat.primitives import serialization

        leaf = self.ca.issue_cert("a.example.com")
        cert, key = write_pair(leaf, self.dir, "a")
        loaded = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
        _write(key, loaded.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret")))
        with self.assertRaises(CertificateError) as caught:
            load_pair(cert, key)
        self.assertIn("encrypted", caught.exception.reason)


class ChooseTests(unittest.TestCase):
    def setUp(self) -> None:
        d = self.mktemp()
        os.mkdir(d)
        ca = trustme.CA()
        self.default = load_pair(*write_pair(ca.issue_cert("default.test"), d, "d"))
        self.wild = load_pair(*write_pair(ca.issue_cert("*.example.com"), d, "w"))
        self.exact = load_pair(*write_pair(ca.issue_cert("api.example.com"), d, "e"))
        self.pairs = (self.default, self.wild, self.exact)

    def test_exact_before_wildcard_before_default(self) -> None:
        self.assertIs(choose(self.pairs, "api.example.com"), self.exact)
        self.assertIs(choose(self.pairs, "API.Example.com."), self.exact)
        self.assertIs(choose(self.pairs, "www.example.com"), self.wild)
        self.assertIs(choose(self.pairs, "default.test"), self.default)
        self.assertIs(choose(self.pairs, "a.b.example.com"), self.default)
        self.assertIs(choose(self.pairs, "example.com"), self.default)
        self.assertIs(choose(self.pairs, None), self.default)
        self.assertIs(choose(self.pairs, ""), self.default)

    def test_wildcard_rules(self) -> None:
        self.assertTrue(name_matches("*.example.com", "a.example.com"))
        self.assertFalse(name_matches("*.example.com", "example.com"))
        self.assertFalse(name_matches("*.example.com", ".example.com"))
        self.assertFalse(name_matches("*.example.com", "a.b.example.com"))
        self.assertFalse(name_matches("a*.example.com", "ab.example.com"))
        self.assertTrue(name_matches("a*.example.com", "a*.example.com"))
        self.assertFalse(name_matches("*.*.example.com", "a.b.example.com"))

    @settings(max_examples=200, derandomize=True, deadline=None)
    @given(st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True),
           st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){1,3}", fullmatch=True))
    def test_wildcard_covers_exactly_one_label(self, name: str, base: str) -> None:
        expected = name.count(".") == base.count(".") + 1 and name.endswith("." + base)
        self.assertEqual(name_matches("*." + base, name), expected)
        self.assertEqual(name_matches(base, name), name == base)


class StoreTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.mkdir(self.dir)
        self.ca = trustme.CA()
        self.cert, self.key = write_pair(self.ca.issue_cert("a.example.com"), self.dir, "a")
        self.lines: list[str] = []

        @implementer(ILogObserver)
        def observe(event) -> None:
            if event.get("log_level") == LogLevel.error:
                self.lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def _rewrite(self, leaf: trustme.LeafCert) -> None:
        # Written to new files and renamed over the old: as cert-manager and
        # certbot do, and a new inode whatever the file system's mtime grain.
        tmp = os.path.join(self.dir, "new")
        os.mkdir(tmp)
        cert, key = write_pair(leaf, tmp, "a")
        os.replace(cert, self.cert)
        os.replace(key, self.key)
        os.rmdir(tmp)

    def test_reload_replaces_a_changed_pair(self) -> None:
        store = CertificateStore([(self.cert, self.key)], owner="listener in")
        self.assertFalse(store.changed())
        self.assertEqual(store.reload(only_changed=True), [])
        self.assertEqual(store.generation, 0)
        self._rewrite(self.ca.issue_cert("b.example.com"))
        self.assertTrue(store.changed())
        self.assertEqual(store.reload(only_changed=True), [])
        self.assertEqual(store.generation, 1)
        self.assertEqual(store.pairs[0].dns_names, ("b.example.com",))
        self.assertFalse(store.changed())

    def test_broken_file_keeps_the_old_pair_and_logs_file_and_reason(self) -> None:
        store = CertificateStore([(self.cert, self.key)], owner="listener in")
        before = store.pairs[0]
        os.replace(_write(os.path.join(self.dir, "junk"), b"-----BEGIN junk\n"), self.cert)
        errors = store.reload()
        self.assertEqual([e.path for e in errors], [self.cert])
        self.assertIs(store.pairs[0], before)
        self.assertEqual(store.generation, 0)
        self.assertEqual(len(self.lines), 1)
        self.assertIn(f"listener in: {self.cert}: not a PEM certificate", self.lines[0])
        # Not retried (nor logged again) by polling until the file changes again.
        self.assertFalse(store.changed())
        self.assertEqual(store.reload(only_changed=True), [])
        self.assertEqual(len(self.lines), 1)
        self._rewrite(self.ca.issue_cert("c.example.com"))
        self.assertTrue(store.changed())
        self.assertEqual(store.reload(only_changed=True), [])
        self.assertEqual(store.pairs[0].dns_names, ("c.example.com",))

    def test_expiry_metric_follows_the_loaded_pairs(self) -> None:
        from l5dproxy.telemetry import Metrics

        store = CertificateStore([(self.cert, self.key)], owner="listener in")
        metrics = Metrics()
        metrics.certificate_sources.append(
            lambda: [("in", "", name, t) for name, t in store.expiries()])
        not_after = datetime.datetime(2030, 1, 2, tzinfo=datetime.UTC)
        self._rewrite(self.ca.issue_cert("b.example.com", not_after=not_after))
        store.reload()
        self.assertEqual(metrics.registry.get_sample_value(
            "tls_certificate_expiry_timestamp_seconds",
            {"listener": "in", "service": "", "name": "b.example.com"}),
            not_after.timestamp())
        self.assertIsNone(metrics.registry.get_sample_value(
            "tls_certificate_expiry_timestamp_seconds",
            {"listener": "in", "service": "", "name": "a.example.com"}))

    def test_constructor_raises_for_a_broken_file(self) -> None:
        with self.assertRaises(CertificateError):
            CertificateStore([(self.cert, self.cert)])


class IdentityTests(unittest.TestCase):
    def setUp(self) -> None:
        self.ca = trustme.CA()

    def test_first_uri_san_else_first_dns_san(self) -> None:
        from cryptography import x509

        cert_pem, _ = issue_uri_cert(self.ca, "spiffe://example.org/ns/web/sa/default",
                                     "web.example.org")
        cert = x509.load_pem_x509_certificate(cert_pem)
        self.assertEqual(peer_identity(cert), "spiffe://example.org/ns/web/sa/default")
        from OpenSSL import crypto
        self.assertEqual(peer_identity(crypto.X509.from_cryptography(cert)),
                         "spiffe://example.org/ns/web/sa/default")
        leaf = self.ca.issue_cert("Web.Example.org", "other.example.org")
        dns_cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
        self.assertEqual(peer_identity(dns_cert), "web.example.org")
        self.assertIsNone(peer_identity(None))

    def test_allow_globs(self) -> None:
        patterns = ["spiffe://example.org/ns/web/*", "db-?.example.org"]
        self.assertTrue(allowed("spiffe://example.org/ns/web/sa/default", patterns))
        self.assertFalse(allowed("spiffe://example.org/ns/webx/sa/default", patterns))
        self.assertFalse(allowed("spiffe://example.org/ns/api/sa/web", patterns))
        self.assertTrue(allowed("db-1.example.org", patterns))
        self.assertFalse(allowed("db-12.example.org", patterns))
        self.assertFalse(allowed("dbx1.example.org", ["db.1.example.org"]))
        self.assertFalse(allowed("a[b", ["a[b]"]))
        self.assertTrue(allowed("a[b]", ["a[b]"]))
        self.assertFalse(allowed(None, ["*"]))
        self.assertTrue(allowed("x\ny", compile_patterns(["x*"])))


class ClientIdTests(unittest.TestCase):
    """exchange.identity.identify_client: the one rule for l5d-client-id."""

    def _head(self, *headers: tuple[bytes, bytes]):
        from l5dproxy.exchange.message import RequestHead

        return RequestHead(b"GET", b"/", b"a", list(headers))

    def test_forged_fields_removed_whatever_their_case(self) -> None:
        from l5dproxy.exchange.identity import identify_client

        class Plain(FakeConnection):  # a plaintext connection: no client_id, authorized
            pass

        class Mtls(FakeConnection):
            client_id = "spiffe://example.org/ns/web/sa/x"
            authorized = True

        for conn, expected in ((Plain(), []),
                               (Mtls(), [(b"l5d-client-id", b"spiffe://example.org/ns/web/sa/x")])):
            head = self._head((b"L5D-Client-Id", b"forged"), (b"x", b"1"),
                              (b"l5d-client-id", b"again"))
            self.assertIsNone(identify_client(head, conn))
            self.assertEqual([h for h in head.headers if h[0].lower() == b"l5d-client-id"],
                             expected)
            self.assertIn((b"x", b"1"), head.headers)

    def test_forged_fields_removed_from_the_trailer_section(self) -> None:
        # Red-team finding: 'l5d-client-id: forged' in a chunked HTTP/1
        # request's trailer section or an h2 request's trailing HEADERS
        # reached the endpoint. Both orders: trailers received before the
        # dispatcher runs (a small request in one read) and after.
        from l5dproxy.exchange.identity import identify_client
        from l5dproxy.exchange.message import Body

        class Sink:
            trailers = None

            def body_data(self, data: bytes) -> None:
                pass

            def body_end(self, trailers) -> None:
                self.trailers = trailers

            def body_error(self, reason: Exception) -> None:
                raise AssertionError(reason)

        forged = [(b"L5D-Client-Id", b"forged"), (b"grpc-status", b"0"),
                  (b"l5d-client-id", b"again")]
        for finished_first in (True, False):
            body, sink = Body(), Sink()
            if finished_first:
                body.write(b"hi")
                body.finish(list(forged))
            self.assertIsNone(identify_client(self._head(), FakeConnection(), body))
            body.consume(sink)
            if not finished_first:
                body.write(b"hi")
                body.finish(list(forged))
            self.assertEqual(sink.trailers, [(b"grpc-status", b"0")], finished_first)
        body, sink = Body(), Sink()   # no trailer section: none made up
        identify_client(self._head(), FakeConnection(), body)
        body.consume(sink)
        body.finish(None)
        self.assertIsNone(sink.trailers)

    def test_refused_client_gets_403_permission_denied(self) -> None:
        from l5dproxy.exchange.identity import identify_client

        class Refused(FakeConnection):
            client_id = "spiffe://example.org/ns/db/sa/x"
            authorized = False

        error = identify_client(self._head(), Refused())
        assert error is not None
        self.assertEqual((error.status, error.reason, error.grpc_status),
                         (403, "unauthorized", 7))

    def test_identity_with_control_characters_is_not_sent(self) -> None:
        from l5dproxy.exchange.identity import set_client_id

        for bad in ("a\r\nx: y", "a b", "caf\u00e9"):
            head = self._head()
            set_client_id(head, bad)
            self.assertEqual(head.headers, [])


class SniGlobTests(unittest.TestCase):
    def test_globs(self) -> None:
        from l5dproxy.tcp.sni import sni_glob

        self.assertTrue(sni_glob("db1.*").fullmatch("DB1.example.com"))
        self.assertTrue(sni_glob("*.example.com").fullmatch("a.b.example.com"))
        self.assertFalse(sni_glob("*.example.com").fullmatch("example.com"))
        self.assertFalse(sni_glob("db?.example.com").fullmatch("db12.example.com"))
        self.assertFalse(sni_glob("a.b").fullmatch("axb"))
