"""What the proxy says when it answers an upstream failure itself.

``name_error`` puts the service and the endpoint before the cause
(``service app: 127.0.0.1:8080: connection refused``: the
``l5d-proxy-error`` value and the text body of
``exchange.message.error_response``), so whoever runs ``curl`` through the
proxy sees which service and endpoint failed and why. (A client end's failure becomes a status in
``exchange.message.as_proxy_error``.) ``note_health``
logs, at warn level, when a service starts failing and when it recovers, at most
once per service per ``HEALTH_LOG_INTERVAL`` (as Envoy's outlier-detection
event log, without one line per request).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.logger import Logger

from l5dproxy.exchange.message import ProxyError

if TYPE_CHECKING:
    from l5dproxy.balance.backends import BackendSet, Endpoint

log = Logger()

#: Seconds between two "failing"/"recovered" log lines of one service.
HEALTH_LOG_INTERVAL = 10.0

#: The cause of a load-shed 503 (Linkerd's wording).
LOAD_SHED = "service unavailable: load shed"


def name_error(err: ProxyError, backends: BackendSet, endpoint: Endpoint | None) -> None:
    """Set ``err.where`` to ``service NAME`` and the endpoint's address,
    unless the cause names it already (a client end's own wording)."""
    if err.where:
        return
    if endpoint is not None and endpoint.label not in err.reason:
        err.where = f"service {backends.name}: {endpoint.label}"
    else:
        err.where = f"service {backends.name}"


def note_health(backends: BackendSet, failing: bool, message: str, now: float) -> None:
    """``backends`` answered a request with an upstream failure (``failing``,
    ``message`` saying what) or a response below 500: log the change, if it
    is one and the last line for the service is ``HEALTH_LOG_INTERVAL`` old.
    A change inside the interval is not logged nor kept: the next request
    after the interval says the state then."""
    if backends.failing == failing:
        return
    last = backends.health_logged
    if last is not None and now - last < HEALTH_LOG_INTERVAL:
        return
    backends.failing = failing
    backends.health_logged = now
    if failing:
        log.warn("service {service} is failing: {cause}", service=backends.name,
                 cause=message)
    else:
        log.warn("service {service} recovered", service=backends.name)
