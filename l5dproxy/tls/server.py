"""TLS termination: server contexts chosen by SNI, and the handshake step.

:class:`ServerContexts` makes the pyOpenSSL ``SSL.Connection`` of each new
client connection of a terminating listener (``[listener.tls]``): one
``SSL.Context`` per certificate pair, the first the default; a servername
callback switches to the pair :func:`l5dproxy.tls.certs.choose` picks for the
ClientHello's SNI. ALPN is chosen from ``alpn`` in the listener's order (no
overlap: no ALPN, and the caller sniffs the plaintext). TLS 1.2 at least,
forward-secret AEAD ciphers only for 1.2 (Mozilla's "intermediate" list; 1.3's
suites are all of that kind), no compression, no client-initiated
renegotiation, no session tickets nor server-side session cache unless
``session_tickets``. With ``client_ca`` a client certificate is required and
verified against those roots (mTLS).

:func:`terminate` wraps a connection in Twisted's ``TLSMemoryBIOProtocol``
with a :class:`Handshake` inside, which aborts the connection if the
handshake has not completed in ``handshake_timeout`` seconds and, when it
completes, asks its ``on_handshake`` callback for the protocol to speak the
plaintext (detect/terminate.py maps ALPN and the sniffed bytes to one) and
puts that protocol in its place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLServerConnectionCreator,
    IProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from l5dproxy.tls.certs import CertificateError, CertificatePair, CertificateStore
from l5dproxy.tls.identity import peer_identity

__all__ = [
    "MIN_VERSIONS", "Handshake", "ServerContexts", "ServerSettings", "TlsInfo",
    "load_client_ca", "terminate",
]

log = Logger()

#: ``min_version`` values: nothing below TLS 1.2 (RFC 8996 deprecates 1.0 and 1.1).
MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

#: TLS 1.2 ciphers: Mozilla's "intermediate" configuration (ECDHE or DHE key
#: exchange, AES-GCM or ChaCha20-Poly1305), as nginx and HAProxy configs
#: generated for it use.
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    b"DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"
)

#: A session id context: OpenSSL requires one when it verifies client
#: certificates and might resume a session.
_SESSION_ID_CONTEXT = b"l5dproxy"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What a terminating listener's contexts are made of besides certificates.

    ``alpn``: protocol names offered, in preference order; ``min_version``: a
    key of ``MIN_VERSIONS``; ``session_tickets``: resumption allowed;
    ``client_ca``: path of PEM roots client certificates must chain to
    (None: no client certificate asked for).
    """

    alpn: tuple[str, ...] = ("h2", "http/1.1")
    min_version: str = "1.2"
    session_tickets: bool = False
    client_ca: str | None = None


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What a completed handshake established, for the protocols after it
    and the connection's log line and labels.

    ``version``: ``TLSv1.3``...; ``alpn``: the protocol agreed on (None:
    none); ``sni``: the ClientHello's server name; ``client_id``: the
    verified client certificate's identity (None without one).
    """

    version: str
    cipher: str
    alpn: str | None
    sni: str | None
    client_id: str | None


def load_client_ca(path: str) -> list[x509.Certificate]:
    """The PEM certificates of a ``client_ca`` file (at least one), or
    :class:`CertificateError` naming the file and the reason."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CertificateError(path, e.strerror or str(e)) from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CertificateError(path, f"no PEM certificate in it ({e})") from None


@implementer(IOpenSSLServerConnectionCreator)
class ServerContexts:
    """The TLS contexts of one terminating listener (see the module doc).

    Built from a :class:`CertificateStore` and :class:`ServerSettings`;
    :meth:`reload` re-reads the certificate files and ``client_ca`` and
    rebuilds the contexts when anything changed: every later handshake uses
    the new ones, connections already made keep theirs. Raises
    :class:`CertificateError` at construction for a broken file.
    """

    def __init__(self, store: CertificateStore, settings: ServerSettings) -> None:
        self.store = store
        self.settings = settings
        self._ca_pem: bytes | None = None
        if settings.client_ca is not None:
            self._ca_pem = self._read_ca()
        self._build()

    def _read_ca(self) -> bytes:
        path = self.settings.client_ca
        assert path is not None
        from cryptography.hazmat.primitives.serialization import Encoding

        return b"".join(c.public_bytes(Encoding.PEM) for c in load_client_ca(path))

    def _build(self) -> None:
        self._generation = self.store.generation
        contexts = {id(pair): self._context(pair) for pair in self.store.pairs}
        self._contexts = contexts
        self._default = contexts[id(self.store.pairs[0])]

    def _context(self, pair: CertificatePair) -> SSL.Context:
        s = self.settings
        ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
        ctx.set_min_proto_version(MIN_VERSIONS[s.min_version])
        ctx.set_cipher_list(TLS12_CIPHERS)
        options = SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION
        if not s.session_tickets:
            options |= SSL.OP_NO_TICKET
            ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        ctx.set_options(options)
        ctx.set_session_id(_SESSION_ID_CONTEXT)
        ctx.use_certificate(pair.openssl_certificate)
        for extra in pair.openssl_chain:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(pair.openssl_key)
        ctx.check_privatekey()
        if s.alpn:
            ctx.set_alpn_select_callback(self._select_alpn)
        if self._ca_pem is not None:
            store = ctx.get_cert_store()
            assert store is not None
            roots = x509.load_pem_x509_certificates(self._ca_pem)
            for root in roots:
                store.add_cert(crypto.X509.from_cryptography(root))
            ctx.set_client_ca_list([crypto.X509.from_cryptography(r).get_subject()
                                    for r in roots])
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        ctx.set_tlsext_servername_callback(self._servername)
        return ctx

    def reload(self) -> list[CertificateError]:
        """Re-read the certificates (a broken file keeps its old pair and is
        logged as ``FILE: reason`` by the store) and ``client_ca`` (a broken
        one keeps the old roots); rebuild the contexts if anything changed.
        The errors, for the caller to report."""
        errors = self.store.reload()
        changed = self.store.generation != self._generation
        if self.settings.client_ca is not None:
            try:
                pem = self._read_ca()
            except CertificateError as e:
                log.error(
                    "{owner}: {error}; keeping the client_ca loaded before",
                    owner=self.store.owner or "tls", error=str(e))
                errors.append(e)
            else:
                changed = changed or pem != self._ca_pem
                self._ca_pem = pem
        if changed:
            self._build()
        return errors

    def changed(self) -> bool:
        """Whether a certificate file differs from the one loaded (watch_config)."""
        return self.store.changed()

    # IOpenSSLServerConnectionCreator
    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self._default, None)

    def _servername(self, connection: SSL.Connection) -> None:
        raw = connection.get_servername()
        name = raw.decode("ascii", "replace") if raw else None
        ctx = self._contexts.get(id(self.store.choose(name)))
        if ctx is not None and ctx is not connection.get_context():
            connection.set_context(ctx)

    def _select_alpn(self, connection: SSL.Connection, offered: list[bytes]) -> bytes:
        for name in self.settings.alpn:
            wanted = name.encode("ascii")
            if wanted in offered:
                return wanted
        return SSL.NO_OVERLAPPING_PROTOCOLS  # type: ignore[return-value]


class _Unused(Factory):
    """The wrapped factory TLSMemoryBIOFactory requires; termination hands
    each connection its protocol itself, so nothing is built here."""

    noisy = False

    def buildProtocol(self, addr):  # pragma: no cover - never called
        raise AssertionError("terminate() builds its protocols")


def tls_factory(contexts: ServerContexts, clock: IReactorTime) -> TLSMemoryBIOFactory:
    """The ``TLSMemoryBIOFactory`` a terminating listener's connections share
    (it only tracks their TLS protocols; :func:`terminate` builds them)."""
    return TLSMemoryBIOFactory(contexts, False, _Unused(), clock=clock)


@implementer(IHandshakeListener)
class Handshake(Protocol):
    """The plaintext protocol of a TLS connection until its handshake is done.

    ``on_handshake(info, tls)`` gives the protocol that speaks the plaintext;
    this one puts it in its place (``tls.wrappedProtocol``, Twisted's
    ``ProtocolWrapper`` attribute) and connects it. ``on_lost(reason, how,
    kind)`` is called if the connection ends first (a failed handshake, the
    client leaving, the handshake timeout): ``how`` for the log line,
    ``kind`` one of :data:`HANDSHAKE_ERROR_REASONS` for the metric. No
    application data can arrive before the handshake completes.
    """

    def __init__(self, on_handshake: Callable[[TlsInfo, TLSMemoryBIOProtocol], IProtocol],
                 on_lost: Callable[[Failure, str, str], None], clock: IReactorTime,
                 timeout: float) -> None:
        self.on_handshake = on_handshake
        self.on_lost = on_lost
        self.clock = clock
        self.timeout = timeout
        self.timer: IDelayedCall | None = None
        self.timed_out = False
        self.next: IProtocol | None = None

    def connectionMade(self) -> None:
        self.timer = self.clock.callLater(self.timeout, self._timed_out)

    def _timed_out(self) -> None:
        self.timer = None
        self.timed_out = True
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def handshakeCompleted(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        tls = self.transport
        assert isinstance(tls, TLSMemoryBIOProtocol)
        info = handshake_info(tls)
        protocol = self.next = self.on_handshake(info, tls)
        tls.wrappedProtocol = protocol
        protocol.makeConnection(tls)

    def dataReceived(self, data: bytes) -> None:  # pragma: no cover - after the swap
        assert self.next is not None
        self.next.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.next is not None:  # pragma: no cover - the swap makes it unreachable
            self.next.connectionLost(reason)
            return
        if self.timed_out:
            how = f"tls handshake timeout ({self.timeout:g} s)"
            kind = "timeout"
        else:
            how = "tls handshake failed: " + describe_tls_error(reason)
            kind = classify_tls_error(reason)
        self.on_lost(reason, how, kind)


#: The ``reason`` label values of ``tls_handshake_errors_total`` (a closed
#: set, so the metric's cardinality is bounded): the handshake timeout, a
#: client offering no TLS version the listener accepts, an mTLS client
#: sending no certificate, a certificate not verified (the client's by
#: ``client_ca``, or the proxy's refused by the client's alert), the client
#: closing or resetting before the handshake was done, anything else.
HANDSHAKE_ERROR_REASONS = ("timeout", "protocol_version", "no_client_certificate",
                           "bad_certificate", "closed", "other")


def _openssl_reasons(reason: Failure) -> list[str]:
    """OpenSSL's reason strings in a failed handshake's error, in order."""
    exc = reason.value
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        found = [entry[-1] for entry in exc.args[0] if entry and entry[-1]]
        return [r for r in dict.fromkeys(found) if isinstance(r, str)]
    return []


def describe_tls_error(reason: Failure) -> str:
    """A short reason for a failed handshake, for the connection's log line:
    OpenSSL's reason strings (``certificate verify failed``, ``no shared
    cipher``, ``unsupported protocol``), else the exception's text."""
    reasons = _openssl_reasons(reason)
    if reasons:
        return ", ".join(reasons)
    exc = reason.value
    text = str(exc) or type(exc).__name__
    return "client closed" if "Connection was closed cleanly" in text else text


def classify_tls_error(reason: Failure) -> str:
    """The :data:`HANDSHAKE_ERROR_REASONS` entry for a handshake that failed
    with ``reason`` (the timeout is the caller's to know). OpenSSL's reason
    strings decide: ``unsupported protocol``, ``wrong version number``, an
    alert ``protocol version`` -> protocol_version; ``peer did not return a
    certificate`` -> no_client_certificate; any other naming a certificate
    or an unknown CA (``certificate verify failed``, ``tlsv1 alert unknown
    ca``) -> bad_certificate. A connection lost without an OpenSSL error
    (ConnectionDone, ConnectionLost) -> closed."""
    reasons = " ".join(_openssl_reasons(reason)).lower()
    if not reasons:
        return "closed" if reason.check(ConnectionDone, ConnectionLost) else "other"
    if any(s in reasons for s in ("unsupported protocol", "wrong version number",
                                  "protocol version", "version too low")):
        return "protocol_version"
    if "did not return a certificate" in reasons:
        return "no_client_certificate"
    if "certificate" in reasons or "unknown ca" in reasons:
        return "bad_certificate"
    return "other"


def handshake_info(tls: TLSMemoryBIOProtocol) -> TlsInfo:
    """The :class:`TlsInfo` of a connection whose handshake is done."""
    connection: SSL.Connection = tls.getHandle()
    alpn = connection.get_alpn_proto_negotiated()
    sni = connection.get_servername()
    # A server asks for a client certificate only with client_ca, and then
    # fails the handshake unless it verifies: one present is verified.
    peer = connection.get_peer_certificate()
    return TlsInfo(
        version=connection.get_protocol_version_name(),
        cipher=connection.get_cipher_name() or "",
        alpn=alpn.decode("ascii", "replace") if alpn else None,
        sni=sni.decode("ascii", "replace") if sni else None,
        client_id=peer_identity(peer))


def terminate(factory: TLSMemoryBIOFactory,
              on_handshake: Callable[[TlsInfo, TLSMemoryBIOProtocol], IProtocol],
              on_lost: Callable[[Failure, str, str], None], clock: IReactorTime,
              handshake_timeout: float) -> TLSMemoryBIOProtocol:
    """The protocol for a connection whose ClientHello is to be answered:
    give it the transport, then the ClientHello bytes already read."""
    handshake = Handshake(on_handshake, on_lost, clock, handshake_timeout)
    return factory.protocol(factory, handshake)
