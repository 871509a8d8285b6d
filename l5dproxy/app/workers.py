"""``--workers N``: N processes sharing the listeners with ``SO_REUSEPORT``.

The process twistd starts is worker 0. It binds every listener with
``SO_REUSEPORT`` (a socket made here and adopted by the reactor: Twisted's
``tcp:`` endpoint has no such option), then spawns workers 1..N-1, each a
``twistd -n l5dproxy --config PATH --worker-index I`` binding the same ports
the same way, so the kernel spreads new connections over the N processes.
Worker 0 supervises them: one that dies is started again (after a second,
backing off to 30 s while it keeps dying); SIGHUP is passed on, so every
worker reloads the file; SIGTERM is passed on and worker 0 waits for them
to drain (``proxy.drain_timeout``) before it exits itself. A worker whose
parent dies exits (``PR_SET_PDEATHSIG``).

Only ``tcp:`` listeners are shared; any other endpoint (``unix:``,
``systemd:``) is served by worker 0 alone. The admin server is per worker:
worker I serves it on the admin port + I (``tcp:`` admin endpoints; other
kinds are served by worker 0 only), so each worker's metrics are scraped as
a target of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

log = Logger()

_TCP = re.compile(r"^tcp:")
_SPLIT = re.compile(r"(?<!\\):")


def _tcp_args(description: str) -> dict[str, str] | None:
    """The arguments of a ``tcp:`` endpoint string (port, interface,
    backlog), or None for any other kind."""
    if not _TCP.match(description):
        return None
    parts = [p.replace("\\:", ":") for p in _SPLIT.split(description)[1:]]
    args: dict[str, str] = {}
    for i, part in enumerate(parts):
        key, sep, value = part.partition("=")
        if sep:
            args[key] = value
        elif i == 0:
            args["port"] = part
        else:
            return None
    if not set(args) <= {"port", "interface", "backlog"} or "port" not in args:
        return None
    return args


def shareable(description: str) -> bool:
    return _tcp_args(description) is not None


def listen_reuseport(reactor, description: str, factory):
    """Listen on a ``tcp:`` endpoint with ``SO_REUSEPORT`` set, so other
    processes of the same user can bind the same port. Raises
    ``CannotListenError`` as the endpoint would."""
    args = _tcp_args(description)
    if args is None:
        raise ValueError(f"not a tcp: endpoint: {description!r}")
    port = int(args["port"])
    interface = args.get("interface", "")
    backlog = int(args.get("backlog", 50))
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface, port))
        sock.listen(backlog)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    except OSError as e:
        raise error.CannotListenError(interface, port, e) from e
    finally:
        sock.close()  # the reactor holds its own duplicate


def admin_listen(description: str, index: int) -> str | None:
    """Worker ``index``'s admin endpoint: the port + index for ``tcp:``;
    None (no admin server) for another kind of endpoint past worker 0."""
    if index == 0:
        return description
    args = _tcp_args(description)
    if args is None:
        return None
    port = int(args["port"])
    if port == 0:
        return description
    return re.sub(r"^tcp:(port=)?\d+", lambda m: f"tcp:{m.group(1) or ''}{port + index}",
                  description)


def die_with_parent() -> None:
    """Linux: get SIGTERM when the parent (worker 0) dies."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:  # the parent is already gone
            os.kill(os.getpid(), signal.SIGTERM)


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred = defer.Deferred()

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        self.supervisor.ended(self, reason)


class WorkerSupervisor(Service):
    """Worker 0's side: spawns workers 1..N-1 and keeps them running."""

    def __init__(self, reactor, count: int, config_path: str, drain_timeout: float) -> None:
        self.reactor = reactor
        self.count = count
        self.config_path = config_path
        self.drain_timeout = drain_timeout
        self.workers: dict[int, tuple[_Worker, IProcessTransport]] = {}
        self.failures: dict[int, int] = {}
        self.stopping = False
        #: What signal.signal returned when we took SIGHUP over.
        self._previous_sighup: Callable[[int, FrameType | None], Any] | int | None = None

    def command(self, index: int) -> list[str]:
        """twistd, by the interpreter running this one, however it was started."""
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                "-n", "--pidfile=", "l5dproxy", "--config", self.config_path,
                "--worker-index", str(index)]

    def startService(self) -> None:
        super().startService()
        for index in range(1, self.count):
            self.spawn(index)
        self._forward_sighup()

    def spawn(self, index: int) -> None:
        if self.stopping:
            return
        worker = _Worker(self, index)
        args = self.command(index)
        process = self.reactor.spawnProcess(worker, args[0], args, env=os.environ.copy(),
                                            childFDs={0: "w", 1: 1, 2: 2})
        self.workers[index] = (worker, process)
        log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def ended(self, worker: _Worker, reason) -> None:
        self.workers.pop(worker.index, None)
        if self.stopping:
            return
        failures = self.failures.get(worker.index, 0) + 1
        self.failures[worker.index] = failures
        delay = min(30.0, 2.0 ** (failures - 1))
        log.warn("worker {index} exited ({reason}); starting it again in {delay:.0f} s",
                 index=worker.index, reason=reason.getErrorMessage(), delay=delay)
        self.reactor.callLater(delay, self.spawn, worker.index)

    def signal_all(self, signum: int) -> None:
        for _worker, process in list(self.workers.values()):
            with contextlib.suppress(error.ProcessExitedAlready, OSError):
                process.signalProcess(signum)

    def _forward_sighup(self) -> None:
        try:
            previous = signal.getsignal(signal.SIGHUP)
        except ValueError:  # pragma: no cover - not the main thread
            return

        def on_sighup(signum, frame) -> None:
            self.signal_all(signal.SIGHUP)
            if callable(previous):
                previous(signum, frame)

        try:
            self._previous_sighup = signal.signal(signal.SIGHUP, on_sighup)
        except ValueError:  # pragma: no cover
            self._previous_sighup = None

    @defer.inlineCallbacks
    def stopService(self):
        """Pass SIGTERM on and wait for every worker to drain and exit."""
        super().stopService()
        self.stopping = True
        if self._previous_sighup is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGHUP, self._previous_sighup)
        waiting = [worker.ended for worker, _ in self.workers.values()]
        self.signal_all(signal.SIGTERM)
        if not waiting:
            return
        timer = self.reactor.callLater(self.drain_timeout + 5.0, self.signal_all,
                                       signal.SIGKILL)
        yield defer.DeferredList(waiting)
        if timer.active():
            timer.cancel()
