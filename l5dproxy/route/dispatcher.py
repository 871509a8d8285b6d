"""The middle of the HTTP pipeline: route, balance, time out, count.

``HttpProxy`` is the ``exchange.Dispatcher`` both codec ends hand their
requests to. For each request it picks the target service (the listener's
``service``, or the first ``[[listener.route]]`` whose ``host`` and/or
``path_prefix`` match), an endpoint of that service, and the client end that
speaks the service's ``protocol`` (by default the protocol the client
spoke), and maps whatever goes wrong to the error Linkerd would answer:

* the service already has ``max_pending_requests`` in flight: 503
  ``service unavailable: load shed``, at once (Linkerd's load shedding),
  counted in ``load_shed_total{service}``
* no endpoint to pick: 503 ``no endpoints`` when discovery gave none,
  ``all N endpoints ejected by failure accrual (next probe in T s)`` when
  failure accrual ejected them all
* the client end cannot connect or loses the connection: 502
* connect timeout or ``response_timeout`` (request head to response head): 504
* the client end could not place the request (``NotPlacedError``: no
  stream, connection limit): 503, retried only on another endpoint and
  only before ``place_by`` (its timeout, else ``connect_timeout``): one
  connect timeout in all, not ``retry_limit + 1`` (``_retry``)

Each such answer names the service and the endpoint before the cause
(``l5d-proxy-error: service app: 127.0.0.1:8080: connection refused``) and,
for a plain HTTP client that accepts text, says it in a one-line body
(``exchange.message.error_response``). A warn-level line is logged when a
service starts failing and when it recovers, at most one per service per
``HEALTH_LOG_INTERVAL`` seconds.

Before routing, every request field whose name has an underscore is dropped
and counted, for HTTP/1 and h2 clients alike (``drop_underscore_fields`` in
exchange.py: nginx's default).

Metrics are counted as Linkerd counts them: ``request_total`` when the
request head arrives; ``response_total`` (``status_code``, ``grpc_status``,
``classification``, ``error``) when the response body has ended, so a
response that dies half-way counts as a failure; ``response_latency_ms``
from the request head to the first byte of the response body (or its end,
when it has none). Labelled children are looked up once per
(listener, service, authority, protocol) and kept.

Every label value comes from configuration or from a small fixed set, never
straight from what a peer sent (``RouteTable.authority_label``, and
``l5dproxy.route.labels``); the access log (per request, no state) keeps
each request's real authority.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from l5dproxy.exchange.contracts import HttpSite, RequestContext
from l5dproxy.exchange.identity import ConnectionIdentity
from l5dproxy.exchange.message import (
    UNDERSCORE_FIELD_REASON,
    Headers,
    NotPlacedError,
    ProxyError,
    Request,
    Response,
    accepts_text,
    as_proxy_error,
    drop_underscore_fields,
    error_response,
)
from l5dproxy.route import classify as grpc
from l5dproxy.route.errors import LOAD_SHED, name_error, note_health
from l5dproxy.route.forwarded import ClientForwarding
from l5dproxy.route.labels import NO_TLS, OTHER, Labels, tls_labels
from l5dproxy.route.retry import EmptyReplay, Replay, replay_for, retryable
from l5dproxy.route.table import RouteTable
from l5dproxy.telemetry import DIRECTION

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from l5dproxy.balance.backends import BackendSet, Endpoint
    from l5dproxy.exchange.contracts import Attempt, ClientEnd
    from l5dproxy.telemetry import Metrics

log = Logger()
access_log = Logger(namespace="l5dproxy.access")

#: Distinct label sets kept per proxy before the cache starts over. Every
#: label is bounded by the config (``authority_label`` and friends), so only
#: reloads that rename listeners, services or routes add sets; this bounds
#: the cache (not the registry's series) across any number of them.
MAX_CACHED_LABEL_SETS = 10_000

class HttpProxy:
    """Route, balance, time out and count every HTTP request."""

    def __init__(self, backends: dict[str, BackendSet], metrics: Metrics, reactor,
                 clients: dict[str, ClientEnd] | None = None) -> None:
        self.backends = backends
        self.metrics = metrics
        self.reactor = reactor
        #: Client ends by protocol name ("http1", "h2"); codecs register theirs.
        self.clients: dict[str, ClientEnd] = dict(clients or {})
        #: Compiled routes by listener; weak, so listeners a reload replaced go.
        self._routes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._labels: dict[tuple[str, ...], Labels] = {}
        #: Bumped when ``_labels`` starts over: a connection's cached
        #: ``Labels`` (``_Inbound``) from before are looked up again.
        self.labels_generation = 0
        #: The tap (l5dproxy.app.tap.TapHub) while anyone watches, else None;
        #: ``tap_start`` while anyone wants request-start events too.
        self.tap = None
        self.tap_start = None

    # -- the dispatcher --

    def dispatch_to(self, request: Request, context: RequestContext, waiter, token) -> _Exchange:
        """Route, balance and send ``request``: ``waiter.dispatch_responded(token,
        response)`` or ``waiter.dispatch_failed(token, failure)`` is called
        once (maybe before this returns: then ``delivered`` is set); the
        returned exchange's ``cancel()`` gives the request up, and nothing is
        called after it. An error the middle answers itself is a response
        (``error_response``, 5xx) or, for a request fault (4xx), a failure
        with ``ProxyError``."""
        exchange = _Exchange(self, request, context, waiter, token)
        exchange.start()
        return exchange

    def route_table(self, site: HttpSite) -> RouteTable:
        """``site``'s listener's routes, compiled once per listener."""
        table = self._routes.get(site)
        if table is None:
            table = self._routes[site] = RouteTable(site.config)
        return table

    def labels(self, listener: str, service: str, authority: str, protocol: str,
               tls: tuple[str, str, str] = NO_TLS) -> Labels:
        """The children of one label set; ``authority`` is already a label
        value (``RouteTable.authority_label``), never a raw authority."""
        key = (listener, service, authority, protocol, *tls)
        labels = self._labels.get(key)
        if labels is None:
            if len(self._labels) >= MAX_CACHED_LABEL_SETS:
                for dropped in self._labels.values():
                    dropped.flush()
                    self.metrics.flushers.discard(dropped)
                self._labels.clear()
                self.labels_generation += 1
            labels = self._labels[key] = Labels(self.metrics, (DIRECTION, *key))
            self.metrics.flushers.add(labels)
        return labels


class _Inbound:
    """What the dispatcher keeps per client connection (``RequestContext.routes``):
    its listener's route table and what the rules read of the connection,
    read once (its client and TLS are settled before its first request): the
    forwarded rule for its client, its identity, its TLS labels; and the
    Labels of its last label set (most connections keep to one)."""

    __slots__ = ("authority", "forwarding", "generation", "identity", "labels", "service",
                 "table", "tls")

    def __init__(self, table: RouteTable, context: RequestContext) -> None:
        connection = context.connection
        self.table = table
        self.forwarding: ClientForwarding | None = table.forwarded.for_connection(connection)
        self.identity = ConnectionIdentity(connection)
        self.tls = tls_labels(connection)
        #: The last (service, authority label) and their Labels, while the
        #: proxy's cache is at ``generation``.
        self.service = ""
        self.authority = ""
        self.labels: Labels | None = None
        self.generation = -1


class _Exchange:
    """One request through the middle, from its head to the end of its response."""

    __slots__ = (
        "attempt", "backends", "client", "context", "delivered", "endpoint", "grpc", "head_latency",
        "labels", "latency_seen", "pending", "place_by", "proxy", "replay", "request", "response",
        "retries", "settled", "started", "status", "timer", "token", "waiter",
    )

    #: The routed service, and the client end speaking its protocol: set by
    #: ``start`` before anything reads them (an exchange that fails before
    #: they are known never does).
    backends: BackendSet
    client: ClientEnd

    def __init__(self, proxy: HttpProxy, request: Request, context: RequestContext,
                 waiter: Any, token: Any) -> None:
        self.proxy = proxy
        self.request = request
        self.context = context
        self.started = proxy.reactor.seconds()
        self.endpoint: Endpoint | None = None
        #: The attempt under way (ClientEnd.send), while its outcome is awaited.
        self.attempt: Attempt | None = None
        self.response: Response | None = None
        self.timer: IDelayedCall | None = None
        self.status = 0
        self.head_latency: float | None = None
        self.latency_seen = False
        self.settled = False  # answered, or cancelled
        #: Told the outcome, once (then None).
        self.waiter = waiter
        self.token = token
        self.delivered = False
        #: The request body's tee when the request may be retried (retry.py).
        self.replay: Replay | EmptyReplay | None = None
        self.retries = 0
        self.grpc = False
        #: Counted in ``backends.pending`` (until the exchange is over).
        self.pending = False
        #: After this, a request not placed is not tried elsewhere (_retry).
        self.place_by = self.started

    def start(self) -> None:
        proxy = self.proxy
        head = self.request.head
        context = self.context
        site = context.site
        listener_name = site.listener
        dropped = drop_underscore_fields(head)
        if dropped:   # one rule for every request, whatever protocol it came in
            proxy.metrics.http_errors_total.labels(
                DIRECTION, listener_name, UNDERSCORE_FIELD_REASON).inc(dropped)
        inbound: Any = context.routes   # RequestContext types it object (exchange/ cannot name it)
        if inbound is None:   # once per connection
            inbound = context.routes = _Inbound(proxy.route_table(site), context)
        forwarding = inbound.forwarding
        if forwarding is not None:
            forwarding.apply(head)   # the client's address (one rule)
        table = inbound.table
        if table.routes:
            service, route = table.match_route(head.authority, head.target)
            authority = table.authority_label(head.authority)
        else:
            service, route, authority = table.default, None, OTHER
        labels = inbound.labels
        if (labels is None or inbound.service is not service or inbound.authority is not authority
                or inbound.generation != proxy.labels_generation):
            labels = inbound.labels = proxy.labels(listener_name, service, authority,
                                                   context.protocol, inbound.tls)
            inbound.service = service
            inbound.authority = authority
            inbound.generation = proxy.labels_generation
        self.labels = labels
        labels.requests.n += 1
        self.grpc = head.is_grpc
        # mTLS: l5d-client-id, allow
        refused = inbound.identity.apply(head, self.request.body)
        backends = proxy.backends.get(service) if refused is None else None
        if proxy.tap_start is not None:
            proxy.tap_start.started(self)
        if backends is None:  # refused (config validation names every service)
            self._fail(refused or ProxyError.unavailable("unknown service"), named=False)
            return
        self.backends = backends
        config = backends.config
        limit = config.max_pending_requests
        if limit and backends.pending >= limit:
            # Linkerd's load shedding: past the concurrency limit a request
            # is refused at once rather than queued behind the others.
            proxy.metrics.load_shed_total.labels(service).inc()
            self._fail(ProxyError.unavailable(LOAD_SHED))
            return
        backends.pending += 1
        self.pending = True
        # A transparent listener's connection to original_dst brings its endpoint.
        endpoint = context.connection.pinned or backends.pick()
        if endpoint is None:
            reason, detail = backends.why_unavailable()
            err = ProxyError.unavailable(reason)
            err.detail = detail
            self._fail(err)
            return
        protocol = config.protocol or context.protocol
        if self.request.upgrade is not None and config.protocol != "h2":
            protocol = "http1"  # Upgrade and CONNECT tunnels are HTTP/1 only
        client = proxy.clients.get(protocol)
        if client is None:
            self._fail(ProxyError.bad_gateway(f"no {protocol} client"))
            return
        self.client = client
        backends.deposit()  # an original request earns the retry budget
        if config.retry_limit and retryable(self.request, config.retry_max_body,
                                            route is not None and route.retryable):
            self.replay = replay_for(self.request, config.retry_max_body)
        timeout = config.response_timeout
        if route is not None and route.timeout is not None:
            timeout = route.timeout  # a route's request timeout overrides the service's
        if self.grpc:  # a gRPC deadline bounds the request too
            deadline = grpc.parse_timeout(head.header(b"grpc-timeout"))
            if deadline is not None and (not timeout or deadline < timeout):
                timeout = deadline
        if timeout:
            self.timer = proxy.reactor.callLater(timeout, self._timed_out)
        self.place_by = self.started + (timeout or config.connect_timeout)
        self._send(endpoint)

    def _send(self, endpoint: Endpoint) -> None:
        """One attempt (the first, or a retry) to ``endpoint``."""
        self.endpoint = endpoint
        endpoint.begin()
        self.context.connection.endpoint = endpoint.label
        request = self.request
        if self.replay is not None:
            request = self.replay.request_for_attempt(request, self.retries)
        self.attempt = None
        retries = self.retries
        try:
            # The service's current target: its connect and idle timeouts
            # and name (the pool key, with the endpoint).
            attempt = self.client.send(self.backends.config.target, endpoint, request, self)
        except Exception as e:  # a client end bug must not hang the request
            log.failure("client end failed", Failure(e))
            self._upstream_failed(Failure(e))
            return
        if not self.settled and self.retries == retries and self.endpoint is endpoint:
            self.attempt = attempt   # still waiting: cancel() gives it up

    def _retry(self, latency: float | None, not_placed: bool = False) -> bool:
        """Retry on another endpoint if the request, the service's retry
        limit and its budget allow; the failed attempt's endpoint is released.

        ``not_placed`` (``NotPlacedError``): only to a different endpoint
        (the same one would refuse it again) and only before ``place_by``."""
        replay = self.replay
        backends = self.backends
        if (replay is None or not replay.replayable or self.settled
                or self.retries >= backends.config.retry_limit):
            return False
        failed = self.endpoint
        endpoint = backends.pick(avoid=failed)
        if endpoint is None:
            return False
        if not_placed and (endpoint is failed
                           or self.proxy.reactor.seconds() >= self.place_by):
            return False
        if not backends.retry_allowed():
            return False
        self.retries += 1
        self._release(latency, False)
        log.debug("retry {n} of {method} {path} on {endpoint}", n=self.retries,
                  method=self.request.head.method.decode("latin-1"),
                  path=self.request.head.target.decode("latin-1"), endpoint=endpoint.label)
        self._send(endpoint)
        return True

    # -- outcomes --

    def attempt_responded(self, response: Response) -> None:
        """The attempt's response head (``contracts.AttemptWaiter``)."""
        self.attempt = None
        if self.settled:  # timed out or cancelled meanwhile
            self._cancel_timer()
            response.body.cancel()
            return
        status = response.head.status
        if (status in self.backends.config.retry_statuses
                and self._retry(self.proxy.reactor.seconds() - self.started)):
            response.body.cancel()
            return
        if self.timer is not None:
            self._cancel_timer()
        if self.replay is not None:
            self.replay.release()
        self.settled = True
        now = self.proxy.reactor.seconds()
        self.head_latency = now - self.started
        self.response = response
        self.status = status
        if status < 500 and self.backends.failing:
            note_health(self.backends, False, "", now)
        body = response.body
        if body.ended:
            # The common case: the whole response came with its head (a
            # small one in one read). Its first byte is now, and its end is
            # counted as soon as it is handed on: no hooks on the body.
            self._first_byte(now)
            self._deliver(response, None)
            self._ended(body.trailers, body.error)
            return
        body.on_first_data(self._first_byte)
        self._deliver(response, None)
        body.on_end(self._ended)

    def attempt_failed(self, failure: Failure) -> None:
        """The attempt failed without a response (``contracts.AttemptWaiter``)."""
        self._upstream_failed(failure)

    def _first_byte(self, now: float | None = None) -> None:
        """The response's first byte (or its end, when it has none): its
        latency is counted, once."""
        if not self.latency_seen:
            self.latency_seen = True
            if now is None:
                now = self.proxy.reactor.seconds()
            self.labels.latency(self.status).observe((now - self.started) * 1000.0)

    def _ended(self, trailers: Headers | None, reason: Exception | None) -> None:
        if not self.latency_seen:
            self._first_byte()
        response = self.response
        status = self.status
        headers = response.head.headers if response is not None else []
        grpc_status = grpc.status_text(trailers, headers)
        if reason is not None:
            error = "cancelled" if isinstance(reason, ConnectionAbortedError) else "stream"
            failed = True
            endpoint_ok = error == "cancelled" and status < 500
        else:
            error = ""
            # Linkerd's gRPC failure set; a gRPC stream with no status is UNKNOWN.
            failed = grpc.classify(status, grpc.status_int(grpc_status),
                                   self.grpc or bool(grpc_status)) == "failure"
            endpoint_ok = status < 500
        self.labels.response(status, grpc_status, "failure" if failed else "success",
                             error).inc()
        tap = self.proxy.tap
        if tap is not None:
            tap.ended(self, status, grpc_status, error)
        self._release(self.head_latency, endpoint_ok)
        self._leave()
        if self.context.site.config.access_log:
            self._log_access(status)

    def _upstream_failed(self, failure: Failure) -> None:
        self.attempt = None
        if self.settled:  # we timed out or were cancelled: already answered
            return
        # No response head yet: a connect failure or a reset. Another
        # endpoint may serve it, if the request can be sent again.
        error = failure.value
        request_fault = isinstance(error, ProxyError) and error.status < 500
        if not request_fault and self._retry(None, isinstance(error, NotPlacedError)):
            return
        self._fail(as_proxy_error(failure))

    def _timed_out(self) -> None:
        self.timer = None
        if self.settled:
            return
        self._fail(ProxyError.timeout("response timeout"))
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.cancel()

    def _fail(self, err: ProxyError, named: bool = True) -> None:
        """Answer ``err``, named (errors.py; not when no service was routed to),
        and count it. A 5xx goes to the codec end as a response
        (``error_response``: a text body if the client reads text); a
        request fault (4xx) as a failure with ``err`` (the codec end may
        close the connection)."""
        if named:
            backends = self.backends
            name_error(err, backends, self.endpoint)
            if err.status >= 500 and err.reason != LOAD_SHED:
                note_health(backends, True, err.message, self.proxy.reactor.seconds())
        self.settled = True
        self._cancel_timer()
        self.status = err.status
        self._first_byte()
        # A gRPC request is answered with a trailers-only gRPC error.
        if self.grpc:
            self.labels.response(200, str(err.grpc_status), "failure", err.reason).inc()
        else:
            self.labels.response(err.status, "", "failure", err.reason).inc()
        tap = self.proxy.tap
        if tap is not None:
            tap.ended(self, 200 if self.grpc else err.status,
                      str(err.grpc_status) if self.grpc else "", err.reason)
        self._release(None, False)
        self._leave()
        if self.context.site.config.access_log:
            self._log_access(err.status, err.reason)
        if err.status >= 500 and self.waiter is not None:
            self._deliver(error_response(err, self.grpc, accepts_text(self.request.head)), None)
        else:
            self._deliver(None, Failure(err))

    def _deliver(self, response: Response | None, failure: Failure | None) -> None:
        self.delivered = True
        waiter = self.waiter
        if waiter is None:
            return
        self.waiter = None
        try:
            if failure is None:
                waiter.dispatch_responded(self.token, response)
            else:
                waiter.dispatch_failed(self.token, failure)
        except Exception:
            log.failure("handing on a response failed")

    def cancel(self) -> None:
        """The client went away before the response head: give the request
        up (the attempt under way is cancelled); nothing is called after."""
        if self.delivered or self.settled:
            return
        self.delivered = True
        self.waiter = None
        self.settled = True
        self._cancel_timer()
        attempt, self.attempt = self.attempt, None
        if attempt is not None:
            attempt.cancel()
        self._release(None, True)
        self._leave()

    def _leave(self) -> None:
        """The exchange is over: it no longer counts against the service's
        ``max_pending_requests``."""
        if self.pending:
            self.pending = False
            self.backends.pending -= 1

    def _release(self, latency: float | None, success: bool) -> None:
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            endpoint.end(latency, success)

    def _cancel_timer(self) -> None:
        timer, self.timer = self.timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def _log_access(self, status: int, error: str = "") -> None:
        head = self.request.head
        response = self.response
        access_log.info(
            "{method} {authority} {path} {status} req_bytes={req_bytes} resp_bytes={resp_bytes}"
            " duration_ms={duration_ms:.1f} endpoint={endpoint} client={client}{error}",
            listener=self.context.site.listener,
            method=head.method.decode("latin-1"), authority=head.authority.decode("latin-1")
            or "-", path=head.target.decode("latin-1"), status=status,
            req_bytes=self.request.body.received,
            resp_bytes=response.body.received if response is not None else 0,
            duration_ms=(self.proxy.reactor.seconds() - self.started) * 1000.0,
            endpoint=self.context.connection.endpoint or "-",
            client=self.context.connection.peer or "-",
            error=f' error="{error}"' if error else "",
        )
