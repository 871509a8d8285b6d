"""Where a service's endpoints come from: a static list, DNS A/AAAA, DNS SRV.

A ``Discovery`` keeps one service's endpoint set (an ``AddressSink``: the
balancer's ``BackendSet``) up to date:

* ``endpoints = [...]``: IP literals are used as they are; names are looked
  up once at start (A and AAAA; /etc/hosts first). A name that does not
  resolve stays as it is, and each connection resolves it then.
* ``dns = "name:port"``: A and AAAA records, looked up again when the
  shortest TTL runs out (clamped to ``[discovery] min_ttl``/``max_ttl``).
* ``srv = "_service._proto.name"``: SRV records; the lowest priority whose
  targets resolve is used, and each target's weight becomes its endpoint's
  weight in the balancer.

A lookup that fails (timeout, SERVFAIL, refused) keeps the last good set and
is tried again after ``retry_interval``; NXDOMAIN or an empty answer is an
answer: no endpoints (requests then fail fast with 503). A change applies to
new picks at once: ``BackendSet.set_addresses`` drops departed endpoints from
the balancer while whatever is in flight to them holds its own reference.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Sized
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.names import dns, hosts, resolve
from twisted.names.error import DNSNameError

from l5dproxy.config.model import DiscoveryConfig, HostPort, ServiceConfig
from l5dproxy.net.dns import QuietResolver

log = Logger()

#: A TTL for answers that carry none (NXDOMAIN, empty): the floor applies.
_NO_TTL = 0


class NoAnswerError(Exception):
    """A lookup that gave no answer (as opposed to an answer of none)."""


def make_resolver(config: DiscoveryConfig, reactor: Any):
    """/etc/hosts, then the configured DNS servers (or the system's);
    ``l5dproxy.net.dns.stop_resolver`` stops it."""
    servers = [(r.host, r.port) for r in config.resolvers]
    if servers:
        dns_resolver = QuietResolver(servers=servers, reactor=reactor)
    else:
        dns_resolver = QuietResolver(resolv="/etc/resolv.conf", reactor=reactor)
    return resolve.ResolverChain([hosts.Resolver(), dns_resolver])


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@defer.inlineCallbacks
def lookup_addresses(resolver, name: str, timeout: float,
                     failures: list | None = None):
    """A and AAAA of ``name``: ``{"A": (addresses, ttl) or None, "AAAA": ...}``,
    None for a family whose lookup failed (its Failure appended to
    ``failures`` when given). NXDOMAIN answers ``((), 0)``."""
    results = yield defer.DeferredList(
        [_family(resolver.lookupAddress, name, timeout, dns.A),
         _family(resolver.lookupIPV6Address, name, timeout, dns.AAAA)],
        consumeErrors=True)
    out = {}
    for family, (ok, value) in zip(("A", "AAAA"), results, strict=True):
        out[family] = value if ok else None
        if not ok and failures is not None:
            failures.append(value)
    return out


def resolvers_named(config: DiscoveryConfig) -> str:
    """The DNS servers lookups go to, for log lines: ``resolver 10.0.0.2:53``,
    ``resolvers A, B`` or the system's (``/etc/resolv.conf``)."""
    names = [f"{r.host}:{r.port}" for r in config.resolvers]
    if not names:
        return "the system's resolvers (/etc/resolv.conf)"
    return ("resolver " if len(names) == 1 else "resolvers ") + ", ".join(names)


@defer.inlineCallbacks
def _family(lookup: Callable, name: str, timeout: float, rtype: int):
    try:
        answers, _authority, _additional = yield lookup(name, timeout=(timeout,))
    except DNSNameError:  # NXDOMAIN: an answer, of none
        return (), _NO_TTL
    addresses = []
    ttls = []
    for rr in answers:
        if rr.type != rtype:
            continue
        if rtype == dns.A:
            addresses.append(rr.payload.dottedQuad())
        else:
            addresses.append(socket.inet_ntop(socket.AF_INET6, rr.payload.address))
        ttls.append(rr.ttl)
    return tuple(addresses), (min(ttls) if ttls else _NO_TTL)


class AddressSink(Protocol):
    """Where a ``Discovery`` puts what it finds: a service's endpoint set at
    run time (``l5dproxy.balance.backends.BackendSet``)."""

    @property
    def name(self) -> str:
        """The service's name (log lines)."""

    @property
    def config(self) -> ServiceConfig:
        """The service as configured now: where its endpoints come from."""

    @property
    def endpoints(self) -> Sized:
        """The endpoints in use (their number is logged)."""

    def set_addresses(self, addresses: Iterable[HostPort],
                      weights: dict[HostPort, float] | None = None,
                      ) -> tuple[list[HostPort], list[HostPort]]:
        """Make ``addresses`` the endpoint set (with relative ``weights``, 1
        by default); return (added, removed)."""


class Discovery:
    """Keeps one upstream's endpoint set from its source."""

    def __init__(self, backends: AddressSink, config: DiscoveryConfig, resolver,
                 clock: Any) -> None:
        self.backends = backends
        self.config = config
        self.resolver = resolver
        self.clock = clock
        self.running = False
        self.lookups = {"success": 0, "failure": 0}
        self._call = None
        self._generation = 0
        #: Last good answers: (name, family) -> (addresses); srv -> records.
        self._last: dict[Any, Any] = {}
        self._first: defer.Deferred[None] = defer.Deferred()
        self.pending: defer.Deferred | None = None

    @property
    def service(self) -> ServiceConfig:
        return self.backends.config

    def start(self) -> defer.Deferred:
        """Begin; the Deferred fires once the first lookup has finished."""
        self.running = True
        self._generation += 1
        self._refresh(self._generation)
        return self._first

    def stop(self) -> None:
        self.running = False
        self._generation += 1
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self, generation: int, delay: float) -> None:
        if self.running and generation == self._generation:
            self._call = self.clock.callLater(delay, self._refresh, generation)

    def _refresh(self, generation: int) -> None:
        if not self.running or generation != self._generation:
            return
        self._call = None
        service = self.service
        if service.dns is not None:
            d = self._lookup_dns(service.dns)
        elif service.srv is not None:
            d = self._lookup_srv(service.srv)
        else:
            d = self._lookup_static(service.endpoints)
        d.addCallbacks(self._resolved, self._failed, callbackArgs=(generation,),
                       errbackArgs=(generation,))
        d.addErrback(lambda f: log.failure("discovery for {service}", f,
                                           service=self.backends.name))
        #: The lookup under way (tests wait on it).
        self.pending = d

    def _resolved(self, result, generation: int) -> None:
        if generation != self._generation:
            return
        weighted, ttl = result
        self.lookups["success"] += 1
        added, removed = self.backends.set_addresses(
            [a for a, _ in weighted], {a: w for a, w in weighted})
        if added or removed:
            log.info("service {service}: endpoints {endpoints} (added {added}, removed "
                     "{removed})", service=self.backends.name,
                     endpoints=" ".join(str(a) for a, _ in weighted) or "none",
                     added=len(added), removed=len(removed))
        if ttl is not None:
            self._schedule(generation, min(max(ttl, self.config.min_ttl), self.config.max_ttl))
        self._fire_first()

    def _failed(self, failure, generation: int) -> None:
        if generation != self._generation:
            return
        self.lookups["failure"] += 1
        log.warn("service {service}: lookup failed ({reason}); keeping {n} endpoints, "
                 "retrying in {retry} s", service=self.backends.name,
                 reason=failure.getErrorMessage() or failure.type.__name__,
                 n=len(self.backends.endpoints), retry=self.config.retry_interval)
        self._schedule(generation, self.config.retry_interval)
        self._fire_first()

    def _fire_first(self) -> None:
        if not self._first.called:
            self._first.callback(None)

    # -- the sources --

    @defer.inlineCallbacks
    def _addresses(self, name: str, port: int, key: Any):
        """Addresses of ``name`` (last good per family when a family fails);
        raises NoAnswerError when no family answered and nothing is known."""
        failures: list = []
        families = yield lookup_addresses(self.resolver, name, self.config.timeout, failures)
        addresses: list[HostPort] = []
        ttls = []
        answered = False
        for family, answer in families.items():
            if answer is None:
                kept = self._last.get((key, family))
                if kept is not None:
                    addresses.extend(kept[0])
                continue
            answered = True
            found = tuple(HostPort(a, port, name) for a in answer[0])
            self._last[(key, family)] = (found,)
            addresses.extend(found)
            if answer[0]:
                ttls.append(answer[1])
        if not answered:
            if any(f.check(defer.TimeoutError) for f in failures):
                # twisted.names' DNSQueryTimeoutError is a defer.TimeoutError
                raise NoAnswerError(
                    f"{resolvers_named(self.config)} timed out after "
                    f"{self.config.timeout:g} s looking up {name}")
            raise NoAnswerError(f"no answer for {name}")
        return addresses, (min(ttls) if ttls else _NO_TTL)

    @defer.inlineCallbacks
    def _lookup_dns(self, target: HostPort):
        addresses, ttl = yield self._addresses(target.host, target.port, "dns")
        return [(a, 1.0) for a in addresses], ttl

    @defer.inlineCallbacks
    def _lookup_static(self, endpoints: tuple[HostPort, ...]):
        """Names in a static list are resolved once; no refresh (ttl None)."""
        out: list[tuple[HostPort, float]] = []
        for endpoint in endpoints:
            if is_ip(endpoint.host):
                out.append((endpoint, 1.0))
                continue
            try:
                addresses, _ = yield self._addresses(endpoint.host, endpoint.port, endpoint)
            except Exception as e:  # any failure: keep the name
                log.info("service {service}: {name} does not resolve ({reason}); "
                         "it is resolved per connection", service=self.backends.name,
                         name=endpoint.host, reason=str(e) or type(e).__name__)
                addresses = []
            if addresses:
                out.extend((a, 1.0) for a in addresses)
            else:
                out.append((endpoint, 1.0))
        return out, None

    @defer.inlineCallbacks
    def _lookup_srv(self, name: str):
        try:
            answers, _auth, _add = yield self.resolver.lookupService(
                name, timeout=(self.config.timeout,))
            records = [rr for rr in answers if rr.type == dns.SRV]
        except DNSNameError:
            records = []
        srv_ttl = min((rr.ttl for rr in records), default=_NO_TTL)
        by_priority: dict[int, list] = {}
        for rr in records:
            target = str(rr.payload.target).rstrip(".")
            if not target:
                continue  # "." : the service is decidedly not available here
            by_priority.setdefault(rr.payload.priority, []).append(
                (target, rr.payload.port, rr.payload.weight))
        ttls = [srv_ttl] if records else []
        for priority in sorted(by_priority):
            group = by_priority[priority]
            total = sum(w for _, _, w in group)
            weighted: list[tuple[HostPort, float]] = []
            for target, port, weight in group:
                share = (weight / total * len(group)) if total else 1.0
                try:
                    addresses, ttl = yield self._addresses(target, port, ("srv", target, port))
                except NoAnswerError:
                    continue
                if addresses:
                    ttls.append(ttl)
                weighted.extend((a, max(share, 0.01)) for a in addresses)
            if weighted:
                return weighted, min((t for t in ttls if t), default=_NO_TTL)
        return [], min((t for t in ttls if t), default=_NO_TTL)
