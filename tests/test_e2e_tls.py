"""End to end: TLS termination on a listener, with real clients (issue 13).

curl (HTTP/1.1 and HTTP/2 by ALPN), ``openssl s_client`` (SNI, versions,
resumption, no ALPN), grpcio with ``ssl_channel_credentials``, against the
real ``twistd l5dproxy``; certificates made by trustme for each test.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import SkipTest

import trustme
from cryptography import x509
from twisted.trial import unittest

from tests.support import (
    ProxyProcess,
    echo_server,
    require_tool,
    run_l5dproxy,
    wait_for,
    write_config,
)
from tests.test_e2e_h2 import start_h2_backend
from tests.tlsfixtures import issue_uri_cert, write_ca, write_pair

WEB_ID = "spiffe://example.org/ns/web/sa/default"
DB_ID = "spiffe://example.org/ns/db/sa/default"


class _EchoHeaders(BaseHTTPRequestHandler):
    """Answers every GET with a JSON body: the path and every l5d-client-id
    field the request carried (so a test sees what the app sees)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps({"path": self.path,
                           "client_id": self.headers.get_all("l5d-client-id") or []}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def header_app(testcase) -> str:
    """An HTTP/1.1 app on 127.0.0.1:0 echoing what it saw; its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHeaders)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)
    testcase.addCleanup(stop)
    return f"127.0.0.1:{server.server_address[1]}"


class Certificates:
    """A CA, server certificates for a.example.com (the default, also
    localhost) and *.b.example.com, client certificates for WEB_ID and DB_ID,
    written to ``directory``."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_path = write_ca(self.ca, directory)
        self.a = write_pair(self.ca.issue_cert("a.example.com", "localhost"), directory, "a")
        self.b = write_pair(self.ca.issue_cert("*.b.example.com"), directory, "b")
        self.web = self._client("web", WEB_ID)
        self.db = self._client("db", DB_ID)

    def _client(self, stem: str, uri: str) -> tuple[str, str]:
        cert, key = issue_uri_cert(self.ca, uri)
        paths = (os.path.join(self.directory, f"{stem}.crt"),
                 os.path.join(self.directory, f"{stem}.key"))
        for path, data in zip(paths, (cert, key), strict=True):
            with open(path, "wb") as f:
                f.write(data)
        return paths


def tls_table(certs: Certificates, **extra: Any) -> dict[str, Any]:
    return {"certificates": [{"cert": certs.a[0], "key": certs.a[1]},
                             {"cert": certs.b[0], "key": certs.b[1]}], **extra}


def curl(port: int, host: str, *args: str, cafile: str, path: str = "/") -> tuple[int, str, str]:
    """``curl --cacert`` to https://HOST:PORT/PATH resolved to 127.0.0.1:
    (exit code, stdout with ``-w`` figures after the body, stderr)."""
    tool = require_tool("curl")
    result = subprocess.run(
        [tool, "-sS", "--max-time", "20", "--cacert", cafile,
         "--resolve", f"{host}:{port}:127.0.0.1", *args,
         "-w", "\n%{http_code} %{http_version}", f"https://{host}:{port}{path}"],
        capture_output=True, text=True, timeout=30)
    return result.returncode, result.stdout, result.stderr


def s_client(port: int, *args: str, stdin: bytes = b"", wait: float = 0.0) -> str:
    """``openssl s_client -connect 127.0.0.1:PORT ARGS``, sending ``stdin``
    then EOF: everything it printed."""
    tool = require_tool("openssl")
    result = subprocess.run(
        [tool, "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts", *args],
        input=stdin, capture_output=True, timeout=30)
    return (result.stdout + result.stderr).decode("utf-8", "replace")


def presented(output: str) -> x509.Certificate:
    """The leaf certificate in ``openssl s_client -showcerts`` output."""
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", output, re.S)
    assert m is not None, output
    return x509.load_pem_x509_certificate(m.group(0).encode())


def san_names(cert: x509.Certificate) -> list[str]:
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)


class TerminationTests(unittest.TestCase):
    """One terminating detect listener in front of an HTTP/1 app."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.certs = Certificates(self.dir)
        self.app = header_app(self)
        self.proxy = ProxyProcess(
            self, listeners=[{"name": "in", "service": "app", "tls": tls_table(self.certs)}],
            services={"app": {"endpoints": [self.app], "protocol": "http1"}})
        self.port = self.proxy.port("in")

    def test_curl_http1_over_tls(self) -> None:
        code, out, err = curl(self.port, "a.example.com", "--http1.1",
                              cafile=self.certs.ca_path, path="/one")
        self.assertEqual(code, 0, err)
        body, _, figures = out.rpartition("\n")
        self.assertEqual(figures, "200 1.1")
        self.assertEqual(json.loads(body), {"path": "/one", "client_id": []})
        self.proxy.wait_log(r"closed listener=in .*protocol=tls sni=a\.example\.com .*"
                            r"tls=TLSv1\.3 alpn=http/1\.1 client_id=- spliced=no")

    def test_curl_http2_by_alpn(self) -> None:
        code, out, err = curl(self.port, "a.example.com", "--http2",
                              "-H", "l5d-client-id: forged",
                              cafile=self.certs.ca_path, path="/two")
        self.assertEqual(code, 0, err)
        body, _, figures = out.rpartition("\n")
        self.assertEqual(figures, "200 2")
        # No client certificate: the forged identity is removed, none added.
        self.assertEqual(json.loads(body), {"path": "/two", "client_id": []})
        self.assertEqual(self.proxy.metric_value("request_total", listener="in",
                                                 protocol="h2", tls="true", client_id=""), 1)

    def test_s_client_picks_the_certificate_by_sni(self) -> None:
        for sni, expected in (("a.example.com", ["a.example.com", "localhost"]),
                              ("x.b.example.com", ["*.b.example.com"]),
                              ("unknown.example.net", ["a.example.com", "localhost"])):
            output = s_client(self.port, "-servername", sni)
            self.assertEqual(san_names(presented(output)), expected, sni)
        output = s_client(self.port, "-noservername")
        self.assertEqual(san_names(presented(output)), ["a.example.com", "localhost"])

    def test_no_alpn_sniffs_the_plaintext(self) -> None:
        output = s_client(self.port, "-servername", "a.example.com", "-ign_eof",
                          stdin=b"GET /plain HTTP/1.1\r\nHost: a.example.com\r\n"
                                b"l5d-client-id: forged\r\nConnection: close\r\n\r\n")
        self.assertIn("HTTP/1.1 200", output)
        self.assertIn('{"path": "/plain", "client_id": []}', output)
        self.proxy.wait_log(r"tls=TLSv1\.3 alpn=- client_id=- spliced=no")

    def test_below_tls_1_2_is_refused_and_tickets_resume_nothing(self) -> None:
        output = s_client(self.port, "-tls1_1", "-servername", "a.example.com")
        self.assertNotIn("BEGIN CERTIFICATE", output)
        self.assertRegex(output, r"alert protocol version|no protocols available|"
                                 r"unsupported protocol")
        wait_for(lambda: self.proxy.metric_value(
            "tls_handshake_errors_total", listener="in", reason="protocol_version") == 1,
            10, "tls_handshake_errors_total{reason=protocol_version} 1")
        for version in ("-tls1_2", "-tls1_3"):
            session = os.path.join(self.dir, f"session{version}")
            first = s_client(self.port, version, "-servername", "a.example.com",
                             "-sess_out", session)
            self.assertIn("New, TLSv1.", first)
            if os.path.exists(session):  # 1.3: a ticket that resumes nothing
                again = s_client(self.port, version, "-servername", "a.example.com",
                                 "-sess_in", session)
                self.assertIn("New, TLSv1.", again)
                self.assertNotIn("Reused", again)

    def test_expiry_metric(self) -> None:
        a = x509.load_pem_x509_certificate(_read(self.certs.a[0]))
        b = x509.load_pem_x509_certificate(_read(self.certs.b[0]))
        samples = self.proxy.metrics()
        expiry = "tls_certificate_expiry_timestamp_seconds"
        self.assertEqual(samples[(expiry, frozenset({
            "listener": "in", "service": "", "name": "a.example.com"}.items()))],
            a.not_valid_after_utc.timestamp())
        self.assertEqual(samples[(expiry, frozenset({
            "listener": "in", "service": "", "name": "*.b.example.com"}.items()))],
            b.not_valid_after_utc.timestamp())


class HandshakeTimeoutTests(unittest.TestCase):
    def test_a_client_that_stops_mid_handshake_is_cut_off(self) -> None:
        from OpenSSL import SSL

        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        certs = Certificates(d)
        proxy = ProxyProcess(
            self, listeners=[{"name": "in", "service": "app",
                              "tls": tls_table(certs, handshake_timeout=0.5)}],
            services={"app": {"endpoints": [header_app(self)]}})
        client = SSL.Connection(SSL.Context(SSL.TLS_CLIENT_METHOD), None)
        client.set_connect_state()
        client.set_tlsext_host_name(b"a.example.com")
        with self.assertRaises(SSL.WantReadError):
            client.do_handshake()
        hello = client.bio_read(65536)
        sock = socket.create_connection(("127.0.0.1", proxy.port("in")), timeout=10)
        self.addCleanup(sock.close)
        sock.sendall(hello)
        started = time.monotonic()
        received = b""
        while True:  # the ServerHello and the rest of its flight, then the end
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        self.assertEqual(received[:1], b"\x16")  # a handshake record: the ServerHello
        self.assertLess(time.monotonic() - started, 8)
        proxy.wait_log(r"closed listener=in .* end=tls handshake timeout \(0\.5 s\)")
        self.assertEqual(proxy.metric_value("tls_handshake_errors_total", listener="in",
                                            reason="timeout"), 1)
        self.assertEqual(proxy.metric_value("tls_handshake_errors_total"), 1)


class MutualTlsTests(unittest.TestCase):
    """client_ca + allow: the identity reaches the app; others are refused."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.certs = Certificates(self.dir)
        self.proxy = ProxyProcess(
            self, listeners=[{"name": "in", "service": "app", "tls": tls_table(
                self.certs, client_ca=self.certs.ca_path,
                allow=["spiffe://example.org/ns/web/*"])}],
            services={"app": {"endpoints": [header_app(self)], "protocol": "http1"}})
        self.port = self.proxy.port("in")

    def _curl(self, client: tuple[str, str], *args: str) -> tuple[int, str, str]:
        return curl(self.port, "a.example.com", "--cert", client[0], "--key", client[1],
                    "-H", "l5d-client-id: forged", *args, cafile=self.certs.ca_path,
                    path="/who")

    def test_identity_seen_by_the_app_over_http1_and_h2(self) -> None:
        for version, shown in (("--http1.1", "1.1"), ("--http2", "2")):
            code, out, err = self._curl(self.certs.web, version)
            self.assertEqual(code, 0, err)
            body, _, figures = out.rpartition("\n")
            self.assertEqual(figures, f"200 {shown}")
            self.assertEqual(json.loads(body), {"path": "/who", "client_id": [WEB_ID]})
        self.proxy.wait_log(rf"tls=TLSv1\.3 alpn=h2 client_id={re.escape(WEB_ID)} spliced=no")
        # Linkerd's labels: tls="true" and the client's identity.
        self.assertEqual(self.proxy.metric_value(
            "request_total", listener="in", tls="true", client_id=WEB_ID, no_tls_reason=""), 2)

    def test_identity_outside_allow_is_refused(self) -> None:
        for version in ("--http1.1", "--http2"):
            code, out, err = self._curl(self.certs.db, version, "-i")
            self.assertEqual(code, 0, err)
            self.assertRegex(out, r"^HTTP/[12.]+ 403")
            self.assertRegex(out, r"(?im)^l5d-proxy-error: unauthorized\r?$")
        self.assertEqual(self.proxy.metric_value("authz_denied_total", listener="in"), 2)
        self.assertEqual(self.proxy.metric_value("response_total", listener="in",
                                                 status_code="403"), 2)
        self.proxy.wait_log(rf"client_id={re.escape(DB_ID)} unauthorized spliced=no")

    def test_plaintext_is_refused_on_an_mtls_listener(self) -> None:
        # Red-team finding: plaintext HTTP/1, h2 (prior knowledge) and opaque
        # bytes sent to a client_ca listener were proxied with no identity,
        # past allow. They are refused as a client allow refuses is.
        tool = require_tool("curl")
        for version, shown in (("--http1.1", "1.1"), ("--http2-prior-knowledge", "2")):
            result = subprocess.run(
                [tool, "-sS", "-i", "--max-time", "20", version, "-H",
                 f"l5d-client-id: {WEB_ID}", "-w", "\n%{http_code} %{http_version}",
                 f"http://127.0.0.1:{self.port}/who"],
                capture_output=True, text=True, timeout=30)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertTrue(result.stdout.endswith(f"\n403 {shown}"), result.stdout)
            self.assertRegex(result.stdout, r"(?im)^l5d-proxy-error: unauthorized\r?$")
            self.assertNotIn("client_id", result.stdout)   # the app never answered
        with socket.create_connection(("127.0.0.1", self.port), timeout=20) as sock:
            sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            self.assertEqual(sock.recv(100), b"")           # closed, nothing relayed
        self.proxy.wait_log(r"protocol=opaque .*end=unauthorized")
        for protocol in ("http1", "h2", "opaque"):
            self.assertEqual(self.proxy.metric_value(
                "authz_denied_total", listener="in", protocol=protocol), 1)

    def test_no_client_certificate_fails_the_handshake(self) -> None:
        code, _, _ = curl(self.port, "a.example.com", cafile=self.certs.ca_path)
        self.assertNotEqual(code, 0)
        self.proxy.wait_log(r"end=tls handshake failed: .*certificate")
        self.assertEqual(self.proxy.metric_value(
            "tls_handshake_errors_total", listener="in", reason="no_client_certificate"), 1)

    def test_a_certificate_from_another_ca_is_a_bad_certificate(self) -> None:
        """A client certificate client_ca does not verify fails the handshake,
        counted as bad_certificate; so does a client refusing the proxy's
        certificate (its alert: unknown ca)."""
        cert, key = issue_uri_cert(trustme.CA(), WEB_ID)
        foreign = (os.path.join(self.dir, "foreign.crt"), os.path.join(self.dir, "foreign.key"))
        for path, data in zip(foreign, (cert, key), strict=True):
            with open(path, "wb") as f:
                f.write(data)
        code, _, _ = self._curl(foreign)
        self.assertNotEqual(code, 0)
        self.proxy.wait_log(r"end=tls handshake failed: .*certificate")
        self.assertEqual(self.proxy.metric_value(
            "tls_handshake_errors_total", listener="in", reason="bad_certificate"), 1)
        other_ca = write_ca(trustme.CA(), self.dir, "other")
        code, _, _ = curl(self.port, "a.example.com", "--cert", self.certs.web[0],
                          "--key", self.certs.web[1], cafile=other_ca)
        self.assertNotEqual(code, 0)
        wait_for(lambda: self.proxy.metric_value(
            "tls_handshake_errors_total", listener="in", reason="bad_certificate") == 2,
            10, "tls_handshake_errors_total{reason=bad_certificate} 2")
        self.assertEqual(self.proxy.metric_value("tls_handshake_errors_total"), 2)

    def test_grpc_identity_refused_is_permission_denied(self) -> None:
        grpc = _grpc()
        server_port = _grpc_server(self, grpc)
        proxy = ProxyProcess(
            self, listeners=[{"name": "in", "service": "grpc", "tls": tls_table(
                self.certs, client_ca=self.certs.ca_path,
                allow=["spiffe://example.org/ns/web/*"])}],
            services={"grpc": {"endpoints": [f"127.0.0.1:{server_port}"]}})
        for client, expected in ((self.certs.web, None),
                                 (self.certs.db, grpc.StatusCode.PERMISSION_DENIED)):
            channel = _tls_channel(grpc, proxy.port("in"), self.certs, client)
            unary = channel.unary_unary("/test.Echo/Unary")
            if expected is None:
                self.assertEqual(unary(b"hi", timeout=20), b"unary:hi")
            else:
                with self.assertRaises(grpc.RpcError) as caught:
                    unary(b"hi", timeout=20)
                self.assertEqual(caught.exception.code(), expected)
            channel.close()


def _grpc():
    try:
        import grpc
    except ImportError:  # pragma: no cover
        if os.environ.get("CI") == "true":
            raise
        raise SkipTest("grpcio is not installed") from None
    return grpc


def _grpc_server(testcase, grpc) -> int:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))

    def unary(request, context):
        return b"unary:" + request

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    testcase.addCleanup(server.stop, None)
    return port


def _tls_channel(grpc, port: int, certs: Certificates, client: tuple[str, str] | None = None):
    key = cert = None
    if client is not None:
        cert = _read(client[0])
        key = _read(client[1])
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(certs.ca_path), private_key=key,
        certificate_chain=cert)
    return grpc.secure_channel(f"127.0.0.1:{port}", credentials,
                               options=[("grpc.ssl_target_name_override", "a.example.com")])


class GrpcOverTlsTests(unittest.TestCase):
    def test_grpc_through_a_terminating_listener(self) -> None:
        grpc = _grpc()
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        certs = Certificates(d)
        port = _grpc_server(self, grpc)
        proxy = ProxyProcess(
            self, listeners=[{"name": "in", "service": "grpc", "tls": tls_table(certs)}],
            services={"grpc": {"endpoints": [f"127.0.0.1:{port}"]}})
        channel = _tls_channel(grpc, proxy.port("in"), certs)
        self.addCleanup(channel.close)
        unary = channel.unary_unary("/test.Echo/Unary")
        for i in range(3):
            self.assertEqual(unary(f"m{i}".encode(), timeout=20), f"unary:m{i}".encode())
        self.assertEqual(proxy.metric_value("request_total", listener="in", protocol="h2"), 3)


class H2AppTests(unittest.TestCase):
    def test_curl_http2_to_an_h2_app(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        certs = Certificates(d)
        port, _ = start_h2_backend(self)
        proxy = ProxyProcess(
            self, listeners=[{"name": "in", "service": "h2app", "tls": tls_table(certs)}],
            services={"h2app": {"endpoints": [f"127.0.0.1:{port}"], "protocol": "h2"}})
        code, out, err = curl(proxy.port("in"), "a.example.com", "--http2",
                              cafile=certs.ca_path, path="/bytes/100000")
        self.assertEqual(code, 0, err)
        body, _, figures = out.rpartition("\n")
        self.assertEqual(figures, "200 2")
        self.assertEqual(len(body.encode("latin-1")), 100000)


class OpaqueInsideTlsTests(unittest.TestCase):
    def test_a_tls_wrapped_opaque_protocol_is_relayed(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        certs = Certificates(d)
        echo = echo_server(self)
        proxy = ProxyProcess(
            self, listeners=[{"name": "in", "service": "echo", "tls": tls_table(certs)}],
            services={"echo": {"endpoints": [echo.address]}})
        # Python's ssl module (OpenSSL) as the client, offering no ALPN.
        context = ssl.create_default_context(cafile=certs.ca_path)
        with socket.create_connection(("127.0.0.1", proxy.port("in")), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="a.example.com") as tls:
            tls.sendall(b"\x00\x01binary hello\n")
            received = b""
            while len(received) < 15:
                chunk = tls.recv(100)
                if not chunk:
                    break
                received += chunk
        self.assertEqual(received, b"\x00\x01binary hello\n")
        proxy.wait_log(r"protocol=tls .*service=echo endpoint=127\.0\.0\.1:\d+ .*"
                       r"tls=TLSv1\.3 alpn=- client_id=- spliced=no")


class ConfigTests(unittest.TestCase):
    def _check(self, tls: str) -> subprocess.CompletedProcess:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        certs = Certificates(d)
        text = (f'[[listener]]\nname = "in"\nlisten = "tcp:0"\nservice = "app"\n'
                f'[listener.tls]\n{tls.format(a=certs.a[0], k=certs.a[1], ca=certs.ca_path)}\n'
                f'[service.app]\nendpoints = ["127.0.0.1:1"]\n')
        return run_l5dproxy("--config", write_config(self, text), "--check")

    def test_broken_values_fail_with_file_key_and_reason(self) -> None:
        cases = [
            ('certificates = [{{cert = "missing.crt", key = "{k}"}}]',
             r"listener\[0\]\.tls\.certificates\[0\]\.cert: /\S+/missing\.crt: "
             r"No such file or directory"),
            ('certificates = [{{cert = "{a}", key = "{ca}"}}]',
             r"listener\[0\]\.tls\.certificates\[0\]\.key: \S+ca\.pem: not a PEM private"
             r" key"),
            ('certificates = [{{cert = "{a}", key = "{k}"}}]\nmin_version = "1.1"',
             r"listener\[0\]\.tls\.min_version: '1\.1': one of '1\.2', '1\.3'"),
            ('certificates = [{{cert = "{a}", key = "{k}"}}]\nalpn = ["spdy/3"]',
             r"listener\[0\]\.tls\.alpn: unknown protocols \['spdy/3'\]"),
            ('certificates = [{{cert = "{a}", key = "{k}"}}]\nallow = ["x"]',
             r"listener\[0\]\.tls\.allow: allow matches client identities: it needs client_ca"),
            ('certificates = [{{cert = "{a}", key = "{k}"}}]\nclient_ca = "{k}"',
             r"listener\[0\]\.tls\.client_ca: \S+a\.key: no PEM certificate"),
            ("certificates = []", r"listener\[0\]\.tls\.certificates: at least one"),
            ('certificates = [{{cert = "{a}", key = "{k}"}}]\nhandshake_timeout = 0',
             r"listener\[0\]\.tls\.handshake_timeout: must be a duration"),
        ]
        for tls, expected in cases:
            result = self._check(tls)
            self.assertNotEqual(result.returncode, 0, tls)
            self.assertRegex(result.stdout + result.stderr, expected)

    def test_example_config_checks(self) -> None:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        d = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(d, "tls"))
        with open(os.path.join(root, "conf", "examples", "mtls-server.toml")) as f:
            text = f.read()
        example = os.path.join(d, "mtls-server.toml")
        with open(example, "w") as f:
            f.write(text)
        # Without its files the example is refused, naming them...
        result = run_l5dproxy("--config", example, "--check")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"{d}/tls/server.crt: No such file or directory", result.stderr)
        # ...and with them (relative to the config's folder) it passes.
        ca = trustme.CA()
        write_ca(ca, os.path.join(d, "tls"))
        write_pair(ca.issue_cert("app.example.org"), os.path.join(d, "tls"), "server")
        result = run_l5dproxy("--config", example, "--check")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class RotationTests(unittest.TestCase):
    """Certificates re-read under traffic: SIGHUP and watch_config."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ca = trustme.CA()
        self.ca_path = write_ca(self.ca, self.dir)
        self.cert, self.key = write_pair(self.ca.issue_cert("a.example.com"), self.dir, "a")

    def _proxy(self, **proxy: Any) -> ProxyProcess:
        return ProxyProcess(
            self, listeners=[{"name": "in", "service": "app", "tls": {
                "certificates": [{"cert": self.cert, "key": self.key}]}}],
            services={"app": {"endpoints": [header_app(self)], "protocol": "http1"}},
            proxy=proxy or None)

    def _replace(self, leaf: trustme.LeafCert | None, garbage: bytes = b"") -> None:
        """New files renamed over the old ones, as cert-manager and certbot do."""
        staging = os.path.join(self.dir, "staging")
        os.makedirs(staging, exist_ok=True)
        if leaf is None:
            with open(os.path.join(staging, "a.crt"), "wb") as f:
                f.write(garbage)
            os.replace(os.path.join(staging, "a.crt"), self.cert)
            return
        cert, key = write_pair(leaf, staging, "a")
        os.replace(key, self.key)
        os.replace(cert, self.cert)

    def _serial(self, port: int) -> int:
        """The serial number of the certificate a new handshake gets."""
        context = ssl.create_default_context(cafile=self.ca_path)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname="a.example.com") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def _traffic(self, port: int, stop: threading.Event, results: list[str]) -> None:
        """New connections (each a handshake), one GET each, until ``stop``
        (at most 2000): "ok" or what went wrong, per request."""
        import http.client

        context = ssl.create_default_context(cafile=self.ca_path)
        for _ in range(2000):
            if stop.is_set():
                return
            try:
                c = http.client.HTTPSConnection("a.example.com", port, timeout=10,
                                                context=context)
                c.sock = context.wrap_socket(
                    socket.create_connection(("127.0.0.1", port), timeout=10),
                    server_hostname="a.example.com")
                c.request("GET", "/r")
                response = c.getresponse()
                response.read()
                results.append("ok" if response.status == 200 else f"status {response.status}")
                c.close()
            except Exception as e:  # every failure is counted, none may happen
                results.append(f"{type(e).__name__}: {e}")

    def _rotate_under_traffic(self, proxy: ProxyProcess, trigger) -> None:
        import http.client

        port = proxy.port("in")
        old = self._serial(port)
        context = ssl.create_default_context(cafile=self.ca_path)
        kept = http.client.HTTPSConnection("a.example.com", port, timeout=10, context=context)
        kept.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port)),
                                        server_hostname="a.example.com")
        kept.request("GET", "/before")
        self.assertEqual(kept.getresponse().read()[:9], b'{"path": ')
        stop = threading.Event()
        results: list[str] = []
        worker = threading.Thread(target=self._traffic, args=(port, stop, results))
        worker.start()
        try:
            wait_for(lambda: len(results) >= 5, 30, "traffic before the rotation")
            leaf = self.ca.issue_cert("a.example.com")
            self._replace(leaf)
            trigger()
            proxy.wait_log(r"listener in: 1 certificate\(s\) reloaded", 30)
            expected = x509.load_pem_x509_certificate(
                leaf.cert_chain_pems[0].bytes()).serial_number
            self.assertNotEqual(expected, old)
            wait_for(lambda: self._serial(port) == expected, 30,
                     "a new handshake to present the new certificate")
            before = len(results)
            wait_for(lambda: len(results) >= before + 5, 30, "traffic after the rotation")
        finally:
            stop.set()
            worker.join(60)
        self.assertEqual([r for r in results if r != "ok"], [])
        # The connection opened before the rotation is still served.
        kept.request("GET", "/after")
        self.assertIn(b'"/after"', kept.getresponse().read())
        kept.close()

    def test_sighup_rotates_and_a_broken_file_keeps_the_old(self) -> None:
        proxy = self._proxy()
        self._rotate_under_traffic(proxy, lambda: proxy.send_signal(signal.SIGHUP))
        serving = self._serial(proxy.port("in"))
        self._replace(None, b"-----BEGIN CERTIFICATE-----\nnot base64\n")
        proxy.send_signal(signal.SIGHUP)
        proxy.wait_log(rf"{re.escape(self.cert)}: not a PEM certificate", 30)
        proxy.wait_log(r"config reload failed: keeping the running config", 30)
        self.assertEqual(self._serial(proxy.port("in")), serving)

    def test_watch_config_rotates_and_a_broken_file_keeps_the_old(self) -> None:
        proxy = self._proxy(watch_config=True, watch_interval=0.1)
        self._rotate_under_traffic(proxy, lambda: None)
        serving = self._serial(proxy.port("in"))
        self._replace(None, b"garbage")
        proxy.wait_log(rf"listener in: {re.escape(self.cert)}: not a PEM certificate .*;"
                       r" keeping the certificate loaded before", 30)
        self.assertEqual(self._serial(proxy.port("in")), serving)
        # The expiry metric follows the certificate in use.
        leaf = self.ca.issue_cert("a.example.com", not_after=datetime.datetime(
            2033, 3, 3, tzinfo=datetime.UTC))
        self._replace(leaf)
        proxy.wait_log(r"listener in: 1 certificate\(s\) reloaded(.|\n)*"
                       r"listener in: 1 certificate\(s\) reloaded", 30)
        samples = proxy.metrics()
        self.assertEqual(samples[("tls_certificate_expiry_timestamp_seconds", frozenset({
            "listener": "in", "service": "", "name": "a.example.com"}.items()))],
            datetime.datetime(2033, 3, 3, tzinfo=datetime.UTC).timestamp())


def tls_backend(testcase, certs_dir: str, ca: trustme.CA, name: str) -> str:
    """A TLS server (Python's ssl) on 127.0.0.1:0 presenting a certificate for
    ``name``: each line read is answered ``NAME: line``. Its address."""
    cert, key = write_pair(ca.issue_cert(name), certs_dir, name)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    testcase.addCleanup(listener.close)

    def serve(conn: socket.socket) -> None:
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                reader = tls.makefile("rb")
                for line in reader:
                    tls.sendall(name.encode() + b": " + line)
        except (OSError, ssl.SSLError):
            pass

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}"


class SniPassthroughTests(unittest.TestCase):
    """[[listener.route]] sni: TLS relayed unterminated by its ClientHello's SNI."""

    def test_two_tls_backends_by_sni(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        ca = trustme.CA()
        ca_path = write_ca(ca, d)
        backends = {name: tls_backend(self, d, ca, name)
                    for name in ("db1.example.com", "db2.example.com", "other.example.com")}
        proxy = ProxyProcess(self, config=f"""
[admin]
listen = "{{listen}}"
[[listener]]
name = "in"
listen = "{{listen}}"
service = "other"
[[listener.route]]
sni = "db1.*"
service = "db1"
[[listener.route]]
sni = "*2.EXAMPLE.com"
service = "db2"
[service.db1]
endpoints = ["{backends['db1.example.com']}"]
[service.db2]
endpoints = ["{backends['db2.example.com']}"]
[service.other]
endpoints = ["{backends['other.example.com']}"]
""")
        port = proxy.port("in")
        context = ssl.create_default_context(cafile=ca_path)
        for name in ("db1.example.com", "db2.example.com", "other.example.com"):
            # The backend's own certificate verifies for the name: the
            # proxy did not terminate, the backend did.
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname=name) as tls:
                tls.sendall(b"hello\n")
                self.assertEqual(tls.makefile("rb").readline(), f"{name}: hello\n".encode())
        output = s_client(port, "-servername", "db2.example.com")
        self.assertEqual(san_names(presented(output)), ["db2.example.com"])
        proxy.wait_log(r"closed listener=in .*protocol=tls sni=db1\.example\.com service=db1 ")
        proxy.wait_log(r"closed listener=in .*protocol=tls sni=db2\.example\.com service=db2 ")
        proxy.wait_log(r"closed listener=in .*protocol=tls sni=other\.example\.com "
                       r"service=other ")
        self.assertNotIn("spliced=no", proxy.log_text())

    def test_sni_routes_are_refused_beside_termination_and_on_opaque_listeners(self) -> None:
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        cert, key = Certificates(d).a
        for extra, expected in (
                (f'[listener.tls]\ncertificates = [{{cert = "{cert}", key = "{key}"}}]',
                 r"listener\[0\]\.route: sni routes pass TLS through unterminated"),
                ("opaque = true", r"listener\[0\]\.route: sni routes need detection")):
            text = ('[[listener]]\nname = "in"\nlisten = "tcp:0"\nservice = "app"\n'
                    + (extra + "\n" if extra.startswith("opaque") else "")
                    + '[[listener.route]]\nsni = "a.*"\nservice = "app"\n'
                    + (extra + "\n" if extra.startswith("[") else "")
                    + '[service.app]\nendpoints = ["127.0.0.1:1"]\n')
            result = run_l5dproxy("--config", write_config(self, text), "--check")
            self.assertNotEqual(result.returncode, 0)
            self.assertRegex(result.stderr, expected)
