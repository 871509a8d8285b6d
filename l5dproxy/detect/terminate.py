"""The ``tls`` verdict on a terminating listener: handshake, then detect inside.

A listener with ``[listener.tls]`` gets :func:`tls_handler` as its handler
for the ``tls`` verdict (app/ builds it; without the table TLS stays opaque:
the relay, or an SNI route). The ClientHello the detect protocol buffered is
answered by Twisted's ``TLSMemoryBIOProtocol`` (l5dproxy.tls.server); once
the handshake is done the plaintext is given to the protocol that speaks it:

* ALPN ``h2`` -> the h2 server end; ALPN ``http/1.1`` -> the HTTP/1 end
  (the ALPN choice is binding: RFC 7301 3.2);
* no ALPN -> the plaintext's first bytes are sniffed as on a plain
  connection (:class:`InnerDetect`): HTTP/1, the h2 preface, or anything else
  relayed as opaque TCP (TLS-wrapped database protocols still work).

The connection record gets the handshake (``conn.tls``), the client's
verified identity (``conn.client_id``, mTLS) and whether ``allow`` admits it
(``conn.authorized``): the dispatcher answers each request of a refused
client 403 / PERMISSION_DENIED, and a refused opaque connection is closed;
each refused connection counts once in ``authz_denied_total{listener,
protocol}``. A failed handshake or one not
done within ``handshake_timeout`` ends the connection, logged with why and
counted in ``tls_handshake_errors_total{listener, reason}`` (reasons:
l5dproxy.tls.server.HANDSHAKE_ERROR_REASONS).
Terminated connections are never spliced (the proxy reads the plaintext).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from l5dproxy.detect.sniff import Verdict, sniff, timed_out
from l5dproxy.tls.identity import allowed, compile_patterns
from l5dproxy.tls.server import TlsInfo, terminate, tls_factory

if TYPE_CHECKING:
    from l5dproxy.net.connection import InboundConnection
    from l5dproxy.telemetry import Metrics
    from l5dproxy.tls.server import ServerContexts

Handler = Callable[["InboundConnection"], IProtocol]

#: The verdict an ALPN choice stands for.
_ALPN_VERDICTS = {"h2": "h2", "http/1.1": "http1"}


def tls_handler(contexts: ServerContexts, handlers: Mapping[str, Handler],
                clock: IReactorTime, metrics: Metrics, listener: str,
                handshake_timeout: float, allow: tuple[str, ...] | None,
                peek_limit: int, detect_timeout: float) -> Handler:
    """The handler of one terminating listener's ``tls`` verdict.

    ``handlers`` speak the plaintext (``h2``, ``http1``; anything else goes
    to ``opaque``, the TCP relay, which it must have); ``allow`` (None: any
    verified client) are glob patterns over the client's identity; ``peek_limit`` and
    ``detect_timeout`` bound the sniffing of plaintext without ALPN.
    """
    factory = tls_factory(contexts, clock)
    patterns = compile_patterns(allow) if allow is not None else None

    def handler(conn: InboundConnection) -> IProtocol:
        def on_handshake(info: TlsInfo, tls: TLSMemoryBIOProtocol) -> IProtocol:
            conn.tls = info
            conn.client_id = info.client_id
            if patterns is not None and not allowed(info.client_id, patterns):
                conn.authorized = False
            protocol = _ALPN_VERDICTS.get(info.alpn or "")
            if protocol is not None:
                return _speak(conn, protocol)
            return InnerDetect(conn, _speak, clock, peek_limit, detect_timeout)

        def _speak(conn: InboundConnection, protocol: str) -> IProtocol:
            return _speak_or_refuse(conn, protocol, handlers, metrics, listener)

        def on_lost(reason: Failure, how: str, kind: str) -> None:
            metrics.tls_handshake_errors_total.labels(listener, kind).inc()
            conn.closed(reason, how)

        return terminate(factory, on_handshake, on_lost, clock, handshake_timeout)

    return handler


def _speak_or_refuse(conn: InboundConnection, protocol: str,
                     handlers: Mapping[str, Handler], metrics: Metrics,
                     listener: str) -> IProtocol:
    """The protocol speaking ``protocol`` for ``conn``; a refused client
    (``conn.authorized`` false) is counted once in
    ``authz_denied_total{listener, protocol}``, and its opaque stream is
    closed (its HTTP requests are answered 403 by the dispatcher)."""
    if not conn.authorized:  # counted once per connection
        metrics.authz_denied_total.labels(listener, protocol).inc()
        if protocol not in ("h2", "http1"):
            return _Refused(conn)
    return handlers.get(protocol, handlers["opaque"])(conn)


def plaintext_refused(handlers: Mapping[str, Handler], metrics: Metrics,
                      listener: str) -> dict[str, Handler]:
    """The handlers of the plaintext verdicts (``h2``, ``http1``, ``opaque``)
    on a listener whose ``[listener.tls]`` has ``client_ca``: a client
    certificate is required there, and a connection without TLS has none, so
    it is refused as a client ``allow`` refuses is (HTTP: each request 403
    ``l5d-proxy-error: unauthorized``; opaque: closed; counted in
    ``authz_denied_total``). Without this, plaintext sent to an mTLS port
    would be proxied with no identity, past ``allow`` (Linkerd's
    ``all-authenticated`` policy likewise refuses plaintext)."""
    def refusing(protocol: str) -> Handler:
        def handler(conn: InboundConnection) -> IProtocol:
            conn.authorized = False
            return _speak_or_refuse(conn, protocol, handlers, metrics, listener)
        return handler
    return {protocol: refusing(protocol) for protocol in ("h2", "http1", "opaque")}


class _Refused(Protocol):
    """A TLS client whose identity ``allow`` refuses, on an opaque stream:
    closed at once (TCP has no way to say why)."""

    def __init__(self, conn: InboundConnection) -> None:
        self.conn = conn

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.conn.closed(reason, "unauthorized")


class InnerDetect(Protocol):
    """Sniffs the plaintext of a terminated connection that agreed on no ALPN.

    The rules of the outer detection (l5dproxy.detect.sniff): the h2
    preface, the start of an HTTP/1 request, else opaque, decided within
    ``peek_limit`` bytes and ``timeout`` seconds (a client waiting for the
    server to speak first is relayed as opaque at the timeout, as the
    endpoint is then connected). A TLS ClientHello inside TLS is opaque.
    ``speak(conn, protocol)`` builds the protocol for a verdict; it takes
    this one's place in the TLS layer and gets the bytes read so far.
    """

    def __init__(self, conn: InboundConnection,
                 speak: Callable[[InboundConnection, str], IProtocol],
                 clock: IReactorTime, peek_limit: int, timeout: float) -> None:
        self.conn = conn
        self.speak = speak
        self.clock = clock
        self.peek_limit = peek_limit
        self.timeout = timeout
        self.buffer = b""
        self.next: IProtocol | None = None
        self.timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.timer = self.clock.callLater(self.timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self.next is not None:
            self.next.dataReceived(data)
            return
        self.buffer += data
        verdict = sniff(self.buffer, self.peek_limit)
        if verdict is not None:
            self._switch(verdict)

    def _timed_out(self) -> None:
        self.timer = None
        self._switch(timed_out(self.buffer))

    def _switch(self, verdict: Verdict) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        protocol = verdict.protocol if verdict.protocol in ("h2", "http1") else "opaque"
        next_protocol = self.next = self.speak(self.conn, protocol)
        tls = self.transport
        assert tls is not None
        buffered, self.buffer = self.buffer, b""
        if isinstance(tls, TLSMemoryBIOProtocol) and tls.wrappedProtocol is self:
            tls.wrappedProtocol = next_protocol
        next_protocol.makeConnection(tls)
        if buffered:
            next_protocol.dataReceived(buffered)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.next is not None:
            self.next.connectionLost(reason)
            return
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        self.conn.closed(reason, "closed during detection (inside tls)")
