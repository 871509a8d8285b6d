"""The abuse budget (l5dproxy.http.h2.abuse), fed events and a clock."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.http.h2.abuse import KINDS, AbuseBudget

BOUNDED = settings(max_examples=60, deadline=None, derandomize=True)


class AbuseBudgetTests(SynchronousTestCase):
    def test_size_points_then_crossed(self) -> None:
        clock = Clock()
        budget = AbuseBudget(10, 5.0, clock)
        for _ in range(10):
            self.assertFalse(budget.spend("reset"))
        self.assertTrue(budget.spend("reset"))
        self.assertTrue(budget.exceeded)

    def test_stays_crossed(self) -> None:
        clock = Clock()
        budget = AbuseBudget(1, 100.0, clock)
        budget.spend("ping")
        budget.spend("ping")
        clock.advance(100)
        budget.earn()
        self.assertTrue(budget.spend("ping"))

    def test_refills_with_time_up_to_its_size(self) -> None:
        clock = Clock()
        budget = AbuseBudget(10, 5.0, clock)
        for _ in range(10):
            budget.spend("ping")
        clock.advance(1.0)     # 5 points back
        for _ in range(5):
            self.assertFalse(budget.spend("ping"))
        self.assertTrue(budget.spend("ping"))

        budget = AbuseBudget(10, 5.0, clock)
        clock.advance(1000)    # capped: still 10, not 5010
        for _ in range(10):
            self.assertFalse(budget.spend("ping"))
        self.assertTrue(budget.spend("ping"))

    def test_completed_streams_earn_points_back(self) -> None:
        """Half the streams reset, half completed: never crossed (Envoy's ratio)."""
        budget = AbuseBudget(10, 0.0, Clock())
        for _ in range(10_000):
            self.assertFalse(budget.spend("reset"))
            budget.earn()
        for _ in range(10):
            budget.earn()   # capped at the size
        for _ in range(10):
            self.assertFalse(budget.spend("reset"))
        self.assertTrue(budget.spend("reset"))

    def test_worst_kind_and_counts(self) -> None:
        budget = AbuseBudget(100, 0.0, Clock())
        self.assertEqual(budget.worst(), "")
        for kind in ("ping", "reset", "reset", "priority"):
            budget.spend(kind)
        self.assertEqual(budget.worst(), "reset")
        self.assertEqual(budget.spent, {"ping": 1, "reset": 2, "priority": 1})

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, AbuseBudget, 0, 1.0, Clock())
        self.assertRaises(ValueError, AbuseBudget, 1, -1.0, Clock())

    @BOUNDED
    @given(size=st.integers(1, 50), rate=st.integers(1, 1000),
           gaps=st.lists(st.integers(0, 3), min_size=1, max_size=300),
           kinds=st.lists(st.sampled_from(KINDS), min_size=1, max_size=300))
    def test_a_peer_within_the_rate_is_never_cut_off(self, size, rate, gaps, kinds) -> None:
        """Events no closer than 1/rate seconds apart (after any pause) never
        cross, however many; a burst of size + 1 with no time passing does."""
        clock = Clock()
        budget = AbuseBudget(size, float(rate), clock)
        for gap, kind in zip(gaps, kinds, strict=False):
            clock.advance(1.001 * (1 + gap) / rate)
            self.assertFalse(budget.spend(kind))
        clock.advance(1.001 * size / rate)   # full again
        for _ in range(size):
            self.assertFalse(budget.spend("ping"))
        self.assertTrue(budget.spend("ping"))
