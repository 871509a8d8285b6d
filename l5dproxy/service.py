"""The running proxy: a Twisted service built from a Config.

Binding happens in ``privilegedStartService`` and all at once, so a port
already in use stops the process with one clear line before anything
serves. Stopping (SIGTERM) closes the listening ports at once, lets open
connections finish for ``drain_timeout`` and then closes what is left.
"""

from __future__ import annotations

import dataclasses

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from l5dproxy.admin import admin_site
from l5dproxy.balance import Upstream
from l5dproxy.config import Config
from l5dproxy.http.h1 import h1_handler
from l5dproxy.http.h1client import H1Client
from l5dproxy.http.h2 import H2Client, H2Settings, h2_handler
from l5dproxy.http.proxy import HttpProxy
from l5dproxy.listener import Listener
from l5dproxy.serverfirst import OpaqueMemory, OpaqueResource, ServerFirst
from l5dproxy.telemetry import Metrics

log = Logger(namespace="l5dproxy.service")


class StartupError(SystemExit):
    """A start-up failure worth one line to the operator, not a traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"l5dproxy: {message}")


class ProxyService(Service):
    """Owns the listeners, the admin server and the metrics of one config."""

    def __init__(self, config: Config, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.reactor = reactor
        self.metrics = Metrics()
        self.upstreams = {
            name: Upstream(service, config.detect.opaque_ports)
            for name, service in config.services.items()
        }
        self.server_first = ServerFirst(
            OpaqueMemory(reactor, config.detect.learned_max, config.detect.learned_ttl),
            config.detect.client_silence)
        # HTTP: one dispatcher for every listener; codec ends register here.
        self.http = HttpProxy(self.upstreams, self.metrics, reactor)
        h2_settings = H2Settings(**dataclasses.asdict(config.h2))
        self.http.clients["h2"] = H2Client(reactor, settings=h2_settings, metrics=self.metrics,
                                           target_of=self.http.target_of)
        self.handlers = {"h2": h2_handler(self.http, h2_settings)}
        self.http.clients["http1"] = H1Client(reactor, self.metrics, self.http.target_of,
                                              max_idle=config.http.pool_max_idle)
        self.handlers["http1"] = h1_handler(self.http, config.http.max_request_line,
                                            config.http.max_header_bytes)
        self.listeners = [
            Listener(lc, config.detect, self.upstreams, self.metrics, reactor,
                     log_connections=config.proxy.log_connections,
                     server_first=self.server_first, handlers=self.handlers)
            for lc in config.listeners
        ]
        self.ports: dict[str, IListeningPort] = {}
        self.admin_port: IListeningPort | None = None
        self.ready = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self.bind()

    def startService(self) -> None:
        if not self.ports and self.listeners:
            self.bind()
        super().startService()

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
                              {b"opaque": OpaqueResource(self.server_first)})
            self.admin_port = self._listen("admin", self.config.admin.listen, site)
            log.info("admin on {address}", address=_port_address(self.admin_port))
        except StartupError:
            self._unbind()
            raise
        self.ready = True

    def _listen(self, what: str, description: str, factory) -> IListeningPort:
        endpoint = serverFromString(self.reactor, description)
        result = []
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
        return self.ports[listener_name].getHost().port

    @defer.inlineCallbacks
    def stopService(self):
        """Stop accepting, drain open connections, then close the rest."""
        super().stopService()
        self.ready = False
        yield defer.gatherResults(
            [defer.maybeDeferred(p.stopListening) for p in self.ports.values()])
        self.ports.clear()
        open_connections = [c for listener in self.listeners for c in listener.connections]
        if open_connections:
            log.info("draining {n} connections for up to {timeout} s",
                     n=len(open_connections), timeout=self.config.proxy.drain_timeout)
            yield self._drain(self.config.proxy.drain_timeout)
        if self.admin_port is not None:
            yield defer.maybeDeferred(self.admin_port.stopListening)
            self.admin_port = None

    def _drain(self, timeout: float) -> defer.Deferred:
        """Fires when every connection has closed, aborting stragglers at ``timeout``."""
        done = defer.Deferred()
        deadline = self.reactor.seconds() + timeout

        def check() -> None:
            remaining = [c for listener in self.listeners for c in listener.connections]
            if not remaining:
                done.callback(None)
            elif self.reactor.seconds() >= deadline:
                log.info("drain timeout: closing {n} connections", n=len(remaining))
                for conn in remaining:
                    conn.transport.abortConnection()
                    conn.listener.connections.discard(conn)
                done.callback(None)
            else:
                self.reactor.callLater(min(0.05, timeout), check)

        for conn in [c for listener in self.listeners for c in listener.connections]:
            conn.drain()
        check()
        return done


def _port_address(port: IListeningPort) -> str:
    address = port.getHost()
    host = getattr(address, "host", None)
    return f"{host}:{address.port}" if host is not None else str(address)
