"""What makes an HTTP request retryable, and the body tee that lets it be sent again.

A request may be retried when its method is idempotent (RFC 9110: GET, HEAD,
OPTIONS, TRACE, PUT, DELETE), it is no upgrade or tunnel, and its body fits
in the service's ``retry_max_body`` (64 KiB by default): the body is teed as
it streams to the first attempt, and a retry replays what was kept, then
goes on streaming whatever is still to come. Past the limit the kept bytes
are dropped and the request is no longer retryable; nothing ever waits for a
whole body before sending.

A retry carries the whole body or does not happen: once an attempt stops the
body before it has all arrived (an endpoint answered early or reset, and the
client end gave up the rest), the rest is discarded by the server end and can
never be replayed, so the request is no longer retryable and the client gets
that attempt's response or error (as Envoy does when its buffered body is
incomplete). And the original body's flow control is always the current
attempt's: a pause left by an attempt that was replaced is lifted.

Whether a retry happens at all is the service's: ``retry_limit`` per
request, and its retry budget across requests (``BackendSet.retry_allowed``).
"""

from __future__ import annotations

from l5dproxy.exchange.message import Body, Headers, Request

IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def retryable(request: Request, max_body: int, route_retryable: bool = False) -> bool:
    """Whether ``request`` may be sent again, as far as the request goes:
    an idempotent method, or any method on a route marked ``retryable``."""
    head = request.head
    if head.method not in IDEMPOTENT_METHODS and not route_retryable:
        return False
    if request.upgrade is not None:
        return False
    length = request.body.length
    return length is None or length <= max_body


def replay_for(request: Request, max_body: int) -> Replay | EmptyReplay:
    """The tee for a retryable request (nothing to keep for an empty body:
    one ``EmptyReplay`` serves them all)."""
    if request.body.is_empty:
        return EMPTY_REPLAY
    return Replay(request.body, max_body)


class EmptyReplay:
    """A request without a body: the first attempt sends it as it is, a retry
    sends its head with an empty body. It keeps nothing, so one is shared."""

    __slots__ = ()

    replayable = True

    def request_for_attempt(self, request: Request, attempt: int) -> Request:
        """The request for attempt number ``attempt`` (0: the first)."""
        if not attempt:
            return request
        return Request(request.head, Body.empty(), request.interim)

    def release(self) -> None:
        pass


class Replay:
    """The sink of a request's body: forwards it to the current attempt's
    body and keeps a copy (up to ``limit`` bytes) for the next attempt."""

    __slots__ = ("chunks", "current", "ended", "error", "limit", "original", "overflow",
                 "paused", "size", "started", "trailers")

    def __init__(self, original: Body, limit: int) -> None:
        self.original = original
        self.limit = limit
        self.chunks: list[bytes] = []
        self.size = 0
        self.overflow = False
        self.ended = False
        self.trailers: Headers | None = None
        self.error: Exception | None = None
        self.current: Body | None = None
        self.started = False
        #: The current attempt has paused the original (``_AttemptSource``).
        self.paused = False

    @property
    def replayable(self) -> bool:
        return not self.overflow and self.error is None

    def request_for_attempt(self, request: Request, attempt: int) -> Request:
        return Request(request.head, self.body_for_attempt(), request.interim)

    def body_for_attempt(self) -> Body:
        """A fresh body for one attempt: what was kept, then the rest as it comes."""
        body = Body(self.original.length)
        body.set_source(_AttemptSource(self, body))
        previous, self.current = self.current, body
        if previous is not None and not previous.ended:
            previous.cancel()  # its source is stale: this does not stop the original
        held, self.paused = self.paused, False
        for chunk in self.chunks:
            body.write(chunk)
        if self.error is not None:
            body.fail(self.error)
        elif self.ended:
            body.finish(self.trailers)
        if not self.started:
            self.started = True
            self.original.consume(self)
        elif held and not self.paused:
            self.original.resume()   # the replaced attempt's pause is not this one's
        return body

    def release(self) -> None:
        """No more attempts: drop the copy, only forward from now on."""
        self.chunks = []
        self.overflow = True

    # -- the original body's sink --

    def body_data(self, data: bytes) -> None:
        if not self.overflow:
            self.size += len(data)
            if self.size > self.limit:
                self.release()
            else:
                self.chunks.append(data)
        if self.current is not None:
            self.current.write(data)

    def body_end(self, trailers: Headers | None) -> None:
        self.ended = True
        self.trailers = trailers
        if self.current is not None:
            self.current.finish(trailers)

    def body_error(self, reason: Exception) -> None:
        self.error = reason
        if self.current is not None:
            self.current.fail(reason)


EMPTY_REPLAY = EmptyReplay()


class _AttemptSource:
    """Flow control from one attempt's body back to the original; stale
    attempts (already replaced by a retry) have no say."""

    __slots__ = ("body", "replay")

    def __init__(self, replay: Replay, body: Body) -> None:
        self.replay = replay
        self.body = body

    def pause_body(self) -> None:
        replay = self.replay
        if replay.current is self.body and replay.started:
            replay.paused = True
            replay.original.pause()

    def resume_body(self) -> None:
        replay = self.replay
        if replay.current is self.body and replay.started:
            replay.paused = False
            replay.original.resume()

    def stop_body(self) -> None:
        """The current attempt gives the rest of the body up: the original
        stops, and what it had still to send is lost to any later attempt."""
        replay = self.replay
        if replay.current is self.body:
            if not replay.original.ended:
                replay.release()   # a retry would carry a truncated body: none
            replay.original.cancel()
