"""Canaries for the private and undocumented library names l5dproxy relies on.

A library may change or drop a private name (a leading underscore) in any
release: Twisted's compatibility policy says so outright ("Private Changes"),
and h2 and prometheus-client promise nothing for theirs. l5dproxy uses a
few, each for a measured reason; this module is the one list of them. Each
test names the library, its installed version, the name and the l5dproxy
module that uses it, and fails if the name is gone, changed its signature or
no longer means what the user assumes (checked by driving the library object
itself, not ours). When one fails after an upgrade, fix the user named in
the message (or drop the shortcut) before widening the upper bound in
setup.cfg. ``.ci/newest`` runs the suite against the newest releases.

Users today:

* Twisted: ``l5dproxy/net/batchsend.py`` (``FileDescriptor._tempDataBuffer``,
  ``_tempDataLen``, ``_writeDisconnecting``, ``_maybePauseProducer``, and the
  undocumented ``dataBuffer``, ``offset``, ``TLS``, ``socket``),
  ``l5dproxy/net/splice.py`` (``dataBuffer``, ``offset``, ``_tempDataLen``,
  ``_writeDisconnecting``), ``l5dproxy/net/dns.py`` (overrides
  ``twisted.names.client.Resolver._connectedProtocol``, reads its ``_reactor``,
  cancels its ``_parseCall``), ``l5dproxy/net/listening.py`` (reads a server
  endpoint's ``_port``), ``l5dproxy/net/transport.py`` (``switch_protocol``:
  protocol switching by assigning ``transport.protocol``, as Twisted's own
  ``_GenericHTTPChannelProtocol`` does), ``app/service.py`` (a reload swaps a
  listening port's ``factory``, which ``IListeningPort`` does not declare).
* h2: ``l5dproxy/http/h2/connection.py`` (overrides ``H2Connection._begin_new_stream``,
  ``_receive_frame``, ``_receive_goaway_frame``, ``_open_streams`` and
  ``_get_or_create_stream``, and ``H2Stream._initialize_content_length`` and
  ``_build_hdr_validation_flags``; calls ``_inbound_flow_control_window_manager``,
  ``_prepare_for_sending``, ``_frame_dispatch_table``, ``_stream_is_closed_by_reset``
  and ``_end``; reads ``StreamClosedError._events`` and ``H2Stream.state_machine``;
  sizes ``_closed_streams`` by setting ``MAX_CLOSED_STREAMS`` on the instance;
  reads ``state_machine.state`` and ``h2.connection.ConnectionState``);
  ``l5dproxy/http/h2/translate.py`` (uses
  ``h2.utilities.CONNECTION_HEADERS``).
* Twisted: ``l5dproxy/accept/proxyproto.py`` (the PROXY protocol parsers
  ``twisted.protocols.haproxy._v1parser.V1Parser.parse``,
  ``_v2parser.V2Parser.parse`` and ``_exceptions.InvalidProxyHeader``: the
  package's one public name, ``proxyEndpoint``, wraps a whole listening
  endpoint and cannot do ``optional``, a timeout or protocol switching).
* Twisted: ``l5dproxy/net/eventloop.py`` (replaces ``EPollReactor.doPoll`` on
  the running reactor with a copy of its loop that calls ``_doReadOrWrite``
  without ``log.callWithLogger``; reads ``_poller`` and ``_selectables``).
* prometheus-client: ``l5dproxy/telemetry.py`` (``PendingHistogram`` adds to a
  histogram child's ``_buckets`` and ``_sum``).
"""

from __future__ import annotations

import inspect
import ipaddress
import socket
from importlib.metadata import version

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import Event
from hyperframe.frame import GoAwayFrame, WindowUpdateFrame
from prometheus_client import CollectorRegistry, Histogram
from twisted.internet import abstract, defer, tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import ClientCreator, DatagramProtocol, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import formatEvent, globalLogPublisher
from twisted.names import client, dns
from twisted.trial import unittest


def _where(dist: str, name: str, user: str) -> str:
    return f"{dist} {version(dist)}: {name} (used by {user})"


class _Canary(unittest.TestCase):
    def require(self, condition: bool, dist: str, name: str, user: str, what: str) -> None:
        if not condition:
            self.fail(f"{_where(dist, name, user)} {what}")

    def require_attr(self, owner: object, attr: str, dist: str, qualname: str,
                     user: str) -> None:
        self.require(hasattr(owner, attr), dist, qualname, user, "is gone")

    def require_params(self, func: object, params: list[str], dist: str, qualname: str,
                       user: str) -> None:
        if func is None:
            self.fail(f"{_where(dist, qualname, user)} is gone")
        got = list(inspect.signature(func).parameters)
        self.require(got == params, dist, qualname, user,
                     f"changed signature: parameters {got}, expected {params}")


class _Sink(Protocol):
    def __init__(self) -> None:
        self.data = b""

    def dataReceived(self, data: bytes) -> None:
        self.data += data


class TwistedTransportInternalsTests(_Canary):
    """``twisted.internet.tcp.Connection`` as net/batchsend.py and net/splice.py use it."""

    def _connection(self) -> tuple[tcp.Connection, socket.socket, _Sink]:
        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        peer.settimeout(5)
        sink = _Sink()
        conn = tcp.Connection(ours, sink, MemoryReactor())
        conn.connected = 1
        return conn, peer, sink

    def test_write_buffers_exist(self) -> None:
        conn, _, _ = self._connection()
        user = "l5dproxy/net/batchsend.py, l5dproxy/net/splice.py"
        fd = "twisted.internet.abstract.FileDescriptor"
        for attr, kind in (("_tempDataBuffer", list), ("_tempDataLen", int),
                           ("_writeDisconnecting", bool), ("dataBuffer", bytes),
                           ("offset", int), ("TLS", bool)):
            self.require_attr(conn, attr, "Twisted", f"{fd}.{attr}", user)
            value = getattr(conn, attr)
            self.require(isinstance(value, kind), "Twisted", f"{fd}.{attr}", user,
                         f"is a {type(value).__name__}, not a {kind.__name__}")
        self.assertEqual((conn._tempDataBuffer, conn._tempDataLen, conn.dataBuffer, conn.offset,
                          conn._writeDisconnecting, conn.TLS), ([], 0, b"", 0, False, False))
        self.require(conn.socket is conn.getHandle(), "Twisted",
                     "twisted.internet.tcp.Connection.socket", "l5dproxy/net/batchsend.py",
                     "is not the connection's socket")

    def test_write_appends_to_the_temporary_buffer(self) -> None:
        """net/splice.py counts unsent bytes as ``len(dataBuffer) - offset +
        _tempDataLen``; net/batchsend.py queues into ``_tempDataBuffer`` as
        ``write`` does, so a later ``write`` keeps the order."""
        conn, _, _ = self._connection()
        conn.write(b"abc")
        conn.write(b"de")
        self.require(conn._tempDataBuffer == [b"abc", b"de"] and conn._tempDataLen == 5,
                     "Twisted", "twisted.internet.abstract.FileDescriptor.write",
                     "l5dproxy/net/batchsend.py",
                     f"no longer queues into _tempDataBuffer/_tempDataLen "
                     f"(got {conn._tempDataBuffer!r}, {conn._tempDataLen!r})")
        self.assertEqual(len(conn.dataBuffer) - conn.offset + conn._tempDataLen, 5)

    def test_do_write_sends_what_was_queued_in_the_temporary_buffer(self) -> None:
        """What net/batchsend.py puts in ``_tempDataBuffer`` and leaves to
        Twisted (``startWriting``) is sent, in order, by ``doWrite``."""
        conn, peer, _ = self._connection()
        conn.write(b"first ")
        conn._tempDataBuffer.append(b"second")
        conn._tempDataLen += len(b"second")
        conn.doWrite()
        got = b""
        while len(got) < 12:
            got += peer.recv(64)
        self.require(got == b"first second", "Twisted",
                     "twisted.internet.abstract.FileDescriptor._tempDataBuffer",
                     "l5dproxy/net/batchsend.py", f"is not what doWrite sends (peer got {got!r})")
        self.assertEqual((conn._tempDataLen, len(conn.dataBuffer) - conn.offset), (0, 0))

    def test_maybe_pause_producer(self) -> None:
        user = "l5dproxy/net/batchsend.py"
        name = "twisted.internet.abstract.FileDescriptor._maybePauseProducer"
        self.require_params(getattr(abstract.FileDescriptor, "_maybePauseProducer", None),
                            ["self"], "Twisted", name, user)
        conn, _, _ = self._connection()

        class Producer:
            paused = False

            def pauseProducing(self) -> None:
                self.paused = True

            def resumeProducing(self) -> None:
                self.paused = False

            def stopProducing(self) -> None:
                pass

        producer = Producer()
        conn.registerProducer(producer, True)
        conn._tempDataBuffer.append(b"x" * (conn.bufferSize + 1))
        conn._tempDataLen += conn.bufferSize + 1
        conn._maybePauseProducer()
        self.require(producer.paused, "Twisted", name, user,
                     "no longer pauses a streaming producer over a full buffer")

    def test_write_disconnecting_set_by_lose_write_connection(self) -> None:
        conn, _, _ = self._connection()
        conn.loseWriteConnection()
        self.require(conn._writeDisconnecting is True, "Twisted",
                     "twisted.internet.abstract.FileDescriptor._writeDisconnecting",
                     "l5dproxy/net/batchsend.py, l5dproxy/net/splice.py",
                     "is not set by loseWriteConnection")

    def test_protocol_switch_by_assignment(self) -> None:
        """net/transport.py hands a connection to another protocol by assigning
        ``transport.protocol``; later reads must reach the new one."""
        conn, peer, first = self._connection()
        second = _Sink()
        conn.protocol = second
        peer.sendall(b"after the switch")
        conn.doRead()
        self.require(second.data == b"after the switch" and first.data == b"", "Twisted",
                     "twisted.internet.tcp.Connection.protocol",
                     "l5dproxy/net/transport.py (switch_protocol)",
                     "assigned no longer receives what doRead reads")


class TwistedHAProxyParserTests(_Canary):
    """``twisted.protocols.haproxy``'s parsers as l5dproxy/accept/proxyproto.py
    calls them: a class method ``parse(header)`` returning an object with
    ``source`` and ``destination`` addresses, raising ``InvalidProxyHeader``."""

    user = "l5dproxy/accept/proxyproto.py"

    def test_v1_parse(self) -> None:
        from twisted.internet.address import IPv4Address
        from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
        from twisted.protocols.haproxy._v1parser import V1Parser

        info = V1Parser.parse(b"PROXY TCP4 192.0.2.1 192.0.2.2 1000 80")
        self.require(info.source == IPv4Address("TCP", "192.0.2.1", 1000)
                     and info.destination == IPv4Address("TCP", "192.0.2.2", 80),
                     "Twisted", "twisted.protocols.haproxy._v1parser.V1Parser.parse",
                     self.user, "no longer gives the source and destination addresses")
        with self.assertRaises(InvalidProxyHeader):
            V1Parser.parse(b"PROXY TCP9 x")

    def test_v2_parse(self) -> None:
        from twisted.internet.address import IPv6Address
        from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
        from twisted.protocols.haproxy._v2parser import V2Parser

        header = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x21\x00\x24" + b"\x00" * 15 + b"\x01"
                  + b"\x00" * 15 + b"\x02" + b"\x03\xe8\x00\x50")
        info = V2Parser.parse(header)
        # (Twisted writes IPv6 uncompressed, "0:0:0:0:0:0:0:1"; proxyproto.py
        # makes every address canonical.)
        self.require(isinstance(info.source, IPv6Address)
                     and ipaddress.ip_address(info.source.host) == ipaddress.ip_address("::1")
                     and info.source.port == 1000 and info.destination.port == 80,
                     "Twisted", "twisted.protocols.haproxy._v2parser.V2Parser.parse",
                     self.user, "no longer gives the source and destination addresses")
        local = V2Parser.parse(b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00")
        self.require(local.source is None, "Twisted",
                     "twisted.protocols.haproxy._v2parser.V2Parser.parse", self.user,
                     "a LOCAL command no longer gives no source address")
        with self.assertRaises(InvalidProxyHeader):
            V2Parser.parse(b"\r\n\r\n\x00\r\nQUIT\n\x10\x00\x00\x00")


class TwistedPortInternalsTests(_Canary):
    """A listening ``tcp.Port`` as app/service.py's reload (``_swap_factory``) uses it."""

    @defer.inlineCallbacks
    def test_swapped_factory_builds_the_next_connection(self):
        from twisted.internet import reactor

        built: defer.Deferred[None] = defer.Deferred()

        class Second(Factory):
            protocol = Protocol

            def buildProtocol(self, addr):
                if not built.called:
                    built.callback(None)
                return super().buildProtocol(addr)

        first = Factory.forProtocol(Protocol)
        port = reactor.listenTCP(0, first, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        name = "twisted.internet.tcp.Port.factory"
        self.require(getattr(port, "factory", None) is first, "Twisted", name,
                     "l5dproxy/app/service.py", "is not the factory the port was made with")
        port.factory = Second()
        client = yield ClientCreator(reactor, Protocol).connectTCP(
            "127.0.0.1", port.getHost().port)
        self.addCleanup(client.transport.loseConnection)
        try:
            yield built.addTimeout(10, reactor)
        except defer.TimeoutError:
            self.fail(f"{_where('Twisted', name, 'l5dproxy/app/service.py')} assigned does not "
                      f"build the next connection's protocol")


class TwistedNamesInternalsTests(_Canary):
    """``twisted.names.client.Resolver`` as l5dproxy/net/dns.py subclasses and stops it."""

    user = "l5dproxy/net/dns.py"

    @defer.inlineCallbacks
    def test_quiet_resolver_answers_without_logging_each_query_protocol(self):
        """A query goes through ``_connectedProtocol`` (so the override makes
        each query's protocol), built on ``_reactor``: answered, and no
        "Starting protocol"/"Stopping protocol" line per query (stock Twisted
        logs both; the UDP port's own "... starting on PORT" line stays)."""
        from twisted.internet import reactor

        from l5dproxy.net.dns import QuietResolver

        name = "twisted.names.client.Resolver._connectedProtocol"
        self.require_params(getattr(client.Resolver, "_connectedProtocol", None),
                            ["self", "interface"], "Twisted", name, self.user)

        class Server(DatagramProtocol):
            def datagramReceived(self, data, addr):
                query = dns.Message()
                query.fromStr(data)
                answer = dns.Message(id=query.id, answer=1)
                answer.queries = query.queries
                answer.answers = [dns.RRHeader(query.queries[0].name.name, ttl=60,
                                               payload=dns.Record_A("127.0.0.9", 60))]
                self.transport.write(answer.toStr(), addr)

        server = reactor.listenUDP(0, Server(), interface="127.0.0.1")
        self.addCleanup(server.stopListening)
        made: list[dns.DNSDatagramProtocol] = []
        stopped: list[defer.Deferred[None]] = []

        class Recording(QuietResolver):
            def _connectedProtocol(self, interface=""):
                proto = super()._connectedProtocol(interface)
                made.append(proto)
                port = proto.transport
                stop = port.stopListening  # the resolver stops it after the answer
                port.stopListening = lambda: stopped.append(stop()) or stopped[-1]
                return proto

        logged: list[str] = []

        def observe(event):
            text = formatEvent(event)
            if text.startswith(("Starting protocol", "Stopping protocol")):
                logged.append(text)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        resolver = Recording(servers=[("127.0.0.1", server.getHost().port)], reactor=reactor)
        answers, _, _ = yield resolver.lookupAddress("canary.test", timeout=[5])
        yield defer.gatherResults(stopped)
        self.require([a.payload.dottedQuad() for a in answers] == ["127.0.0.9"], "Twisted",
                     name, self.user, f"answered {answers!r}")
        self.require(len(made) >= 1 and getattr(made[0], "_reactor", None) is reactor,
                     "Twisted", name, self.user,
                     f"was not called for a query (made {made!r}), or _reactor is gone")
        self.require(logged == [], "Twisted", name, self.user,
                     f"overridden, still logs each query's protocol: {logged!r}")

    def test_parse_call_is_the_resolv_conf_timer(self) -> None:
        """A resolver reading resolv.conf keeps its re-read timer as
        ``_parseCall``: ``stop_resolver`` cancels it, leaving no call behind."""
        from l5dproxy.net.dns import stop_resolver

        path = self.mktemp()
        with open(path, "w") as f:
            f.write("nameserver 127.0.0.1\n")
        clock = Clock()
        resolver = client.Resolver(resolv=path, reactor=clock)
        name = "twisted.names.client.Resolver._parseCall"
        self.require(getattr(resolver, "_parseCall", None) in clock.getDelayedCalls(), "Twisted",
                     name, self.user, "is not the scheduled resolv.conf re-read")
        stop_resolver(resolver)
        self.require(clock.getDelayedCalls() == [], "Twisted", name, self.user,
                     f"cancelled, still leaves {clock.getDelayedCalls()!r}")


class TwistedEndpointInternalsTests(_Canary):
    """A parsed server endpoint's port, as l5dproxy/net/listening.py reads it."""

    def test_out_of_range_tcp_port_is_kept_as_port(self) -> None:
        from l5dproxy.net.listening import server_endpoint_port

        for text, expected in (("tcp:70000", 70000), ("tcp6:70000", 70000),
                               ("tcp:8080:interface=127.0.0.1", 8080)):
            endpoint = serverFromString(MemoryReactor(), text)
            port = server_endpoint_port(endpoint)
            self.require(port == expected, "Twisted",
                         f"{type(endpoint).__module__}.{type(endpoint).__name__}._port",
                         "l5dproxy/net/listening.py",
                         f"read {port!r} from {text!r}, not {expected}: the config check "
                         f"would let an out-of-range port through to bind")


class H2InternalsTests(_Canary):
    """h2's ``H2Connection`` as l5dproxy/http/h2/connection.py subclasses and drives it."""

    user = "l5dproxy/http/h2/connection.py"

    @staticmethod
    def _pair(cls: type[H2Connection]) -> tuple[H2Connection, H2Connection]:
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        server = cls(H2Configuration(client_side=False, header_encoding=None))
        client.initiate_connection()
        server.initiate_connection()
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
        return client, server

    def test_frame_handler_signatures(self) -> None:
        for name in ("_receive_goaway_frame", "_prepare_for_sending"):
            self.require_params(getattr(H2Connection, name, None),
                                ["self", "frames" if name == "_prepare_for_sending" else "frame"],
                                "h2", f"h2.connection.H2Connection.{name}", self.user)

    def test_our_subclass_overrides_only_names_h2_has(self) -> None:
        """Every private method ``ProxyH2Connection`` overrides still exists in
        h2 with the same parameters (else the override is silently dead)."""
        from l5dproxy.http.h2.connection import ProxyH2Connection

        for name, ours in vars(ProxyH2Connection).items():
            if not name.startswith("_") or name.startswith("__") or not callable(ours):
                continue
            theirs = getattr(H2Connection, name, None)
            self.require_params(theirs, list(inspect.signature(ours).parameters), "h2",
                                f"h2.connection.H2Connection.{name}", self.user)

    def test_overridden_frame_handlers_are_called(self) -> None:
        """h2 looks the handlers up on the instance, so a subclass's
        ``_receive_goaway_frame`` replaces h2's, and the events it returns are
        what ``receive_data`` returns."""
        seen: list[type] = []

        class Marker(Event):
            pass

        class Recording(H2Connection):
            def _receive_goaway_frame(self, frame):
                seen.append(type(frame))
                return [], [Marker()]

        client, server = self._pair(Recording)
        client.close_connection()
        events = server.receive_data(client.data_to_send())
        self.require(GoAwayFrame in seen and isinstance(events[-1], Marker), "h2",
                     "h2.connection.H2Connection._receive_goaway_frame", self.user,
                     "override is not called for a received GOAWAY frame")

    def test_receive_frame_sees_every_frame(self) -> None:
        """``_receive_frame(frame)`` is called once per received frame and
        returns its events: the abuse budget is told of each frame there."""
        from hyperframe.frame import PingFrame

        self.require_params(getattr(H2Connection, "_receive_frame", None),
                            ["self", "frame"], "h2",
                            "h2.connection.H2Connection._receive_frame", self.user)
        seen: list[tuple[type, int]] = []

        class Recording(H2Connection):
            def _receive_frame(self, frame):
                events = super()._receive_frame(frame)
                seen.append((type(frame), len(events)))
                return events

        client, server = self._pair(Recording)
        seen.clear()
        client.ping(b"12345678")
        client.ping(b"abcdefgh")
        server.receive_data(client.data_to_send())
        pings = [entry for entry in seen if entry[0] is PingFrame]
        self.require(pings == [(PingFrame, 1), (PingFrame, 1)], "h2",
                     "h2.connection.H2Connection._receive_frame", self.user,
                     f"saw {seen!r} for two PINGs")

    def test_content_length_tracking_is_ours(self) -> None:
        """``_begin_new_stream`` makes every stream (``H2Stream``), and
        ``H2Stream._initialize_content_length`` is where h2 takes a stream's
        content-length: stock h2 then refuses DATA past it (a connection
        error); with l5dproxy's ``ProxyH2Connection`` it does not (``Body``
        enforces the length, as a stream error)."""
        from h2.exceptions import ProtocolError
        from h2.stream import H2Stream

        from l5dproxy.http.h2.connection import ProxyH2Connection

        self.require_params(getattr(H2Connection, "_begin_new_stream", None),
                            ["self", "stream_id", "allowed_ids"], "h2",
                            "h2.connection.H2Connection._begin_new_stream", self.user)
        self.require_params(getattr(H2Stream, "_initialize_content_length", None),
                            ["self", "headers"], "h2",
                            "h2.stream.H2Stream._initialize_content_length", self.user)
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"),
                   (b":authority", b"a"), (b"content-length", b"2")]
        verdicts = []
        for cls in (H2Connection, ProxyH2Connection):
            client, server = self._pair(cls)
            client.send_headers(1, headers)
            client.send_data(1, b"four")
            try:
                server.receive_data(client.data_to_send())
            except ProtocolError:
                verdicts.append("refused")
            else:
                verdicts.append("passed")
            self.require(type(server.streams[1]).__mro__[-2] is H2Stream, "h2",
                         "h2.connection.H2Connection._begin_new_stream", self.user,
                         f"made a {type(server.streams[1])!r}")
        self.require(verdicts == ["refused", "passed"], "h2",
                     "h2.stream.H2Stream._initialize_content_length", self.user,
                     f"content-length verdicts stock/ours: {verdicts}")

    def test_connection_window_manager_and_prepare_for_sending(self) -> None:
        """``acknowledge_connection_data``: the connection window's manager
        gives the increment to send, ``_prepare_for_sending`` queues the frame."""
        client, server = self._pair(H2Connection)
        name = "h2.connection.H2Connection._inbound_flow_control_window_manager"
        self.require_attr(server, "_inbound_flow_control_window_manager", "h2", name,
                          self.user)
        manager = server._inbound_flow_control_window_manager
        self.require_params(getattr(manager, "process_bytes", None), ["size"], "h2",
                            f"{name}.process_bytes", self.user)
        client.send_headers(1, [(b":method", b"POST"), (b":scheme", b"http"),
                                (b":path", b"/"), (b":authority", b"a")])
        for _ in range(4):
            client.send_data(1, b"x" * 10000)
        server.receive_data(client.data_to_send())
        increment = manager.process_bytes(40000)
        self.require(isinstance(increment, int) and increment > 0, "h2", f"{name}.process_bytes",
                     self.user, f"returned {increment!r} for 40000 bytes of a 65535 window")
        frame = WindowUpdateFrame(0)
        frame.window_increment = increment
        server.data_to_send()
        server._prepare_for_sending([frame])
        self.require(server.data_to_send() == frame.serialize(), "h2",
                     "h2.connection.H2Connection._prepare_for_sending", self.user,
                     "does not queue the frame for data_to_send")

    def test_closed_stream_record_sized_by_max_closed_streams(self) -> None:
        """h2 records how closed streams ended in ``_closed_streams``, sized
        by ``MAX_CLOSED_STREAMS`` when ``__init__`` runs: ``ProxyH2Connection``
        sets it per instance to bound what a long-lived connection keeps
        (issue 17). If either name goes, the record is 65,536 again."""
        from l5dproxy.http.h2.connection import ProxyH2Connection

        qualname = "h2.connection.H2Connection.MAX_CLOSED_STREAMS/_closed_streams"
        self.require(isinstance(getattr(H2Connection, "MAX_CLOSED_STREAMS", None), int), "h2",
                     "h2.connection.H2Connection.MAX_CLOSED_STREAMS", self.user, "is gone")
        conn = ProxyH2Connection(H2Configuration(client_side=True, header_encoding=None), 8)
        self.require_attr(conn, "_closed_streams", "h2",
                          "h2.connection.H2Connection._closed_streams", self.user)
        peer = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        conn.initiate_connection()
        peer.initiate_connection()
        peer.receive_data(conn.data_to_send())
        conn.receive_data(peer.data_to_send())
        get = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
               (b":authority", b"a")]
        for _ in range(50):
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, get, end_stream=True)
            peer.receive_data(conn.data_to_send())
            peer.send_headers(sid, [(b":status", b"204")], end_stream=True)
            conn.receive_data(peer.data_to_send())
        conn.send_headers(conn.get_next_available_stream_id(), get)  # h2 drops the closed
        self.require(len(conn._closed_streams) == 8, "h2", qualname, self.user,
                     f"holds {len(conn._closed_streams)} of 50 closed streams, not the last 8")

    def test_methods_ours_repeat_are_unchanged(self) -> None:
        """``ProxyH2Connection`` does the work of h2's ``_receive_frame``,
        ``_open_streams`` and ``_get_or_create_stream`` itself (the same
        steps, less Python per frame and stream; tests/test_h2_shortcuts.py
        compares them frame by frame with the installed h2's), and drops
        ``H2Stream._build_hdr_validation_flags`` when no header check is on.
        A new h2 whose versions of these differ from 4.4.1's is to be read
        and the copies brought in line before this fingerprint is updated."""
        import hashlib

        from h2.stream import H2Stream

        pinned = {
            (H2Connection, "_receive_frame"): "39b2e16b4fd74ed0",
            (H2Connection, "_open_streams"): "28d9501144f0cee7",
            (H2Connection, "_get_or_create_stream"): "71d2c402157f2d50",
            (H2Stream, "_build_hdr_validation_flags"): "311e1970b3aa3e66",
        }
        for (owner, name), digest in pinned.items():
            qualname = f"{owner.__module__}.{owner.__name__}.{name}"
            method = getattr(owner, name, None)
            self.require(method is not None, "h2", qualname, self.user, "is gone")
            source = inspect.getsource(method).encode()
            got = hashlib.sha256(source).hexdigest()[:16]
            self.require(got == digest, "h2", qualname, self.user,
                         f"changed (source sha256 {got}, 4.4.1's {digest}): re-check the copy")

    def test_names_the_shortcuts_use(self) -> None:
        """What ``ProxyH2Connection._receive_frame`` and ``_open_streams``
        read: the frame dispatch table, how a stream was closed, the events a
        StreamClosedError carries, each stream's state as a ``StreamState``
        (an IntEnum 0-6)."""
        from h2.exceptions import StreamClosedError
        from h2.stream import StreamState
        from hyperframe.frame import HeadersFrame

        client, server = self._pair(H2Connection)
        table = getattr(server, "_frame_dispatch_table", None)
        self.require(isinstance(table, dict) and HeadersFrame in table, "h2",
                     "h2.connection.H2Connection._frame_dispatch_table", self.user,
                     f"is not a dict of frame classes to handlers: {table!r}")
        for name in ("_stream_is_closed_by_reset", "_stream_is_closed_by_end"):
            self.require_params(getattr(H2Connection, name, None), ["self", "stream_id"],
                                "h2", f"h2.connection.H2Connection.{name}", self.user)
        self.require(getattr(StreamClosedError(1), "_events", None) == [], "h2",
                     "h2.exceptions.StreamClosedError._events", self.user, "is not a list")
        self.require(sorted(StreamState) == list(range(7)), "h2", "h2.stream.StreamState",
                     self.user, f"is not 0-6: {sorted(StreamState)!r}")
        client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                (b":authority", b"a")], end_stream=True)
        server.receive_data(client.data_to_send())
        stream = server.streams[1]
        self.require(stream.state_machine.state is StreamState.HALF_CLOSED_REMOTE
                     and stream.open, "h2", "h2.stream.H2Stream.state_machine.state",
                     self.user, f"is {stream.state_machine.state!r} for a request received")
        server.reset_stream(1)
        self.require(stream.state_machine.state is StreamState.CLOSED and stream.closed
                     and server._stream_is_closed_by_reset(1), "h2",
                     "h2.stream.H2Stream.state_machine.state", self.user,
                     f"is {stream.state_machine.state!r} for a stream reset")

    def test_undocumented_names(self) -> None:
        import h2.connection
        import h2.utilities

        state_user = "l5dproxy/http/h2/connection.py"
        headers_user = "l5dproxy/http/h2/translate.py"
        for module, name, user in ((h2.connection, "ConnectionState", state_user),
                                   (h2.utilities, "CONNECTION_HEADERS", headers_user)):
            self.require_attr(module, name, "h2", f"{module.__name__}.{name}", user)
        self.require_attr(h2.connection.ConnectionState, "CLOSED", "h2",
                          "h2.connection.ConnectionState.CLOSED", state_user)
        self.require(b"connection" in h2.utilities.CONNECTION_HEADERS
                     and b"te" not in h2.utilities.CONNECTION_HEADERS, "h2",
                     "h2.utilities.CONNECTION_HEADERS", headers_user, "changed its members")
        _client, server = self._pair(H2Connection)
        self.require_attr(server, "state_machine", "h2", "h2.connection.H2Connection.state_machine",
                          state_user)
        server.close_connection()
        self.require(server.state_machine.state is h2.connection.ConnectionState.CLOSED, "h2",
                     "h2.connection.H2Connection.state_machine.state", state_user,
                     "is not ConnectionState.CLOSED after close_connection")


class PrometheusHistogramInternalsTests(_Canary):
    """A histogram child as ``telemetry.PendingHistogram.flush`` adds to it."""

    user = "l5dproxy/telemetry.py (falls back to observe, slower, when they go)"

    def test_buckets_and_sum(self) -> None:
        bounds = (1.0, 10.0)
        histogram = Histogram("canary_ms", "canary", buckets=bounds,
                              registry=CollectorRegistry())
        for name in ("_buckets", "_sum"):
            self.require_attr(histogram, name, "prometheus_client",
                              f"prometheus_client.Histogram.{name}", self.user)
        self.require(len(histogram._buckets) == len(bounds) + 1, "prometheus_client",
                     "prometheus_client.Histogram._buckets", self.user,
                     f"has {len(histogram._buckets)} buckets for bounds {bounds} (+Inf)")
        histogram._buckets[1].inc(2)
        histogram._sum.inc(7.5)
        samples = {(s.name, s.labels.get("le")): s.value
                   for metric in histogram.collect() for s in metric.samples}
        self.require(samples.get(("canary_ms_bucket", "1.0")) == 0
                     and samples.get(("canary_ms_bucket", "10.0")) == 2
                     and samples.get(("canary_ms_bucket", "+Inf")) == 2
                     and samples.get(("canary_ms_sum", None)) == 7.5,
                     "prometheus_client", "prometheus_client.Histogram._buckets/_sum",
                     self.user, f"are not what is exposed (samples {samples})")


class EPollReactorInternalsTests(_Canary):
    """``twisted.internet.epollreactor.EPollReactor`` as net/eventloop.py uses it."""

    USER = "l5dproxy/net/eventloop.py"
    #: sha256 of ``inspect.getsource(EPollReactor.doPoll)`` in Twisted 26.10:
    #: the loop ``eventloop._do_poll`` copies (without callWithLogger).
    DO_POLL_SHA256 = "09b62ae68ef01b4bc5eaa170827e2baf0a2a5098e7e7ce7b5e1c80cda187c827"

    def _reactor(self):
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()

        def close() -> None:   # closing the epoll fd drops every registration
            reactor.waker.connectionLost(None)
            reactor._poller.close()
        self.addCleanup(close)
        return reactor

    def test_do_poll_is_the_loop_ours_copies(self) -> None:
        from twisted.internet.epollreactor import EPollReactor

        source = inspect.getsource(EPollReactor.doPoll)
        import hashlib
        self.require(hashlib.sha256(source.encode()).hexdigest() == self.DO_POLL_SHA256,
                     "twisted", "EPollReactor.doPoll", self.USER,
                     "changed: compare it with eventloop._do_poll, carry the change over "
                     "(or drop lighten) and update DO_POLL_SHA256")

    def test_private_names(self) -> None:
        reactor = self._reactor()
        for attr in ("_poller", "_selectables", "_doReadOrWrite"):
            self.require_attr(reactor, attr, "twisted", f"EPollReactor.{attr}", self.USER)
        self.require(isinstance(reactor._selectables, dict), "twisted",
                     "EPollReactor._selectables", self.USER, "is no longer a dict by fd")
        self.require_params(reactor._doReadOrWrite, ["selectable", "fd", "event"], "twisted",
                            "EPollReactor._doReadOrWrite", self.USER)
        from twisted.internet.epollreactor import EPollReactor
        self.require(EPollReactor.doIteration is EPollReactor.doPoll, "twisted",
                     "EPollReactor.doIteration", self.USER,
                     "is no longer the alias of doPoll that lighten replaces with it")

    def _reader(self, fail_read: bool = False, fail_lost: bool = False):
        ours, peer = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        peer.send(b"x")

        class Reader:
            reads = 0
            lost = 0

            def fileno(self) -> int:
                return ours.fileno()

            def logPrefix(self) -> str:
                return "Reader"

            def doRead(self):
                self.reads += 1
                ours.recv(10)
                if fail_read:
                    raise ValueError("read failed")

            def connectionLost(self, reason) -> None:
                self.lost += 1
                if fail_lost:
                    raise ValueError("connectionLost failed")
        return Reader()

    def test_lightened_reactor_dispatches_without_call_with_logger(self) -> None:
        from twisted.python import log as legacy

        from l5dproxy.net import eventloop

        reactor = self._reactor()
        self.assertFalse(eventloop.lighten(MemoryReactor()))
        self.assertTrue(eventloop.lighten(reactor))
        reader = self._reader()
        reactor.addReader(reader)

        def refuse(*args, **kwargs):
            raise AssertionError("callWithLogger called")
        self.patch(legacy, "callWithLogger", refuse)
        reactor.iterate(0)   # what the reactor's loop calls (doIteration)
        self.assertEqual((reader.reads, reader.lost), (1, 0))

    def test_an_escaping_exception_is_logged_and_the_next_event_handled(self) -> None:
        """A read that fails is the reactor's as before (the selectable is
        disconnected); a failure escaping ``_doReadOrWrite`` (here from
        ``connectionLost``) is logged and the other ready reader still read."""
        from l5dproxy.net import eventloop

        reactor = self._reactor()
        eventloop.lighten(reactor)
        broken = self._reader(fail_read=True, fail_lost=True)
        fine = self._reader()
        reactor.addReader(broken)
        reactor.addReader(fine)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reactor.iterate(0)
        self.assertEqual((broken.reads, broken.lost, fine.reads), (1, 1, 1))
        self.assertTrue(any("handling an event of" in formatEvent(e) for e in events), events)
        self.flushLoggedErrors(ValueError)
