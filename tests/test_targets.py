"""Typed per-request targets: each service's own pools, timeouts and labels.

The dispatcher hands the client end the routed service's ``Target`` with
every request; pools are per (service, endpoint). Two services whose
endpoints share an address get a connection each, dialled with each one's
``connect_timeout``, closed at each one's ``idle_timeout`` and labelled
with each one's name; a reload reaches the pools that exist; HTTP/2
upstream connections honour ``idle_timeout`` too (GOAWAY, then close).

The proxy is the production one (``ProxyService`` from a config file, its
``HttpProxy`` and real client ends) on a MemoryReactorClock; the endpoints
are fakes written here (HTTP/1 bytes, an ``h2`` server connection).
"""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, RequestReceived
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.app.service import ProxyService
from l5dproxy.app.sites import http_site
from l5dproxy.config.model import ListenerConfig, RouteConfig
from l5dproxy.config.parse import load
from l5dproxy.exchange.contracts import RequestContext
from l5dproxy.exchange.message import Body, Request, RequestHead
from tests.fakes import FakeConnection, FakeListener, Transport, dispatch
from tests.support import build_config, write_config

ADDRESS = "127.0.0.1:8080"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


def services(protocol: str | None = None, **timeouts: tuple[float, float]) -> dict:
    """``[service.NAME]`` tables, every one on ``ADDRESS``: ``a=(connect, idle)``."""
    tables = {}
    for name, (connect, idle) in timeouts.items():
        table = {"endpoints": [ADDRESS], "connect_timeout": connect, "idle_timeout": idle,
                 "retry_limit": 0}
        if protocol is not None:
            table["protocol"] = protocol
        tables[name] = table
    return tables


class TargetRig(SynchronousTestCase):
    """A ``ProxyService`` without listeners; requests go to its dispatcher
    from a listener routing ``b.test`` to service ``b``, anything else to
    ``a``. ``self.clock.tcpClients`` are the client ends' dials."""

    protocol = "http1"

    def start(self, tables: dict) -> None:
        self.path = write_config(self, build_config([], tables))
        self.clock = MemoryReactorClock()
        self.service = ProxyService(load(self.path), reactor=self.clock)
        self.listener = FakeListener(config=ListenerConfig(
            "in", "tcp:0", "a", routes=(RouteConfig("b", host="b.test"),)))
        self.accepted = 0

    def reload(self, tables: dict) -> None:
        with open(self.path, "w") as f:
            f.write(build_config([], tables))
        self.assertTrue(self.service.reload(self.path))

    def get(self, host: bytes):
        head = RequestHead(b"GET", b"/", host, [], version="2" if self.protocol == "h2" else "1.1")
        context = RequestContext(http_site(self.listener), FakeConnection(), self.protocol)
        return dispatch(self.service.http, Request(head, Body.empty()), context)

    def dial_timeouts(self) -> list[float]:
        return [timeout for _host, _port, _factory, timeout, _bind in self.clock.tcpClients]

    def opened(self, service: str) -> float | None:
        """``tcp_open_total{peer="dst", service=...}`` to ADDRESS."""
        return self.service.metrics.registry.get_sample_value("tcp_open_total", {
            "direction": "inbound", "peer": "dst", "listener": "", "service": service,
            "protocol": self.protocol, "target_addr": ADDRESS})

    # -- HTTP/1 endpoints --

    def accept_h1(self):
        """The next dial, connected to a fake HTTP/1 endpoint."""
        self.assertGreater(len(self.clock.tcpClients), self.accepted,
                           "no new connection was dialled")
        factory = self.clock.tcpClients[self.accepted][2]
        self.accepted += 1
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def served_h1(self, host: bytes):
        """One request to ``host`` on a new connection, answered: the
        connection (idle in its pool now) and its transport."""
        d = self.get(host)
        protocol, transport = self.accept_h1()
        protocol.dataReceived(OK)
        self.assertEqual(self.successResultOf(d).head.status, 200)
        return protocol, transport

    # -- h2 endpoints --

    def accept_h2(self) -> dict:
        """The next dial, connected to a fake h2 endpoint (an h2 server
        connection); its events so far in ``["events"]``."""
        self.assertGreater(len(self.clock.tcpClients), self.accepted,
                           "no new connection was dialled")
        factory = self.clock.tcpClients[self.accepted][2]
        self.accepted += 1
        protocol = factory.buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        server.initiate_connection()
        end = {"server": server, "protocol": protocol, "transport": transport, "events": [],
               "answered": set()}
        self.pump(end)
        return end

    def pump(self, end: dict) -> list:
        server, transport, protocol = end["server"], end["transport"], end["protocol"]
        events = []
        for _ in range(20):
            out = transport.take()
            if out:
                events.extend(server.receive_data(out))
            back = server.data_to_send()
            if back and not protocol._lost:
                protocol.dataReceived(back)
            if not out and not back:
                break
        end["events"].extend(events)
        return events

    def respond_h2(self, end: dict) -> None:
        """Answer every request the endpoint has received and not answered."""
        for event in end["events"]:
            if isinstance(event, RequestReceived) and event.stream_id not in end["answered"]:
                end["answered"].add(event.stream_id)
                end["server"].send_headers(event.stream_id, [(b":status", b"200")],
                                           end_stream=True)
        self.pump(end)

    def served_h2(self, host: bytes, end: dict | None = None) -> dict:
        d = self.get(host)
        if end is None:
            end = self.accept_h2()
        self.pump(end)
        self.respond_h2(end)
        self.assertEqual(self.successResultOf(d).head.status, 200)
        return end

    def goaways(self, end: dict) -> list[int]:
        """The error codes of the GOAWAYs the endpoint has received."""
        self.pump(end)
        return [e.error_code for e in end["events"] if isinstance(e, ConnectionTerminated)]


class SharedAddressTests(TargetRig):
    """Two services on one address: ``a`` (connect 1 s, idle 2 s) and ``b``
    (connect 3 s, idle 20 s). Before targets, ``b`` reused ``a``'s
    connection (HTTP/1) or flipped the pool's settings (h2): one dial with
    ``a``'s timeout, everything labelled ``a``, h2 never idle-closed."""

    def test_h1_two_services_one_address(self) -> None:
        self.start(services(a=(1, 2), b=(3, 20)))
        _, a = self.served_h1(b"a.test")
        _, b = self.served_h1(b"b.test")   # a's connection is idle: not b's to take
        self.assertEqual(self.dial_timeouts(), [1.0, 3.0])
        self.clock.advance(2)
        self.assertEqual((a.disconnecting, b.disconnecting), (True, False))
        self.clock.advance(17.9)
        self.assertFalse(b.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(b.disconnecting)
        self.assertEqual((self.opened("a"), self.opened("b")), (1, 1))

    def test_h2_two_services_one_address(self) -> None:
        self.protocol = "h2"
        self.start(services("h2", a=(1, 2), b=(3, 20)))
        a = self.served_h2(b"a.test")
        b = self.served_h2(b"b.test")
        self.assertEqual(self.dial_timeouts(), [1.0, 3.0])
        self.clock.advance(2)
        self.assertEqual(self.goaways(a), [ErrorCodes.NO_ERROR])
        self.assertEqual(self.goaways(b), [])
        self.assertTrue(a["transport"].disconnecting)
        self.assertFalse(b["transport"].disconnecting)
        self.clock.advance(18)
        self.assertEqual(self.goaways(b), [ErrorCodes.NO_ERROR])
        self.assertTrue(b["transport"].disconnecting)
        self.assertEqual((self.opened("a"), self.opened("b")), (1, 1))


class ReloadTargetTests(TargetRig):
    """A reload changing ``connect_timeout``/``idle_timeout`` reaches the
    pools that exist (before, HTTP/1 pools kept their first settings for
    good); a removed service's idle connections close."""

    def test_reload_reaches_existing_h1_pool(self) -> None:
        self.start(services(a=(5, 60), b=(5, 60)))
        a_protocol, a = self.served_h1(b"a.test")
        _, b = self.served_h1(b"b.test")
        self.clock.advance(10)
        self.reload(services(a=(2, 1)))             # b removed
        self.assertTrue(b.disconnecting)             # its idle connection: closed now
        self.assertTrue(a.disconnecting)             # idle 10 s: the new 1 s is over
        a_protocol.connectionLost(Failure(ConnectionDone()))
        self.served_h1(b"a.test")
        self.assertEqual(self.dial_timeouts(), [5.0, 5.0, 2.0])

    def test_reload_shortens_the_wait_of_a_recently_idle_h1_connection(self) -> None:
        self.start(services(a=(5, 60)))
        _, a = self.served_h1(b"a.test")
        self.reload(services(a=(5, 1)))
        self.clock.advance(0.9)
        self.assertFalse(a.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(a.disconnecting)

    def test_reload_reaches_existing_h2_pool(self) -> None:
        self.protocol = "h2"
        self.start(services("h2", a=(5, 60), b=(5, 60)))
        a = self.served_h2(b"a.test")
        b = self.served_h2(b"b.test")
        self.reload(services("h2", a=(2, 1)))        # b removed
        self.clock.advance(0)
        self.assertEqual(self.goaways(b), [ErrorCodes.NO_ERROR])
        self.assertEqual(self.goaways(a), [])
        self.clock.advance(0.9)
        self.assertEqual(self.goaways(a), [])
        self.clock.advance(0.1)
        self.assertEqual(self.goaways(a), [ErrorCodes.NO_ERROR])
        self.assertTrue(a["transport"].disconnecting)
        a["protocol"].connectionLost(Failure(ConnectionDone()))
        self.served_h2(b"a.test")
        self.assertEqual(self.dial_timeouts(), [5.0, 5.0, 2.0])


class H2IdleTests(TargetRig):
    """HTTP/2 upstream connections honour ``idle_timeout``: counted from
    the end of the last stream, never while a stream is open."""

    protocol = "h2"

    def test_busy_connection_is_never_idle_closed(self) -> None:
        self.start(services("h2", a=(5, 2)))
        d = self.get(b"a.test")
        end = self.accept_h2()
        self.clock.advance(10)                       # the stream is open all along
        self.assertEqual(self.goaways(end), [])
        self.assertFalse(end["transport"].disconnecting)
        self.respond_h2(end)
        self.assertEqual(self.successResultOf(d).head.status, 200)
        self.clock.advance(1.9)
        self.assertEqual(self.goaways(end), [])
        self.clock.advance(0.1)
        self.assertEqual(self.goaways(end), [ErrorCodes.NO_ERROR])
        self.assertTrue(end["transport"].disconnecting)

    def test_idle_time_counts_from_the_last_stream(self) -> None:
        """A stream between arming and expiry: the connection is closed
        ``idle_timeout`` after that stream ended, not before."""
        self.start(services("h2", a=(5, 2)))
        end = self.served_h2(b"a.test")
        self.clock.advance(1.5)
        self.served_h2(b"a.test", end)               # the same connection
        self.assertEqual(len(self.clock.tcpClients), 1)
        self.clock.advance(1.9)
        self.assertEqual(self.goaways(end), [])
        self.clock.advance(0.1)
        self.assertEqual(self.goaways(end), [ErrorCodes.NO_ERROR])

    def test_idle_closed_connection_is_not_used_again(self) -> None:
        self.start(services("h2", a=(5, 2)))
        end = self.served_h2(b"a.test")
        self.clock.advance(2)
        self.assertTrue(end["transport"].disconnecting)
        d = self.get(b"a.test")                      # before the close completes
        self.assertEqual(len(self.clock.tcpClients), 2)
        end["protocol"].connectionLost(Failure(ConnectionDone()))
        second = self.accept_h2()
        self.respond_h2(second)
        self.assertEqual(self.successResultOf(d).head.status, 200)
