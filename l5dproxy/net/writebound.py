"""What a protocol end has queued for a peer that does not read: bounded.

Twisted's transport pauses its streaming producer (here: the protocol end
itself, registered with ``registerProducer(self, True)``) once more than
``bufferSize`` (64 KiB, the high-water mark) waits to be sent, and resumes
it once everything has gone (the low-water mark: empty). Pausing the bodies
being sent is not enough: what the proxy writes in answer to what the peer
sends (an ACK to each HTTP/2 PING or SETTINGS, a response to each pipelined
HTTP/1 request, RST_STREAM for frames on closed streams) keeps coming for as
long as the peer's bytes are read, so a peer that writes and never reads
grew the write buffer without bound (+13.5 MB after 1.2 M PINGs).

``WriteBound`` is the one rule every end applies, from its
``pauseProducing``/``resumeProducing`` and each of its writes: while the
buffer is over the high-water mark the peer is not read (``pause_reading``;
its own sends then block in its kernel), until the buffer drains
(``resume_reading``). What is still written meanwhile (responses to the
requests already read, the headers of responses coming from upstream) is
counted; past ``limit`` bytes the peer has left ``limit`` + 64 KiB unread
and ``overflow`` is called (the end aborts the connection and counts it).
So the proxy holds at most ``bufferSize`` + ``limit`` + one write for a
connection that does not read.

The TCP relay has always had the first half of this rule: each side is the
other's producer (``l5dproxy/tcp/relay.py``). An HTTP/1 upstream connection writes
nothing in answer to what it reads (one request at a time, its body paused
by the same signal), so reading from it is never paused: an endpoint may
answer early while the request body is still blocked.
"""

from __future__ import annotations

from collections.abc import Callable

#: Bytes written to a connection while its peer is not reading (its write
#: buffer over the high-water mark) past which the connection is aborted.
WRITE_HARD_LIMIT = 4 * 1024 * 1024


class WriteBound:
    """One connection's unread output: pause reading past the high-water
    mark, abort past the hard limit (see the module docstring)."""

    __slots__ = ("crossed", "limit", "overflow", "pause_reading", "paused", "resume_reading",
                 "since_full")

    def __init__(self, pause_reading: Callable[[], None], resume_reading: Callable[[], None],
                 overflow: Callable[[], None], limit: int = WRITE_HARD_LIMIT) -> None:
        self.pause_reading = pause_reading
        self.resume_reading = resume_reading
        self.overflow = overflow
        self.limit = limit
        self.paused = False
        self.crossed = False
        #: Bytes written since the buffer passed the high-water mark.
        self.since_full = 0

    def full(self) -> None:
        """The transport's ``pauseProducing``: its buffer is over the high-water mark."""
        if not self.paused:
            self.paused = True
            self.since_full = 0
            self.pause_reading()

    def drained(self) -> None:
        """The transport's ``resumeProducing``: its buffer is empty."""
        if self.paused:
            self.paused = False
            self.since_full = 0
            if not self.crossed:
                self.resume_reading()

    def wrote(self, n: int) -> None:
        """``n`` bytes were written to the transport."""
        if self.paused:
            self.since_full += n
            if self.since_full > self.limit and not self.crossed:
                self.crossed = True
                self.overflow()
