"""Discovery against a real twisted.names authoritative server on loopback."""

from __future__ import annotations

import random

from twisted.internet import defer, reactor
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from l5dproxy.balance.backends import BackendSet
from l5dproxy.config.model import DiscoveryConfig, HostPort, ServiceConfig
from l5dproxy.discovery import Discovery, make_resolver
from l5dproxy.net.dns import stop_resolver
from tests.dnsserver import DnsServer


def hp(host: str, port: int) -> HostPort:
    return HostPort(host, port)


class DiscoveryTests(TestCase):

    def setUp(self):
        self.dns = DnsServer({
            "app.test": [("A", "127.0.0.1", 7), ("A", "127.0.0.2", 9), ("AAAA", "::1", 30)],
            "web.test": [("A", "127.0.0.5", 60)],
            "a.app.test": [("A", "127.0.1.1", 60)],
            "b.app.test": [("A", "127.0.1.2", 60)],
            "c.app.test": [("A", "127.0.1.3", 60)],
            "_http._tcp.app.test": [
                ("SRV", 10, 60, 8081, "a.app.test", 20),
                ("SRV", 10, 20, 8082, "b.app.test", 20),
                ("SRV", 20, 0, 8083, "c.app.test", 20),
            ],
        })
        port = self.dns.start()
        self.addCleanup(self.dns.stop)
        self.config = DiscoveryConfig(resolvers=(hp("127.0.0.1", port),), min_ttl=2,
                                      max_ttl=60, retry_interval=3, timeout=0.3)
        self.resolver = make_resolver(self.config, reactor)
        self.addCleanup(stop_resolver, self.resolver)
        # Let the resolver's UDP ports finish closing before the reactor is checked.
        self.addCleanup(deferLater, reactor, 0.05, lambda: None)
        self.clock = Clock()

    def discovery(self, **service) -> Discovery:
        config = ServiceConfig(name="app", endpoints=service.pop("endpoints", ()), **service)
        self.upstream = BackendSet(config, frozenset(), clock=self.clock, rng=random.Random(1))
        d = Discovery(self.upstream, self.config, self.resolver, self.clock)
        self.addCleanup(d.stop)
        return d

    def addresses(self) -> set[HostPort]:
        return {e.address for e in self.upstream.endpoints}

    def next_refresh(self, d: Discovery) -> float:
        return d._call.getTime() - self.clock.seconds()

    @defer.inlineCallbacks
    def refresh(self, d: Discovery):
        self.clock.advance(self.next_refresh(d))
        yield d.pending

    @defer.inlineCallbacks
    def test_dns_a_and_aaaa_refreshed_by_ttl(self):
        d = self.discovery(dns=hp("app.test", 8080))
        self.assertEqual(self.upstream.endpoints, [])
        yield d.start()
        self.assertEqual(self.addresses(), {hp("127.0.0.1", 8080), hp("127.0.0.2", 8080),
                                            hp("::1", 8080)})
        self.assertEqual(self.next_refresh(d), 7)  # the shortest TTL
        self.dns.records["app.test"] = [("A", "127.0.0.3", 1)]
        yield self.refresh(d)
        self.assertEqual(self.addresses(), {hp("127.0.0.3", 8080)})
        self.assertEqual(self.next_refresh(d), 2)  # TTL 1, floor 2
        self.dns.records["app.test"] = [("A", "127.0.0.3", 100000)]
        yield self.refresh(d)
        self.assertEqual(self.next_refresh(d), 60)  # the ceiling
        self.assertEqual(d.lookups, {"success": 3, "failure": 0})

    @defer.inlineCallbacks
    def test_change_never_cuts_in_flight(self):
        d = self.discovery(dns=hp("app.test", 8080))
        yield d.start()
        leaving = next(e for e in self.upstream.endpoints if e.address.host == "127.0.0.2")
        staying = next(e for e in self.upstream.endpoints if e.address.host == "127.0.0.1")
        leaving.begin()
        staying.begin()
        self.dns.records["app.test"] = [("A", "127.0.0.1", 7), ("A", "127.0.0.4", 7)]
        yield self.refresh(d)
        self.assertEqual(self.addresses(), {hp("127.0.0.1", 8080), hp("127.0.0.4", 8080)})
        # The one that left is never picked again, but its user still holds it.
        self.assertEqual(leaving.active, 1)
        for _ in range(50):
            e = self.upstream.pick()
            self.assertIsNot(e, leaving)
        leaving.end(0.01, True)
        self.assertEqual(leaving.active, 0)
        # The one that stayed is the same object, with its count.
        self.assertIn(staying, self.upstream.endpoints)
        self.assertEqual(staying.active, 1)

    @defer.inlineCallbacks
    def test_servfail_keeps_the_last_good_set(self):
        d = self.discovery(dns=hp("app.test", 8080))
        yield d.start()
        before = list(self.upstream.endpoints)
        self.dns.records["app.test"] = "servfail"
        yield self.refresh(d)
        self.flushLoggedErrors(RuntimeError)  # the server logs the failure it answers
        self.assertEqual(self.upstream.endpoints, before)
        self.assertEqual(d.lookups["failure"], 1)
        self.assertEqual(self.next_refresh(d), 3)  # retry_interval
        self.dns.records["app.test"] = [("A", "127.0.0.9", 7)]
        yield self.refresh(d)
        self.assertEqual(self.addresses(), {hp("127.0.0.9", 8080)})

    @defer.inlineCallbacks
    def test_timeout_keeps_the_last_good_set(self):
        d = self.discovery(dns=hp("app.test", 8080))
        yield d.start()
        before = list(self.upstream.endpoints)
        self.dns.records["app.test"] = "drop"
        seen: list[dict] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        yield self.refresh(d)
        self.assertEqual(self.upstream.endpoints, before)
        self.assertEqual(d.lookups["failure"], 1)
        # the warning names the resolver and says it timed out (issue 15)
        lines = [formatEvent(e) for e in seen if "lookup failed" in e.get("log_format", "")]
        resolver = f"127.0.0.1:{self.config.resolvers[0].port}"
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"lookup failed (resolver {resolver} timed out after", lines[0])
        self.assertIn("looking up app.test", lines[0])

    @defer.inlineCallbacks
    def test_nxdomain_is_no_endpoints(self):
        d = self.discovery(dns=hp("app.test", 8080))
        yield d.start()
        del self.dns.records["app.test"]
        yield self.refresh(d)
        self.assertEqual(self.upstream.endpoints, [])
        self.assertIsNone(self.upstream.pick())
        self.assertEqual(self.next_refresh(d), 2)

    @defer.inlineCallbacks
    def test_srv_priority_and_weight(self):
        d = self.discovery(srv="_http._tcp.app.test")
        yield d.start()
        weights = {e.address: e.weight for e in self.upstream.endpoints}
        self.assertEqual(weights, {hp("127.0.1.1", 8081): 1.5, hp("127.0.1.2", 8082): 0.5})
        self.assertEqual(self.next_refresh(d), 20)
        # Heavier weight, bigger share.
        counts = {a: 0 for a in weights}
        for _ in range(1000):
            e = self.upstream.pick_connection()
            e.begin()
            counts[e.address] += 1
        self.assertGreater(counts[hp("127.0.1.1", 8081)], 2 * counts[hp("127.0.1.2", 8082)])
        # The first priority's targets are gone: the next priority serves.
        del self.dns.records["a.app.test"]
        del self.dns.records["b.app.test"]
        yield self.refresh(d)
        self.assertEqual(self.addresses(), {hp("127.0.1.3", 8083)})

    @defer.inlineCallbacks
    def test_static_names_resolved_once(self):
        d = self.discovery(endpoints=(hp("127.0.0.1", 1), hp("web.test", 2),
                                      hp("nowhere.test", 3)))
        self.assertEqual(self.addresses(), {hp("127.0.0.1", 1), hp("web.test", 2),
                                            hp("nowhere.test", 3)})
        yield d.start()
        self.assertEqual(self.addresses(), {hp("127.0.0.1", 1), hp("127.0.0.5", 2),
                                            hp("nowhere.test", 3)})
        self.assertIsNone(d._call)  # no refresh

    @defer.inlineCallbacks
    def test_addresses_keep_the_name_they_were_found_under(self):
        """TLS origination verifies an endpoint against the name it came
        from (tls.server_name's default), not the address it resolved to."""
        d = self.discovery(endpoints=(hp("127.0.0.1", 1), hp("web.test", 2),
                                      hp("nowhere.test", 3)))
        yield d.start()
        names = {(e.address.host, e.address.name) for e in self.upstream.endpoints}
        self.assertEqual(names, {("127.0.0.1", ""), ("127.0.0.5", "web.test"),
                                 ("nowhere.test", "")})
        d = self.discovery(srv="_http._tcp.app.test")
        yield d.start()
        self.assertEqual({(e.address.host, e.address.name) for e in self.upstream.endpoints},
                         {("127.0.1.1", "a.app.test"), ("127.0.1.2", "b.app.test")})
        d = self.discovery(dns=hp("web.test", 8080))
        yield d.start()
        self.assertEqual([e.address.name for e in self.upstream.endpoints], ["web.test"])
