"""The client's address end to end (issue 14), against peers nobody here
wrote: nginx as the application (echoing what it sees: ``$remote_addr``,
``X-Forwarded-For``, ``$proxy_protocol_addr``), HAProxy in front
(``send-proxy``, ``send-proxy-v2``) and behind (``accept-proxy``), curl
as the client, bound to 127.0.0.5 so that its address differs from every
other hop's (127.0.0.1).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile

from twisted.trial.unittest import TestCase

from tests.peers import HAProxy, Nginx, on_free_ports
from tests.support import (
    ProxyProcess,
    build_config,
    connect,
    recv_until_eof,
    require_tool,
    run_l5dproxy,
    wait_for,
    write_config,
)

CLIENT = "127.0.0.5"

#: nginx: what the application sees of a request.
ECHO = ('default_type text/plain; return 200 "remote=$remote_addr xff=$http_x_forwarded_for'
        ' proto=$http_x_forwarded_proto fwd=$http_forwarded\\n";')
#: nginx behind a PROXY protocol sender: what the header said.
PP_ECHO = ('default_type text/plain; return 200 "pp=$proxy_protocol_addr:$proxy_protocol_port'
           ' dst=$proxy_protocol_server_addr:$proxy_protocol_server_port\\n";')


def curl(*args: str) -> str:
    result = subprocess.run([require_tool("curl"), "-sS", "--max-time", "20",
                             "--interface", CLIENT, *args],
                            capture_output=True, timeout=60)
    if result.returncode:
        raise AssertionError(f"curl {args}: exit {result.returncode}: {result.stderr!r}")
    return result.stdout.decode()


class App:
    """nginx: an echo server and a PROXY-protocol echo server."""

    def __init__(self, testcase) -> None:
        self.nginx, (self.port, self.pp_port) = on_free_ports(lambda p: Nginx(testcase, (
            f"  server {{ listen 127.0.0.1:{p[0]}; location / {{ {ECHO} }} }}\n"
            f"  server {{ listen 127.0.0.1:{p[1]} proxy_protocol;"
            f" location / {{ {PP_ECHO} }} }}\n"), p), 2)
        self.address = f"127.0.0.1:{self.port}"
        self.pp_address = f"127.0.0.1:{self.pp_port}"


class ForwardedEndToEnd(TestCase):
    """X-Forwarded-For, X-Forwarded-Proto and Forwarded, HTTP/1 and h2."""

    timeout = 120

    def setUp(self) -> None:
        import trustme

        from tests.tlsfixtures import write_ca, write_pair
        self.app = App(self)
        directory = tempfile.mkdtemp(prefix="l5dproxy-addr-tls-")
        self.addCleanup(shutil.rmtree, directory, True)
        ca = trustme.CA()
        self.ca_path = write_ca(ca, directory)
        cert, key = write_pair(ca.issue_cert("localhost"), directory, "localhost")
        self.proxy = ProxyProcess(
            self,
            listeners=[{"name": "in", "service": "app", "access_log": True},
                       {"name": "trusting", "service": "app",
                        "trusted_proxies": ["127.0.0.0/8"]},
                       {"name": "off", "service": "app", "forwarded": "off"},
                       {"name": "tls", "service": "app",
                        "tls": {"certificates": [{"cert": cert, "key": key}]}}],
            services={"app": {"endpoints": [self.app.address], "protocol": "http1"}})

    def url(self, listener: str) -> str:
        return f"http://127.0.0.1:{self.proxy.port(listener)}/"

    def test_forged_fields_from_an_untrusted_client_are_replaced(self) -> None:
        forged = ("-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Forwarded-Proto: https",
                  "-H", "Forwarded: for=6.6.6.6;proto=https")
        want = f"remote=127.0.0.1 xff={CLIENT} proto=http fwd=for={CLIENT};proto=http\n"
        self.assertEqual(curl(*forged, self.url("in")), want)
        self.assertEqual(curl("--http2-prior-knowledge", *forged, self.url("in")), want)
        # The access log names the client.
        self.proxy.wait_log(rf"GET 127\.0\.0\.1:\d+ / 200 .* client={re.escape(CLIENT)}:\d+")

    def test_a_trusted_peer_is_appended_to(self) -> None:
        body = curl("-H", "X-Forwarded-For: 6.6.6.6", "-H", "X-Forwarded-Proto: https",
                    "-H", "Forwarded: for=6.6.6.6", self.url("trusting"))
        self.assertEqual(body, f"remote=127.0.0.1 xff=6.6.6.6, {CLIENT} proto=https"
                               f" fwd=for=6.6.6.6, for={CLIENT};proto=http\n")
        body = curl("--http2-prior-knowledge", "-H", "x-forwarded-for: 6.6.6.6",
                    self.url("trusting"))
        self.assertEqual(body, f"remote=127.0.0.1 xff=6.6.6.6, {CLIENT} proto=http fwd=\n")

    def test_terminated_tls_is_https(self) -> None:
        """X-Forwarded-Proto says https for a connection whose TLS the proxy
        terminates (a forged one replaced), HTTP/1 and h2 (ALPN) alike."""
        port = self.proxy.port("tls")
        for version in ("--http1.1", "--http2"):
            body = curl(version, "--cacert", self.ca_path, "--resolve",
                        f"localhost:{port}:127.0.0.1", "-H", "X-Forwarded-Proto: http",
                        "-H", "Forwarded: for=6.6.6.6", f"https://localhost:{port}/")
            self.assertEqual(body, f"remote=127.0.0.1 xff={CLIENT} proto=https"
                                   f" fwd=for={CLIENT};proto=https\n", version)

    def test_off_forwards_as_it_came(self) -> None:
        body = curl("-H", "X-Forwarded-For: 6.6.6.6", self.url("off"))
        self.assertEqual(body, "remote=127.0.0.1 xff=6.6.6.6 proto= fwd=\n")


class ProxyProtocolInEndToEnd(TestCase):
    """HAProxy in front, sending a PROXY header v1 and v2 to the proxy."""

    timeout = 120

    def setUp(self) -> None:
        self.app = App(self)
        self.proxy = ProxyProcess(
            self,
            listeners=[{"name": "pp", "service": "app", "access_log": True,
                        "proxy_protocol": "required"},
                       {"name": "ppo", "service": "app", "proxy_protocol": "optional"}],
            services={"app": {"endpoints": [self.app.address], "protocol": "http1"}})
        pp, ppo = self.proxy.port("pp"), self.proxy.port("ppo")
        self.haproxy, (self.v1, self.v2, self.v2o) = on_free_ports(lambda p: HAProxy(self, (
            f"listen v1\n  mode tcp\n  bind 127.0.0.1:{p[0]}\n"
            f"  server proxy 127.0.0.1:{pp} send-proxy\n\n"
            f"listen v2\n  mode tcp\n  bind 127.0.0.1:{p[1]}\n"
            f"  server proxy 127.0.0.1:{pp} send-proxy-v2 check inter 1s\n\n"
            f"listen v2o\n  mode tcp\n  bind 127.0.0.1:{p[2]}\n"
            f"  server proxy 127.0.0.1:{ppo} send-proxy-v2\n"), p), 3)

    def counted(self, result: str, listener: str = "pp") -> float:
        return self.proxy.metric_value("proxy_protocol_total", listener=listener,
                                       result=result)

    def check_client_everywhere(self, front: int, version: str) -> None:
        want = f"remote=127.0.0.1 xff={CLIENT} proto=http fwd=\n"
        self.assertEqual(curl(f"http://127.0.0.1:{front}/"), want)
        self.assertEqual(curl("--http2-prior-knowledge", f"http://127.0.0.1:{front}/"), want)
        self.assertGreaterEqual(self.counted(version), 2)
        # The access log and the connection log name the client, and the
        # connection log the balancer it came through.
        self.proxy.wait_log(rf"GET 127\.0\.0\.1:{front} / 200 .* client={CLIENT}:\d+")
        self.proxy.wait_log(rf"closed listener=pp peer={CLIENT}:\d+ via=127\.0\.0\.1:\d+"
                            rf" protocol=h2")
        # The src-side metrics' target_addr is the address the client
        # connected to (HAProxy's frontend), as the header said.
        self.assertGreaterEqual(self.proxy.metric_value(
            "tcp_open_total", peer="src", listener="pp", protocol="http1",
            target_addr=f"127.0.0.1:{front}"), 1)

    def test_haproxy_send_proxy_v1(self) -> None:
        self.check_client_everywhere(self.v1, "v1")

    def test_haproxy_send_proxy_v2_and_its_local_health_checks(self) -> None:
        self.check_client_everywhere(self.v2, "v2")
        # HAProxy's health checks carry a v2 LOCAL command: counted, and the
        # connection keeps its own address.
        wait_for(lambda: self.counted("local") >= 1, timeout=20,
                 message="a LOCAL health check")

    def test_required_refuses_a_connection_without_header(self) -> None:
        sock = connect(self.proxy.port("pp"))
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n")
        self.assertEqual(recv_until_eof(sock), b"")
        sock.close()
        wait_for(lambda: self.counted("missing") == 1, message="missing counted")

    def test_optional_takes_both(self) -> None:
        port = self.proxy.port("ppo")
        want = f"remote=127.0.0.1 xff={CLIENT} proto=http fwd=\n"
        self.assertEqual(curl(f"http://127.0.0.1:{port}/"), want)
        self.assertEqual(curl(f"http://127.0.0.1:{self.v2o}/"), want)
        self.assertEqual((self.counted("absent", "ppo"), self.counted("v2", "ppo")), (1, 1),
                         self.proxy.log_text())


class ProxyProtocolOutEndToEnd(TestCase):
    """The TCP relay sending a PROXY header to nginx and HAProxy behind."""

    timeout = 120

    def setUp(self) -> None:
        self.app = App(self)
        self.haproxy_behind, (self.behind,) = on_free_ports(lambda p: HAProxy(self, (
            f"frontend behind\n  mode http\n  bind 127.0.0.1:{p[0]} accept-proxy\n"
            '  http-request return status 200 content-type text/plain'
            ' lf-string "src=%[src] dst=%[dst]:%[dst_port]\\n"\n'), p), 1)
        self.proxy = ProxyProcess(
            self,
            listeners=[{"name": "v1", "service": "nginx_v1", "opaque": True},
                       {"name": "v2", "service": "nginx_v2", "opaque": True},
                       {"name": "ha", "service": "haproxy", "opaque": True},
                       {"name": "chain", "service": "nginx_v2", "opaque": True,
                        "proxy_protocol": "required"}],
            services={"nginx_v1": {"endpoints": [self.app.pp_address],
                                   "send_proxy_protocol": "v1"},
                      "nginx_v2": {"endpoints": [self.app.pp_address],
                                   "send_proxy_protocol": "v2"},
                      "haproxy": {"endpoints": [f"127.0.0.1:{self.behind}"],
                                  "send_proxy_protocol": "v2"}})

    def test_nginx_behind_sees_the_client(self) -> None:
        for listener in ("v1", "v2"):
            curl_pp_check(self, self.proxy.port(listener))

    def test_haproxy_behind_sees_the_client(self) -> None:
        port = self.proxy.port("ha")
        self.assertEqual(curl(f"http://127.0.0.1:{port}/"),
                         f"src={CLIENT} dst=127.0.0.1:{port}\n")

    def test_a_chain_keeps_the_first_client(self) -> None:
        """HAProxy (send-proxy-v2) -> l5dproxy (required) -> relay (v2) ->
        nginx: nginx sees curl's address, two balancers away."""
        chain = self.proxy.port("chain")
        _, (front,) = on_free_ports(lambda p: HAProxy(
            self, f"listen front\n  mode tcp\n  bind 127.0.0.1:{p[0]}\n"
                  f"  server proxy 127.0.0.1:{chain} send-proxy-v2\n", p), 1)
        body = curl(f"http://127.0.0.1:{front}/")
        self.assertRegex(body, rf"^pp={re.escape(CLIENT)}:\d+ dst=127\.0\.0\.1:{front}\n$")


def curl_pp_check(testcase: TestCase, port: int) -> str:
    """curl through ``port`` to nginx's PROXY-protocol server; the body,
    checked to name curl's own address and port and the proxy's listener."""
    result = subprocess.run(
        [require_tool("curl"), "-sS", "--max-time", "20", "--interface", CLIENT,
         "-w", "%{local_port}", f"http://127.0.0.1:{port}/"], capture_output=True, timeout=60)
    out = result.stdout.decode()
    body, local_port = out[:out.rindex("\n") + 1], out[out.rindex("\n") + 1:]
    testcase.assertEqual(body, f"pp={CLIENT}:{local_port} dst=127.0.0.1:{port}\n")
    return body


class SendProxyProtocolConfigTests(TestCase):
    def test_refused_for_a_service_reached_by_http(self) -> None:
        text = build_config([{"name": "in", "service": "app"}],
                            {"app": {"endpoints": ["127.0.0.1:8080"],
                                     "send_proxy_protocol": "v1"}})
        result = run_l5dproxy("--config", write_config(self, text), "--check")
        self.assertEqual(result.returncode, 2, result.stdout + result.stderr)
        self.assertIn("service.app.send_proxy_protocol: HTTP traffic reaches this service",
                      result.stdout + result.stderr)
