"""Server-speaks-first through l5dproxy: time to the first server byte, and
what the feature costs client-speaks-first traffic.

    python bench/serverfirst.py [--runs N] [--no-stall]

Starts, all on loopback ports picked free: a banner server (sends
``220 ready`` on connect, like SMTP), an HTTP/1.1 server, and three proxies
(``twistd -n l5dproxy``) with a listener for each:

* ``first``: ``learned_ttl = 0``, so nothing is remembered and every
  connection goes through the client-silence window: the first-connection
  figure, N times over;
* ``on``: the shipped defaults: the first connection learns the destination,
  the later ones skip the window;
* ``off``: ``client_silence = 0`` (the feature off), i.e. how a
  wait-for-the-client proxy behaves: a banner waits for the 10 s detect
  timeout (measured once; ``--no-stall`` skips it).

Prints time to the banner's first byte (connect included) for direct and
each proxy, and curl's ``time_total`` for HTTP direct, through ``on`` and
through ``off``, interleaved, as median / p90 / p99 in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BANNER = b"220 ready\r\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def banner_server() -> int:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)

    def serve(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(BANNER)
                while conn.recv(65536):
                    pass
            except OSError:
                pass

    def accept() -> None:
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return sock.getsockname()[1]


class _Hello(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    #: Buffered: head and body leave in one send, so the backend's Nagle
    #: against a pooled connection's delayed ACK (40 ms) does not blur the
    #: figures (http.server is unbuffered by default).
    wbufsize = 65536

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "6")
        self.end_headers()
        self.wfile.write(b"hello\n")

    def log_message(self, *args) -> None:
        pass


def http_server() -> int:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1]


def start_proxy(directory: str, name: str, detect: str, banner_port: int,
                http_port: int) -> tuple[subprocess.Popen, int, int, int]:
    """A proxy with listeners ``banner`` and ``http``:
    (process, banner port, http port, admin port)."""
    ports = [free_port() for _ in range(3)]
    config = os.path.join(directory, f"{name}.toml")
    with open(config, "w") as f:
        f.write(f"""
[admin]
listen = "tcp:{ports[0]}:interface=127.0.0.1"
[detect]
{detect}
[proxy]
log_connections = false
[[listener]]
name = "banner"
listen = "tcp:{ports[1]}:interface=127.0.0.1"
service = "banner"
[[listener]]
name = "http"
listen = "tcp:{ports[2]}:interface=127.0.0.1"
service = "http"
[service.banner]
endpoints = ["127.0.0.1:{banner_port}"]
[service.http]
endpoints = ["127.0.0.1:{http_port}"]
""")
    twistd = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
    log = open(os.path.join(directory, f"{name}.log"), "wb")  # noqa: SIM115
    process = subprocess.Popen([*twistd, "-n", "--pidfile=", "l5dproxy", "--config", config],
                               stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/ready", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit(f"proxy {name} did not start; see {directory}/{name}.log")
        time.sleep(0.05)
    return process, ports[1], ports[2], ports[0]


def detections(admin_port: int) -> str:
    """The proxy's protocol_detect_total samples, one line each."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return "\n".join("    " + line for line in text.splitlines()
                     if line.startswith("protocol_detect_total{"))


def first_byte_ms(port: int) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        if not s.recv(1):
            raise RuntimeError("no banner")
        return (time.perf_counter() - start) * 1000.0


def curl_ms(curl: str, port: int) -> float:
    out = subprocess.run([curl, "-s", "-o", "/dev/null", "-w", "%{time_total}",
                          f"http://127.0.0.1:{port}/"], capture_output=True, check=True)
    return float(out.stdout) * 1000.0


def summary(values: list[float]) -> str:
    v = sorted(values)
    n = len(v)

    def pct(p: float) -> float:
        return v[min(n - 1, int(p * n))]

    return (f"n={n:<5} median {statistics.median(v):8.2f}  p90 {pct(0.9):8.2f}  "
            f"p99 {pct(0.99):8.2f}  max {v[-1]:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--no-stall", action="store_true",
                        help="skip the one 10 s banner through the feature-off proxy")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="l5dproxy-serverfirst-")
    banner_port, http_port = banner_server(), http_server()
    processes = []
    try:
        first = start_proxy(directory, "first", "learned_ttl = 0", banner_port, http_port)
        on = start_proxy(directory, "on", "", banner_port, http_port)
        off = start_proxy(directory, "off", "client_silence = 0", banner_port, http_port)
        processes = [first[0], on[0], off[0]]
        n = args.runs
        print(f"time to the server's first byte, ms ({n} connections each):")
        learning = first_byte_ms(on[1])  # the one that teaches proxy 'on'
        rows = {"direct": [], "first (window)": [], "later (learned)": []}
        for _ in range(n):
            rows["direct"].append(first_byte_ms(banner_port))
            rows["first (window)"].append(first_byte_ms(first[1]))
            rows["later (learned)"].append(first_byte_ms(on[1]))
        for label, values in rows.items():
            print(f"  {label:<22} {summary(values)}")
        print(f"  {'first, proxy on':<22} {summary([learning])}")
        if not args.no_stall:
            print(f"  {'feature off':<22} {summary([first_byte_ms(off[1])])}")
        curl = shutil.which("curl")
        if curl:
            print(f"curl time_total over HTTP/1.1, ms ({n} runs each, interleaved):")
            rows = {"direct": [], "proxy, feature on": [], "proxy, feature off": []}
            for _ in range(n):
                rows["direct"].append(curl_ms(curl, http_port))
                rows["proxy, feature on"].append(curl_ms(curl, on[2]))
                rows["proxy, feature off"].append(curl_ms(curl, off[2]))
            for label, values in rows.items():
                print(f"  {label:<22} {summary(values)}")
        print("verdicts, proxy 'on':")
        print(detections(on[3]))
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(30)
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
