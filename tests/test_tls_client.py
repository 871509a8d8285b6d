"""TLS origination (l5dproxy.tls.client): the dial, the verification and the
errors a client end gets, against a TLS server end in memory (iosim), with
certificates made by trustme."""

from __future__ import annotations

import os
import tempfile

import trustme
from OpenSSL import SSL
from twisted.internet import error, ssl
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect
from twisted.trial import unittest

from l5dproxy.tls import client as tlsclient
from l5dproxy.tls.client import ClientTls, TlsError, TlsSettingsError


class Recorder(Protocol):
    """The client end's protocol: what it was given, when."""

    def __init__(self) -> None:
        self.received = b""
        self.lost: Failure | None = None

    def connectionMade(self) -> None:
        self.transport.write(b"hello")

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason=None) -> None:
        self.lost = reason


class EndFactory(ClientFactory):
    """The client end's factory: the protocol it built, or the failure."""

    def __init__(self) -> None:
        self.built: list[Recorder] = []
        self.failed: list[Failure] = []

    def buildProtocol(self, addr) -> Recorder:
        p = Recorder()
        self.built.append(p)
        return p

    def clientConnectionFailed(self, connector, reason: Failure) -> None:
        self.failed.append(reason)


class Echo(Protocol):
    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.factory.received.append(data)
        self.transport.write(b"echo:" + data)


class Silent(Protocol):
    """A server that never answers the ClientHello."""


def pem_file(case: unittest.TestCase, data: bytes) -> str:
    fd, path = tempfile.mkstemp(suffix=".pem")
    os.write(fd, data)
    os.close(fd)
    case.addCleanup(os.unlink, path)
    return path


def server_options(cert: trustme.LeafCert, alpn: list[bytes] | None = None,
                   client_ca: trustme.CA | None = None) -> ssl.CertificateOptions:
    private = ssl.PrivateCertificate.loadPEM(cert.private_key_and_cert_chain_pem.bytes())
    extra = {}
    if client_ca is not None:
        extra = {"verify": True, "requireCertificate": True,
                 "caCerts": [ssl.Certificate.loadPEM(client_ca.cert_pem.bytes()).original]}
    return ssl.CertificateOptions(privateKey=private.privateKey.original,
                                  certificate=private.original,
                                  acceptableProtocols=alpn, **extra)


class Rig(unittest.TestCase):
    """A CA, a server certificate for localhost and 127.0.0.1, a clock."""

    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("localhost", "127.0.0.1")
        self.ca_path = pem_file(self, self.ca.cert_pem.bytes())
        self.reactor = MemoryReactorClock()
        self.end = EndFactory()
        self.server_connections: list[Protocol] = []
        self.server_received: list[bytes] = []

    def dial(self, client_tls: ClientTls, options: ssl.CertificateOptions, server=Echo,
             host: str = "127.0.0.1", **kwargs):
        """Dial through ``tlsclient.connect`` and wire the TCP connection it
        asked for to a TLS server in memory; returns (connector, pump)."""
        connector = tlsclient.connect(self.reactor, client_tls, host, 443, self.end,
                                      timeout=5.0, **kwargs)
        host_, port, wrapping, timeout, _ = self.reactor.tcpClients[-1]
        self.assertEqual((host_, port, timeout), (host, 443, 5.0))
        inner = Factory.forProtocol(server)
        inner.connections = self.server_connections  # type: ignore[attr-defined]
        inner.received = self.server_received  # type: ignore[attr-defined]
        server_factory = TLSMemoryBIOFactory(options, False, inner, clock=self.reactor)
        client_proto = wrapping.buildProtocol(None)
        server_proto = server_factory.buildProtocol(None)
        pump = connect(server_proto, FakeTransport(server_proto, True),
                       client_proto, FakeTransport(client_proto, False),
                       greet=False, clock=self.reactor)
        pump.flush()
        self.reactor.advance(0)  # the buffered TLS writes of this turn
        pump.flush()
        return connector, pump

    def failure(self) -> TlsError:
        self.assertEqual(self.end.built, [], "the client end's protocol was built")
        self.assertEqual(len(self.end.failed), 1)
        exc = self.end.failed[0].value
        self.assertIsInstance(exc, TlsError)
        return exc


class OriginationTests(Rig):

    def test_verified_endpoint_gets_the_protocol_after_the_handshake(self) -> None:
        tls = ClientTls.load(ca=self.ca_path)
        self.dial(tls, server_options(self.cert), server_name="localhost")
        self.assertEqual(self.end.failed, [])
        [protocol] = self.end.built
        self.assertEqual(protocol.received, b"echo:hello")
        self.assertEqual(len(self.server_connections), 1)

    def test_ip_address_is_checked_against_ip_sans(self) -> None:
        tls = ClientTls.load(ca=self.ca_path)
        self.dial(tls, server_options(self.cert))  # server_name: the host, 127.0.0.1
        self.assertEqual([p.received for p in self.end.built], [b"echo:hello"])

    def test_wrong_name_is_refused_in_the_handshake(self) -> None:
        tls = ClientTls.load(ca=self.ca_path)
        self.dial(tls, server_options(self.cert), server_name="wrong.example")
        exc = self.failure()
        self.assertEqual((exc.status, exc.reason), (502, "tls: certificate verify failed"))
        self.assertEqual(exc.detail, "tls: certificate verify failed: certificate is for "
                         "DNS:localhost, IP:127.0.0.1, not 'wrong.example'")
        self.assertEqual(self.server_received, [], "a byte reached the server")

    def test_untrusted_ca_is_refused(self) -> None:
        other = trustme.CA()
        tls = ClientTls.load(ca=pem_file(self, other.cert_pem.bytes()))
        self.dial(tls, server_options(self.cert), server_name="localhost")
        exc = self.failure()
        self.assertEqual(exc.detail, "tls: certificate verify failed: "
                         "unable to get local issuer certificate")
        self.assertEqual(str(exc), exc.detail)

    def test_h2_required_but_not_chosen(self) -> None:
        tls = ClientTls.load(ca=self.ca_path)
        self.dial(tls, server_options(self.cert, alpn=[b"http/1.1"]), server_name="localhost",
                  alpn=["h2", "http/1.1"], require_alpn="h2")
        exc = self.failure()
        self.assertEqual(exc.detail,
                         "tls: ALPN: endpoint did not choose h2 (it chose http/1.1)")

    def test_h2_chosen(self) -> None:
        tls = ClientTls.load(ca=self.ca_path)
        self.dial(tls, server_options(self.cert, alpn=[b"h2", b"http/1.1"]),
                  server_name="localhost", alpn=["h2"], require_alpn="h2")
        [protocol] = self.end.built
        self.assertEqual(protocol.transport.negotiatedProtocol, b"h2")

    def test_http1_is_met_by_no_alpn_but_not_by_h2(self) -> None:
        tls = ClientTls.load(ca=self.ca_path)
        self.dial(tls, server_options(self.cert), server_name="localhost",
                  require_alpn="http/1.1")  # nothing offered, nothing chosen
        self.assertEqual(len(self.end.built), 1)
        self.end = EndFactory()
        self.dial(tls, server_options(self.cert, alpn=[b"h2"]), server_name="localhost",
                  alpn=["h2", "http/1.1"], require_alpn="http/1.1")
        self.assertEqual(self.failure().detail,
                         "tls: ALPN: endpoint did not choose http/1.1 (it chose h2)")

    def test_handshake_timeout(self) -> None:
        tls = ClientTls.load(ca=self.ca_path)
        connector = tlsclient.connect(self.reactor, tls, "127.0.0.1", 443, self.end,
                                      timeout=5.0, server_name="localhost")
        wrapping = self.reactor.tcpClients[-1][2]
        client_proto = wrapping.buildProtocol(None)
        server_proto = Silent()
        pump = connect(server_proto, FakeTransport(server_proto, True),
                       client_proto, FakeTransport(client_proto, False),
                       greet=False, clock=self.reactor)
        self.reactor.advance(4.9)
        pump.flush()
        self.assertEqual(self.end.failed, [])
        self.reactor.advance(0.2)
        pump.flush()
        exc = self.failure()
        self.assertEqual((exc.status, exc.detail), (504, "tls: handshake timeout: 5 s"))
        self.assertTrue(connector.handshake.done)

    def test_tcp_failure_reaches_the_end_as_it_is(self) -> None:
        tls = ClientTls.load(ca=self.ca_path)
        tlsclient.connect(self.reactor, tls, "127.0.0.1", 443, self.end, timeout=5.0)
        wrapping = self.reactor.tcpClients[-1][2]
        wrapping.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        [failure] = self.end.failed
        self.assertIsInstance(failure.value, error.ConnectionRefusedError)

    def test_stop_connecting_during_the_handshake(self) -> None:
        tls = ClientTls.load(ca=self.ca_path)
        connector = tlsclient.connect(self.reactor, tls, "127.0.0.1", 443, self.end,
                                      timeout=5.0)
        client_proto = self.reactor.tcpClients[-1][2].buildProtocol(None)
        server_proto = Silent()
        pump = connect(server_proto, FakeTransport(server_proto, True),
                       client_proto, FakeTransport(client_proto, False),
                       greet=False, clock=self.reactor)
        connector.stopConnecting()
        pump.flush()
        [failure] = self.end.failed
        self.assertIsInstance(failure.value, error.UserError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_client_certificate_is_presented(self) -> None:
        client_ca = trustme.CA()
        client = client_ca.issue_cert("web.example")
        tls = ClientTls.load(ca=self.ca_path,
                             cert=pem_file(self, client.cert_chain_pems[0].bytes()),
                             key=pem_file(self, client.private_key_pem.bytes()))
        self.dial(tls, server_options(self.cert, client_ca=client_ca), server_name="localhost")
        [protocol] = self.end.built
        self.assertEqual(protocol.received, b"echo:hello")
        [server] = self.server_connections
        peer = server.transport.getPeerCertificate().to_cryptography()
        self.assertEqual(tlsclient.certificate_names(peer),
                         ["DNS:web.example"])

    def test_refused_client_certificate_is_a_tls_error(self) -> None:
        client_ca = trustme.CA()
        tls = ClientTls.load(ca=self.ca_path)  # no client certificate
        self.dial(tls, server_options(self.cert, client_ca=client_ca), server_name="localhost")
        # TLS 1.3: the client's handshake is done before the server refuses
        # its (missing) certificate; the refusal comes with the first read.
        failures = self.end.failed or [p.lost for p in self.end.built]
        [failure] = failures
        self.assertIsInstance(failure.value, TlsError)
        self.assertIn("certificate required", failure.value.detail)


class LoadTests(unittest.TestCase):

    def setUp(self) -> None:
        self.ca = trustme.CA()
        self.leaf = self.ca.issue_cert("client.example")

    def assertRefused(self, setting: str, contains: str, **files) -> None:
        with self.assertRaises(TlsSettingsError) as caught:
            ClientTls.load(**files)
        self.assertEqual(caught.exception.key, setting)
        self.assertIn(contains, str(caught.exception))

    def test_missing_file(self) -> None:
        self.assertRefused("ca", "/nonexistent/ca.pem: cannot read: No such file or directory",
                           ca="/nonexistent/ca.pem")

    def test_not_pem(self) -> None:
        path = pem_file(self, b"hello\n")
        self.assertRefused("ca", f"{path}: no PEM certificate in it", ca=path)

    def test_key_that_is_not_a_key(self) -> None:
        cert = pem_file(self, self.leaf.cert_chain_pems[0].bytes())
        key = pem_file(self, self.leaf.cert_chain_pems[0].bytes())
        self.assertRefused("key", f"{key}: not a PEM private key", cert=cert, key=key)

    def test_key_of_another_certificate(self) -> None:
        other = self.ca.issue_cert("other.example")
        cert = pem_file(self, self.leaf.cert_chain_pems[0].bytes())
        key = pem_file(self, other.private_key_pem.bytes())
        self.assertRefused("key", f"{key}: this key does not belong to the certificate in {cert}",
                           cert=cert, key=key)

    def test_cert_without_key(self) -> None:
        cert = pem_file(self, self.leaf.cert_chain_pems[0].bytes())
        self.assertRefused("key", "cert and key go together", cert=cert)

    def test_system_trust_and_tls12_floor(self) -> None:
        tls = ClientTls.load()
        self.assertIsNone(tls.client_certificate)
        conn = SSL.Connection(tls.context, None)
        conn.set_connect_state()
        self.assertEqual(tls.context.get_verify_mode(), SSL.VERIFY_PEER)

    def test_creators_are_kept_per_name_and_alpn_and_bounded(self) -> None:
        tls = ClientTls.load()
        a = tls.creator("a.example", ["h2"])
        self.assertIs(tls.creator("a.example", ["h2"]), a)
        self.assertIsNot(tls.creator("a.example", ["http/1.1"]), a)
        self.assertIsNone(tls.creator("10.0.0.1").sni)
        self.patch(tlsclient, "MAX_CREATORS", 3)
        for i in range(10):
            tls.creator(f"h{i}.example")
        self.assertLessEqual(len(tls._creators), 3)


class AnswerTests(unittest.TestCase):
    """What the dispatcher answers for a TlsError (exchange.message.as_proxy_error)."""

    def test_reason_is_the_label_and_detail_the_header(self) -> None:
        from l5dproxy.exchange.message import as_proxy_error

        err = as_proxy_error(Failure(TlsError("tls: certificate verify failed",
                                              "certificate has expired")))
        self.assertEqual((err.status, err.reason, err.grpc_status),
                         (502, "tls: certificate verify failed", 14))
        self.assertEqual(err.message, "tls: certificate verify failed: certificate has expired")
        timeout = as_proxy_error(Failure(TlsError("tls: handshake timeout", "5 s", status=504)))
        self.assertEqual((timeout.status, timeout.grpc_status), (504, 4))


class DialTests(Rig):
    """``dial``: a service's settings and an endpoint address."""

    def settings(self, **kwargs):
        from l5dproxy.config.model import ServiceTlsConfig
        return ServiceTlsConfig(ca=self.ca_path, **kwargs)

    def wire(self, connector) -> None:
        wrapping = self.reactor.tcpClients[-1][2]
        inner = Factory.forProtocol(Echo)
        inner.connections = self.server_connections  # type: ignore[attr-defined]
        inner.received = self.server_received  # type: ignore[attr-defined]
        server_factory = TLSMemoryBIOFactory(server_options(self.ca.issue_cert("app.example"),
                                                            alpn=[b"h2", b"http/1.1"]),
                                             False, inner, clock=self.reactor)
        client_proto = wrapping.buildProtocol(None)
        server_proto = server_factory.buildProtocol(None)
        pump = connect(server_proto, FakeTransport(server_proto, True),
                       client_proto, FakeTransport(client_proto, False),
                       greet=False, clock=self.reactor)
        pump.flush()
        self.reactor.advance(0)
        pump.flush()

    def test_the_name_the_address_was_found_under_is_verified(self) -> None:
        from l5dproxy.config.model import HostPort
        settings = self.settings()
        self.wire(tlsclient.dial(self.reactor, settings, HostPort("127.0.0.1", 443, "app.example"),
                                 self.end, 5.0))
        self.assertEqual([p.received for p in self.end.built], [b"echo:hello"])
        self.assertIs(tlsclient.client_tls_for(settings), tlsclient.client_tls_for(settings))

    def test_an_address_without_a_name_is_verified_as_an_address(self) -> None:
        from l5dproxy.config.model import HostPort
        self.wire(tlsclient.dial(self.reactor, self.settings(), HostPort("127.0.0.1", 443),
                                 self.end, 5.0))
        self.assertEqual(self.failure().detail, "tls: certificate verify failed: certificate "
                         "is for DNS:app.example, not '127.0.0.1'")

    def test_server_name_and_alpn_from_the_settings_win(self) -> None:
        from l5dproxy.config.model import HostPort
        settings = self.settings(server_name="other.example", alpn=("h2",))
        self.wire(tlsclient.dial(self.reactor, settings,
                                 HostPort("127.0.0.1", 443, "app.example"), self.end, 5.0,
                                 alpn=("http/1.1",)))
        self.assertIn("not 'other.example'", self.failure().detail)
        self.assertEqual(list(tlsclient.client_tls_for(settings)._creators),
                         [("other.example", (b"h2",))])
