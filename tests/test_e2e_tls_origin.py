"""TLS origination end to end (issue 13 part 2): the real proxy dialling real
TLS servers, ``openssl s_server`` and nginx with ``ssl``, with certificates
made by trustme; real clients (sockets, curl)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from typing import Any

import trustme
from cryptography import x509
from twisted.trial import unittest

from tests.support import (
    ProxyProcess,
    connect,
    refused_port,
    require_tool,
    run_l5dproxy,
    wait_for,
)
from tests.test_e2e_tls import WEB_ID, Certificates, header_app, tls_table
from tests.tlsfixtures import issue_uri_cert


def write_files(directory: str, ca: trustme.CA, leaf: trustme.LeafCert | None = None,
                name: str = "server") -> dict[str, str]:
    """``ca.pem`` and, with ``leaf``, ``NAME.crt``/``NAME.key`` in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    files = {"ca": os.path.join(directory, "ca.pem")}
    ca.cert_pem.write_to_path(files["ca"])
    if leaf is not None:
        files["cert"] = os.path.join(directory, f"{name}.crt")
        files["key"] = os.path.join(directory, f"{name}.key")
        with open(files["cert"], "wb") as f:
            f.write(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(files["key"])
    return files


class OpenSslServer:
    """``openssl s_server -rev`` on a free loopback port: each line it
    reads over TLS comes back reversed."""

    def __init__(self, testcase: unittest.TestCase, cert: str, key: str,
                 extra: tuple[str, ...] = ()) -> None:
        openssl = require_tool("openssl")
        self.process = subprocess.Popen(
            [openssl, "s_server", "-accept", "127.0.0.1:0", "-cert", cert, "-key", key,
             "-rev", "-naccept", "1", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        testcase.addCleanup(self.stop)
        assert self.process.stdout is not None
        deadline = time.monotonic() + 10
        self.output = b""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            self.output += line
            match = re.match(rb"ACCEPT 127\.0\.0\.1:(\d+)", line)
            if match:
                self.port = int(match.group(1))
                return
            if not line:
                break
        raise AssertionError(f"openssl s_server did not start: {self.output!r}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def read_line(sock: Any) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data


class Nginx:
    """nginx with ``ssl`` on two free loopback ports: ``h1`` (HTTP/1.1 only,
    answers ``hello over tls``) and ``h2`` (``ssl http2``, answers the
    protocol it was asked over: ``HTTP/2.0``)."""

    def __init__(self, testcase: unittest.TestCase, cert: str, key: str) -> None:
        nginx = require_tool("nginx")
        self.dir = os.path.abspath(testcase.mktemp())
        os.makedirs(self.dir)
        self.h1, self.h2 = refused_port(), refused_port()
        conf = os.path.join(self.dir, "nginx.conf")
        d = self.dir
        with open(conf, "w") as f:
            f.write(f"""
daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    server {{
        listen 127.0.0.1:{self.h1} ssl;
        location / {{ return 200 "hello over tls\n"; }}
    }}
    server {{
        listen 127.0.0.1:{self.h2} ssl http2;
        location / {{ return 200 "$server_protocol\n"; }}
    }}
}}
""")
        self.process = subprocess.Popen([nginx, "-p", d, "-c", conf, "-e", f"{d}/error.log"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        stdin=subprocess.DEVNULL)
        testcase.addCleanup(self.stop)
        for port in (self.h1, self.h2):
            wait_for(lambda port=port: self._listening(port), 15, f"nginx on :{port}")

    def _listening(self, port: int) -> bool:
        if self.process.poll() is not None:
            with open(os.path.join(self.dir, "error.log")) as f:
                raise AssertionError(f"nginx exited: {f.read()}")
        try:
            connect(port, timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        self.process.wait(10)


def curl(port: int, *args: str) -> tuple[int, dict[str, str], str]:
    """``curl -si`` through the proxy: (status, headers by lower-cased name, body)."""
    result = subprocess.run([require_tool("curl"), "-si", "--max-time", "20", *args,
                             f"http://127.0.0.1:{port}/"],
                            capture_output=True, text=True, timeout=30)
    head, _, body = result.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.split("\n")
    if not lines[0].startswith("HTTP/"):
        raise AssertionError(f"curl: {result.stdout!r} {result.stderr!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


class HttpOriginationTests(unittest.TestCase):
    """HTTP services with ``[service.NAME.tls]`` in front of nginx ``ssl``."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.ca = trustme.CA()
        self.files = write_files(self.dir, self.ca, self.ca.issue_cert("app.example"))
        self.nginx = Nginx(self, self.files["cert"], self.files["key"])

    def proxy(self, port: int, protocol: str = "http1", accrual: int = 7,
              **tls: Any) -> ProxyProcess:
        return ProxyProcess(self, listeners=[{"name": "in", "service": "app"}],
                            services={"app": {
                                "endpoints": [f"127.0.0.1:{port}"], "protocol": protocol,
                                "retry_limit": 0,
                                "failure_accrual": {"consecutive_failures": accrual},
                                "tls": {"ca": self.files["ca"], **tls}}})

    def test_verified_endpoint_answers(self) -> None:
        proxy = self.proxy(self.nginx.h1, server_name="app.example")
        status, _, body = curl(proxy.port("in"))
        self.assertEqual((status, body), (200, "hello over tls\n"))

    def test_wrong_name_is_a_502_naming_the_reason_and_counts_for_accrual(self) -> None:
        proxy = self.proxy(self.nginx.h1, accrual=2, server_name="wrong.example")
        where = f"service app: 127.0.0.1:{self.nginx.h1}"
        for _ in range(2):
            status, headers, _ = curl(proxy.port("in"))
            self.assertEqual(status, 502)
            self.assertEqual(headers["l5d-proxy-error"],
                             f"{where}: tls: certificate verify failed: certificate is for "
                             "DNS:app.example, not 'wrong.example'")
        self.assertEqual(proxy.metric_value("response_total",
                                            error="tls: certificate verify failed"), 2)
        # Two failures in a row eject the endpoint (failure accrual).
        status, headers, _ = curl(proxy.port("in"))
        self.assertEqual(status, 503)
        self.assertIn("ejected by failure accrual", headers["l5d-proxy-error"])

    def test_untrusted_ca_is_a_502(self) -> None:
        other = write_files(os.path.join(self.dir, "other"), trustme.CA())
        proxy = self.proxy(self.nginx.h1, server_name="app.example", ca=other["ca"])
        status, headers, _ = curl(proxy.port("in"))
        self.assertEqual(status, 502)
        self.assertEqual(headers["l5d-proxy-error"],
                         f"service app: 127.0.0.1:{self.nginx.h1}: tls: certificate verify "
                         "failed: unable to get local issuer certificate")

    def test_h2_backend_over_tls_with_alpn_h2(self) -> None:
        proxy = self.proxy(self.nginx.h2, protocol="h2", server_name="app.example")
        status, _, body = curl(proxy.port("in"))
        self.assertEqual((status, body), (200, "HTTP/2.0\n"))
        # An h2 client through the same proxy: h2 both ways.
        status, _, body = curl(proxy.port("in"), "--http2-prior-knowledge")
        self.assertEqual((status, body), (200, "HTTP/2.0\n"))

    def test_h2_to_an_endpoint_without_h2_is_a_502(self) -> None:
        proxy = self.proxy(self.nginx.h1, protocol="h2", server_name="app.example")
        status, headers, _ = curl(proxy.port("in"))
        self.assertEqual(status, 502)
        self.assertTrue(headers["l5d-proxy-error"].startswith(
            f"service app: 127.0.0.1:{self.nginx.h1}: tls: "), headers)


class RelayOriginationTests(unittest.TestCase):
    """An opaque service with ``[service.NAME.tls]``: the relay speaks TLS
    to the endpoint, plaintext to the client."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        self.ca = trustme.CA()
        self.files = write_files(self.dir, self.ca, self.ca.issue_cert("db.internal"))

    def proxy(self, port: int, **tls: Any) -> ProxyProcess:
        return ProxyProcess(self, listeners=[{"name": "in", "service": "db", "opaque": True}],
                            services={"db": {"endpoints": [f"127.0.0.1:{port}"],
                                             "tls": {"ca": self.files["ca"], **tls}}})

    def test_relay_originates_tls(self) -> None:
        server = OpenSslServer(self, self.files["cert"], self.files["key"])
        proxy = self.proxy(server.port, server_name="db.internal")
        with connect(proxy.port("in")) as sock:
            sock.sendall(b"hello over tls\n")
            self.assertEqual(read_line(sock), b"slt revo olleh\n")
        wait_for(lambda: proxy.metric_value("tcp_close_total", peer="dst") == 1,
                 message="the upstream connection closed")
        proxy.wait_log(r"closed listener=in .* service=db .* upstream_tls=yes spliced=no")
        self.assertEqual(proxy.metric_value("endpoint_connect_errors_total"), 0)

    def test_wrong_name_closes_the_client_connection(self) -> None:
        server = OpenSslServer(self, self.files["cert"], self.files["key"])
        proxy = self.proxy(server.port, server_name="wrong.example")
        with connect(proxy.port("in")) as sock:
            sock.sendall(b"hello\n")
            self.assertEqual(sock.recv(100), b"", "the client got bytes")
        proxy.wait_log(r"connect to 127\.0\.0\.1:\d+ for db failed: tls: certificate verify "
                       r"failed: certificate is for DNS:db\.internal, not 'wrong\.example'")
        self.assertEqual(proxy.metric_value("endpoint_connect_errors_total", reason="tls"), 1)


    def test_client_certificate_presented_and_its_expiry_exported(self) -> None:
        client_ca = trustme.CA()
        client = write_files(os.path.join(self.dir, "client"), client_ca,
                             client_ca.issue_cert("web.example.org"), name="client")
        # s_server -Verify: a client certificate chaining to client_ca is required.
        server = OpenSslServer(self, self.files["cert"], self.files["key"],
                               extra=("-Verify", "1", "-CAfile", client["ca"]))
        proxy = self.proxy(server.port, server_name="db.internal", cert=client["cert"],
                           key=client["key"])
        with connect(proxy.port("in")) as sock:
            sock.sendall(b"mutual\n")
            self.assertEqual(read_line(sock), b"lautum\n")
        with open(client["cert"], "rb") as f:
            not_after = x509.load_pem_x509_certificate(f.read()).not_valid_after_utc
        samples = proxy.metrics()
        self.assertEqual(
            samples[("tls_certificate_expiry_timestamp_seconds",
                     frozenset({("listener", ""), ("service", "db"),
                                ("name", "web.example.org")}))],
            not_after.timestamp())


class CheckTests(unittest.TestCase):

    def test_example_config_checks(self) -> None:
        """conf/examples/mtls-client.toml with its files passes --check, and
        without them is refused naming the file."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        d = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(d, "tls"))
        with open(os.path.join(root, "conf", "examples", "mtls-client.toml")) as f:
            text = f.read()
        example = os.path.join(d, "mtls-client.toml")
        with open(example, "w") as f:
            f.write(text)
        result = run_l5dproxy("--config", example, "--check")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"{d}/tls/ca.pem: cannot read: No such file or directory",
                      result.stdout + result.stderr)
        ca = trustme.CA()
        write_files(os.path.join(d, "tls"), ca,
                    ca.issue_cert("web.example.org"), name="client")
        result = run_l5dproxy("--config", example, "--check")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class MeshTests(unittest.TestCase):
    """Two l5dproxy processes in mTLS (issue 13 part 3, "the mesh case"): one
    beside the client app originates TLS with a client certificate, one in
    front of the server app terminates it with ``client_ca`` and ``allow``;
    neither app changes, and the server app sees the caller's identity."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.certs = Certificates(self.dir)
        self.server = ProxyProcess(
            self, listeners=[{"name": "in", "service": "app", "tls": tls_table(
                self.certs, client_ca=self.certs.ca_path,
                allow=["spiffe://example.org/ns/web/*"])}],
            services={"app": {"endpoints": [header_app(self)], "protocol": "http1"}})

    def client_proxy(self, identity: tuple[str, str], protocol: str = "http1") -> ProxyProcess:
        return ProxyProcess(
            self, listeners=[{"name": "out", "service": "mesh"}],
            services={"mesh": {
                "endpoints": [f"127.0.0.1:{self.server.port('in')}"], "protocol": protocol,
                "tls": {"ca": self.certs.ca_path, "server_name": "a.example.com",
                        "cert": identity[0], "key": identity[1]}}})

    def test_the_app_sees_the_callers_identity(self) -> None:
        for protocol in ("http1", "h2"):
            client = self.client_proxy(self.certs.web, protocol)
            status, _, body = curl(client.port("out"), "-H", "l5d-client-id: forged")
            self.assertEqual(status, 200, (protocol, body))
            self.assertEqual(json.loads(body), {"path": "/", "client_id": [WEB_ID]}, protocol)

    def test_an_identity_outside_allow_is_refused(self) -> None:
        client = self.client_proxy(self.certs.db)
        status, headers, _ = curl(client.port("out"))
        self.assertEqual(status, 403)
        self.assertEqual(headers["l5d-proxy-error"], "unauthorized")
        self.assertEqual(self.server.metric_value("authz_denied_total", listener="in"), 1)

    def test_a_certificate_the_server_does_not_trust_is_a_502(self) -> None:
        stranger = trustme.CA()
        cert, key = issue_uri_cert(stranger, WEB_ID)
        paths = (os.path.join(self.dir, "stranger.crt"), os.path.join(self.dir, "stranger.key"))
        for path, data in zip(paths, (cert, key), strict=True):
            with open(path, "wb") as f:
                f.write(data)
        for protocol in ("http1", "h2"):
            client = self.client_proxy(paths, protocol)
            status, headers, _ = curl(client.port("out"))
            self.assertEqual(status, 502, protocol)
            self.assertRegex(headers["l5d-proxy-error"],
                             r"^service mesh: 127\.0\.0\.1:\d+: tls: .*(unknown ca|certificate)")
