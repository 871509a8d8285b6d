"""The contracts between the HTTP ends and the middle, as ``typing.Protocol``s.

Structural only: the implementations do not inherit them (an explicit
Protocol base costs an ``__init__`` wrapper per instance in 3.11), and nothing
checks them with ``isinstance``; mypy checks them where the ends are wired.

Server side (a server end hands each request to the dispatcher)::

    server end --dispatch_to(request, context, waiter, token)--> Dispatcher
               <--waiter.dispatch_responded(token, response)--
               <--waiter.dispatch_failed(token, failure)------
    client gone: Dispatched.cancel() (the waiter then hears nothing)

Client side (the dispatcher sends each attempt of a request to a client end,
with the routed service's ``Target``)::

    Dispatcher --send(target, endpoint, request, waiter)--> ClientEnd
               <--waiter.attempt_responded(response)------
               <--waiter.attempt_failed(failure)----------
    given up: Attempt.cancel() (the waiter then hears nothing)
    reload:   ClientEnd.retarget({service: target})

``HttpSite`` is what a server end uses of the listener it serves, one
record per listener built by ``app`` (``app.sites.http_site``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from twisted.python.failure import Failure

    from l5dproxy.config.model import HostPort, ListenerConfig, Target
    from l5dproxy.exchange.message import Request, Response

T = TypeVar("T")
T_contra = TypeVar("T_contra", contravariant=True)


# -- server side ---------------------------------------------------------------

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


# -- client side ---------------------------------------------------------------

class AttemptWaiter(Protocol):
    """Who hears how an attempt went (``route.dispatcher._Exchange``).
    Exactly one of the two is called, at most once, maybe before
    ``ClientEnd.send`` returns."""

    def attempt_responded(self, response: Response) -> None:
        """The endpoint's response head arrived; ``response.body`` follows."""

    def attempt_failed(self, failure: Failure) -> None:
        """No response: ``failure`` wraps a ``ProxyError`` (502/503/504,
        ``NotPlacedError`` when the request was never placed) or a
        connection error that ``as_proxy_error`` maps."""


class Attempt(Protocol):
    """One try of a request on one endpoint (``H1Attempt``, ``H2Attempt``)."""

    def cancel(self) -> None:
        """Give it up (the client left, a deadline passed): a queued request
        leaves its queue, a dial stops, a sent request's connection is
        aborted (HTTP/1) or its stream reset with CANCEL (h2). The waiter
        hears nothing after this."""


class Dialable(Protocol):
    """An endpoint as a client end sees it (``balance.backends.Endpoint``)."""

    @property
    def address(self) -> HostPort: ...

    @property
    def label(self) -> str:
        """``str(address)``: with the target's service, the pool key."""


class ClientEnd(Protocol):
    """An HTTP client end (``H1Client``, ``H2Client``): pools of upstream
    connections, one pool per (``target.service``, ``endpoint.label``)."""

    def send(self, target: Target, endpoint: Dialable, request: Request,
             waiter: AttemptWaiter) -> Attempt:
        """Send ``request`` to ``endpoint`` with ``target``'s settings
        (connect timeout, idle timeout, service label); the outcome goes to
        ``waiter``."""

    def retarget(self, targets: Mapping[str, Target]) -> None:
        """A reload: every pool of a service in ``targets`` takes its new
        target (a shorter idle timeout applies to connections already idle);
        the pools of every other service are forgotten (their idle
        connections closed, busy ones closed once they finish)."""


# -- what a server end is given of its listener ---------------------------------

@dataclass(frozen=True, slots=True, eq=False, weakref_slot=True)
class HttpSite:
    """One listener as its HTTP server ends see it (built once per listener;
    a reload's new listener gets a new one)."""

    #: The listener's name (the ``listener`` metric label).
    listener: str
    #: IReactorTime: timeouts and timers, the h2 abuse budget's refill.
    clock: Any
    #: CONNECT is tunnelled (else 405): ``[[listener]] allow_connect``.
    allow_connect: bool
    #: Upgrade protocol names forwarded (lowercase): ``[[listener]] upgrades``.
    upgrades: frozenset[bytes]
    #: Counts ``http_errors_total{direction="inbound", listener, reason}``.
    count_error: Callable[[str], None]
    #: Counts ``h2_abuse_total{kind}``.
    count_abuse: Callable[[str], None]
    #: The listener's config as the dispatcher reads it: ``routes``,
    #: ``access_log``, ``forwarded``/``trusted_proxies``, ``tls``.
    config: ListenerConfig


class ClientConnection(Protocol):
    """What the middle (dispatcher, forwarded rule, labels, tap) reads of an
    inbound connection: ``l5dproxy.net.connection.InboundConnection``
    provides it (tests.fakes.FakeConnection in unit tests)."""

    #: The client's address as text ("host:port"; after a PROXY header, the
    #: client it names): the access log's and tap's ``client``.
    peer: str
    #: The label of the endpoint the request went to ("" before one is
    #: picked); the dispatcher sets it, the access log reads it.
    endpoint: str
    #: A transparent listener's Endpoint at the original destination (every
    #: request goes there), else None. Typed Any: balance/ is above exchange/.
    pinned: Any
    #: TLS the proxy terminated (l5dproxy.tls), else None: plaintext.
    tls: Any
    #: The verified client certificate's identity (mTLS), else None.
    client_id: str | None
    #: False when ``[listener.tls] allow`` refused the client (403).
    authorized: bool

    @property
    def client_host(self) -> str | None:
        """The client's IP address (no port), None for a non-IP connection."""

    @property
    def secure(self) -> bool:
        """Whether the client's bytes reach the proxy over TLS."""


@dataclass(slots=True)
class RequestContext:
    """What the dispatcher knows of where a request came from: one per
    inbound HTTP connection, built by its server end."""

    site: HttpSite                  # the listener, as the ends and the middle see it
    connection: ClientConnection    # l5dproxy.net.connection.InboundConnection
    protocol: str                   # "http1" or "h2": what the client speaks
    #: The dispatcher's state kept per connection (its route table, the
    #: rules' view of the connection), made at its first request.
    routes: object = None


__all__ = ["Attempt", "AttemptWaiter", "ClientConnection", "ClientEnd", "Dialable", "Dispatched",
           "Dispatcher", "HttpSite", "RequestContext", "ResponseWaiter"]
