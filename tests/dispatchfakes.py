"""Fakes shared by the dispatcher's unit tests (test_proxy, test_retry).

The dispatcher has two entry points (a Deferred, and ``dispatch_to`` with a
waiter) and client ends of two shapes (``request`` returning a Deferred, and
``call`` with a waiter); these adapters let one test run through both.
"""

from __future__ import annotations

from twisted.internet import defer


def as_call_client(client):
    """``client`` as a client end without Deferreds (``call(endpoint, request,
    waiter)``, as H1Client has): the same attempts, reported to the waiter."""

    class _Handle:
        def __init__(self, d) -> None:
            self.d = d
            self.cancelled = False

        def cancel(self) -> None:
            self.cancelled = True
            self.d.cancel()

    def call(endpoint, request, waiter):
        d = client.request(endpoint, request)
        handle = _Handle(d)

        def responded(response):
            if not handle.cancelled:
                waiter.upstream_responded(response)

        def failed(failure):
            if not handle.cancelled:
                waiter.upstream_failed(failure)
        d.addCallbacks(responded, failed)
        return handle

    client.call = call
    return client


def dispatch_to_deferred(proxy, request, context):
    """``proxy.dispatch_to`` seen through a Deferred (cancelling it cancels
    the exchange), so the Deferred tests run through the direct path too."""
    exchange = None
    d = defer.Deferred(lambda _d: exchange.cancel())

    class Waiter:
        def dispatch_responded(self, token, response):
            assert token == "token"
            if response.error is not None:   # the exchange answered an error itself
                d.errback(response.error)
            else:
                d.callback(response)

        def dispatch_failed(self, token, failure):
            assert token == "token"
            d.errback(failure)

    exchange = proxy.dispatch_to(request, context, Waiter(), "token")
    return d
