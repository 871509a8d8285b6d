"""Twisted's DNS client as discovery needs it: quiet, and stoppable.

``twisted.names.client.Resolver`` makes one ``DNSDatagramProtocol`` per query
(on a random port) and logs each one's start and stop; with many services on
short TTLs that is most of a proxy's log. ``QuietResolver`` overrides the
private ``Resolver._connectedProtocol`` (and reads its ``_reactor``) to make
them quiet. A resolver reading ``/etc/resolv.conf`` re-reads it every minute
through a call it keeps private as ``_parseCall``: ``stop_resolver`` cancels
it (else a stopped service leaves a timer behind). These are the only uses of
``twisted.names`` private names; tests/test_library_internals.py fails loudly
if one goes.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.names import client, dns


class _QuietProtocol(dns.DNSDatagramProtocol):
    noisy = False


class QuietResolver(client.Resolver):
    """A DNS client whose per-query protocols (one per query, on a random
    port, as twisted.names does) do not log their start and stop."""

    def _connectedProtocol(self, interface: str = "") -> dns.DNSDatagramProtocol:
        proto = _QuietProtocol(self, reactor=self._reactor)
        for attempt in range(1000):
            try:
                self._reactor.listenUDP(dns.randomSource(), proto, interface=interface)
            except CannotListenError as e:
                if getattr(e.socketError, "errno", None) == errno.EMFILE or attempt == 999:
                    raise
            else:
                return proto
        raise AssertionError("unreachable")  # pragma: no cover


def stop_resolver(resolver: Any) -> None:
    """Cancel what a resolver (or each resolver of a ``ResolverChain``) keeps
    scheduled: a ``client.Resolver``'s resolv.conf re-reading."""
    for r in getattr(resolver, "resolvers", [resolver]):
        call = getattr(r, "_parseCall", None)
        if call is not None and call.active():
            call.cancel()
