"""The client's TLS identity in an HTTP request (``l5d-client-id``) and the
``[listener.tls] allow`` verdict: one rule for every request, HTTP/1 and h2
alike, applied by the dispatcher to the neutral ``RequestHead``."""

from __future__ import annotations

from typing import Protocol

from l5dproxy.exchange.message import Body, Headers, ProxyError, RequestHead

CLIENT_ID = b"l5d-client-id"
#: The ``l5d-proxy-error`` of a request refused by ``[listener.tls] allow``.
UNAUTHORIZED = "unauthorized"


class ClientIdentity(Protocol):
    """What :func:`identify_client` reads of a client connection (part of
    exchange.contracts.ClientConnection, which InboundConnection provides)."""

    client_id: str | None   # the verified client certificate's identity, else None
    authorized: bool        # false: ``[listener.tls] allow`` refused the client


def identify_client(head: RequestHead, connection: ClientIdentity,
                    body: Body | None = None) -> ProxyError | None:
    """The one rule for the client's TLS identity, applied by the dispatcher
    to every request: ``l5d-client-id`` set from the connection's verified
    client certificate (:func:`set_client_id`), every ``l5d-client-id`` the
    client sent in the trailer section of ``body`` removed (an application
    that merges trailers into the header section must not see a forged
    one), and the 403 to answer when
    ``[listener.tls] allow`` refused the client (``connection.authorized``
    false; l5dproxy.detect.terminate). ``connection`` is the
    InboundConnection (``client_id`` None: plaintext or no certificate).
    The dispatcher keeps a ``ConnectionIdentity`` per connection instead
    (the same rule, the connection read once)."""
    return ConnectionIdentity(connection).apply(head, body)


class ConnectionIdentity:
    """:func:`identify_client` for the requests of one connection: its
    identity and ``allow`` verdict read once (a connection's TLS handshake
    is over before its first request)."""

    __slots__ = ("field", "refused")

    def __init__(self, connection: ClientIdentity) -> None:
        #: The ``l5d-client-id`` field the proxy sets, if any.
        self.field = client_id_field(connection.client_id)
        self.refused = not connection.authorized

    def apply(self, head: RequestHead, body: Body | None = None) -> ProxyError | None:
        """Apply the rule to one request (``identify_client``): its
        ``l5d-client-id`` fields replaced, its trailer section ruled; the
        403 to answer when the connection was refused, else None."""
        headers = head.headers
        for name, _ in headers:   # per request: lengths first
            if len(name) == 13 and name.lower() == CLIENT_ID:
                headers = head.headers = without_client_id(headers)
                break
        if self.field is not None:
            headers.append(self.field)
        if body is not None:
            body.rule_trailers(without_client_id)
        if self.refused:
            return ProxyError.forbidden(UNAUTHORIZED)
        return None


def without_client_id(fields: Headers) -> Headers:
    """``fields`` without any ``l5d-client-id`` (any case); ``fields``
    itself when it has none."""
    for name, _ in fields:
        if len(name) == 13 and name.lower() == CLIENT_ID:
            return [(n, v) for n, v in fields if n.lower() != CLIENT_ID]
    return fields


def client_id_field(client_id: str | None) -> tuple[bytes, bytes] | None:
    """The ``l5d-client-id`` field for a verified client identity: None
    without one, and for one that is not visible ASCII (not sent)."""
    if client_id is not None and client_id.isascii() and client_id.isprintable() \
            and " " not in client_id:
        return (CLIENT_ID, client_id.encode("ascii"))
    return None


def set_client_id(head: RequestHead, client_id: str | None) -> None:
    """Remove every ``l5d-client-id`` field the client sent and, when the
    connection's client certificate was verified (mTLS), add one with its
    identity (``l5d-client-id: spiffe://...``), as Linkerd's inbound proxy
    does (an identity that is not visible ASCII is not sent,
    ``client_id_field``). Applied by the dispatcher to every request, HTTP/1
    and h2 alike (``ConnectionIdentity``), so an endpoint can trust the
    field: only the proxy sets it."""
    headers = head.headers = without_client_id(head.headers)
    field = client_id_field(client_id)
    if field is not None:
        headers.append(field)
