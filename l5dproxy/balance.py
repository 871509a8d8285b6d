"""Endpoints and the choice among them.

For now a service's connections go to the endpoint with the fewest open
connections (ties broken in turn), which is enough to spread TCP connections;
latency-aware P2C balancing replaces the choice, not the interface.
"""

from __future__ import annotations

from collections.abc import Iterable

from l5dproxy.config import HostPort, ServiceConfig


class Endpoint:
    """One address of a service, with what is in flight to it right now."""

    __slots__ = ("active", "address", "label")

    def __init__(self, address: HostPort) -> None:
        self.address = address
        self.label = str(address)
        self.active = 0

    def __repr__(self) -> str:
        return f"<Endpoint {self.label} active={self.active}>"

    def begin(self) -> None:
        """A request or connection to this endpoint starts."""
        self.active += 1

    def end(self, latency: float | None = None, success: bool = True) -> None:
        """It ended: ``latency`` in seconds (None when there was no response)
        and whether it succeeded, for latency-aware balancing and failure accrual."""
        self.active -= 1


class LeastConnections:
    """Pick the endpoint with the fewest active uses; rotate among ties."""

    def __init__(self, addresses: Iterable[HostPort]) -> None:
        self.endpoints = [Endpoint(a) for a in addresses]
        self._turn = 0

    def pick(self) -> Endpoint | None:
        """The endpoint to use next, or None when there is none."""
        endpoints = self.endpoints
        if not endpoints:
            return None
        n = len(endpoints)
        start = self._turn
        self._turn = (start + 1) % n
        best = endpoints[start % n]
        for i in range(1, n):
            candidate = endpoints[(start + i) % n]
            if candidate.active < best.active:
                best = candidate
        return best


class Upstream:
    """A service at run time: its config and the balancer over its endpoints."""

    def __init__(self, config: ServiceConfig, opaque_ports: frozenset[int]) -> None:
        self.name = config.name
        self.config = config
        self.opaque = config.is_opaque(opaque_ports)
        self.balancer = LeastConnections(config.endpoints)

    def pick(self) -> Endpoint | None:
        return self.balancer.pick()
