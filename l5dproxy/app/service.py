"""The running proxy: a Twisted service built from a Config.

Binding happens in ``privilegedStartService`` and all at once, so a port
already in use stops the process with one clear line before anything
serves. Stopping (SIGTERM) closes the listening ports at once, lets open
connections finish for ``drain_timeout`` and then closes what is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from l5dproxy import __version__
from l5dproxy.accept.listener import ConnectionLimits, Handler, Listener
from l5dproxy.app import logs, workers
from l5dproxy.app.admin import OpaqueResource, admin_site, config_document
from l5dproxy.app.listeners import build_listener, relay_site
from l5dproxy.app.sites import HttpSites
from l5dproxy.app.stats import Stats
from l5dproxy.app.tap import TapHub
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import Config, ListenerConfig
from l5dproxy.config.parse import ConfigError, load
from l5dproxy.detect.early import ServerFirst
from l5dproxy.detect.memory import OpaqueMemory
from l5dproxy.discovery import Discovery, make_resolver
from l5dproxy.http.h1.pool import H1Client
from l5dproxy.http.h1.server import h1_handler
from l5dproxy.http.h2.codec import describe_engine, engine_at_start
from l5dproxy.http.h2.pool import H2Client
from l5dproxy.http.h2.server import h2_handler
from l5dproxy.net.dns import stop_resolver
from l5dproxy.route.dispatcher import HttpProxy
from l5dproxy.tcp.relay import RelaySite, relay_handler
from l5dproxy.tcp.sni import sni_handler
from l5dproxy.telemetry import Metrics

log = Logger()


class StartupError(SystemExit):
    """A start-up failure worth one line to the operator, not a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"l5dproxy: {message}")


class ProxyService(Service):
    """Owns the listeners, the admin server and the metrics of one config."""

    def __init__(self, config: Config, reactor=None, worker: int | None = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        #: With --workers: this process's index; its tcp: listeners bind with
        #: SO_REUSEPORT and its admin port is offset by it (l5dproxy.app.workers).
        self.worker = worker
        #: With --workers, worker 0's: the group's metric families for the
        #: admin's /metrics and /stats.json (workers.MetricsGatherer.gather).
        self.gather: Callable[[], defer.Deferred] | None = None
        #: Past worker 0, a non-tcp: admin's socket directory (workers.admin_listen).
        self.private_admin_dir: str | None = None
        self.reactor = reactor
        self.metrics = Metrics()
        self.backends = {
            name: BackendSet(service, config.detect.opaque_ports, clock=reactor)
            for name, service in config.services.items()
        }
        self.server_first = ServerFirst(
            OpaqueMemory(reactor, config.detect.learned_max, config.detect.learned_ttl),
            config.detect.client_silence,
            lambda listener: self.metrics.early_connect_limit_total.labels(listener).inc())
        # HTTP: one dispatcher for every listener; codec ends register here.
        self.http = HttpProxy(self.backends, self.metrics, reactor)
        sites = HttpSites()
        self.h2_engine = engine_at_start(config.h2.engine, config.source)
        self.http.clients["h2"] = H2Client(reactor, settings=config.h2, metrics=self.metrics)
        self.handlers: dict[str, Handler] = {"h2": h2_handler(self.http, config.h2, sites)}
        self.http.clients["http1"] = H1Client(reactor, self.metrics,
                                              max_idle=config.http.pool_max_idle,
                                              max_connections=(
                                                  config.http.max_connections_per_endpoint))
        self.handlers["http1"] = h1_handler(self.http, config.http, sites)
        self.limits = ConnectionLimits(lambda: self.config.proxy.max_connections,
                                       self._all_listeners)
        #: TLS termination ([listener.tls]); None while no listener has it, so
        #: OpenSSL is imported only by a config that uses it (app/lean.py).
        self.terminations: Any = None
        tls_contexts = self._prepare_tls(config)
        self.listeners = [
            self._build_listener(lc, config, tls_contexts)
            for lc in config.listeners
        ]
        self._commit_tls(config, tls_contexts)
        self.ports: dict[str, IListeningPort] = {}
        self.admin_port: IListeningPort | None = None
        self.ready = False
        #: Listeners taken out by a reload, kept until their connections end.
        self.retired: list[Listener] = []
        self.resolver = None
        self.discoveries: dict[str, Discovery] = {}
        #: What signal.signal returned when we took SIGHUP over.
        self._previous_sighup: Callable[[int, FrameType | None], Any] | int | None = None
        self._watch: LoopingCall | None = None
        self._watched: tuple | None = None
        self.metrics.watch_services(lambda: list(self.backends.values()),
                                    lambda: self.discoveries)
        self.metrics.certificate_sources.append(lambda: client_certificates(self.config))
        self.tap = TapHub(self.http, reactor)
        self.stats = Stats(self.metrics.registry, reactor, lambda: self.backends,
                           self._listener_rows, self.server_first.memory.entries,
                           __version__)

    def _prepare_tls(self, config: Config) -> dict[str, Any]:
        """The TLS contexts of ``config``'s terminating listeners (see
        app/tlsterm.py); a certificate that cannot be loaded is a StartupError."""
        if not any(lc.tls is not None for lc in config.listeners):
            return {}
        if self.terminations is None:
            from l5dproxy.app.tlsterm import Terminations

            self.terminations = Terminations(self.metrics, self.reactor)
        from l5dproxy.tls.certs import CertificateError

        try:
            return self.terminations.prepare(config.listeners)
        except CertificateError as e:
            raise StartupError(f"tls: {e}") from None

    def _commit_tls(self, config: Config, contexts: dict[str, Any]) -> None:
        if self.terminations is not None:
            self.terminations.commit(config.listeners, contexts)

    def _build_listener(self, lc: ListenerConfig, config: Config,
                        tls_contexts: dict[str, Any]) -> Listener:
        """The listener of ``lc`` (at start and at each reload: new records)."""
        relay = relay_site(lc, self.backends, self.metrics, self.reactor)
        return build_listener(lc, config.detect, self.backends, self.metrics, self.reactor,
                              log_connections=config.proxy.log_connections,
                              server_first=self.server_first,
                              handlers=self._handlers_for(lc, config, tls_contexts, relay),
                              relay=relay, limits=self.limits)

    def _handlers_for(self, lc: ListenerConfig, config: Config, tls_contexts: dict[str, Any],
                      relay: RelaySite) -> dict:
        """The verdict handlers of listener ``lc``: the shared ones, plus TLS
        termination when it has ``[listener.tls]``, or SNI routes when it has
        routes with ``sni``; ``relay`` is what its TCP relays share."""
        if lc.tls is None:
            sni = [(r.sni, r.service) for r in lc.routes if r.sni is not None]
            if not sni:
                return self.handlers
            return {**self.handlers, "tls": sni_handler(sni, self.backends, relay)}
        return self.terminations.handlers(
            lc, config.detect, {**self.handlers, "opaque": relay_handler(relay)},
            tls_contexts[lc.name])

    def _listener_rows(self) -> list[tuple[str, str, str]]:
        """(name, bound address, service) of each listener, for /stats.json."""
        return [(listener.name,
                 _port_address(self.ports[listener.name]) if listener.name in self.ports
                 else "", listener.config.service)
                for listener in self.listeners]

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind()

    def startService(self) -> None:
        log.info("l5dproxy {version} starting, config {path}", version=__version__,
                 path=self.config.source)
        log.info("h2 engine: {engine}", engine=describe_engine(self.h2_engine))
        if not self.ports and self.listeners:
            self.bind()
        super().startService()
        self.resolver = make_resolver(self.config.discovery, self.reactor)
        for name in self.backends:
            self._start_discovery(name)
        self._install_sighup()
        self._set_watch(self.config)

    # -- discovery --

    def _start_discovery(self, name: str) -> None:
        discovery = Discovery(self.backends[name], self.config.discovery, self.resolver,
                              self.reactor)
        self.discoveries[name] = discovery
        discovery.start()

    def _stop_discovery(self) -> None:
        for discovery in self.discoveries.values():
            discovery.stop()
        self.discoveries.clear()
        if self.resolver is not None:
            stop_resolver(self.resolver)
            self.resolver = None

    # -- live reload --

    def _install_sighup(self) -> None:
        def on_sighup(signum, frame) -> None:
            self.reactor.callFromThread(self.reload)

        try:
            self._previous_sighup = signal.signal(signal.SIGHUP, on_sighup)
        except ValueError:  # not the main thread (tests): no signal handling
            self._previous_sighup = None

    def _uninstall_sighup(self) -> None:
        if self._previous_sighup is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None

    def _file_state(self) -> tuple | None:
        try:
            st = os.stat(self.config.source)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _set_watch(self, config: Config) -> None:
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._watch = None
        if not config.proxy.watch_config:
            return
        self._watched = self._file_state()

        def check() -> None:
            state = self._file_state()
            if state is not None and state != self._watched:
                self._watched = state
                log.info("config file {path} changed", path=self.config.source)
                self.reload()
            elif self.terminations is not None and self.terminations.changed():
                log.info("tls certificate files changed: reloading them")
                self.terminations.reload_changed()

        self._watch = LoopingCall(check)
        self._watch.clock = self.reactor
        self._watch.start(config.proxy.watch_interval, now=False)

    def reload(self, path: str | None = None) -> bool:
        """Re-read the config (SIGHUP, a file change): apply a valid one
        without dropping connections, keep the old one when it is not."""
        path = path or self.config.source
        log.info("reloading config from {path}", path=path)
        try:
            new = load(path)
        except ConfigError as e:
            for line in e.errors:
                log.error("{line}", line=line)
            log.error("config reload failed: keeping the running config")
            self.metrics.config_reload_total.labels("failure").inc()
            return False
        try:
            self._apply(new)
        except StartupError as e:
            log.error("config reload failed: {reason}; keeping the running config",
                      reason=str(e.code))
            self.metrics.config_reload_total.labels("failure").inc()
            return False
        self.metrics.config_reload_total.labels("success").inc()
        log.info("config reloaded: {n} listeners, {m} services",
                 n=len(new.listeners), m=len(new.services))
        return True

    def _apply(self, new: Config) -> None:
        old = self.config
        opaque_ports = new.detect.opaque_ports
        # 1. New ports first: a port that cannot be bound fails the reload
        #    before anything has changed.
        current = {listener.name: listener for listener in self.listeners}
        to_bind = [lc for lc in new.listeners
                   if lc.name not in current or current[lc.name].config.listen != lc.listen]
        bound: dict[str, IListeningPort] = {}
        new_sets = dict(self.backends)
        for name, service in new.services.items():
            if name not in new_sets:
                new_sets[name] = BackendSet(service, opaque_ports, clock=self.reactor)
        try:
            tls_contexts = self._prepare_tls(new)
            for lc in to_bind:
                bound[lc.name] = self._listen(f"listener {lc.name!r}", lc.listen, _Deferred())
        except StartupError:
            for port in bound.values():
                port.stopListening()
            raise
        # 2. Services: updated in place, added, removed.
        resolvers_changed = new.discovery != old.discovery
        self.config = new
        for name, service in new.services.items():
            backends = new_sets[name]
            if name in self.backends:
                source_changed = (backends.config.endpoints, backends.config.dns,
                                  backends.config.srv) != (service.endpoints, service.dns,
                                                           service.srv)
                backends.reconfigure(service, opaque_ports)
                if source_changed and not (service.dns or service.srv):
                    backends.set_addresses(service.endpoints)
                if (source_changed or resolvers_changed) and name in self.discoveries:
                    self.discoveries[name].stop()
                    del self.discoveries[name]
            self.backends[name] = backends
        if resolvers_changed and self.resolver is not None:
            stop_resolver(self.resolver)
            self.resolver = make_resolver(new.discovery, self.reactor)
        for name in [n for n in self.backends if n not in new.services]:
            del self.backends[name]  # its listeners go below; connections keep their own
            discovery = self.discoveries.pop(name, None)
            if discovery is not None:
                discovery.stop()
        if self.running:
            for name in new.services:
                if name not in self.discoveries:
                    self._start_discovery(name)
        # Pools: every existing one takes its service's new target (connect
        # and idle timeouts); a removed service's are forgotten.
        targets = {name: service.target for name, service in new.services.items()}
        for client in self.http.clients.values():
            client.retarget(targets)
        # 3. Listeners: each rebuilt on the new config; ports kept or swapped.
        listeners = []
        for lc in new.listeners:
            listener = self._build_listener(lc, new, tls_contexts)
            listeners.append(listener)
            if lc.name in bound:
                port = bound[lc.name]
                old_port = self.ports.pop(lc.name, None)
                if old_port is not None:
                    old_port.stopListening()
                self.ports[lc.name] = port
                log.info("listener {name} on {address} -> service {service}",
                         name=lc.name, address=_port_address(port), service=lc.service)
            else:
                port = self.ports[lc.name]
            _swap_factory(port, listener)
        for name in [n for n in self.ports if n not in {lc.name for lc in new.listeners}]:
            log.info("listener {name} removed", name=name)
            self.ports.pop(name).stopListening()
        self.retired = [listener for listener in [*self.retired, *self.listeners]
                        if listener.connections]
        self.listeners = listeners
        self._commit_tls(new, tls_contexts)
        self._set_watch(new)
        if new.proxy.log_level != old.proxy.log_level:
            logs.set_level(new.proxy.log_level)
        if new.admin != old.admin:
            log.warn("admin.listen changed: it takes effect at the next restart")

    def bind(self) -> None:
        """Bind every listener and the admin server, or none of them."""
        try:
            for listener in self.listeners:
                port = self._listen(f"listener {listener.name!r}", listener.config.listen,
                                    listener)
                self.ports[listener.name] = port
                log.info("listener {name} on {address} -> service {service}",
                         name=listener.name, address=_port_address(port),
                         service=listener.config.service)
            site = admin_site(self.metrics.registry, lambda: self.ready,
                              {b"opaque": OpaqueResource(self.server_first)},
                              config_json=lambda: config_document(self.config),
                              stats=self.stats, tap=self.tap, gather=self.gather)
            admin_listen = workers.admin_listen(self.config.admin.listen, self.worker or 0,
                                                self.private_admin_dir)
            if admin_listen is not None:
                self.admin_port = self._listen("admin", admin_listen, site)
                log.info("admin on {address}", address=_port_address(self.admin_port))
        except StartupError:
            self._unbind()
            raise
        self.ready = True

    def _listen(self, what: str, description: str, factory) -> IListeningPort:
        if what != "admin":
            description = with_listen_backlog(description)
        result: list[Any] = []   # the port, or a Failure
        if self.worker is not None and what != "admin" and workers.shareable(description):
            defer.maybeDeferred(workers.listen_reuseport, self.reactor, description,
                                factory).addBoth(result.append)
        elif self.worker is not None and self.worker > 0 and what != "admin":
            log.info("{what} ({description}) is served by worker 0 only", what=what,
                     description=description)
            return _NotListening(description)
        else:
            endpoint = serverFromString(self.reactor, description)
            endpoint.listen(factory).addBoth(result.append)
        if not result:  # pragma: no cover - TCP, UNIX and systemd listen synchronously
            raise StartupError(f"{what} ({description}): listening did not complete")
        outcome = result[0]
        if isinstance(outcome, defer.Failure) or hasattr(outcome, "check"):
            reason = outcome.value
            if isinstance(reason, CannotListenError):
                cause = reason.socketError
                detail = getattr(cause, "strerror", None) or str(cause)
            else:
                detail = str(reason) or type(reason).__name__
            raise StartupError(f"{what} ({description}): cannot listen: {detail}")
        return outcome

    def _unbind(self) -> None:
        for port in self.ports.values():
            port.stopListening()
        self.ports.clear()
        if self.admin_port is not None:
            self.admin_port.stopListening()
            self.admin_port = None

    def port_of(self, listener_name: str) -> int:
        address = self.ports[listener_name].getHost()
        if not isinstance(address, (IPv4Address, IPv6Address)):
            raise TypeError(f"listener {listener_name!r} is not on a TCP port ({address})")
        return address.port

    def _all_listeners(self) -> list[Listener]:
        return [*self.listeners, *self.retired]

    @defer.inlineCallbacks
    def stopService(self):
        """Stop accepting, drain open connections, then close the rest."""
        super().stopService()
        self.ready = False
        self._uninstall_sighup()
        if self._watch is not None and self._watch.running:
            self._watch.stop()
        self._stop_discovery()
        yield defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in self.ports.values()])
        self.ports.clear()
        open_connections = [c for listener in self._all_listeners()
                            for c in listener.connections]
        if open_connections:
            log.info("draining {n} connections for up to {timeout} s",
                     n=len(open_connections), timeout=self.config.proxy.drain_timeout)
            drained = self._drain(self.config.proxy.drain_timeout)
            previous = self._install_hurry(drained)
            try:
                yield drained
            finally:
                for signum, handler in previous.items():
                    with contextlib.suppress(ValueError):
                        signal.signal(signum, handler)
        if self.admin_port is not None:
            yield defer.maybeDeferred(self.admin_port.stopListening)
            self.admin_port = None

    def _install_hurry(self, drained: defer.Deferred) -> dict[int, Any]:
        """While draining, a second SIGTERM or SIGINT (Ctrl-C) closes what is
        left at once, so the process exits now; the reactor's own handler
        would call ``reactor.stop`` again and log a ``ReactorNotRunning``
        traceback. Returns the handlers replaced, to put back."""
        def hurry() -> None:
            if not drained.called:
                self._close_remaining("second signal")
                drained.callback(None)

        def on_signal(signum, frame) -> None:
            self.reactor.callFromThread(hurry)

        previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[signum] = signal.signal(signum, on_signal)
            except ValueError:  # not the main thread (tests): no signal handling
                break
        return previous

    def _close_remaining(self, why: str) -> None:
        remaining = [c for listener in self._all_listeners() for c in listener.connections]
        log.info("{why}: closing {n} connections", why=why, n=len(remaining))
        for conn in remaining:
            conn.transport.abortConnection()
            conn.site.connections.discard(conn)

    def _drain(self, timeout: float) -> defer.Deferred:
        """Fires when every connection has closed, aborting stragglers at ``timeout``."""
        done: defer.Deferred[None] = defer.Deferred()
        deadline = self.reactor.seconds() + timeout

        def check() -> None:
            remaining = [c for listener in self._all_listeners() for c in listener.connections]
            if done.called:  # cut short by a second signal
                return
            if not remaining:
                done.callback(None)
            elif self.reactor.seconds() >= deadline:
                self._close_remaining("drain timeout")
                done.callback(None)
            else:
                self.reactor.callLater(min(0.05, timeout), check)

        for conn in [c for listener in self._all_listeners() for c in listener.connections]:
            conn.drain()
        check()
        return done


@implementer(IListeningPort)
class _NotListening:
    """Stands in for a listener another worker serves (--workers)."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.factory = Factory()  # what a reload swaps (_swap_factory)

    def startListening(self) -> None:
        return None

    def getHost(self):
        return self.description

    def stopListening(self) -> None:
        return None


#: A proxy listener's accept queue. Twisted's default (50) makes a burst of
#: connections wait for SYN retries (1 s and more); nginx asks for 511 and
#: HAProxy for the kernel's somaxconn. The kernel caps it at somaxconn.
LISTEN_BACKLOG = 1024


def client_certificates(config: Config) -> list[tuple[str, str, str, float]]:
    """``("", service, name, not_after)`` of each service's TLS client
    certificate (``[service.NAME.tls] cert``), as the running config has
    them, for ``tls_certificate_expiry_timestamp_seconds``."""
    found = []
    for name, service in config.services.items():
        if service.tls is not None and service.tls.cert is not None:
            from l5dproxy.tls.client import client_tls_for
            pair = client_tls_for(service.tls).client_certificate
            if pair is not None:
                found.append(("", name, pair.name, pair.not_after))
    return found


def with_listen_backlog(description: str) -> str:
    """``description`` with ``backlog=LISTEN_BACKLOG`` when it is a TCP
    endpoint that names none (an explicit ``backlog=`` wins)."""
    kind = description.split(":", 1)[0]
    if kind in ("tcp", "tcp6") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def _port_address(port: IListeningPort) -> str:
    address = port.getHost()
    if isinstance(address, IPv6Address):   # bracketed, so the port can be told apart
        return f"[{address.host}]:{address.port}"
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    return str(address)


class _Deferred(Factory):
    """Stands in as a newly bound port's factory until the reload swaps in
    its listener (nothing is accepted in between: the reactor is ours)."""

    noisy = False

    def buildProtocol(self, addr):  # pragma: no cover - never reached
        return None


def _swap_factory(listening: IListeningPort, listener: Listener) -> None:
    """Make ``listener`` accept the port's next connections; the previous
    one keeps serving the connections it has."""
    # Twisted's ports (tcp.Port, unix.Port) keep their factory in ``factory``,
    # which IListeningPort does not declare (canary: tests/test_library_internals).
    port: Any = listening
    holder = port
    wrapped = getattr(port.factory, "wrappedFactory", None)  # TLS endpoints wrap it
    if wrapped is not None:
        holder = port.factory
    previous = holder.wrappedFactory if wrapped is not None else port.factory
    if previous is listener:
        return
    listener.doStart()
    if wrapped is not None:
        holder.wrappedFactory = listener
    else:
        port.factory = listener
    previous.doStop()
