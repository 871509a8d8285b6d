"""The detect protocol: peek at a client's first bytes, then hand over.

It buffers what the client sends until the sniffer gives a verdict (or the
detect timeout, the peek limit or the client's EOF forces one), then switches
the transport to the protocol for that verdict and replays every buffered
byte to it, exactly once and in order. The switch replaces the transport's
protocol in place when the transport allows it (plain TCP), so no wrapper
stays on the per-read path; otherwise this protocol stays as a thin
forwarder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IProtocol,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from l5dproxy.detect.sniff import Verdict, ended, sniff, timed_out
from l5dproxy.net.transport import forward_read_closed, forward_write_closed, switch_protocol

if TYPE_CHECKING:
    from l5dproxy.detect.early import Detecting, EarlyConnect
    from l5dproxy.net.connection import InboundConnection


@dataclass(frozen=True, slots=True, eq=False)
class DetectSite:
    """What the detect protocols of one listener share: its ``[detect]``
    settings and the verdict callables of the listener (``accept``), built
    once per listener."""

    #: Bytes buffered at most before the verdict is forced (``[detect] peek_limit``).
    peek_limit: int
    #: Seconds to a verdict once the client has spoken (``[detect] timeout``).
    timeout: float
    clock: IReactorTime
    #: Counts the verdict and builds the protocol that speaks it.
    protocol_for: Callable[[InboundConnection, Verdict], IProtocol]
    #: Told when the client goes away before a verdict (counted).
    abandoned: Callable[[InboundConnection], None]
    #: Starts the client-silence window (``l5dproxy.detect.early``); None: no window.
    watch: Callable[[Detecting], EarlyConnect | None] | None = None


@implementer(IHalfCloseableProtocol)
class DetectProtocol(Protocol):
    """Buffers the first bytes of one connection until its protocol is known."""

    def __init__(self, conn: InboundConnection, site: DetectSite) -> None:
        self.conn = conn
        self.site = site
        self.peek_limit = site.peek_limit
        self.buffer = b""
        self.next_protocol: IProtocol | None = None
        self._timer: IDelayedCall | None = site.clock.callLater(site.timeout, self._timed_out)
        # The client-silence window: see l5dproxy.detect.early.
        self.early = site.watch(self) if site.watch is not None else None

    def dataReceived(self, data: bytes) -> None:
        if self.next_protocol is not None:
            self.next_protocol.dataReceived(data)
            return
        if self.early is not None:
            self.early.client_spoke()
        if self._timer is None:
            # The first bytes after a quiet timeout (see _timed_out): they
            # get a detect timeout of their own.
            site = self.site
            self._timer = site.clock.callLater(site.timeout, self._timed_out)
        self.buffer += data
        verdict = sniff(self.buffer, self.peek_limit)
        if verdict is not None:
            self._switch(verdict)

    def readConnectionLost(self) -> None:
        if self.next_protocol is None:
            # The client half-closed: what it sent is all there is.
            self._switch(ended(self.buffer))
        forward_read_closed(self.next_protocol, self.transport)

    def writeConnectionLost(self) -> None:
        forward_write_closed(self.next_protocol)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.next_protocol is not None:
            self.next_protocol.connectionLost(reason)
            return
        self._cancel_timer()
        if self.early is not None:
            self.early.close()
        self.site.abandoned(self.conn)
        self.conn.closed(reason, "closed during detection")

    def decide(self, verdict: Verdict) -> None:
        """A verdict from elsewhere (the server spoke first), unless one is in."""
        if self.next_protocol is None:
            self._switch(verdict)

    def _timed_out(self) -> None:
        self._timer = None
        if not self.buffer and self.early is not None and self.early.listening:
            # Neither side has spoken, and the early connection notices a
            # server that speaks first whenever it does: wait on for whoever
            # speaks. Relaying now would let a client that stays quiet past
            # the timeout send an HTTP request straight to the endpoint,
            # past routes and limits.
            return
        self._switch(timed_out(self.buffer))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _switch(self, verdict: Verdict) -> None:
        """Hand the transport and the buffered bytes to the verdict's protocol."""
        self._cancel_timer()
        protocol = self.site.protocol_for(self.conn, verdict)
        if self.early is not None:
            self.early.hand_to(protocol)  # adopted by the protocol, or closed
        transport = self.transport
        assert transport is not None  # connected
        buffered, self.buffer = self.buffer, b""
        switch_protocol(transport, self, protocol)  # else: forward (dataReceived)
        self.next_protocol = protocol
        protocol.makeConnection(transport)
        if buffered:
            protocol.dataReceived(buffered)
