"""The contracts between the HTTP ends and the middle, as ``typing.Protocol``s.

Structural only: the implementations do not inherit them (an explicit
Protocol base costs an ``__init__`` wrapper per instance in 3.11), and nothing
checks them with ``isinstance``; mypy checks them where the ends are wired.

Server side (a server end hands each request to the dispatcher)::

    server end --dispatch_to(request, context, waiter, token)--> Dispatcher
               <--waiter.dispatch_responded(token, response)--
               <--waiter.dispatch_failed(token, failure)------
    client gone: Dispatched.cancel() (the waiter then hears nothing)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from l5dproxy.exchange.message import Request, RequestContext, Response

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


class ResponseWaiter(Protocol[T_contra]):
    """Told the outcome of one dispatched request, exactly once, unless the
    exchange was cancelled first: a server end (``H1Server`` with its
    ``_Message`` as the token, ``H2ServerProtocol`` with its ``Stream``)."""

    def dispatch_responded(self, token: T_contra, response: Response) -> None:
        """The response (its body may still be streaming); an error the
        dispatcher answered itself is a response too (``response.error``
        set: see ``exchange.message.error_response``)."""

    def dispatch_failed(self, token: T_contra, failure: Failure) -> None:
        """No response: a ``ProxyError`` is answered as it says; anything
        else is a bug, answered 502 (HTTP/1) or as an internal error (h2)."""


class Dispatched(Protocol):
    """One request in the middle (``route.dispatcher._Exchange``)."""

    #: The waiter was told during ``dispatch_to`` itself (nothing to cancel).
    delivered: bool

    def cancel(self) -> None:
        """The client went away: give the request up; the waiter hears nothing."""


class Dispatcher(Protocol):
    """The middle (``route.dispatcher.HttpProxy``): route, balance, time
    out, retry, count; the outcome goes to ``waiter`` with ``token``."""

    def dispatch_to(self, request: Request, context: RequestContext,
                    waiter: ResponseWaiter[T], token: T) -> Dispatched: ...


__all__ = ["Dispatched", "Dispatcher", "ResponseWaiter"]
