"""A transparent listener behind a real iptables REDIRECT, in network
namespaces the test makes (issue 14, part 4).

    namespace C (client)           this namespace (the proxy)         namespace S (server)
    10.231.K.2 ---- veth ---- 10.231.K.1      10.232.K.1 ---- veth ---- 10.232.K.2
    curl http://10.232.K.2:8080/   PREROUTING -i <veth to C>          nginx :8080, socat :6379
                                   -j REDIRECT --to-ports PROXY

The client asks for an address in namespace S; the REDIRECT on the veth
from C hands the connection to the proxy, whose ``service = "original_dst"``
connects to where the client was going. The only rule added to this
namespace matches the test's own veth interface, and everything is removed
at cleanup. Needs root (``ip netns add``) and iptables: skipped with the
reason where the machine cannot, failed under ``CI=true``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from unittest import SkipTest

from twisted.trial.unittest import TestCase

from tests.peers import Nginx
from tests.support import ProxyProcess, connect, recv_until_eof, require_tool, wait_for


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        raise AssertionError(f"transparent listener test cannot run under CI: {reason}")
    raise SkipTest(reason)


class Namespaces:
    """Two namespaces joined to this one by veth pairs, torn down at cleanup."""

    made = 0

    def __init__(self, testcase: TestCase, ipv6: bool = False) -> None:
        self.iptables = "ip6tables" if ipv6 else "iptables"
        for tool in ("ip", self.iptables):
            if shutil.which(tool) is None:
                require_tool(tool)   # fails under CI, else skips
        Namespaces.made += 1   # names and subnets of one test, not reused by the next
        k = (os.getpid() * 7 + Namespaces.made) % 200 + 20
        tag = f"{os.getpid() % 100000}{Namespaces.made % 10}"
        self.client_ns, self.server_ns = f"l5dc{tag}", f"l5ds{tag}"
        self.host_c, self.peer_c = f"l5hc{tag}", f"l5pc{tag}"
        self.host_s, self.peer_s = f"l5hs{tag}", f"l5ps{tag}"
        if ipv6:   # unique local addresses (RFC 4193), no duplicate address detection wait
            self.gateway, self.client = f"fd31:{k}::1", f"fd31:{k}::2"
            self.server_gateway, self.server = f"fd32:{k}::1", f"fd32:{k}::2"
            prefix, flags, family = "64", ["nodad"], ["-6"]
        else:
            self.gateway, self.client = f"10.231.{k}.1", f"10.231.{k}.2"
            self.server_gateway, self.server = f"10.232.{k}.1", f"10.232.{k}.2"
            prefix, flags, family = "24", [], []
        try:
            _run("ip", "netns", "add", self.client_ns)
        except (subprocess.CalledProcessError, OSError) as e:
            stderr = getattr(e, "stderr", b"") or b""
            _unavailable(f"cannot create a network namespace as uid {os.getuid()}:"
                         f" {stderr.decode(errors='replace').strip() or e}")
        testcase.addCleanup(_run, "ip", "netns", "del", self.client_ns)
        _run("ip", "netns", "add", self.server_ns)
        testcase.addCleanup(_run, "ip", "netns", "del", self.server_ns)
        for ns, host, peer, near, far in (
                (self.client_ns, self.host_c, self.peer_c, self.gateway, self.client),
                (self.server_ns, self.host_s, self.peer_s, self.server_gateway, self.server)):
            _run("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            # Deleting one end deletes the pair at once (a namespace's own
            # teardown is deferred by the kernel).
            testcase.addCleanup(_run, "ip", "link", "del", host)
            _run("ip", "link", "set", peer, "netns", ns)
            _run("ip", *family, "addr", "add", f"{near}/{prefix}", "dev", host, *flags)
            _run("ip", "link", "set", host, "up")
            _run("ip", "-n", ns, *family, "addr", "add", f"{far}/{prefix}", "dev", peer,
                 *flags)
            _run("ip", "-n", ns, "link", "set", peer, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, *family, "route", "add", "default", "via", near)

    def redirect(self, testcase: TestCase, port: int) -> None:
        rule = ["PREROUTING", "-i", self.host_c, "-p", "tcp", "-j", "REDIRECT",
                "--to-ports", str(port)]
        try:
            _run(self.iptables, "-t", "nat", "-A", *rule)
        except subprocess.CalledProcessError as e:
            _unavailable(f"{self.iptables} -t nat refused the REDIRECT rule: {e.stderr!r}")
        testcase.addCleanup(_run, self.iptables, "-t", "nat", "-D", *rule)

    def address(self, host: str, port: int) -> str:
        """``host:port`` as the proxy writes it (IPv6 in brackets)."""
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def in_client(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.client_ns, *argv],
                              capture_output=True, timeout=timeout)


ECHO = ('default_type text/plain; return 200 "server=$server_addr:$server_port'
        ' remote=$remote_addr xff=$http_x_forwarded_for\\n";')


class TransparentEndToEnd(TestCase):
    timeout = 120
    ipv6 = False

    def setUp(self) -> None:
        ns = self.ns = Namespaces(self, self.ipv6)
        prefix = ("ip", "netns", "exec", ns.server_ns)
        Nginx(self, f"  server {{ listen {ns.address(ns.server, 8080)};"
                    f" location / {{ {ECHO} }} }}\n",
              [8080], host=ns.server, prefix=prefix)
        socat = require_tool("socat")
        listen = "TCP6-LISTEN" if self.ipv6 else "TCP4-LISTEN"
        bind = f"[{ns.server}]" if self.ipv6 else ns.server
        echo = subprocess.Popen([*prefix, socat, f"{listen}:6379,bind={bind},reuseaddr,fork",
                                 "EXEC:cat"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(echo.wait, 10)
        self.addCleanup(echo.terminate)
        wait_for(lambda: self._connectable(6379), message="socat in the server namespace")
        listen_on = (f"tcp6:0:interface={ns.gateway.replace(':', chr(92) + ':')}"
                     if self.ipv6 else f"tcp:0:interface={ns.gateway}")
        self.proxy = ProxyProcess(
            self,
            listeners=[{"name": "out", "service": "original_dst", "transparent": True,
                        "listen": listen_on, "access_log": True}],
            # Its settings: nginx speaks HTTP/1 only, h2 clients are translated.
            services={"original_dst": {"protocol": "http1"}})
        self.port = self.proxy.port("out")
        ns.redirect(self, self.port)

    def _connectable(self, port: int) -> bool:
        try:
            connect(port, self.ns.server, timeout=1).close()
        except OSError:
            return False
        return True

    def curl(self, *args: str) -> str:
        curl = require_tool("curl")
        result = self.ns.in_client(curl, "-sS", "-g", "--max-time", "20", *args)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout.decode()

    def test_http_reaches_the_original_destination(self) -> None:
        ns = self.ns
        server = ns.address(ns.server, 8080)
        url = f"http://{server}/"
        want = f"server={ns.server}:8080 remote={ns.server_gateway} xff={ns.client}\n"
        self.assertEqual(self.curl(url), want)
        self.assertEqual(self.curl("--http2-prior-knowledge", url), want)
        # The original destination is in the log, the client's address too.
        client = re.escape(ns.address(ns.client, 0)[:-1])   # "[fd31:..]:" / "10.231.K.2:"
        self.proxy.wait_log(rf"closed listener=out peer={client}\d+ protocol=http1"
                            rf" original_dst={re.escape(server)} .*"
                            rf" endpoint={re.escape(server)}")
        self.proxy.wait_log(rf"GET {re.escape(server)} / 200 .* endpoint={re.escape(server)}"
                            rf" client={client}\d+")
        self.assertEqual(self.proxy.metric_value(
            "tcp_open_total", peer="src", listener="out", protocol="h2",
            target_addr=server), 1)

    def test_an_opaque_port_is_relayed_to_the_original_destination(self) -> None:
        ns = self.ns
        script = (f"import socket; s = socket.create_connection(('{ns.server}', 6379),"
                  " timeout=10); s.sendall(b'PING through the proxy');"
                  " s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())")
        result = ns.in_client(sys.executable, "-c", script)
        self.assertEqual(result.stdout.decode().strip(), "PING through the proxy", result.stderr)
        client = re.escape(ns.address(ns.client, 0)[:-1])
        self.proxy.wait_log(rf"closed listener=out peer={client}\d+ protocol=opaque"
                            rf" original_dst={re.escape(ns.address(ns.server, 6379))} ")

    def test_a_connection_to_the_proxy_itself_is_refused(self) -> None:
        """Straight to the listener (no REDIRECT: its original destination is
        the proxy): connecting there would loop, so it is closed at once."""
        sock = connect(self.port, self.ns.gateway)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(recv_until_eof(sock), b"")
        sock.close()
        wait_for(lambda: self.proxy.metric_value("original_dst_refused_total", listener="out",
                                                 reason="loop") == 1, message="loop counted")
        self.proxy.wait_log(r"end=refused: original destination is the proxy itself")


class TransparentIPv6EndToEnd(TransparentEndToEnd):
    """The same over IPv6: ip6tables REDIRECT, IP6T_SO_ORIGINAL_DST."""

    ipv6 = True
