"""The ``l5dproxy`` command (and ``python -m l5dproxy``).

* ``l5dproxy run [--config PATH]``: the proxy, through ``twistd`` (``-n`` and
  ``--pidfile=`` unless ``--daemon`` / ``--pidfile`` say otherwise); exactly
  what ``twistd -n --pidfile= l5dproxy --config PATH`` runs.
* ``l5dproxy check PATH``: validate a config as ``--check`` does (every error,
  exit 2), then warn (exit 0) about what would go wrong at start: no
  listener, a port already taken, a DNS resolver that does not answer.
* ``l5dproxy tap [--admin ADDR] [filters]``: live requests from the admin
  port's ``/tap``, one line each (``--json``: the events as they come).
* ``l5dproxy top [--admin ADDR] [filters]``: a live table per path from the
  tap, as ``linkerd viz top``; ``--once`` prints one after ``--seconds``.
* ``l5dproxy version``.

Exit status: 0 done, 1 the admin port cannot be reached, 2 a bad config or
bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import IO, Any

DEFAULT_ADMIN = "127.0.0.1:4191"

#: How long a DNS resolver has to answer ``check``'s query.
DNS_TIMEOUT = 2.0


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # | head
        return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l5dproxy", description="A protocol-aware proxy (HTTP/1, HTTP/2, gRPC, TCP).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser("run", help="run the proxy (twistd underneath)")
    run.add_argument("--config", "-c", help="config file (default: the bundled one)")
    run.add_argument("--workers", "-w", type=int, help="processes sharing the listeners")
    run.add_argument("--daemon", "-d", action="store_true",
                     help="go to the background (twistd without -n)")
    run.add_argument("--pidfile", default="", help="pid file (default: none)")
    run.add_argument("--logfile", help="log file (default: stdout; twistd.log with --daemon)")
    run.set_defaults(run=_run)

    check = commands.add_parser("check", help="validate a config and warn about problems")
    check.add_argument("path", help="config file")
    check.set_defaults(run=_check)

    tap = commands.add_parser("tap", help="live requests from the admin port's /tap")
    _tap_arguments(tap)
    tap.add_argument("--limit", type=int, help="stop after this many requests")
    tap.add_argument("--seconds", type=float, help="stop after this long")
    tap.add_argument("--json", action="store_true", help="the events as JSON lines")
    tap.set_defaults(run=_tap)

    top = commands.add_parser("top", help="live requests per path, from the tap")
    _tap_arguments(top)
    top.add_argument("--interval", type=float, default=2.0,
                     help="seconds between tables (default 2)")
    top.add_argument("--seconds", type=float, help="stop after this long")
    top.add_argument("--once", action="store_true",
                     help="print one table after --seconds (default 5) and exit")
    top.add_argument("--rows", type=int, default=20, help="rows shown (default 20)")
    top.set_defaults(run=_top)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(run=_version)
    return parser


# -- run --------------------------------------------------------------------------------

def twistd_argv(args: argparse.Namespace) -> list[str]:
    """The ``twistd`` command line ``l5dproxy run`` runs."""
    argv = ["twistd"]
    if not args.daemon:
        argv.append("-n")
    argv.append(f"--pidfile={args.pidfile}" if args.pidfile or not args.daemon
                else "--pidfile=twistd.pid")
    if args.logfile:
        argv.append(f"--logfile={args.logfile}")
    argv.append("l5dproxy")
    if args.config:
        # Absolute: twistd --daemon changes directory, and a reload reads it again.
        argv += ["--config", os.path.abspath(args.config)]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    return argv


def _run(args: argparse.Namespace) -> int:
    from twisted.scripts.twistd import run

    sys.argv = twistd_argv(args)
    run()
    return 0


# -- check ------------------------------------------------------------------------------

def _check(args: argparse.Namespace) -> int:
    from l5dproxy.config.parse import ConfigError, load

    path = args.path
    try:
        config = load(path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        return 2
    warnings = config_warnings(config)
    for line in warnings:
        print(f"{path}: warning: {line}", file=sys.stderr)
    print(f"{path}: ok" + (f" ({len(warnings)} warning{'s' * (len(warnings) != 1)})"
                           if warnings else ""))
    return 0


def config_warnings(config) -> list[str]:
    """What would go wrong when ``config`` (valid) starts, one line each."""
    warnings = []
    if not config.listeners:
        warnings.append("no [[listener]]: the proxy would accept no connection")
    listens = [(f"listener {lc.name!r}", lc.listen) for lc in config.listeners]
    listens.append(("admin", config.admin.listen))
    for what, listen in listens:
        address = tcp_address(listen)
        if address is None or address[1] == 0:
            continue
        reason = port_taken(*address)
        if reason:
            warnings.append(f"{what}: {address[0] or '*'}:{address[1]} is taken ({reason})")
    for resolver in config.discovery.resolvers:
        reason = dns_silent(resolver.host, resolver.port)
        if reason:
            warnings.append(f"[discovery] resolver {resolver}: {reason}")
    return warnings


def tcp_address(listen: str) -> tuple[str, int] | None:
    """(interface, port) of a ``tcp:``/``tcp6:`` endpoint string (Twisted's
    syntax: ``:`` separates, ``\\`` escapes, ``name=value`` for options),
    else None."""
    parts, current, chars = [], [], iter(listen)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6"):
        return None
    positional = [p for p in parts[1:] if "=" not in p]
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    port = options.get("port", positional[0] if positional else "")
    if not port.isdigit():
        return None
    return options.get("interface", "::" if kind == "tcp6" else ""), int(port)


def port_taken(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be bound now (as the proxy binds it), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError as e:
            return e.strerror or str(e)
    return None


def dns_silent(host: str, port: int, timeout: float = DNS_TIMEOUT) -> str | None:
    """None when the DNS server answers a query (any answer, even an error
    code), else why not (timed out after ``timeout`` s, refused, ...)."""
    query_id = os.urandom(2)
    # Header: id, RD, one question; question: the root zone, type NS, class IN.
    packet = query_id + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x00\x00\x02\x00\x01"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.send(packet)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                reply = s.recv(4096)
                if reply[:2] == query_id:
                    return None
        except TimeoutError:
            return f"no answer within {timeout:g} s"
        except OSError as e:
            return e.strerror or str(e)
    return f"no answer within {timeout:g} s"


# -- tap and top ------------------------------------------------------------------------

def _tap_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin", default=DEFAULT_ADMIN,
                        help=f"the proxy's admin address (default {DEFAULT_ADMIN})")
    parser.add_argument("--service")
    parser.add_argument("--authority")
    parser.add_argument("--path-prefix", dest="path_prefix")
    parser.add_argument("--method")
    parser.add_argument("--status", help="a status (503) or class (5xx)")


def tap_url(args: argparse.Namespace, **extra: Any) -> str:
    admin = args.admin if "://" in args.admin else f"http://{args.admin}"
    query = {name: getattr(args, name) for name in
             ("service", "authority", "path_prefix", "method", "status")}
    query.update(extra)
    query = {k: v for k, v in query.items() if v is not None}
    return f"{admin.rstrip('/')}/tap" + ("?" + urllib.parse.urlencode(query) if query else "")


def tap_events(url: str, timeout: float | None = None) -> Iterator[dict]:
    """The events of ``url`` (a /tap URL) as they come; raises OSError when
    the admin port cannot be reached, ValueError for an answer that is not 200."""
    try:
        response = urllib.request.urlopen(url, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{url}: {e.code} {e.read().decode(errors='replace').strip()}") \
            from None
    with response:
        for line in response:
            if line.strip():
                yield json.loads(line)


def format_event(event: dict) -> str:
    """One line for a tap event, as ``linkerd viz tap`` prints them."""
    if event.get("type") == "dropped":
        return f"({event['dropped']} events lost: this watcher was too slow)"
    where = (f"{event['method']} {event['authority'] or '-'}{event['path']} "
             f"service={event['service']} endpoint={event['endpoint'] or '-'} "
             f"client={event['client']} {event['protocol']}")
    if event.get("type") == "start":
        return f"req  {where}"
    line = (f"end  {where} status={event['status']} latency={event['latency_ms']:.1f}ms "
            f"bytes={event['request_bytes']}/{event['response_bytes']}")
    if event.get("grpc_status"):
        line += f" grpc-status={event['grpc_status']}"
    if event.get("error"):
        line += f" error={event['error']!s}"
    return line


def _tap(args: argparse.Namespace) -> int:
    url = tap_url(args, limit=args.limit, seconds=args.seconds)
    try:
        for event in tap_events(url):
            print(json.dumps(event) if args.json else format_event(event), flush=True)
    except ValueError as e:
        print(f"l5dproxy tap: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"l5dproxy tap: cannot reach the admin port at {args.admin}: {e}",
              file=sys.stderr)
        return 1
    return 0


class Top:
    """Per (authority, method, path) aggregates of tap events, as
    ``linkerd viz top``: count, best, worst and last latency, success rate."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], dict[str, Any]] = {}

    def add(self, event: dict) -> None:
        if event.get("type") != "end":
            return
        key = (event["authority"], event["method"], event["path"].split("?", 1)[0])
        row = self.rows.get(key)
        latency = event["latency_ms"]
        if row is None:
            row = self.rows[key] = {"count": 0, "ok": 0, "best": latency, "worst": latency}
        row["count"] += 1
        status = event["status"]
        grpc_status = event.get("grpc_status") or "0"
        row["ok"] += int(not event["error"] and status < 500 and grpc_status == "0")
        row["best"] = min(row["best"], latency)
        row["worst"] = max(row["worst"], latency)
        row["last"] = latency

    def table(self, rows: int = 20) -> str:
        head = ("AUTHORITY", "METHOD", "PATH", "COUNT", "BEST", "WORST", "LAST", "SUCCESS")
        lines = [head]
        ranked = sorted(self.rows.items(), key=lambda item: (-item[1]["count"], item[0]))
        for (authority, method, path), r in ranked[:rows]:
            lines.append((authority or "-", method, path, str(r["count"]),
                          f"{r['best']:.1f}ms", f"{r['worst']:.1f}ms", f"{r['last']:.1f}ms",
                          f"{100.0 * r['ok'] / r['count']:.2f}%"))
        widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
        return "\n".join("  ".join(cell.ljust(w) if i < 3 else cell.rjust(w)
                                   for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
                         for line in lines)


def _top(args: argparse.Namespace, out: IO[str] | None = None) -> int:
    out = out or sys.stdout
    seconds = args.seconds if args.seconds is not None else (5.0 if args.once else None)
    url = tap_url(args, seconds=seconds)
    top = Top()
    live = not args.once and out.isatty()
    shown = time.monotonic()
    try:
        for event in tap_events(url):
            top.add(event)
            if not args.once and time.monotonic() - shown >= args.interval:
                shown = time.monotonic()
                out.write(("\x1b[H\x1b[2J" if live else "\n") + top.table(args.rows) + "\n")
                out.flush()
    except ValueError as e:
        print(f"l5dproxy top: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"l5dproxy top: cannot reach the admin port at {args.admin}: {e}",
              file=sys.stderr)
        return 1
    out.write(top.table(args.rows) + "\n")
    return 0


# -- version ----------------------------------------------------------------------------

def _version(args: argparse.Namespace) -> int:
    from l5dproxy import __version__

    print(f"l5dproxy {__version__}")
    return 0
