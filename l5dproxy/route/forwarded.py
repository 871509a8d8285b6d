"""The client's address in an HTTP request: ``X-Forwarded-For``,
``X-Forwarded-Proto`` and RFC 7239 ``Forwarded``.

One rule for every request, whatever protocol it came in on and goes out
on (HTTP/1, h2, and h1<->h2 translation): the dispatcher applies it to the
neutral ``RequestHead`` before routing, so each codec end only writes what
it is given.

A listener's ``forwarded`` mode and ``trusted_proxies`` decide
(``ForwardedRule.apply``):

* ``append`` (the default): from a *trusted* peer (its address in one of
  ``trusted_proxies``) the fields are kept as they came and the client's
  address is appended to ``X-Forwarded-For`` (and, when the request has a
  ``Forwarded`` field, a ``for=...;proto=...`` element to it; a ``Forwarded``
  line that is not RFC 7239 syntax, as an unterminated quoted-string, is
  dropped rather than appended to);
  ``X-Forwarded-Proto`` is kept when present, else set. From any other
  peer the fields it sent are dropped and set anew, so a client cannot
  forge its address (what nginx's ``real_ip`` and Envoy's
  ``xff_num_trusted_hops`` guard against from the other side).
* ``replace``: the fields are always set anew, whoever the peer is.
* ``off``: the request is forwarded as it came.

``X-Forwarded-For`` holds addresses without ports (as nginx's
``$proxy_add_x_forwarded_for`` and Envoy write them), IPv6 without
brackets; ``Forwarded`` quotes an IPv6 node as RFC 7239 section 6 requires
(``for="[2001:db8::1]"``). A ``Forwarded`` field is only added to when the
request has one: the rule keeps the two consistent (the last ``for=`` is the
last ``X-Forwarded-For`` entry), it does not introduce a field an
application does not expect. The fields the rule writes come after the
request's other fields, names lowercase (valid for HTTP/1 and required by
h2, RFC 9113 8.2.1).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from l5dproxy.config.checks import IPNetwork, parse_networks
from l5dproxy.exchange.message import Headers, RequestHead

if TYPE_CHECKING:
    from l5dproxy.exchange.contracts import ClientConnection


MODES = ("append", "replace", "off")

XFF = b"x-forwarded-for"
XFP = b"x-forwarded-proto"
FORWARDED = b"forwarded"
_FIELDS = frozenset((XFF, XFP, FORWARDED))

# RFC 7239 section 4: Forwarded = 1#forwarded-element; forwarded-element =
# [forwarded-pair] *( ";" [forwarded-pair] ); forwarded-pair = token "=" value;
# value = token / quoted-string (RFC 9110 5.6.2, 5.6.4); empty list elements
# allowed (RFC 9110 5.6.1). Token and quoted-string start with different
# bytes and the separators are required, so matching is linear.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_PAIR = _TOKEN + rb"=(?:" + _TOKEN + rb"|" + _QUOTED + rb")"
_ELEMENT = rb"(?:" + _PAIR + rb")?(?:[ \t]*;[ \t]*(?:" + _PAIR + rb")?)*"
_FORWARDED_VALUE = re.compile(
    rb"[ \t]*" + _ELEMENT + rb"(?:[ \t]*,[ \t]*" + _ELEMENT + rb")*[ \t]*")


def well_formed_forwarded(value: bytes) -> bool:
    """Whether ``value`` is a ``Forwarded`` field value by RFC 7239 section
    4. One that is not (an unterminated quoted-string, a stray ``"``) is not
    appended to: the proxy's own element would land inside it."""
    return _FORWARDED_VALUE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class ForwardedRule:
    """A listener's ``forwarded`` and ``trusted_proxies``, compiled."""

    mode: str = "append"
    trusted: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_config(cls, mode: str, trusted_proxies: Sequence[str]) -> ForwardedRule:
        if mode not in MODES:
            raise ValueError(f"forwarded must be one of {', '.join(MODES)}, not {mode!r}")
        return cls(mode, parse_networks(trusted_proxies))

    def trusts(self, host: str | None) -> bool:
        """Whether ``host`` (an IP address as text) is in ``trusted``; an
        IPv4-mapped IPv6 address (``::ffff:10.0.0.1``, a dual-stack socket's
        view of an IPv4 peer) counts as its IPv4 address."""
        if host is None or not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def for_connection(self, connection: ClientConnection) -> ClientForwarding | None:
        """This rule for every request of ``connection``, its ``client_host``
        and scheme (``https`` when ``secure``) read once: a connection's
        client (a PROXY protocol header) and its TLS are settled before its
        first request. None when the mode is ``off``."""
        if self.mode == "off":
            return None
        return ClientForwarding(self, connection.client_host,
                                b"https" if connection.secure else b"http")

    def apply(self, head: RequestHead, client_host: str | None, proto: bytes) -> None:
        """Set the forwarding fields of ``head`` for a request from
        ``client_host`` (the connection's client address, after any PROXY
        protocol header; None: not an IP connection) that came in over
        ``proto`` (``b"http"`` or ``b"https"``); see ``ClientForwarding.apply``."""
        if self.mode != "off":
            ClientForwarding(self, client_host, proto).apply(head)


class ClientForwarding:
    """A ``ForwardedRule`` for one client (address and scheme): what it
    adds worked out once, applied to each of the client's requests."""

    __slots__ = ("added", "client_host", "node", "proto", "rule", "trusted")

    def __init__(self, rule: ForwardedRule, client_host: str | None, proto: bytes) -> None:
        self.rule = rule
        self.client_host = client_host
        self.proto = proto
        self.node = _node(client_host)
        #: The fields a request with none of them gets, in order.
        self.added = ((XFF, self.node), (XFP, proto))
        #: Whether the fields the client sent are kept (``append`` from a
        #: trusted peer); None until a request has any.
        self.trusted: bool | None = None

    def apply(self, head: RequestHead) -> None:
        """Set the forwarding fields of ``head`` by the rule (the module
        docstring). ``head.headers`` is replaced, never changed in place."""
        headers = head.headers
        for name, _ in headers:   # per request: lengths first
            n = len(name)
            if (n == 15 or n == 17 or n == 9) and name.lower() in _FIELDS:
                break
        else:   # the common case: none of the fields, nothing to keep or drop
            head.headers = [*headers, *self.added]
            return
        keep = self.trusted
        if keep is None:
            rule = self.rule
            keep = self.trusted = rule.mode == "append" and rule.trusts(self.client_host)
        node = self.node
        proto = self.proto
        kept: Headers = []
        xff: list[bytes] = []
        xfp: list[bytes] = []
        forwarded: list[bytes] = []
        had_forwarded = False
        for name, value in headers:
            if len(name) == 15 and name.lower() == XFF:
                xff.append(value)
            elif len(name) == 17 and name.lower() == XFP:
                xfp.append(value)
            elif len(name) == 9 and name.lower() == FORWARDED:
                had_forwarded = True
                forwarded.append(value)
            else:
                kept.append((name, value))
        if not keep:
            xff, xfp, forwarded = [], [], []
        else:   # a trusted peer's malformed Forwarded is dropped, not extended
            forwarded = [f for f in forwarded if well_formed_forwarded(f)]
        xff.append(node)
        kept.append((XFF, b", ".join(v for v in (x.strip() for x in xff) if v)))
        kept.append((XFP, b", ".join(xfp) if xfp else proto))
        if had_forwarded:
            element = b"for=" + _forwarded_node(self.client_host, node) + b";proto=" + proto
            forwarded.append(element)
            kept.append((FORWARDED, b", ".join(v for v in (f.strip() for f in forwarded) if v)))
        head.headers = kept


def _node(host: str | None) -> bytes:
    """The client as an ``X-Forwarded-For`` entry: its IP address, or
    ``unknown`` (RFC 7239 6.2's obfuscated-node word) for a connection
    without one (a ``unix:`` listener)."""
    if not host:
        return b"unknown"
    return host.encode("ascii", "replace")


def _forwarded_node(host: str | None, node: bytes) -> bytes:
    """RFC 7239 6: an IPv6 node is bracketed and so must be quoted."""
    if host and ":" in host:
        return b'"[' + node + b']"'
    return node
