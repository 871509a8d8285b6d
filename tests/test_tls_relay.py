"""The opaque TCP relay originating TLS (``[service.NAME.tls]``), on the
real reactor with loopback sockets: a plaintext client, a TLS server
(trustme certificates)."""

from __future__ import annotations

import trustme
from twisted.internet import defer, protocol, reactor
from twisted.trial.unittest import TestCase

from l5dproxy.config.model import ServiceTlsConfig
from l5dproxy.net import splice
from tests.relayrig import start_opaque_relay
from tests.support import metric_value
from tests.test_tcp import _Collect, _HalfCloseCollect, poll, samples_of
from tests.test_tls_client import pem_file, server_options


class _Echo(_Collect):
    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        self.transport.write(b"echo:" + data)


class RelayOriginationTests(TestCase):

    timeout = 30

    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.ca_path = pem_file(self, self.ca.cert_pem.bytes())

    def start(self, server_protocol, names=("localhost",), **tls) -> defer.Deferred:
        options = server_options(self.ca.issue_cert(*names))
        start_opaque_relay(self, server_protocol, server_tls=options,
                           tls=ServiceTlsConfig(ca=self.ca_path, **tls))
        creator = protocol.ClientCreator(reactor, _HalfCloseCollect)
        return creator.connectTCP("127.0.0.1", self.proxy_port).addCallback(self._track)

    def _track(self, client):
        self.addCleanup(self._close, client)
        return client

    @defer.inlineCallbacks
    def _close(self, client):
        client.transport.abortConnection()
        yield client.lost()
        for s in self.servers:
            if s.transport.connected:
                s.transport.abortConnection()
            yield s.lost()
        yield poll(lambda: not self.listener.connections, what="the proxy to close")

    @defer.inlineCallbacks
    def test_bytes_both_ways_over_tls_never_spliced(self):
        self.patch(splice, "ENABLED", True)  # it would splice a plaintext connection
        client = yield self.start(_Echo, server_name="localhost")
        client.transport.write(b"ping")
        yield poll(lambda: bytes(client.data) == b"echo:ping", what="the echo")
        self.assertEqual(bytes(self.servers[0].data), b"ping")
        (conn,) = self.listener.connections
        relay = conn.transport.protocol
        self.assertIsNone(relay.splice, "a TLS connection is spliced")
        self.assertEqual(relay.upstream.transport.negotiatedProtocol, None)
        # The client's EOF: close_notify to the server, whose close comes back.
        client.transport.loseWriteConnection()
        yield client.lost()
        self.assertEqual(bytes(client.data), b"echo:ping")

    @defer.inlineCallbacks
    def test_name_from_the_endpoint_is_verified(self):
        """No server_name: the endpoint's address (127.0.0.1) is verified."""
        client = yield self.start(_Echo, names=("127.0.0.1",))
        client.transport.write(b"ping")
        yield poll(lambda: bytes(client.data) == b"echo:ping", what="the echo")

    @defer.inlineCallbacks
    def test_wrong_name_closes_the_client_and_counts(self):
        client = yield self.start(_Echo, server_name="wrong.example")
        client.transport.write(b"ping")
        yield poll(lambda: client.eof, what="the proxy to close the client connection")
        self.assertEqual(bytes(client.data), b"")
        self.assertEqual(b"".join(bytes(s.data) for s in self.servers), b"",
                         "a byte reached the server")
        samples = samples_of(self.metrics)
        self.assertEqual(metric_value(samples, "endpoint_connect_errors_total",
                                      reason="tls"), 1)
        (endpoint,) = self.listener.backends.endpoints
        self.assertEqual(endpoint.failures, 1, "not counted for failure accrual")

    @defer.inlineCallbacks
    def test_offers_the_configured_alpn(self):
        options_alpn = server_options(self.ca.issue_cert("localhost"),
                                      alpn=[b"imap", b"h2"])
        start_opaque_relay(self, _Echo, server_tls=options_alpn,
                           tls=ServiceTlsConfig(ca=self.ca_path, server_name="localhost",
                                                alpn=("imap",)))
        creator = protocol.ClientCreator(reactor, _HalfCloseCollect)
        client = yield creator.connectTCP("127.0.0.1", self.proxy_port)
        self._track(client)
        client.transport.write(b"a1 NOOP")
        yield poll(lambda: bytes(client.data) == b"echo:a1 NOOP", what="the echo")
        (conn,) = self.listener.connections
        self.assertEqual(conn.transport.protocol.upstream.transport.negotiatedProtocol, b"imap")
