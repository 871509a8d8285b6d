"""One timer whose deadline moves, for timeouts re-armed per request.

Re-arming a Twisted ``DelayedCall`` for every request (``reset()`` or
``cancel()`` plus ``callLater``) costs a scan or a push of the reactor's
timer heap each time. A ``Deadline`` keeps one timer: arming it for a later
moment only moves the deadline, and the timer, when it fires early, sleeps
on until the deadline; only a sooner deadline replaces the timer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Deadline:
    """What is being timed (``wait``: a name such as ``"head"`` or
    ``"idle"``, or None for nothing) and until when, on one timer.

    ``clock`` is an ``IReactorTime``; ``expired(wait)`` is called once the
    deadline of what is timed has passed (``wait`` cleared first). Setting
    ``wait = None`` stops timing without touching the timer (it fires,
    finds nothing timed, and stops); ``cancel`` also cancels the timer.
    """

    __slots__ = ("_clock", "_expired", "_timer", "_timer_at", "at", "wait")

    def __init__(self, clock: Any, expired: Callable[[str], None]) -> None:
        self._clock = clock
        self._expired = expired
        self.wait: str | None = None
        self.at = 0.0   # the deadline, in clock seconds
        self._timer: Any = None
        self._timer_at = 0.0

    def arm(self, wait: str, seconds: float) -> None:
        """Time ``wait`` for ``seconds`` from now (0: time nothing)."""
        if not seconds:
            self.wait = None
            return
        clock = self._clock
        deadline = clock.seconds() + seconds
        self.wait = wait
        self.at = deadline
        timer = self._timer
        if timer is None:
            self._timer = clock.callLater(seconds, self._fired)
            self._timer_at = deadline
        elif self._timer_at > deadline:   # sooner: a new one (reset() scans the timer heap)
            timer.cancel()
            self._timer = clock.callLater(seconds, self._fired)
            self._timer_at = deadline

    def cancel(self) -> None:
        """Time nothing, and cancel the timer."""
        self.wait = None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _fired(self) -> None:
        self._timer = None
        wait = self.wait
        if wait is None:
            return
        now = self._clock.seconds()
        if now < self.at:   # re-armed since: sleep until the new deadline
            self._timer = self._clock.callLater(self.at - now, self._fired)
            self._timer_at = self.at
            return
        self.wait = None
        self._expired(wait)


__all__ = ["Deadline"]
