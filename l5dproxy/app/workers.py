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
worker I serves it on the admin port + I (``tcp:`` admin endpoints; with
another kind, on ``worker-I.sock`` in a directory only this user can enter,
which worker 0 makes and removes) and reports where on a pipe, so worker
0's admin server can gather every worker's metrics (``MetricsGatherer``)
and show the whole group.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, UNIXClientEndpoint
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

_TCP = re.compile(r"^tcp:")
#: The worker's end of the pipe it reports its admin address on.
REPORT_FD = 3
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


def admin_listen(description: str, index: int, private_dir: str | None = None) -> str | None:
    """Worker ``index``'s admin endpoint: the port + index for ``tcp:``
    (port 0 stays 0: the worker picks one and reports it); for another kind
    of endpoint past worker 0, a UNIX socket in ``private_dir`` (see
    ``private_admin_dir``), or None (no admin server) without one."""
    if index == 0:
        return description
    args = _tcp_args(description)
    if args is None:
        if private_dir is None:
            return None
        path = os.path.join(private_dir, f"worker-{index}.sock").replace(":", "\\:")
        return f"unix:{path}:lockfile=1"  # a stale socket of a killed worker is replaced
    port = int(args["port"])
    if port == 0:
        return description
    return re.sub(r"^tcp:(port=)?\d+", lambda m: f"tcp:{m.group(1) or ''}{port + index}",
                  description)


def private_admin_dir(reactor) -> str:
    """A new directory (mode 0700) for workers' admin sockets when the
    configured admin endpoint is not ``tcp:``; removed when worker 0's
    reactor shuts down."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="l5dproxy-admin-")
    reactor.addSystemEventTrigger("after", "shutdown", shutil.rmtree, path, True)
    return path


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
        self.report = b""

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """fd 3: the worker's ``admin HOST PORT`` line (``AdminReport``)."""
        if childFD != REPORT_FD or len(self.report) > 512:
            return
        self.report += data
        line, newline, _ = self.report.partition(b"\n")
        gatherer = self.supervisor.gatherer
        if newline and gatherer is not None:
            address = parse_report(line)
            if address is not None:
                gatherer.admin_bound(self.index, address)

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        self.supervisor.ended(self, reason)


class WorkerSupervisor(Service):
    """Worker 0's side: spawns workers 1..N-1 and keeps them running."""

    def __init__(self, reactor, count: int, config_path: str, drain_timeout: float,
                 gatherer: MetricsGatherer | None = None,
                 admin_dir: str | None = None) -> None:
        self.reactor = reactor
        #: Where workers put their admin sockets (``private_admin_dir``), or None.
        self.admin_dir = admin_dir
        #: Told where each worker's admin server is (and when it is gone).
        self.gatherer = gatherer
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
                "--worker-index", str(index), "--report-fd", str(REPORT_FD),
                *(["--admin-dir", self.admin_dir] if self.admin_dir else [])]

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
                                            childFDs={0: "w", 1: 1, 2: 2, REPORT_FD: "r"})
        self.workers[index] = (worker, process)
        log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def ended(self, worker: _Worker, reason) -> None:
        self.workers.pop(worker.index, None)
        if self.gatherer is not None:
            self.gatherer.worker_ended(worker.index)
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


#: How long worker 0 waits for another worker's ``/metrics`` (seconds, from
#: connecting to the last byte); a worker slower than this is left out of
#: that scrape.
GATHER_TIMEOUT = 2.0
#: The most bytes of one worker's ``/metrics`` worker 0 reads; a bigger
#: answer is left out of the scrape (reason ``too_large``).
GATHER_MAX_BYTES = 32 * 1024 * 1024

_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}


class _LeftOutError(Exception):
    """Why a worker is left out of a scrape (``worker_scrape_failures_total``'s reason)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _CappedBody(Protocol):
    """Collects a response body of at most ``limit`` bytes."""

    def __init__(self, done: defer.Deferred, limit: int) -> None:
        self.done = done
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(_LeftOutError("too_large"))
            _stop(self)
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class MetricsGatherer:
    """Worker 0's merged ``/metrics``: its own registry and every other
    worker's ``/metrics`` (gathered over loopback), as one process group.

    Workers report the address their admin server is bound to (``AdminReport``,
    a pipe to worker 0); ``gather`` asks each at once for
    ``/metrics?local&format=json`` (HTTP/1.1, Twisted's Agent, no connection
    kept; JSON because parsing the text form would hold worker 0's reactor
    some 30 times longer, see ``telemetry.families_to_json``), waits at most
    ``timeout`` seconds, reads at most ``max_bytes`` of each, and merges what
    came (``l5dproxy.telemetry.merge_families``). A worker that is down, refuses,
    is too slow or answers something else is left out of that scrape and
    counted, so the scrape still answers in bounded time:

    * ``workers_expected``: N of ``--workers N``;
    * ``workers_scraped``: how many are in this scrape (worker 0 included);
    * ``worker_scrape_failures_total{worker, reason}``: reasons ``down`` (not
      running or its admin not bound yet), ``timeout``, ``refused``,
      ``status`` (not 200), ``too_large``, ``invalid`` (not the JSON form),
      ``error`` (anything else).

    Scrapes that arrive while one is gathering share its result, so any
    number of scrapers cost one round of N-1 requests at a time. Why this
    and not prometheus-client's multiprocess mode: that mode carries only
    the library's own metric classes (not the collectors that read the
    balancer, discovery and certificates at scrape time), and it writes
    every increment to a memory-mapped file, a cost per request that this
    way (nothing happens until a scrape) does not have.
    """

    def __init__(self, reactor, count: int, local: Callable[[], Iterable], *,
                 timeout: float = GATHER_TIMEOUT, max_bytes: int = GATHER_MAX_BYTES) -> None:
        self.reactor = reactor
        self.count = count
        #: Worker 0's own families (``registry.collect``).
        self.local = local
        self.timeout = timeout
        self.max_bytes = max_bytes
        #: Worker index -> its admin server's address, as reported.
        self.addresses: dict[int, IPv4Address | IPv6Address | UNIXAddress] = {}
        self.failures: dict[tuple[str, str], int] = {}
        self._waiting: list[defer.Deferred] | None = None
        self._agent: Any = None

    def admin_bound(self, index: int, address: IPv4Address | IPv6Address | UNIXAddress,
                    ) -> None:
        """Worker ``index``'s admin server is at ``address`` (a wildcard
        host is asked on loopback)."""
        if not isinstance(address, UNIXAddress) and address.host in _LOOPBACK:
            address = type(address)("TCP", _LOOPBACK[address.host], address.port)
        self.addresses[index] = address

    def endpointForURI(self, uri):
        """``http://worker-I/...``: the endpoint of worker I's admin server
        (``Agent.usingEndpointFactory``)."""
        address = self.addresses.get(int(uri.host.split(b"-")[1]))
        if address is None:
            raise _LeftOutError("down")
        if isinstance(address, UNIXAddress):
            return UNIXClientEndpoint(self.reactor, address.name, timeout=self.timeout)
        kind = TCP6ClientEndpoint if isinstance(address, IPv6Address) else TCP4ClientEndpoint
        return kind(self.reactor, address.host, address.port, timeout=self.timeout)

    def worker_ended(self, index: int) -> None:
        self.addresses.pop(index, None)

    def gather(self) -> defer.Deferred:
        """Fires with the group's metric families (a list of
        ``prometheus_client.Metric``); never fails."""
        mine: defer.Deferred = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(mine)
            return mine
        self._waiting = [mine]
        indexes = range(1, self.count)
        fetches = [self._fetch(i) for i in indexes]
        defer.DeferredList(fetches, consumeErrors=True).addCallback(
            self._merge, list(indexes)).addErrback(self._failed)
        return mine

    def _failed(self, failure: Failure) -> None:
        """A fault of the merge itself (never expected): this scrape shows
        worker 0 alone rather than never answering."""
        log.failure("merging the workers' metrics failed", failure)
        waiting, self._waiting = self._waiting or [], None
        families = list(self.local())
        for d in waiting:
            d.callback(families)

    def _fetch(self, index: int) -> defer.Deferred:
        if index not in self.addresses:
            return defer.fail(_LeftOutError("down"))
        if self._agent is None:
            from twisted.web.client import Agent, HTTPConnectionPool

            self._agent = Agent.usingEndpointFactory(
                self.reactor, self, pool=HTTPConnectionPool(self.reactor, persistent=False))
        d = self._agent.request(b"GET",
                                f"http://worker-{index}/metrics?local&format=json".encode())
        d.addCallback(self._read)
        late: list[bool] = []

        def cancel() -> None:
            late.append(True)
            d.cancel()

        timer = self.reactor.callLater(self.timeout, cancel)

        def ended(result):
            if timer.active():
                timer.cancel()
            if late and isinstance(result, Failure):
                # The Agent wraps the cancellation (ResponseNeverReceived, ...).
                raise _LeftOutError("timeout")
            return result

        return d.addBoth(ended)

    def _read(self, response) -> defer.Deferred:
        if response.code != 200:
            response.deliverBody(_Discard())
            raise _LeftOutError("status")
        body: _CappedBody
        done: defer.Deferred = defer.Deferred(lambda _: _stop(body))
        body = _CappedBody(done, self.max_bytes)
        response.deliverBody(body)
        return done

    def _merge(self, results, indexes: list[int]) -> None:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from l5dproxy.telemetry import families_from_json, merge_families

        groups = [("0", list(self.local()))]
        for index, (ok, value) in zip(indexes, results, strict=True):
            reason = None
            if ok:
                try:
                    groups.append((str(index), families_from_json(value)))
                except ValueError:
                    reason = "invalid"
            else:
                reason = _reason(value)
            if reason is not None:
                key = (str(index), reason)
                self.failures[key] = self.failures.get(key, 0) + 1
                log.debug("worker {index}'s /metrics left out: {reason}", index=index,
                          reason=reason)
        families = merge_families(groups)
        expected = GaugeMetricFamily("workers_expected", "Workers of --workers N")
        expected.add_metric((), self.count)
        scraped = GaugeMetricFamily(
            "workers_scraped", "Workers whose metrics this scrape merges (worker 0 included)")
        scraped.add_metric((), len(groups))
        failures = CounterMetricFamily(
            "worker_scrape_failures", "Workers left out of a merged scrape, by reason",
            labels=("worker", "reason"))
        for key, n in sorted(self.failures.items()):
            failures.add_metric(key, n)
        families += [expected, scraped, failures]
        waiting, self._waiting = self._waiting or [], None
        for d in waiting:
            d.callback(families)


class _Discard(Protocol):
    def connectionLost(self, reason: Failure = connectionDone) -> None:
        pass


def _stop(body: Protocol) -> None:
    transport: Any = body.transport  # the Agent's producer proxy
    if transport is not None:
        transport.stopProducing()


def _reason(failure: Failure) -> str:
    if isinstance(failure.value, _LeftOutError):
        return failure.value.reason
    if failure.check(error.TimeoutError):  # connecting took too long
        return "timeout"
    if failure.check(error.ConnectionRefusedError):
        return "refused"
    return "error"


class AdminReport(Service):
    """Worker I's side: once the proxy service has bound its admin server,
    write ``admin HOST PORT`` on ``fd`` (a pipe worker 0 reads, see
    ``WorkerSupervisor``) and close it. Started after the proxy service
    (``MultiService`` starts its children in order)."""

    def __init__(self, admin_port: Callable[[], Any], fd: int) -> None:
        self.admin_port = admin_port
        self.fd = fd

    def startService(self) -> None:
        super().startService()
        port = self.admin_port()
        try:
            if port is not None:
                line = report_line(port.getHost())
                if line is not None:
                    os.write(self.fd, line)
        except OSError as e:  # worker 0 is gone: PR_SET_PDEATHSIG ends us
            log.warn("cannot report the admin address to worker 0: {e}", e=e)
        finally:
            with contextlib.suppress(OSError):
                os.close(self.fd)


def report_line(address) -> bytes | None:
    """``AdminReport``'s line for an admin server's address: ``admin tcp
    HOST PORT``, ``admin tcp6 HOST PORT`` or ``admin unix PATH``; None for
    another kind (no way to reach it)."""
    if isinstance(address, IPv6Address | IPv4Address):
        kind = "tcp6" if isinstance(address, IPv6Address) else "tcp"
        return f"admin {kind} {address.host} {address.port}\n".encode()
    if isinstance(address, UNIXAddress) and isinstance(address.name, bytes | str):
        name = os.fsdecode(address.name)
        if name and "\n" not in name:
            return f"admin unix {name}\n".encode()
    return None


def parse_report(line: bytes) -> IPv4Address | IPv6Address | UNIXAddress | None:
    """The address in a ``report_line`` (without its newline); None if it is not one."""
    text = line.decode("utf-8", "replace")
    if not text.startswith("admin "):
        return None
    kind, _, rest = text.removeprefix("admin ").partition(" ")
    if kind == "unix" and rest:
        return UNIXAddress(rest)
    host, _, port = rest.partition(" ")
    if kind in ("tcp", "tcp6") and host and port.isdigit() and int(port) < 65536:
        return (IPv6Address if kind == "tcp6" else IPv4Address)("TCP", host, int(port))
    return None
