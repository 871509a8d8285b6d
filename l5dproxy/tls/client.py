"""TLS origination: the proxy's connections to a service's endpoints over TLS.

``ClientTls.load(ca, cert, key)`` reads a service's ``[service.NAME.tls]``
files once (trust roots: ``ca``, else the system's; an optional client
certificate chain and its key) into one OpenSSL context, shared by every
connection to the service. ``connect(reactor, client_tls, host, port,
factory, ...)`` dials one endpoint: TCP, then the TLS handshake, and only then
``factory.buildProtocol``: the client end's protocol is made on a connection
whose peer is verified, and a failure at either step reaches
``factory.clientConnectionFailed`` as for a refused connect. So each client
end (HTTP/1, h2, the TCP relay) changes one line, its dial, and a TLS failure
counts for failure accrual and is retried as a connect failure is.

The endpoint is verified as a browser or ``curl`` verifies a server: its
chain against the trust roots (OpenSSL, ``VERIFY_PEER``; TLS 1.2 at least,
issue 13 part 6), then its identity against ``server_name``
(``service_identity``, RFC 6125: a DNS name against the certificate's DNS
SANs, wildcards in the leftmost label; an IP address against its IP SANs; the
subject's CN is never used), inside the handshake, so a certificate that
does not verify ends it with an alert before any request byte or client
certificate identity is used. ``server_name`` is also the SNI (RFC 6066 3;
not sent for an IP address, which SNI does not allow).

A failure is a ``TlsError`` (``l5dproxy.tls.errors``; the dispatcher
answers it as 502, 504 for the handshake timeout) whose ``reason`` is one of
a small fixed set (the ``error`` label of ``response_total``) and whose
``detail`` says what was seen, as the ``l5d-proxy-error`` header shows it::

    tls: certificate verify failed: unable to get local issuer certificate
    tls: certificate verify failed: certificate is for DNS:localhost, not 'wrong.example'
    tls: handshake failed: tlsv1 alert unknown ca
    tls: handshake timeout (5 s)
    tls: ALPN: endpoint did not choose h2 (it chose none)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any
from typing import Protocol as Protocol_
from weakref import WeakKeyDictionary

import service_identity
from cryptography import x509
from OpenSSL import SSL, crypto
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet import error
from twisted.internet.interfaces import (
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from l5dproxy.tls.certs import CertificateError, CertificatePair, load_pair
from l5dproxy.tls.errors import TlsError

#: Creators kept per ``ClientTls`` (one per server name and ALPN list);
#: past it the cache starts over (names come from the config and discovery).
MAX_CREATORS = 4096

#: OpenSSL's texts for the X.509 verification results a proxy meets
#: (``X509_V_ERR_*`` in OpenSSL's ``x509_vfy.h``, texts from its
#: ``x509_txt.c``); pyOpenSSL gives the number, not the text.
X509_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    4: "unable to decode issuer public key",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    13: "format error in certificate's notBefore field",
    14: "format error in certificate's notAfter field",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    22: "certificate chain too long",
    23: "certificate revoked",
    24: "invalid CA certificate",
    25: "path length constraint exceeded",
    26: "unsupported certificate purpose",
    27: "certificate not trusted",
    28: "certificate rejected",
}


class TlsSettingsError(ValueError):
    """A ``[service.NAME.tls]`` file that cannot be used: ``key`` names the
    setting (``ca``, ``cert``, ``key``), ``str()`` the reason."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(reason)
        self.key = key


def ssl_error_text(exc: BaseException) -> str:
    """OpenSSL's reasons in an ``SSL.Error`` (``tlsv1 alert unknown ca``),
    joined with ``; ``; else the exception's own text."""
    reasons: list[str] = []
    args = exc.args[0] if exc.args else None
    if isinstance(args, list):
        for entry in args:
            text = entry[-1] if isinstance(entry, tuple) and entry else str(entry)
            if text and text not in reasons:
                reasons.append(text)
    return "; ".join(reasons) or str(exc) or type(exc).__name__


def certificate_names(cert: x509.Certificate) -> list[str]:
    """A certificate's subject alternative names as ``DNS:name``,
    ``IP:address``, ``URI:uri`` (as ``openssl x509 -ext subjectAltName``)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    names = [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
    names += [f"IP:{a}" for a in san.get_values_for_type(x509.IPAddress)]
    names += [f"URI:{u}" for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
    return names


def identity_mismatch(cert: x509.Certificate, server_name: str) -> str | None:
    """Why ``cert`` is not ``server_name``'s (None when it is): RFC 6125 as
    ``service_identity`` checks it, a DNS name against the DNS SANs, an IP
    address against the IP SANs."""
    try:
        if _is_ip(server_name):
            verify_certificate_ip_address(cert, server_name)
        else:
            verify_certificate_hostname(cert, server_name)
    except (service_identity.VerificationError, service_identity.CertificateError):
        names = certificate_names(cert)
        what = ", ".join(names) if names else "no subject alternative name"
        return f"certificate is for {what}, not {server_name!r}"
    return None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TlsSettingsError(key, f"{path}: cannot read: {e.strerror}") from None


def load_certificates(key: str, path: str) -> list[x509.Certificate]:
    """Every PEM certificate in the file at ``path`` (at least one), else
    ``TlsSettingsError(key, ...)``."""
    data = _read(key, path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise TlsSettingsError(key, f"{path}: no PEM certificate in it")
    return certs


class ClientTls:
    """One service's TLS origination: an OpenSSL context (trust roots,
    client certificate, TLS 1.2 at least) and the connection creators made
    from it, one per server name and ALPN list."""

    def __init__(self, context: SSL.Context,
                 client_certificate: CertificatePair | None = None) -> None:
        self.context = context
        #: The client certificate presented (``l5dproxy.tls.certs``), if any:
        #: its ``name`` and ``not_after`` go to the expiry metric.
        self.client_certificate = client_certificate
        self._creators: dict[tuple[str, tuple[bytes, ...]], _Creator] = {}
        context.set_verify(SSL.VERIFY_PEER, _verify)

    @classmethod
    def load(cls, ca: str | None = None, cert: str | None = None,
             key: str | None = None) -> ClientTls:
        """Read the files: ``ca`` (PEM trust roots; None: the system's),
        ``cert`` (a PEM chain, leaf first) with ``key`` (its PEM private key).
        Raises ``TlsSettingsError`` naming the setting and the reason."""
        if (cert is None) != (key is None):
            raise TlsSettingsError("key" if key is None else "cert",
                                   "cert and key go together: set both or neither")
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_TICKET)
        if ca is None:
            context.set_default_verify_paths()
        else:
            store = context.get_cert_store()
            assert store is not None
            for root in load_certificates("ca", ca):
                store.add_cert(crypto.X509.from_cryptography(root))
        pair = None
        if cert is not None and key is not None:
            try:
                pair = load_pair(cert, key)
            except CertificateError as e:
                raise TlsSettingsError("cert" if e.path == cert else "key", str(e)) from None
            context.use_certificate(pair.openssl_certificate)
            for extra in pair.openssl_chain:
                context.add_extra_chain_cert(extra)
            context.use_privatekey(pair.openssl_key)
        return cls(context, pair)

    def creator(self, server_name: str, alpn: Sequence[str] = ()) -> _Creator:
        """The connection creator for ``server_name`` (SNI and identity)
        offering ``alpn``; made once, then reused."""
        protos = tuple(p.encode("ascii") for p in alpn)
        found = self._creators.get((server_name, protos))
        if found is None:
            if len(self._creators) >= MAX_CREATORS:
                self._creators.clear()
            found = self._creators[(server_name, protos)] = _Creator(
                self.context, server_name, protos)
        return found


def _verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
    """OpenSSL's verify callback: keep its verdict on the chain, check the
    leaf's identity, and note why a certificate is refused on the handshake
    (``_Handshake.refused``) for the error the client end gets."""
    tls = conn.get_app_data()
    handshake = getattr(tls, "wrappedProtocol", None)
    if not isinstance(handshake, _Handshake):  # pragma: no cover - after the handshake
        return bool(ok)
    if not ok:
        if handshake.refused is None:
            handshake.refused = X509_VERIFY_ERRORS.get(errno, f"X.509 verify error {errno}")
        return False
    if depth == 0:
        mismatch = identity_mismatch(cert.to_cryptography(), handshake.dial.server_name)
        if mismatch is not None:
            handshake.refused = mismatch
            return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class _Creator:
    """An ``SSL.Connection`` per dial: SNI and ALPN set, in client mode."""

    __slots__ = ("context", "protos", "server_name", "sni")

    def __init__(self, context: SSL.Context, server_name: str,
                 protos: tuple[bytes, ...]) -> None:
        self.context = context
        self.server_name = server_name
        self.protos = list(protos)
        # RFC 6066 3: no IP address literals in SNI.
        self.sni = None if _is_ip(server_name) else server_name.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self.context, None)
        if self.sni is not None:
            conn.set_tlsext_host_name(self.sni)
        if self.protos:
            conn.set_alpn_protos(self.protos)
        return conn


class _Dial:
    """What one dial needs after TCP: the client end's factory, the name to
    verify, the ALPN protocol the client end requires, the timeout."""

    __slots__ = ("clock", "connector", "factory", "handshake", "require_alpn", "server_name",
                 "stopped", "timeout")

    def __init__(self, factory: ClientFactory, server_name: str, require_alpn: str | None,
                 clock: IReactorTime, timeout: float) -> None:
        self.factory = factory
        self.server_name = server_name
        self.require_alpn = require_alpn
        self.clock = clock
        self.timeout = timeout
        self.connector: Any = None
        self.handshake: _Handshake | None = None
        self.stopped = False

    def stopConnecting(self) -> None:
        """Give the dial up, in either step (as ``IConnector.stopConnecting``):
        ``clientConnectionFailed`` follows with ``UserError``."""
        if self.stopped:
            return
        handshake = self.handshake
        if handshake is None:
            self.connector.stopConnecting()
            return
        if not handshake.done:
            self.stopped = True
            handshake.fail(Failure(error.UserError()), abort=True)

    def disconnect(self) -> None:
        """``IConnector.disconnect``: stop connecting, or close the connection."""
        if self.handshake is None:
            self.connector.disconnect()
        elif not self.handshake.done:
            self.stopConnecting()
        else:
            self.connector.disconnect()

    def getDestination(self) -> Any:
        return self.connector.getDestination()


@implementer(IHandshakeListener)
class _Handshake(Protocol):
    """Stands in for the client end's protocol while the handshake runs;
    on success it checks ALPN, builds that protocol and steps out of the way
    (the TLS transport then delivers to it directly)."""

    def __init__(self, dial: _Dial, addr: Any) -> None:
        self.dial = dial
        self.addr = addr
        self.done = False
        #: Why the verify callback refused the endpoint's certificate.
        self.refused: str | None = None
        self.failure: Failure | None = None
        self.timer: Any = None

    def connectionMade(self) -> None:
        dial = self.dial
        dial.handshake = self
        self.timer = dial.clock.callLater(dial.timeout, self._timed_out)

    def handshakeCompleted(self) -> None:
        self._stop_timer()
        if self.done:
            return
        tls: Any = self.transport
        dial = self.dial
        want = dial.require_alpn
        if want is not None:
            got = tls.negotiatedProtocol
            if got is not None:
                got = got.decode("ascii", "replace")
            # HTTP/1.1 without ALPN is the historic default (RFC 7301 3.2):
            # only h2 must be chosen explicitly.
            if got != want and not (want == "http/1.1" and got is None):
                self.fail(Failure(TlsError(
                    "tls: ALPN", f"endpoint did not choose {want} (it chose {got or 'none'})")),
                    abort=True)
                return
        self.done = True
        protocol = dial.factory.buildProtocol(self.addr)
        if protocol is None:
            tls.abortConnection()
            return
        tls.wrappedProtocol = protocol
        protocol.makeConnection(tls)

    def _timed_out(self) -> None:
        self.timer = None
        if not self.done:
            self.fail(Failure(TlsError("tls: handshake timeout", f"{self.dial.timeout:g} s",
                                       status=504)), abort=True)

    def fail(self, failure: Failure, abort: bool = False) -> None:
        """End the dial with ``failure`` (once); ``abort`` closes the socket."""
        if self.failure is None:
            self.failure = failure
        transport: Any = self.transport
        if abort and transport is not None:
            transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:  # pragma: no cover - none before the handshake
        pass

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self.done:
            return
        self.done = True
        failure = self.failure
        if failure is None:
            if self.refused is not None:
                failure = Failure(TlsError("tls: certificate verify failed", self.refused))
            else:
                failure = Failure(TlsError("tls: handshake failed", _lost_text(reason)))
        connector: Any = self.dial
        self.dial.factory.clientConnectionFailed(connector, failure)

    def _stop_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()


def _lost_text(reason: Failure) -> str:
    if isinstance(reason.value, SSL.Error):
        return ssl_error_text(reason.value)
    if reason.check(error.ConnectionDone, error.ConnectionLost):
        return "connection closed by endpoint"
    return reason.getErrorMessage() or type(reason.value).__name__


class _TlsTransport(BufferingTLSTransport):
    """The TLS transport of an originated connection: an OpenSSL error
    after the handshake (a TLS 1.3 server refusing the client certificate
    says so with the first read) reaches the client end as a ``TlsError``."""

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        wrapped = self.wrappedProtocol
        if not isinstance(wrapped, _Handshake):
            # The reason OpenSSL gave is only known inside; the last bytes
            # and the loss pass through a translator on their way out.
            self.wrappedProtocol = _Translated(wrapped)
        super().connectionLost(reason)


    def loseWriteConnection(self) -> None:
        """Half-close, as the relay and HTTP/1 tunnels ask for it: TLS has
        none of its own, so this sends ``close_notify`` once what is
        buffered is written and goes on reading until the endpoint closes
        (RFC 8446 6.1 lets it write after our ``close_notify``). Without
        this the wrapper would pass the call to the socket under the TLS
        records."""
        self.loseConnection()


class _Translated(Protocol):
    """The client end's protocol as its connection ends: an ``SSL.Error``
    reason becomes a ``TlsError`` (``tls: error: ...``)."""

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def dataReceived(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason is not None and isinstance(reason.value, SSL.Error):
            reason = Failure(TlsError("tls: error", ssl_error_text(reason.value)))
        self.protocol.connectionLost(reason)


class _HandshakeFactory(ClientFactory):
    noisy = False

    def __init__(self, dial: _Dial) -> None:
        self.dial = dial

    def buildProtocol(self, addr: Any) -> _Handshake:
        return _Handshake(self.dial, addr)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        # TCP never connected: the client end hears it as from connectTCP.
        dial: Any = self.dial
        self.dial.factory.clientConnectionFailed(dial, reason)


class _TlsFactory(TLSMemoryBIOFactory):
    protocol = _TlsTransport


class Origination(Protocol_):
    """A service's ``[service.NAME.tls]`` (``config.model.ServiceTlsConfig``,
    structurally: tls/ imports nothing of config)."""

    @property
    def ca(self) -> str | None: ...
    @property
    def server_name(self) -> str | None: ...
    @property
    def alpn(self) -> tuple[str, ...] | None: ...
    @property
    def cert(self) -> str | None: ...
    @property
    def key(self) -> str | None: ...


#: Each settings record's loaded context, for as long as the record lives (a
#: config holds it; a reload makes new records, so it re-reads the files).
_loaded: WeakKeyDictionary[Any, ClientTls] = WeakKeyDictionary()


def client_tls_for(settings: Origination) -> ClientTls:
    """The ``ClientTls`` of ``settings``, loaded on first use (config
    parsing does it, so a broken file fails the start or the reload) and
    then kept with the record. Raises ``TlsSettingsError``."""
    found = _loaded.get(settings)
    if found is None:
        found = _loaded[settings] = ClientTls.load(settings.ca, settings.cert, settings.key)
    return found


def dial(reactor: Any, settings: Origination, address: Any, factory: ClientFactory,
         timeout: float, require_alpn: str | None = None, alpn: Sequence[str] = ()) -> _Dial:
    """``connect`` to ``address`` (``config.model.HostPort``) with a
    service's settings: the server name is ``settings.server_name``, else
    the name the address was found under, else the address itself; ALPN
    offers ``settings.alpn``, else ``alpn`` (the client end's own)."""
    name = settings.server_name or address.name or address.host
    offered = settings.alpn if settings.alpn is not None else alpn
    return connect(reactor, client_tls_for(settings), address.host, address.port, factory,
                   timeout, server_name=name, alpn=offered, require_alpn=require_alpn)


def connect(reactor: Any, client_tls: ClientTls, host: str, port: int,
            factory: ClientFactory, timeout: float, server_name: str | None = None,
            alpn: Sequence[str] = (), require_alpn: str | None = None) -> _Dial:
    """Dial ``host:port`` over TLS, as ``reactor.connectTCP(host, port,
    factory, timeout)`` dials over TCP: ``factory.buildProtocol`` once the
    handshake verified ``server_name`` (default ``host``) and, if
    ``require_alpn`` is given, ALPN chose it (``http/1.1`` is also met by no
    ALPN at all); else ``factory.clientConnectionFailed(connector, failure)``
    with the TCP failure or a ``TlsError``. ``timeout`` bounds the TCP
    connect and then the handshake, each. Returns a connector whose
    ``stopConnecting()`` gives the dial up in either step."""
    name = server_name or host
    clock: IReactorTime = reactor
    dial = _Dial(factory, name, require_alpn, clock, timeout)
    wrapping = _TlsFactory(client_tls.creator(name, alpn), True, _HandshakeFactory(dial),
                           clock=clock)
    tcp: IReactorTCP = reactor
    dial.connector = tcp.connectTCP(host, port, wrapping, timeout=timeout)
    return dial


__all__ = ["MAX_CREATORS", "ClientTls", "Origination", "TlsError", "TlsSettingsError",
           "certificate_names", "client_tls_for", "connect", "dial", "identity_mismatch",
           "load_certificates", "ssl_error_text"]
