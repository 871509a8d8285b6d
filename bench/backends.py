"""The servers under test: nginx + iperf3 + a connection sink as backends, and three
proxies in front of them (l5dproxy, HAProxy, Twisted's portforward).

Config text is produced by pure ``*_config`` functions; ``start_*`` functions
write it into the run's temp dir, start the process under the Supervisor and
wait until it is ready. Every port is picked free at run time.
"""

from __future__ import annotations

import grp
import os
import pwd
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import (
    Child,
    StartError,
    Supervisor,
    free_port,
    free_port_block,
    http_status,
    raise_nofile,
    twistd_path,
    wait_http_ok,
    wait_tcp,
    wait_until,
    which,
)

BODY = "hello\n"
_READ_BUF = bytearray(1 << 20)
HOST = "127.0.0.1"


@dataclass
class Backends:
    """Where the origin servers listen."""

    h1: int  # nginx HTTP/1.1 keep-alive
    h2c: int  # nginx h2c (prior knowledge)
    iperf: int  # iperf3 -s
    sink: dict[str, int] = field(default_factory=dict)  # proxy name -> sink port
    big_path: str = "/big"  # the large sparse file served by nginx
    big_bytes: int = 0


@dataclass
class Target:
    """One way to reach the backends: direct, or through a proxy."""

    name: str
    h1: int | None = None
    h2c: int | None = None
    tcp: int | None = None  # relays to iperf3
    hold: int | None = None  # relays to the connection sink (memory test)
    admin: int | None = None  # l5dproxy's admin port (/metrics, /ready)
    children: list[Child] = field(default_factory=list)
    pid: int | None = None  # process whose RSS is measured
    error: str | None = None

    @property
    def available(self) -> bool:
        if self.error is not None:
            return False
        return all(c.alive() for c in self.children)

    def why_unavailable(self) -> str:
        if self.error is not None:
            return self.error
        dead = [f"{c.name} exited ({c.proc.returncode})" for c in self.children if not c.alive()]
        return "; ".join(dead) or "available"


# ---------------------------------------------------------------------- nginx


def nginx_user_line() -> str:
    """As root, nginx switches workers to nobody:nobody; Debian has no 'nobody' group."""
    if os.geteuid() != 0:
        return ""  # ignored (with a warning) for non-root anyway
    try:
        pw = pwd.getpwnam("nobody")
        return f"user nobody {grp.getgrgid(pw.pw_gid).gr_name};"
    except KeyError:
        return "user root;"


def nginx_config(workdir: Path, h1: int, h2c: int, big_file: Path) -> str:
    t = workdir
    return f"""\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
{nginx_user_line()}
pid {t}/nginx.pid;
error_log {t}/nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000000;   # h1 and h2: never force reconnects mid-run
    keepalive_timeout 300s;
    http2_max_concurrent_streams 256;
    client_body_temp_path {t}/nginx-client-body;
    proxy_temp_path {t}/nginx-proxy;
    fastcgi_temp_path {t}/nginx-fastcgi;
    uwsgi_temp_path {t}/nginx-uwsgi;
    scgi_temp_path {t}/nginx-scgi;
    server {{
        listen {HOST}:{h1};
        listen {HOST}:{h2c} http2;
        location = /big {{ alias {big_file}; }}
        location / {{ return 200 "{BODY.strip()}\\n"; }}
    }}
}}
"""


def start_nginx(sup: Supervisor, big_bytes: int) -> tuple[Child, int, int]:
    nginx = which("nginx")
    if nginx is None:
        raise StartError("nginx not found (apt-get install nginx-light)")
    big = sup.workdir / "big.bin"
    with open(big, "wb") as f:  # sparse: no disk space used, reads as zeros
        f.truncate(big_bytes)
    # Read it once so its (zero) pages are in the page cache: otherwise whichever target
    # downloads first pays for filling it (seen: 0.4 instead of 2 GB/s direct).
    with open(big, "rb") as f:
        while f.readinto(_READ_BUF):
            pass
    h1, h2c = free_port(), free_port()
    conf = sup.workdir / "nginx.conf"
    conf.write_text(nginx_config(sup.workdir, h1, h2c, big))
    child = sup.start("nginx", [nginx, "-p", str(sup.workdir), "-c", str(conf)])
    wait_until(lambda: http_status(f"http://{HOST}:{h1}/") == 200, child, 15.0,
               "nginx to answer")
    wait_tcp(child, h2c)
    return child, h1, h2c


# ------------------------------------------------------------- iperf3 / sink


def start_iperf_server(sup: Supervisor) -> tuple[Child, int]:
    iperf3 = which("iperf3")
    if iperf3 is None:
        raise StartError("iperf3 not found (apt-get install iperf3)")
    port = free_port()
    child = sup.start("iperf3-server", [iperf3, "-s", "-B", HOST, "-p", str(port)])
    # Probe with a plain connect: iperf3 logs a short error about it and keeps serving.
    wait_tcp(child, port)
    return child, port


def start_sink(sup: Supervisor, ports: dict[str, int]) -> Child:
    """One asyncio process holding idle connections, one port per proxy (``ports``)."""
    script = Path(__file__).with_name("sink.py")
    child = sup.start("sink", [sys.executable, str(script), *map(str, ports.values())])
    for port in ports.values():
        wait_tcp(child, port)
    return child


# -------------------------------------------------------------------- l5dproxy


def l5dproxy_config(admin: int, http: int, h2c: int, tcp: int, hold: int,
                    b: Backends) -> str:
    return f"""\
# generated by bench/ -- one run, ports picked free at start
[admin]
listen = "tcp:{admin}:interface={HOST}"

[detect]
timeout = 10
peek_limit = 8192
opaque_ports = [25, 587, 3306, 4444, 5432, 6379, 9300, 11211]

[[listener]]
name = "http"
listen = "tcp:{http}:interface={HOST}"
service = "backend"

[[listener]]
name = "h2c"
listen = "tcp:{h2c}:interface={HOST}"
service = "backend-h2"

[[listener]]
name = "tcp"
listen = "tcp:{tcp}:interface={HOST}"
service = "iperf"
opaque = true

[[listener]]
name = "hold"
listen = "tcp:{hold}:interface={HOST}"
service = "sink"
opaque = true

[service.backend]
endpoints = ["{HOST}:{b.h1}"]
protocol = "http1"

[service.backend-h2]
endpoints = ["{HOST}:{b.h2c}"]
protocol = "h2"

[service.iperf]
endpoints = ["{HOST}:{b.iperf}"]

[service.sink]
endpoints = ["{HOST}:{b.sink['l5dproxy']}"]
"""


def l5dproxy_plugin_present() -> bool:
    import subprocess

    twistd = twistd_path()
    if twistd is None:
        return False
    out = subprocess.run([twistd, "--help"], capture_output=True, text=True, timeout=60)
    return any(line.split()[:1] == ["l5dproxy"] for line in out.stdout.splitlines())


def start_l5dproxy(sup: Supervisor, b: Backends, ready_timeout: float = 30.0,
                   name: str = "l5dproxy", extra_config: str = "") -> Target:
    """``twistd -n l5dproxy`` with the harness's config (plus ``extra_config``, more
    listeners and services), ready once its admin ``/ready`` answers 200."""
    target = Target(name)
    twistd = twistd_path()
    if twistd is None:
        target.error = "twistd not found next to the harness's python"
        return target
    if not l5dproxy_plugin_present():
        target.error = "`twistd --help` lists no l5dproxy plugin (not pip install -e'd yet?)"
        return target
    admin, http, h2c, tcp, hold = (free_port() for _ in range(5))
    conf = sup.workdir / f"{name}.toml"
    conf.write_text(l5dproxy_config(admin, http, h2c, tcp, hold, b) + extra_config)
    child = sup.start(name, [twistd, "-n", "--pidfile=", "l5dproxy", "--config", str(conf)])
    target.children.append(child)
    target.pid = child.pid
    try:
        wait_http_ok(child, f"http://{HOST}:{admin}/ready", timeout=ready_timeout)
    except StartError as exc:
        target.error = f"l5dproxy did not become ready: {exc}"
        sup.stop(child)
        return target
    target.h1, target.h2c, target.tcp, target.hold = http, h2c, tcp, hold
    target.admin = admin
    return target


# ------------------------------------------------------------ l5dproxy --workers


@dataclass
class WorkerSet:
    """One ``twistd -n l5dproxy --workers N`` (worker 0 is ``child``, the session leader;
    workers 1..N-1 are its children in the same process group and session)."""

    n: int
    admin: int  # worker I serves admin on admin + I
    h1: int
    tcp: int
    child: Child | None = None
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None and self.child is not None and self.child.alive()

    def why_unavailable(self) -> str:
        if self.error is not None:
            return self.error
        if self.child is not None and not self.child.alive():
            return f"worker 0 exited ({self.child.proc.returncode})"
        return "available"


def start_worker_sets(sup: Supervisor, b: Backends, counts: list[int],
                      ready_timeout: float = 30.0) -> dict[int, WorkerSet]:
    """Start ``l5dproxy --workers N`` for every N in ``counts`` at once (the same config
    as the l5dproxy target, ports of its own), then wait for every worker's ``/ready``.

    Shared listeners cannot use port 0 (each worker would pick its own), so every port
    is picked free here and written into the config, the admin ports as a block."""
    sets: dict[int, WorkerSet] = {}
    twistd = twistd_path()
    for n in counts:
        try:
            admin = free_port_block(n)
            block = frozenset(range(admin, admin + n))
            http, h2c, tcp, hold = _free_ports_outside(4, block)
        except StartError as exc:
            sets[n] = WorkerSet(n, 0, 0, 0, error=str(exc))
            continue
        ws = sets[n] = WorkerSet(n, admin, http, tcp)
        if twistd is None:
            ws.error = "twistd not found next to the harness's python"
            continue
        conf = sup.workdir / f"l5dproxy-w{n}.toml"
        conf.write_text(l5dproxy_config(admin, http, h2c, tcp, hold, b))
        ws.child = sup.start(f"l5dproxy-w{n}", [twistd, "-n", "--pidfile=", "l5dproxy",
                                                "--config", str(conf), "--workers", str(n)])
    deadline = time.monotonic() + ready_timeout
    for ws in sets.values():
        if ws.child is None:
            continue
        try:
            for i in range(ws.n):
                wait_http_ok(ws.child, f"http://{HOST}:{ws.admin + i}/ready",
                             timeout=max(1.0, deadline - time.monotonic()))
        except StartError as exc:
            ws.error = f"--workers {ws.n} did not become ready (worker {i}): {exc}"
            sup.stop(ws.child)
    return sets


def _free_ports_outside(count: int, avoid: frozenset[int]) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in avoid and port not in ports:
            ports.append(port)
    return ports


# --------------------------------------------------------------------- HAProxy


def haproxy_config(h1: int, h2c: int, tcp: int, hold: int, b: Backends,
                   maxconn: int = 40000) -> str:
    return f"""\
# generated by bench/
global
    nbthread 1
    maxconn {maxconn}
    log stderr format short local0 err

defaults
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout tunnel 300s
    maxconn {maxconn}

frontend h1
    mode http
    bind {HOST}:{h1}
    default_backend nginx_h1

backend nginx_h1
    mode http
    http-reuse always
    server s1 {HOST}:{b.h1}

frontend h2c
    mode http
    bind {HOST}:{h2c} proto h2
    default_backend nginx_h2

backend nginx_h2
    mode http
    http-reuse always
    server s1 {HOST}:{b.h2c} proto h2

listen iperf
    mode tcp
    bind {HOST}:{tcp}
    server s1 {HOST}:{b.iperf}

listen hold
    mode tcp
    bind {HOST}:{hold}
    server s1 {HOST}:{b.sink['haproxy']}
"""


def start_haproxy(sup: Supervisor, b: Backends) -> Target:
    target = Target("haproxy")
    haproxy = which("haproxy")
    if haproxy is None:
        target.error = "haproxy not found (apt-get install haproxy)"
        return target
    h1, h2c, tcp, hold = (free_port() for _ in range(4))
    conf = sup.workdir / "haproxy.cfg"
    # HAProxy needs about 2 fds per connection and refuses to start if it cannot raise
    # RLIMIT_NOFILE that far, so fit maxconn to the limit children get.
    maxconn = max(1000, (raise_nofile() - 200) // 2)
    conf.write_text(haproxy_config(h1, h2c, tcp, hold, b, maxconn))
    child = sup.start("haproxy", [haproxy, "-db", "-f", str(conf)])
    target.children.append(child)
    target.pid = child.pid
    try:
        for port in (h1, h2c, tcp, hold):
            wait_tcp(child, port)
    except StartError as exc:
        target.error = f"haproxy did not start: {exc}"
        sup.stop(child)
        return target
    target.h1, target.h2c, target.tcp, target.hold = h1, h2c, tcp, hold
    return target


# ---------------------------------------------------------------- portforward


def start_portforward(sup: Supervisor, b: Backends) -> Target:
    """Twisted's raw relay; it forwards to one port, so one process per backend port.

    RSS is measured on the instance in front of the h1 backend (``pid``), and the
    ``hold`` one for the idle-connection test (that child's pid is looked up by name).
    """
    target = Target("portforward")
    twistd = twistd_path()
    if twistd is None:
        target.error = "twistd not found"
        return target
    ports: dict[str, int] = {}
    for kind, dest in (("h1", b.h1), ("h2c", b.h2c), ("tcp", b.iperf),
                       ("hold", b.sink["portforward"])):
        port = free_port()
        child = sup.start(
            f"portforward-{kind}",
            [twistd, "-n", "--pidfile=", "portforward", "-p", f"tcp:{port}:interface={HOST}",
             "-h", HOST, "-d", str(dest)],
        )
        target.children.append(child)
        ports[kind] = port
    try:
        for child, port in zip(target.children, ports.values(), strict=True):
            wait_tcp(child, port)
    except StartError as exc:
        target.error = f"portforward did not start: {exc}"
        return target
    target.h1, target.h2c, target.tcp, target.hold = (
        ports["h1"], ports["h2c"], ports["tcp"], ports["hold"])
    target.pid = target.children[0].pid
    return target


def pid_for(target: Target, kind: str) -> int | None:
    """The process to measure for a given listener kind (portforward has one per kind)."""
    if target.name == "portforward":
        for child in target.children:
            if child.name == f"portforward-{kind}":
                return child.pid
        return None
    return target.pid
