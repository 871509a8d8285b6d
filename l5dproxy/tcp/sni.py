"""SNI passthrough: ``[[listener.route]] sni = "GLOB"`` on a listener that
does not terminate TLS.

A ``tls`` verdict carries the ClientHello's server name (detect/sniff.py);
:func:`sni_handler` relays the connection, unterminated, to the service of
the first route whose glob matches it, else to the listener's service, as
opaque TCP (spliced when the kernel can: nothing is read but the
ClientHello). That is TLS routing for databases and external hosts, as
Envoy's ``server_names`` filter-chain match and HAProxy's ``req.ssl_sni``
do. Pure Python: no OpenSSL is loaded for it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from l5dproxy.tcp.relay import RelayProtocol, RelaySite

if TYPE_CHECKING:
    from l5dproxy.balance.backends import BackendSet
    from l5dproxy.net.connection import InboundConnection


def sni_glob(pattern: str) -> re.Pattern[str]:
    """``pattern`` as a case-insensitive regex over a whole server name:
    ``*`` any run of characters (dots included: ``*.example.com`` matches
    ``a.b.example.com`` too), ``?`` one character, the rest literal."""
    parts = (".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in pattern)
    return re.compile("".join(parts), re.IGNORECASE | re.DOTALL)


def sni_handler(routes: Sequence[tuple[str, str]], backends: Mapping[str, BackendSet],
                site: RelaySite) -> Callable[[InboundConnection], RelayProtocol]:
    """The ``tls`` verdict's handler for a listener with SNI routes.

    ``routes`` are ``(glob, service)`` in config order; ``backends`` the
    running services by name, looked up per connection (a reload updates
    the map in place); ``site`` what the listener's relays share. The
    connection's ``service`` (its log line) becomes the route's.
    """
    compiled = [(sni_glob(glob), service) for glob, service in routes]

    def handler(conn: InboundConnection) -> RelayProtocol:
        name = conn.sni
        if name:
            for pattern, service in compiled:
                if pattern.fullmatch(name):
                    upstream = backends.get(service)
                    if upstream is not None:
                        conn.service = service
                        return RelayProtocol(conn, site, upstream)
        return RelayProtocol(conn, site)

    return handler
