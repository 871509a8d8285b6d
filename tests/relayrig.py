"""An opaque relay on loopback, in the test's own reactor (test_tcp, test_splice)."""

from __future__ import annotations

from twisted.internet import protocol, reactor

from l5dproxy.app.listeners import build_listener
from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import DetectConfig, HostPort, ListenerConfig, ServiceConfig
from l5dproxy.telemetry import Metrics


def start_opaque_relay(testcase, server_protocol, server_tls=None, tls=None) -> None:
    """A server on 127.0.0.1 port 0 and an opaque listener in front of it.

    Sets on ``testcase``: ``servers`` (every server protocol built, in
    order), ``metrics``, ``listener`` and ``proxy_port``; both ports stop
    listening at cleanup. With ``server_tls`` (server TLS options) the server
    speaks TLS, and ``tls`` (a ``ServiceTlsConfig``) is the service's.
    """
    testcase.servers = []

    def build():
        p = server_protocol()
        testcase.servers.append(p)
        return p

    factory = protocol.Factory.forProtocol(build)
    if server_tls is not None:
        server_port = reactor.listenSSL(0, factory, server_tls, interface="127.0.0.1")
    else:
        server_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    testcase.addCleanup(server_port.stopListening)
    testcase.metrics = Metrics()
    service = ServiceConfig("app", (HostPort("127.0.0.1", server_port.getHost().port),),
                            tls=tls)
    detect = DetectConfig()
    testcase.listener = build_listener(ListenerConfig("in", "tcp:0", "app", opaque=True), detect,
                                       {"app": BackendSet(service, detect.opaque_ports)},
                                       testcase.metrics, reactor, log_connections=False)
    proxy_port = reactor.listenTCP(0, testcase.listener, interface="127.0.0.1")
    testcase.addCleanup(proxy_port.stopListening)
    testcase.proxy_port = proxy_port.getHost().port
