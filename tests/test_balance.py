"""Balancer, failure accrual and retry budget, fed with values, a Clock and a seed."""

from __future__ import annotations

import random
from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.balance.backends import (
    DEFAULT_RTT,
    EJECTED,
    P2C,
    PROBATION,
    READY,
    Accrual,
    BackendSet,
    Endpoint,
    RetryBudget,
    outstanding_cost,
    peak_ewma_cost,
)
from l5dproxy.config.model import HostPort, ServiceConfig


def hp(i: int) -> HostPort:
    return HostPort("127.0.0.1", 8000 + i)


def upstream(n: int, clock: Clock, seed: int = 1) -> BackendSet:
    config = ServiceConfig(name="app", endpoints=tuple(hp(i) for i in range(n)))
    return BackendSet(config, frozenset(), clock=clock, rng=random.Random(seed))


def simulate(up: BackendSet, clock: Clock, latency: dict[str, float], requests: int,
             interval: float) -> Counter:
    """Requests every ``interval`` s, each answered after its endpoint's latency."""
    share: Counter = Counter()
    for _ in range(requests):
        endpoint = up.pick()
        endpoint.begin()
        share[endpoint.label] += 1
        took = latency[endpoint.label]
        clock.callLater(took, endpoint.end, took, True)
        clock.advance(interval)
    clock.advance(10)
    return share


class PeakEwmaTests(SynchronousTestCase):

    def test_initial_rtt(self):
        e = Endpoint(hp(0), Clock())
        self.assertEqual(e.latency(0.0), DEFAULT_RTT)
        self.assertEqual(e.peak_ewma_cost(0.0), DEFAULT_RTT)
        e.begin()
        self.assertEqual(e.peak_ewma_cost(0.0), 2 * DEFAULT_RTT)

    def test_peak_replaces_at_once_then_decays(self):
        clock = Clock()
        e = Endpoint(hp(0), clock, decay=10.0)
        e.begin()
        e.end(0.5, True)
        self.assertEqual(e.latency(clock.seconds()), 0.5)
        clock.advance(10)  # one decay time: e^-1 of the peak is left
        self.assertAlmostEqual(e.latency(clock.seconds()), 0.5 / 2.718281828, places=4)

    def test_lower_samples_pull_down_with_time(self):
        clock = Clock()
        e = Endpoint(hp(0), clock)
        e.begin()
        e.end(0.1, True)
        for _ in range(200):
            clock.advance(0.5)
            e.begin()
            e.end(0.01, True)
        self.assertAlmostEqual(e.latency(clock.seconds()), 0.01, places=3)

    def test_slow_endpoint_gets_a_small_share(self):
        """Four endpoints, one 10x slower: its share, against 25% for round robin."""
        clock = Clock()
        up = upstream(4, clock)
        latency = {str(hp(i)): 0.010 for i in range(3)}
        latency[str(hp(3))] = 0.100
        n = 20000
        share = simulate(up, clock, latency, n, interval=0.002)
        slow = share[str(hp(3))] / n
        print(f"\nslow endpoint share: {slow:.2%} of {n} requests ({dict(share)})")
        self.assertLess(slow, 0.05)
        self.assertGreater(slow, 0.0)  # it is still probed, not starved forever
        for i in range(3):
            self.assertGreater(share[str(hp(i))] / n, 0.28)

    def test_two_endpoints_outstanding_counts(self):
        """Equal latency: the one with more in flight loses."""
        clock = Clock()
        up = upstream(2, clock)
        busy, idle = up.endpoints
        for _ in range(3):
            busy.begin()
        for _ in range(20):
            self.assertIs(up.pick(), idle)

    def test_seeded_picks_repeat(self):
        picks = []
        for _ in range(2):
            clock = Clock()
            up = upstream(5, clock, seed=42)
            picks.append([up.pick().label for _ in range(50)])
        self.assertEqual(picks[0], picks[1])


class P2CTests(SynchronousTestCase):

    def test_empty_is_none(self):
        clock = Clock()
        p = P2C(peak_ewma_cost, clock, random.Random(0))
        self.assertIsNone(p.pick([]))
        self.assertIsNone(upstream(0, clock).pick())
        self.assertIsNone(upstream(0, clock).pick_connection())

    def test_least_outstanding_for_connections(self):
        clock = Clock()
        up = upstream(3, clock)
        counts: Counter = Counter()
        for _ in range(300):
            e = up.pick_connection()
            e.begin()
            counts[e.label] += 1
        # P2C over outstanding keeps connections within one of each other.
        self.assertLessEqual(max(counts.values()) - min(counts.values()), 1)

    def test_avoid(self):
        clock = Clock()
        up = upstream(3, clock)
        first = up.endpoints[0]
        for _ in range(50):
            self.assertIsNot(up.pick(avoid=first), first)
        solo = upstream(1, clock)
        self.assertIs(solo.pick(avoid=solo.endpoints[0]), solo.endpoints[0])

    def test_outstanding_cost(self):
        e = Endpoint(hp(0), Clock())
        e.begin()
        e.begin()
        self.assertEqual(outstanding_cost(e, 0.0), 3)


class AccrualTests(SynchronousTestCase):

    def fail(self, e: Endpoint, n: int) -> None:
        for _ in range(n):
            e.begin()
            e.end(None, False)

    def test_ejected_after_consecutive_failures(self):
        clock = Clock()
        e = Endpoint(hp(0), clock, random.Random(0), Accrual(consecutive_failures=7))
        self.fail(e, 6)
        self.assertEqual(e.state, READY)
        e.begin()
        e.end(0.01, True)  # a success resets the count
        self.fail(e, 6)
        self.assertEqual(e.state, READY)
        self.fail(e, 1)
        self.assertEqual(e.state, EJECTED)
        self.assertEqual(e.ejections, 1)
        self.assertFalse(e.available(clock.seconds()))

    def test_all_ejected_pick_is_none(self):
        clock = Clock()
        up = upstream(2, clock)
        for e in up.endpoints:
            self.fail(e, 7)
        self.assertIsNone(up.pick())
        self.assertIsNone(up.pick_connection())

    def test_one_ejected_traffic_goes_to_the_other(self):
        clock = Clock()
        up = upstream(3, clock)
        bad = up.endpoints[1]
        self.fail(bad, 7)
        picks = {up.pick().label for _ in range(100)}
        self.assertNotIn(bad.label, picks)
        self.assertEqual(len(picks), 2)

    def test_probe_then_back(self):
        clock = Clock()
        e = Endpoint(hp(0), clock, random.Random(0),
                     Accrual(consecutive_failures=3, min_backoff=1, max_backoff=60, jitter=0.5))
        self.fail(e, 3)
        until = e.ejected_until
        self.assertTrue(1.0 <= until <= 1.5, until)
        clock.advance(until - 0.01)
        self.assertFalse(e.available(clock.seconds()))
        clock.advance(0.02)
        # One probe, and only one, while it is in flight.
        self.assertTrue(e.available(clock.seconds()))
        self.assertEqual(e.state, PROBATION)
        e.begin()
        self.assertFalse(e.available(clock.seconds()))
        e.end(0.01, True)
        self.assertEqual(e.state, READY)
        self.assertTrue(e.available(clock.seconds()))

    def test_failed_probe_backs_off_longer_up_to_max(self):
        clock = Clock()
        e = Endpoint(hp(0), clock, random.Random(3),
                     Accrual(consecutive_failures=2, min_backoff=1, max_backoff=60, jitter=0.5))
        self.fail(e, 2)
        backoffs = []
        for _ in range(10):
            backoffs.append(e.ejected_until - clock.seconds())
            clock.advance(e.ejected_until - clock.seconds())
            self.assertTrue(e.available(clock.seconds()))
            self.fail(e, 1)  # the probe fails: ejected again
            self.assertEqual(e.state, EJECTED)
        for i, b in enumerate(backoffs[:6]):
            self.assertTrue(2 ** i <= b <= min(60, 1.5 * 2 ** i), (i, b))
        self.assertEqual(backoffs[-1], 60)
        self.assertEqual(e.ejections, 11)

    def test_success_after_probe_resets_backoff(self):
        clock = Clock()
        e = Endpoint(hp(0), clock, random.Random(0), Accrual(consecutive_failures=1, jitter=0))
        self.fail(e, 1)
        clock.advance(1)
        self.assertTrue(e.available(clock.seconds()))
        self.fail(e, 1)
        self.assertEqual(e.ejected_until - clock.seconds(), 2)
        clock.advance(2)
        e.available(clock.seconds())
        e.begin()
        e.end(None, True)
        self.fail(e, 1)
        self.assertEqual(e.ejected_until - clock.seconds(), 1)

    def test_tcp_report_and_neutral_end(self):
        """TCP: success is reported at connect; closing later is no verdict."""
        clock = Clock()
        e = Endpoint(hp(0), clock, random.Random(0), Accrual(consecutive_failures=2))
        e.begin()
        e.report(True)
        self.fail(e, 1)
        e.end(None, None)
        self.assertEqual(e.failures, 1)
        self.assertEqual(e.active, 0)

    def test_probe_without_verdict_lets_another_probe(self):
        """The client left before the probe connected: probe again."""
        clock = Clock()
        e = Endpoint(hp(0), clock, random.Random(0), Accrual(consecutive_failures=1))
        self.fail(e, 1)
        clock.advance(2)
        self.assertTrue(e.available(clock.seconds()))
        e.begin()
        self.assertFalse(e.available(clock.seconds()))
        e.end(None, None)
        self.assertTrue(e.available(clock.seconds()))
        self.assertEqual(e.state, PROBATION)

    def test_late_results_while_ejected_are_ignored(self):
        clock = Clock()
        e = Endpoint(hp(0), clock, random.Random(0), Accrual(consecutive_failures=2))
        e.begin()  # in flight before the ejection
        self.fail(e, 2)
        e.end(0.01, True)
        self.assertEqual(e.state, EJECTED)
        self.assertEqual(e.active, 0)

    def test_disabled(self):
        e = Endpoint(hp(0), Clock(), accrual=Accrual(consecutive_failures=0))
        self.fail(e, 100)
        self.assertEqual(e.state, READY)


class RetryBudgetTests(SynchronousTestCase):

    def test_floor_without_traffic(self):
        clock = Clock()
        budget = RetryBudget(clock, ratio=0.2, min_per_second=10, ttl=10)
        allowed = sum(budget.try_withdraw() for _ in range(150))
        self.assertEqual(allowed, 100)  # 10/s over the 10 s window

    def test_ratio_of_deposits(self):
        clock = Clock()
        budget = RetryBudget(clock, ratio=0.2, min_per_second=0, ttl=10)
        for _ in range(1000):
            budget.deposit()
        allowed = sum(budget.try_withdraw() for _ in range(1000))
        self.assertEqual(allowed, 200)
        self.assertFalse(budget.try_withdraw())

    def test_exhausted_then_refilled_as_the_window_slides(self):
        clock = Clock()
        budget = RetryBudget(clock, ratio=0.2, min_per_second=1, ttl=10)
        for _ in range(50):
            budget.deposit()
        self.assertEqual(sum(budget.try_withdraw() for _ in range(100)), 20)
        clock.advance(5)
        self.assertFalse(budget.try_withdraw())
        clock.advance(5)  # the window has passed: deposits and withdrawals expired
        self.assertEqual(budget.balance(), 10)
        self.assertTrue(budget.try_withdraw())

    def test_deposits_expire_with_their_slot(self):
        """Deposits made within one slot (the fast path) and across slot
        boundaries leave the window exactly when their slot does."""
        clock = Clock()
        budget = RetryBudget(clock, ratio=0.5, min_per_second=0, ttl=10)  # 1 s slots
        for _ in range(4):
            budget.deposit()
        clock.advance(0.5)
        for _ in range(4):                   # the same slot
            budget.deposit()
        clock.advance(0.6)                   # t = 1.1: the next slot
        for _ in range(2):
            budget.deposit()
        self.assertEqual(budget.balance(), 5)
        clock.advance(8.95)                  # t = 10.05: the first slot has left
        self.assertEqual(budget.balance(), 1)
        budget.deposit()
        self.assertEqual(budget.balance(), 1.5)
        clock.advance(1.0)                   # t = 11.05: so has the second
        self.assertEqual(budget.balance(), 0.5)

    def test_every_request_failing_retries_stay_bounded(self):
        """An outage: 100 rps for 30 s, every request retried as long as allowed.
        Retries stay near 20% of requests plus the floor, never 100%."""
        clock = Clock()
        budget = RetryBudget(clock, ratio=0.2, min_per_second=10, ttl=10)
        retries = 0
        for _ in range(3000):
            budget.deposit()
            retries += budget.try_withdraw()
            clock.advance(0.01)
        # 0.2 * 3000 + 10/s * 10 s per window * 3 windows at most
        self.assertLessEqual(retries, 600 + 300)
        self.assertGreaterEqual(retries, 600)

    def test_upstream_retry_allowed_counts(self):
        clock = Clock()
        up = upstream(1, clock)
        self.assertTrue(up.retry_allowed())
        self.assertEqual(up.retries, 1)
