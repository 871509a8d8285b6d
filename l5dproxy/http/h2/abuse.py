"""The budget of work an HTTP/2 peer may cause that yields nothing (sans-IO).

Some frames cost the proxy work and carry nothing: a stream reset before
its response was complete (rapid reset, CVE-2023-44487: every such request
was dispatched upstream and cancelled there), a stream the proxy resets
because of something the peer did (MadeYouReset, CVE-2025-8671: a DATA
past its content-length, malformed trailers, a stream flow-control error;
spent as ``reset``), an empty DATA frame without
END_STREAM, a PING or SETTINGS frame (each answered with an ACK), a PRIORITY
frame (the proxy does not use priorities), a frame on a stream that is
already closed, a stream refused (over the concurrent-stream limit, or a
header block that is unusable). Each of these spends one point of a per
connection budget; the budget refills with time (``refill_per_second``) and
with every stream that completes, up to its size. Once spent, the peer has
crossed it: the connection is ended with GOAWAY(ENHANCE_YOUR_CALM), as
Envoy, nginx and Linkerd do.

Which rule this follows: Envoy closes a connection once more than half of
its streams were reset prematurely, checked after 500 streams
(``overload.premature_reset_total_stream_count``); a completed stream
earning back what a reset costs is that ratio, and 500 is the default size
here. Envoy and nginx also bound PRIORITY, empty-payload and control frames
per connection (``max_inbound_priority_frames_per_stream``,
``max_consecutive_inbound_frames_with_empty_payload``); here they share the
one budget, refilled over time so that a peer sending them "beyond a rate"
crosses it and an honest one (a gRPC keep-alive PING, a SETTINGS update)
never does.

The class is pure: it is told of events and reads time from the clock it is
given (an ``IReactorTime``, ``seconds()``), so it is tested by feeding it
values.
"""

from __future__ import annotations

from typing import Protocol

#: What a point is spent on: the kinds of ``h2_abuse_total{kind}``.
KINDS = ("reset", "empty_data", "ping", "settings", "priority", "no_effect", "refused")


class _Clock(Protocol):
    def seconds(self) -> float: ...


class AbuseBudget:
    """Per connection: points spent on work that yields nothing.

    ``size`` points to begin with and at most; ``refill_per_second`` points
    come back each second, and one with each completed stream (``earn``).
    ``spend(kind)`` takes one point and returns True once the budget is
    crossed (the points went below zero); it stays crossed. ``spent`` counts
    the points spent per kind, ``worst()`` is the kind that spent the most
    (the label the connection is counted under when it is closed).
    """

    __slots__ = ("clock", "exceeded", "points", "rate", "size", "spent", "updated")

    def __init__(self, size: int, refill_per_second: float, clock: _Clock) -> None:
        if size < 1 or refill_per_second < 0:
            raise ValueError("an abuse budget needs size >= 1 and refill_per_second >= 0")
        self.size = size
        self.rate = refill_per_second
        self.clock = clock
        self.points = float(size)
        self.updated = clock.seconds()
        self.exceeded = False
        self.spent: dict[str, int] = {}

    def spend(self, kind: str) -> bool:
        """One point for ``kind``; True if the budget is (now or already) crossed."""
        spent = self.spent
        spent[kind] = spent.get(kind, 0) + 1
        if self.exceeded:
            return True
        self._refill()
        self.points -= 1
        if self.points < 0:
            self.exceeded = True
        return self.exceeded

    def earn(self) -> None:
        """A stream completed: one point back, up to the size."""
        if self.points < self.size:
            self.points = min(self.size, self.points + 1)

    def worst(self) -> str:
        """The kind that spent the most points ("" if none)."""
        spent = self.spent
        return max(spent, key=spent.__getitem__) if spent else ""

    def _refill(self) -> None:
        now = self.clock.seconds()
        elapsed = now - self.updated
        self.updated = now
        if elapsed > 0 and self.points < self.size:
            self.points = min(self.size, self.points + elapsed * self.rate)
