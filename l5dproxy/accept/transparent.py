"""Transparent listeners: each connection's original destination.

``[[listener]] transparent = true``: the proxy takes connections an
iptables ``REDIRECT`` sent to it (a sidecar taking all of a pod's outbound
traffic), and the destination of each is the one the client asked for
(``l5dproxy.net.origdst``), not the proxy's port: in the connection log
(``original_dst=``), the ``src``-side ``target_addr`` label and the PROXY
protocol header the proxy sends. With ``service = "original_dst"`` the
proxy connects there: every upstream connection and HTTP request of the
connection goes to that address, detected and proxied as usual (its port in
``[detect] opaque_ports`` skips detection, as for a configured service).

A connection to ``original_dst`` is refused (closed at once, counted in
``original_dst_refused_total{listener, reason}``, logged with the
connection) when its original destination is the proxy itself (``loop``:
a connection made straight to the listener, or redirected to a port of this
machine the proxy listens on, would come back to it for ever) or when the
kernel has none for it (``unknown``: not redirected, or no conntrack).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from l5dproxy.balance.backends import BackendSet, Endpoint
from l5dproxy.config.model import HostPort
from l5dproxy.net import origdst

#: Endpoints kept for original destinations (their latency and failure
#: statistics), least recently used dropped first; a connection using one
#: keeps its own reference.
MAX_DESTINATIONS = 1024


class TransparentRecord(Protocol):
    """What this module uses of the connection record
    (``l5dproxy.net.connection.InboundConnection``)."""

    pinned: object

    def set_original_destination(self, destination: IAddress) -> None: ...
    def closed(self, reason: Failure | None, how: str) -> None: ...


class OriginalDestinations:
    """One transparent listener's view of where its connections were going.

    ``backends`` is the listener's service; ``connect_there`` (service
    ``original_dst``) pins each connection to an endpoint for its original
    destination; ``count_refused(reason)`` counts a refused connection.
    """

    def __init__(self, backends: BackendSet, connect_there: bool,
                 count_refused: Callable[[str], None],
                 read: Callable[[object], IPv4Address | IPv6Address | None] | None = None,
                 is_own: Callable[[IPv4Address | IPv6Address, IAddress], bool] | None = None,
                 ) -> None:
        self.backends = backends
        self.connect_there = connect_there
        self.count_refused = count_refused
        self._read = read or _read_original
        self._is_own = is_own or _is_own
        self._endpoints: OrderedDict[HostPort, Endpoint] = OrderedDict()

    def accepted(self, conn: TransparentRecord, transport) -> str | None:
        """Record ``conn``'s original destination (and pin its endpoint);
        the reason to refuse it, or None."""
        dst = self._read(transport)
        if dst is not None:
            conn.set_original_destination(dst)
        if not self.connect_there:
            return None
        if dst is None:
            return self._refuse("unknown", "no original destination")
        if self._is_own(dst, transport.getHost()):
            return self._refuse("loop", "original destination is the proxy itself")
        conn.pinned = self.endpoint_for(HostPort(dst.host, dst.port))
        return None

    def endpoint_for(self, address: HostPort) -> Endpoint:
        endpoints = self._endpoints
        endpoint = endpoints.get(address)
        if endpoint is None:
            backends = self.backends
            endpoint = Endpoint(address, backends.clock, backends.rng, backends.accrual)
            endpoints[address] = endpoint
            if len(endpoints) > MAX_DESTINATIONS:
                endpoints.popitem(last=False)
        else:
            endpoints.move_to_end(address)
        return endpoint

    def _refuse(self, reason: str, why: str) -> str:
        self.count_refused(reason)
        return f"refused: {why}"


def _read_original(transport) -> IPv4Address | IPv6Address | None:
    handle = getattr(transport, "getHandle", None)
    sock = handle() if handle is not None else None
    return origdst.original_destination(sock) if sock is not None else None


def _is_own(dst: IPv4Address | IPv6Address, own: IAddress) -> bool:
    if not isinstance(own, IPv4Address | IPv6Address):
        return False
    return origdst.is_own_address(dst, own)


class Refused(TwistedProtocol):
    """A connection closed as soon as it is made, logged as ``how``."""

    def __init__(self, conn: TransparentRecord, how: str) -> None:
        self.conn = conn
        self.how = how

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.conn.closed(reason, self.how)
