"""Real third-party peers for the end-to-end tests: nginx and HAProxy from
Debian, each in a subprocess with a config the test writes, on free
loopback ports, stopped at cleanup.

Neither takes port 0, so a free port is found by binding port 0 and
closing it (``free_port``); the short race with another process taking it
is the usual price: ``on_free_ports`` picks again when the peer could not
bind one, and any other failed start says so with the peer's stderr.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from typing import TypeVar

from tests.support import require_tool, wait_for


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _listening(host: str, port: int) -> bool:
    """Whether something is bound to ``host:port``, found by binding it,
    not by connecting: a probe connection would reach what the peer
    forwards to (and be counted there)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _connectable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


P = TypeVar("P")


class PortTakenError(AssertionError):
    """The peer exited because a port picked free for it was taken before it
    bound it (another process got it between ``free_port`` and the bind)."""


def on_free_ports(start: Callable[[list[int]], P], count: int, attempts: int = 5,
                  ) -> tuple[P, list[int]]:
    """``start(ports)`` with ``count`` ports picked free, picked again when
    the peer could not bind one (``PortTakenError``): a port bound and
    released is only likely to stay free, and on a busy machine another
    process may take it first. Returns the peer and its ports."""
    for attempt in range(attempts):
        ports = [free_port() for _ in range(count)]
        try:
            return start(ports), ports
        except PortTakenError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


class _Peer:
    name = ""

    def __init__(self, testcase, argv: list[str], ports: list[int], config_name: str,
                 config: str, host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        self.directory = tempfile.mkdtemp(prefix=f"l5dproxy-{self.name}-")
        testcase.addCleanup(shutil.rmtree, self.directory, True)
        self.config_path = os.path.join(self.directory, config_name)
        with open(self.config_path, "w") as f:
            f.write(config.replace("{dir}", self.directory))
        self.stderr_path = os.path.join(self.directory, "stderr.log")
        with open(self.stderr_path, "wb") as err:
            argv = [arg.replace("{config}", self.config_path).replace("{dir}", self.directory)
                    for arg in argv]
            self.process = subprocess.Popen(
                [*prefix, *argv],
                stdout=err, stderr=err, stdin=subprocess.DEVNULL, cwd=self.directory)
        testcase.addCleanup(self.stop)
        # In another network namespace (``prefix``) the port is probed by
        # connecting (it cannot be bound from here).
        ready = _connectable if prefix else _listening
        for port in ports:
            wait_for(lambda p=port: ready(host, p) or self.process.poll() is not None,
                     timeout=20, message=f"{self.name} listening on {port}")
            if self.process.poll() is not None:
                error = PortTakenError if "Address already in use" in self.stderr() \
                    else AssertionError
                raise error(f"{self.name} exited {self.process.returncode}: {self.stderr()}")

    def stderr(self) -> str:
        with open(self.stderr_path, errors="replace") as f:
            return f.read()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class Nginx(_Peer):
    """nginx with ``server_blocks`` (``{port}``-free text: the caller puts its
    ports in) inside ``http {}``, one process in the foreground."""

    name = "nginx"

    def __init__(self, testcase, server_blocks: str, ports: list[int],
                 host: str = "127.0.0.1", prefix: tuple[str, ...] = ()) -> None:
        nginx = require_tool("nginx")
        config = (
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n"
            "error_log stderr warn;\nevents { worker_connections 64; }\n"
            "http {\n  access_log off;\n  client_body_temp_path {dir}/body;\n"
            "  proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n"
            "  uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n"
            f"{server_blocks}\n}}\n")
        super().__init__(testcase, [nginx, "-e", "stderr", "-p", "{dir}", "-c", "{config}"],
                         ports, "nginx.conf", config, host, prefix)


class HAProxy(_Peer):
    """HAProxy with ``sections`` (frontends, backends, listens) after a
    ``defaults`` block, in the foreground (``-db``)."""

    name = "haproxy"

    def __init__(self, testcase, sections: str, ports: list[int]) -> None:
        haproxy = require_tool("haproxy")
        config = (
            "global\n  log stderr format raw local0 warning\n\n"
            "defaults\n  log global\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\n\n" + sections)
        super().__init__(testcase, [haproxy, "-db", "-f", "{config}"], ports,
                         "haproxy.cfg", config)
