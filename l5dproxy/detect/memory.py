"""Destinations that spoke first, remembered (pure: a clock in, no I/O).

``OpaqueMemory`` is what ``l5dproxy.detect.early`` learns: a destination
(service, endpoint) whose server spoke before the client is relayed as opaque
TCP at once the next time it is picked (reason ``learned_opaque``), with no
client-silence window. Bounded (the least recently learned goes first) and
expiring; keyed by the service's config too, so a changed service starts
afresh.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime


@dataclass(slots=True)
class _Entry:
    generation: Hashable
    learned_at: float
    expires_at: float
    hits: int = 0


class OpaqueMemory:
    """Destinations that spoke first, each for ``ttl`` seconds, at most
    ``max_entries`` of them (the least recently learned goes first).

    A destination is ``(service, endpoint)``; ``generation`` is anything that
    changes when the service's config changes (the ServiceConfig itself), so
    a lookup under a new config never trusts what the old one taught.
    """

    def __init__(self, clock: IReactorTime, max_entries: int = 1024,
                 ttl: float = 600.0) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.clock = clock
        self.max_entries = max_entries
        self.ttl = ttl
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._per_service: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def has_service(self, service: str) -> bool:
        """Whether anything (maybe expired) is remembered for ``service``: the
        cheap test that keeps services with nothing learned off the slow path."""
        return service in self._per_service

    def learn(self, service: str, endpoint: str, generation: Hashable = None) -> None:
        now = self.clock.seconds()
        key = (service, endpoint)
        if key in self._entries:
            self._remove(key)
        else:
            self.prune()
            while len(self._entries) >= self.max_entries:
                self._remove(next(iter(self._entries)))
        self._entries[key] = _Entry(generation, now, now + self.ttl)
        self._per_service[service] = self._per_service.get(service, 0) + 1

    def knows(self, service: str, endpoint: str, generation: Hashable = None) -> bool:
        """Whether ``endpoint`` of ``service`` (as configured now) spoke first
        within the last ``ttl`` seconds; counts a hit when it did."""
        key = (service, endpoint)
        entry = self._entries.get(key)
        if entry is None:
            return False
        if entry.expires_at <= self.clock.seconds() or entry.generation != generation:
            self._remove(key)
            return False
        entry.hits += 1
        return True

    def prune(self) -> None:
        now = self.clock.seconds()
        for key in [k for k, e in self._entries.items() if e.expires_at <= now]:
            self._remove(key)

    def entries(self) -> list[dict[str, Any]]:
        """What is remembered now, oldest first, for the admin endpoint."""
        self.prune()
        now = self.clock.seconds()
        return [
            {"service": service, "endpoint": endpoint,
             "age_seconds": round(now - e.learned_at, 3),
             "expires_in_seconds": round(e.expires_at - now, 3), "hits": e.hits}
            for (service, endpoint), e in self._entries.items()
        ]

    def _remove(self, key: tuple[str, str]) -> None:
        del self._entries[key]
        service = key[0]
        left = self._per_service[service] - 1
        if left:
            self._per_service[service] = left
        else:
            del self._per_service[service]
