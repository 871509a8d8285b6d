"""What the proxy says when it answers an upstream failure itself.

``name_error`` puts the service and the endpoint before the cause
(``service app: 127.0.0.1:8080: connection refused``: the
``l5d-proxy-error`` value and the text body of
``exchange.message.error_response``), so whoever runs ``curl`` through the
proxy sees which service and endpoint failed and why. ``as_proxy_error``
maps a client end's failure to the status Linkerd answers. ``note_health``
logs, at warn level, when a service starts failing and when it recovers, at most
once per service per ``HEALTH_LOG_INTERVAL`` (as Envoy's outlier-detection
event log, without one line per request).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.internet import defer, error
from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.exchange.message import GRPC_DEADLINE_EXCEEDED, GRPC_UNAVAILABLE, ProxyError
from l5dproxy.tls.errors import TlsError

if TYPE_CHECKING:
    from l5dproxy.balance.backends import Endpoint, Upstream

log = Logger()

#: Seconds between two "failing"/"recovered" log lines of one service.
HEALTH_LOG_INTERVAL = 10.0

#: The cause of a load-shed 503 (Linkerd's wording).
LOAD_SHED = "service unavailable: load shed"


def name_error(err: ProxyError, upstream: Upstream, endpoint: Endpoint | None) -> None:
    """Set ``err.where`` to ``service NAME`` and the endpoint's address,
    unless the cause names it already (a client end's own wording)."""
    if err.where:
        return
    if endpoint is not None and endpoint.label not in err.reason:
        err.where = f"service {upstream.name}: {endpoint.label}"
    else:
        err.where = f"service {upstream.name}"


def note_health(upstream: Upstream, failing: bool, message: str, now: float) -> None:
    """``upstream`` answered a request with an upstream failure (``failing``,
    ``message`` saying what) or a response below 500: log the change, if it
    is one and the last line for the service is ``HEALTH_LOG_INTERVAL`` old.
    A change inside the interval is not logged nor kept: the next request
    after the interval says the state then."""
    if upstream.failing == failing:
        return
    last = upstream.health_logged
    if last is not None and now - last < HEALTH_LOG_INTERVAL:
        return
    upstream.failing = failing
    upstream.health_logged = now
    if failing:
        log.warn("service {service} is failing: {cause}", service=upstream.name,
                 cause=message)
    else:
        log.warn("service {service} recovered", service=upstream.name)


def as_proxy_error(failure: Failure) -> ProxyError:
    """What the client sees for an upstream failure, as Linkerd maps them."""
    exc = failure.value
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, TlsError):  # its reason is the label, its detail the header
        err = ProxyError(exc.status, exc.reason,
                         GRPC_DEADLINE_EXCEEDED if exc.status == 504 else GRPC_UNAVAILABLE)
        err.detail = exc.detail
        return err
    if isinstance(exc, error.TimeoutError | error.TCPTimedOutError):
        return ProxyError.timeout("connect timeout")
    if isinstance(exc, error.ConnectionRefusedError):
        return ProxyError.bad_gateway("connection refused")
    if isinstance(exc, error.DNSLookupError):
        return ProxyError.bad_gateway("dns lookup failed")
    if isinstance(exc, error.ConnectError):
        return ProxyError.bad_gateway("connect failed")
    if isinstance(exc, error.ConnectionDone | error.ConnectionLost | ConnectionError):
        return ProxyError.bad_gateway("connection closed by upstream")
    if isinstance(exc, defer.CancelledError):
        return ProxyError.bad_gateway("cancelled")
    log.failure("unexpected upstream error", failure)
    return ProxyError.bad_gateway("upstream error")
