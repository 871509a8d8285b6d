"""One HTTP/2 stream, either side: the body coming in and the body going out.

A ``Stream`` is the ``BodySource`` of the body it receives (its consumer's
pause/resume/stop become held or sent WINDOW_UPDATEs) and the ``BodySink`` of
the body it sends (queued past ``OUT_HIGH_WATER`` pauses that body). What it
cannot do alone it asks of its ``StreamOwner``, the connection's protocol
(``protocol.H2Protocol``), declared here so this module imports none of its
users.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

from h2.errors import ErrorCodes

from l5dproxy.exchange.message import Body, Headers
from l5dproxy.http.h2.connection import StreamResetError

#: Bytes queued for sending on one stream past which its body is paused.
OUT_HIGH_WATER = 64 * 1024
OUT_LOW_WATER = 16 * 1024


class StreamOwner(Protocol):
    """What a ``Stream`` asks of the connection carrying it (``H2Protocol``)."""

    def ack(self, sid: int, n: int) -> None:
        """Give ``n`` flow-controlled bytes of stream ``sid`` back to the peer."""

    def send_stream(self, stream: Stream) -> None:
        """Send what is queued on ``stream`` as far as the windows allow."""

    def inbound_stopped(self, stream: Stream) -> None:
        """The consumer of ``stream``'s inbound body is gone."""

    def reset(self, stream: Stream, code: int) -> None:
        """Reset ``stream`` with error ``code`` (RST_STREAM)."""


class Stream:
    """One h2 stream: the body coming in (we are its source) and the body
    going out (we are its sink), plus what the side needs to finish it."""

    __slots__ = (
        "conn", "deferred", "grpc", "held", "in_body", "in_discard", "in_done", "in_paused",
        "in_trailers", "out_body", "out_done", "out_end", "out_headers", "out_paused",
        "out_queue", "out_queued", "out_trailers", "pending", "reset", "sid",
    )

    def __init__(self, conn: StreamOwner, sid: int) -> None:
        self.conn = conn
        self.sid = sid
        self.in_body: Body | None = None
        self.in_done = False          # the peer ended its side (or we gave up on it)
        self.in_paused = False
        self.in_discard = False       # the consumer is gone: ack and drop
        self.in_trailers: Headers | None = None
        self.held = 0                 # flow-controlled bytes received, not yet acked
        self.out_body: Body | None = None
        self.out_headers: tuple[Headers, bool] | None = None  # not yet sent
        self.out_queue: deque[memoryview] = deque()
        self.out_queued = 0
        self.out_end = False          # body_end seen
        self.out_trailers: Headers | None = None
        self.out_done = False         # END_STREAM sent
        self.out_paused = False
        self.reset = False
        #: server: the dispatch (an exchange or a Deferred: cancel() gives it
        #: up); client: the _Pending told of the response.
        self.deferred: Any = None   # server: the exchange; client: the attempt waiting
        self.grpc = False
        self.pending: Any = None          # client: the request it carries (pool._Pending)

    # BodySource: the inbound body's consumer speaks

    def pause_body(self) -> None:
        self.in_paused = True

    def resume_body(self) -> None:
        self.in_paused = False
        if self.held:
            held, self.held = self.held, 0
            self.conn.ack(self.sid, held)

    def stop_body(self) -> None:
        self.in_discard = True
        self.resume_body()
        self.conn.inbound_stopped(self)

    # BodySink: the outbound body speaks

    def body_data(self, data: bytes) -> None:
        if self.reset or self.out_done:
            return
        self.out_queue.append(memoryview(data))
        self.out_queued += len(data)
        if self.out_headers is None or not self.out_headers[1]:
            self.conn.send_stream(self)
        # else: the body is being attached (_start_outbound), which sends it
        if self.out_queued > OUT_HIGH_WATER and not self.out_paused and not self.reset:
            self.out_paused = True
            if self.out_body is not None:  # attached before any of its data comes
                self.out_body.pause()

    def body_end(self, trailers: Headers | None) -> None:
        if self.reset or self.out_done:
            return
        self.out_end = True
        self.out_trailers = trailers or None
        if self.out_headers is not None and self.out_headers[1]:
            return   # attaching the body: sent by _start_outbound
        self.conn.send_stream(self)

    def body_error(self, reason: Exception) -> None:
        if self.reset or self.out_done:
            return
        code = reason.code if isinstance(reason, StreamResetError) else ErrorCodes.CANCEL
        if code == ErrorCodes.NO_ERROR:
            code = ErrorCodes.CANCEL
        self.conn.reset(self, code)
