"""Endpoints, the choice among them, failure accrual and the retry budget.

Pure logic: nothing here touches a transport. Time comes from an injected
``IReactorTime`` (``clock.seconds()``), randomness from an injected
``random.Random``, so every decision can be tested with a ``Clock`` and a seed.

* **Balancing** is power of two choices (P2C): two distinct endpoints drawn at
  random, the cheaper one wins. For HTTP requests the cost is Linkerd's (and
  Finagle's) *peak-EWMA*: an exponentially weighted moving average of response
  latency that jumps at once to any sample above it and decays back over
  ``decay`` seconds, times the requests outstanding + 1. For TCP connections
  the cost is just the connections outstanding.
* **Failure accrual**: after ``consecutive_failures`` failures in a row an
  endpoint is ejected for a backoff that doubles (with jitter) from
  ``min_backoff`` to ``max_backoff``; then one request or connection probes
  it. Success brings it back; failure ejects it again for longer.
* **Retry budget**: retries may add ``ratio`` of the original requests plus
  ``min_per_second`` over a ``ttl`` window, so retries never multiply an outage.

Callers: ``endpoint = upstream.pick()`` (None: nothing available, answer 503 at
once), ``endpoint.begin()`` right away, ``endpoint.end(latency_s, success)``
when done (``latency_s`` None when there was no response; ``success`` None for
"no verdict", for example a TCP connection closing after it was established).
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from l5dproxy.config.model import HostPort, ServiceConfig

#: The latency assumed for an endpoint with no data yet (Linkerd: 30 ms).
DEFAULT_RTT = 0.030
#: How fast the peak-EWMA forgets (Linkerd: 10 s).
DEFAULT_DECAY = 10.0

READY = "ready"
EJECTED = "ejected"
PROBATION = "probation"


@dataclass(frozen=True, slots=True)
class Accrual:
    """Failure accrual settings (``consecutive_failures = 0`` turns it off)."""

    consecutive_failures: int = 7
    min_backoff: float = 1.0
    max_backoff: float = 60.0
    jitter: float = 0.5

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """The ejection time after ``attempt`` earlier ejections in a row."""
        base = min(self.max_backoff, self.min_backoff * (2.0 ** min(attempt, 62)))
        return min(self.max_backoff, base * (1.0 + self.jitter * rng.random()))


class Endpoint:
    """One address of a service: what is in flight to it, its latency
    estimate and its failure-accrual state."""

    __slots__ = (
        "accrual", "active", "address", "clock", "decay", "ejected_until", "ejections",
        "failures", "label", "probe_inflight", "rng", "rtt", "stamp", "state", "streak",
        "weight",
    )

    def __init__(self, address: HostPort, clock: Any = None, rng: random.Random | None = None,
                 accrual: Accrual | None = None, default_rtt: float = DEFAULT_RTT,
                 decay: float = DEFAULT_DECAY) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.address = address
        self.label = str(address)
        self.clock = clock
        self.rng = rng or random.Random()
        self.accrual = accrual or Accrual()
        self.decay = decay
        self.active = 0
        self.rtt = default_rtt
        self.stamp = clock.seconds()
        self.state = READY
        self.failures = 0          # consecutive failures so far
        self.streak = 0            # ejections in a row (the backoff exponent)
        self.ejections = 0         # ejections in all
        self.ejected_until = 0.0
        self.probe_inflight = False
        #: Relative weight (DNS SRV): the balancer's cost is divided by it.
        self.weight = 1.0

    def __repr__(self) -> str:
        return f"<Endpoint {self.label} {self.state} active={self.active} rtt={self.rtt:.4f}>"

    # -- the caller's side --

    def begin(self) -> None:
        """A request or connection to this endpoint starts (right after pick)."""
        self.active += 1
        if self.state == PROBATION:
            self.probe_inflight = True

    def end(self, latency: float | None = None, success: bool | None = True) -> None:
        """It ended: ``latency`` in seconds (None when there was no response)
        and whether it succeeded (None: no verdict for failure accrual)."""
        self.active -= 1
        if latency is not None:
            self._update(latency, self.clock.seconds())
        if success is not None:
            self.report(success)
        elif self.state == PROBATION:
            self.probe_inflight = False  # the probe gave no verdict: another may go

    def report(self, success: bool) -> None:
        """A verdict for failure accrual without ending anything (the TCP
        relay reports success when the connection is established)."""
        if self.state == EJECTED:
            return  # the end of something begun before the ejection
        if success:
            self.failures = 0
            if self.state == PROBATION:
                self.state = READY
                self.streak = 0
                self.probe_inflight = False
            return
        if self.state == PROBATION:
            self._eject()
            return
        self.failures += 1
        threshold = self.accrual.consecutive_failures
        if threshold and self.failures >= threshold:
            self._eject()

    # -- the balancer's side --

    def available(self, now: float) -> bool:
        """Whether it may be picked now: not ejected, and not on probation
        with its one probe already in flight."""
        state = self.state
        if state == READY:
            return True
        if state == EJECTED:
            if now < self.ejected_until:
                return False
            self.state = PROBATION
            self.probe_inflight = False
        return not self.probe_inflight

    def latency(self, now: float) -> float:
        """The peak-EWMA latency estimate in seconds, decayed to ``now``."""
        return self._update(0.0, now)

    def peak_ewma_cost(self, now: float) -> float:
        return self._update(0.0, now) * (self.active + 1) / self.weight

    def _update(self, sample: float, now: float) -> float:
        if sample > self.rtt:
            self.rtt = sample  # pessimistic: a peak counts at once
        else:
            elapsed = now - self.stamp
            if elapsed > 0:
                w = math.exp(-elapsed / self.decay)
                self.rtt = self.rtt * w + sample * (1.0 - w)
        if now > self.stamp:
            self.stamp = now
        return self.rtt

    def _eject(self) -> None:
        now = self.clock.seconds()
        self.state = EJECTED
        self.ejected_until = now + self.accrual.backoff(self.streak, self.rng)
        self.streak += 1
        self.ejections += 1
        self.failures = 0
        self.probe_inflight = False


def peak_ewma_cost(endpoint: Endpoint, now: float) -> float:
    return endpoint.peak_ewma_cost(now)


def outstanding_cost(endpoint: Endpoint, now: float) -> float:
    return (endpoint.active + 1) / endpoint.weight


class P2C:
    """Power of two choices: two distinct available endpoints at random, the
    one with the lower ``cost(endpoint, now)`` wins."""

    def __init__(self, cost: Callable[[Endpoint, float], float], clock: Any,
                 rng: random.Random) -> None:
        self.cost = cost
        self.clock = clock
        self.rng = rng

    def pick(self, endpoints: Sequence[Endpoint], avoid: Endpoint | None = None,
             ) -> Endpoint | None:
        """The endpoint to use next, or None when none is available. ``avoid``
        (a retry's last endpoint) is only picked when it is the only choice."""
        n = len(endpoints)
        if n == 0:
            return None
        now = self.clock.seconds()
        if n == 1:   # the slow path's answer, without its lists
            only = endpoints[0]
            return only if only.available(now) else None
        if n >= 2:
            rng = self.rng
            i = rng.randrange(n)
            j = rng.randrange(n - 1)
            if j >= i:
                j += 1
            a, b = endpoints[i], endpoints[j]
            if (a is not avoid and b is not avoid
                    and a.available(now) and b.available(now)):
                return self._cheaper(a, b, now)
        # Slow path: some are unavailable (or to be avoided); choose among the rest.
        ready = [e for e in endpoints if e.available(now)]
        if avoid is not None and len(ready) > 1:
            ready = [e for e in ready if e is not avoid]
        if len(ready) <= 1:
            return ready[0] if ready else None
        a, b = self.rng.sample(ready, 2)
        return self._cheaper(a, b, now)

    def _cheaper(self, a: Endpoint, b: Endpoint, now: float) -> Endpoint:
        return b if self.cost(b, now) < self.cost(a, now) else a


class RetryBudget:
    """Linkerd's retry budget: over a sliding ``ttl`` window, retries may be
    ``ratio`` of the original requests deposited plus ``min_per_second * ttl``.

    ``deposit()`` once per original request; ``try_withdraw()`` before each
    retry, which may go ahead only when it returns True.
    """

    SLOTS = 10

    def __init__(self, clock: Any, ratio: float = 0.2, min_per_second: float = 10.0,
                 ttl: float = 10.0) -> None:
        self.clock = clock
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.ttl = ttl
        self._width = ttl / self.SLOTS
        # (slot index, deposits, withdrawals), oldest first
        self._slots: deque[list[int]] = deque()
        self._deposits = 0
        self._withdrawals = 0
        # The current slot and the times it covers: a deposit within them
        # (one per request) needs no index, no walk of the window. Until the
        # first deposit the range is empty, so that one finds its slot.
        self._slot: list[int] = [0, 0, 0]
        self._slot_from = 0.0
        self._slot_to = 0.0

    def _current(self) -> list[int]:
        index = int(self.clock.seconds() // self._width)
        slots = self._slots
        while slots and slots[0][0] <= index - self.SLOTS:
            _, d, w = slots.popleft()
            self._deposits -= d
            self._withdrawals -= w
        if not slots or slots[-1][0] != index:
            slots.append([index, 0, 0])
        slot = self._slot = slots[-1]
        self._slot_from = index * self._width
        self._slot_to = (index + 1) * self._width
        return slot

    def deposit(self) -> None:
        if self._slot_from <= self.clock.seconds() < self._slot_to:
            self._slot[1] += 1
        else:
            self._current()[1] += 1
        self._deposits += 1

    def balance(self) -> float:
        """How many retries may go now."""
        self._current()
        return (self._deposits * self.ratio + self.min_per_second * self.ttl
                - self._withdrawals)

    def try_withdraw(self) -> bool:
        slot = self._current()
        if (self._deposits * self.ratio + self.min_per_second * self.ttl
                - self._withdrawals) < 1.0:
            return False
        slot[2] += 1
        self._withdrawals += 1
        return True


class BackendSet:
    """A service at run time: its config, its endpoints and their balancers.

    ``pick()`` chooses for an HTTP request (P2C over peak-EWMA),
    ``pick_connection()`` for a TCP connection (P2C over outstanding).
    ``set_addresses()`` swaps the endpoint set: an address that stays keeps
    its ``Endpoint`` (and its statistics); one that leaves is dropped from
    new picks, while its users keep their reference until they end.
    """

    def __init__(self, config: ServiceConfig, opaque_ports: frozenset[int],
                 clock: Any = None, rng: random.Random | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.rng = rng or random.Random()
        self.name = config.name
        self.config = config
        self.opaque = config.is_opaque(opaque_ports)
        self.accrual = _accrual_of(config)
        self.endpoints: list[Endpoint] = []
        self._by_address: dict[HostPort, Endpoint] = {}
        self._requests = P2C(peak_ewma_cost, clock, self.rng)
        self._connections = P2C(outstanding_cost, clock, self.rng)
        self.budget = _budget_of(config, clock)
        self.retries = 0          # retries allowed by the budget, in all
        self.retry_overflows = 0  # retries the budget refused, in all
        #: HTTP requests in flight to the service, from dispatch to the end
        #: of the response (l5dproxy.route.dispatcher: max_pending_requests).
        self.pending = 0
        #: Whether its last answered request failed upstream, and when its
        #: health was last logged (l5dproxy.route.dispatcher: warn on change).
        self.failing = False
        self.health_logged: float | None = None
        self.set_addresses(config.endpoints)

    def __repr__(self) -> str:
        return f"<BackendSet {self.name} {self.endpoints!r}>"

    def pick(self, avoid: Endpoint | None = None) -> Endpoint | None:
        """The endpoint for an HTTP request, or None: answer 503 at once."""
        return self._requests.pick(self.endpoints, avoid)

    def why_unavailable(self) -> tuple[str, str]:
        """Why ``pick()`` found nothing, as (``reason``, ``detail``): the
        reason from a fixed set (a metric label), the detail for a person.
        ``no endpoints``: discovery gave none; ``endpoints ejected``: every
        one is ejected by failure accrual (or on probation, its one probe in
        flight), with when the next may be tried."""
        endpoints = self.endpoints
        if not endpoints:
            return "no endpoints", ""
        now = self.clock.seconds()
        waits = [e.ejected_until - now for e in endpoints if e.state == EJECTED]
        when = (f"next probe in {max(0.0, min(waits)):.1f} s" if waits
                else "a probe is in flight")
        return ("endpoints ejected",
                f"all {len(endpoints)} endpoints ejected by failure accrual ({when})")

    def pick_connection(self, avoid: Endpoint | None = None) -> Endpoint | None:
        """The endpoint for a TCP connection, or None: close the client."""
        return self._connections.pick(self.endpoints, avoid)

    def set_addresses(self, addresses: Iterable[HostPort],
                      weights: dict[HostPort, float] | None = None,
                      ) -> tuple[list[HostPort], list[HostPort]]:
        """Make ``addresses`` the endpoint set (with relative ``weights``, 1
        by default); return (added, removed)."""
        old = self._by_address
        new: dict[HostPort, Endpoint] = {}
        added = []
        for address in addresses:
            if address in new:
                continue
            endpoint = old.get(address)
            if endpoint is None:
                endpoint = Endpoint(address, self.clock, self.rng, self.accrual)
                added.append(address)
            endpoint.weight = weights.get(address, 1.0) if weights else 1.0
            new[address] = endpoint
        removed = [a for a in old if a not in new]
        self._by_address = new
        self.endpoints = list(new.values())  # a new list: nothing iterating is disturbed
        return added, removed

    def reconfigure(self, config: ServiceConfig, opaque_ports: frozenset[int]) -> None:
        """A reloaded config for this service: settings change in place."""
        self.config = config
        self.opaque = config.is_opaque(opaque_ports)
        self.accrual = _accrual_of(config)
        for endpoint in self.endpoints:
            endpoint.accrual = self.accrual
        budget = self.budget
        new = _budget_of(config, self.clock)
        if (new.ratio, new.min_per_second, new.ttl) != (budget.ratio, budget.min_per_second,
                                                        budget.ttl):
            self.budget = new

    def deposit(self) -> None:
        """One original (not retried) request: it earns the retry budget."""
        self.budget.deposit()

    def retry_allowed(self) -> bool:
        """Withdraw from the retry budget for one retry (counted either way)."""
        if self.budget.try_withdraw():
            self.retries += 1
            return True
        self.retry_overflows += 1
        return False


def _accrual_of(config: ServiceConfig) -> Accrual:
    fa = config.failure_accrual
    return Accrual(fa.consecutive_failures, fa.min_backoff, fa.max_backoff, fa.jitter)


def _budget_of(config: ServiceConfig, clock: Any) -> RetryBudget:
    return RetryBudget(
        clock,
        ratio=config.retry_budget_ratio,
        min_per_second=config.retry_budget_min_per_second,
        ttl=config.retry_budget_ttl,
    )
