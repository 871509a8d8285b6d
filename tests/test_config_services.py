"""Config keys of services: discovery sources, timeouts, accrual, retries; [discovery]."""

from __future__ import annotations

import tomllib

from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.config.model import DiscoveryConfig, FailureAccrualConfig, HostPort, ServiceConfig
from l5dproxy.config.parse import ConfigError, parse


def parse_text(text: str):
    return parse(tomllib.loads(text), "f.toml")


class ServiceKeysTests(SynchronousTestCase):

    def errors(self, text: str) -> list[str]:
        with self.assertRaises(ConfigError) as cm:
            parse_text(text)
        return cm.exception.errors

    def test_defaults(self):
        s = parse_text('[service.app]\nendpoints = ["127.0.0.1:1"]\n').services["app"]
        self.assertIsNone(s.dns)
        self.assertIsNone(s.srv)
        self.assertIsNone(s.response_timeout)
        self.assertEqual(s.idle_timeout, 60.0)
        self.assertEqual(s.failure_accrual, FailureAccrualConfig())
        self.assertEqual(s.failure_accrual.consecutive_failures, 7)
        self.assertEqual(s.retry_statuses, (502, 503, 504))
        self.assertEqual((s.retry_budget_ratio, s.retry_budget_min_per_second,
                          s.retry_budget_ttl), (0.2, 10.0, 10.0))

    def test_every_key(self):
        c = parse_text('''
            [discovery]
            resolvers = ["127.0.0.1:5353", "[::1]:53"]
            min_ttl = 1
            max_ttl = 30
            retry_interval = 2
            timeout = 1.5
            [proxy]
            watch_config = true
            watch_interval = 0.5
            [service.app]
            dns = "app.example:8080"
            response_timeout = 2.5
            idle_timeout = 30
            retry_statuses = [503]
            retry_limit = 3
            retry_max_body = 1024
            retry_budget_ratio = 0.5
            retry_budget_min_per_second = 1
            retry_budget_ttl = 5
            [service.app.failure_accrual]
            consecutive_failures = 3
            min_backoff = 0.5
            max_backoff = 10
            jitter = 0
            [service.grpc]
            srv = "_grpc._tcp.example.com"
        ''')
        self.assertEqual(c.discovery, DiscoveryConfig(
            (HostPort("127.0.0.1", 5353), HostPort("::1", 53)), 1.0, 30.0, 2.0, 1.5))
        self.assertTrue(c.proxy.watch_config)
        self.assertEqual(c.proxy.watch_interval, 0.5)
        app = c.services["app"]
        self.assertEqual(app.endpoints, ())
        self.assertEqual(app.dns, HostPort("app.example", 8080))
        self.assertEqual(app.response_timeout, 2.5)
        self.assertEqual(app.idle_timeout, 30.0)
        self.assertEqual(app.retry_statuses, (503,))
        self.assertEqual(app.retry_limit, 3)
        self.assertEqual(app.retry_max_body, 1024)
        self.assertEqual(app.retry_budget_ratio, 0.5)
        self.assertEqual(app.retry_budget_ttl, 5.0)
        self.assertEqual(app.failure_accrual, FailureAccrualConfig(3, 0.5, 10.0, 0.0))
        self.assertEqual(c.services["grpc"].srv, "_grpc._tcp.example.com")

    def test_dns_port_decides_opaque(self):
        c = parse_text('[service.db]\ndns = "db.example:3306"\n')
        self.assertTrue(c.services["db"].is_opaque(frozenset({3306})))
        self.assertFalse(ServiceConfig("x", (), srv="_a._tcp.b").is_opaque(frozenset({3306})))

    def test_errors(self):
        errors = self.errors('''
            [discovery]
            resolvers = ["nope", 5]
            min_ttl = 10
            max_ttl = 1
            bogus = 1
            [service.both]
            endpoints = ["127.0.0.1:1"]
            dns = "a:1"
            [service.bad]
            dns = "a"
            response_timeout = 0
            retry_statuses = [200, 999, "x"]
            retry_budget_ratio = 2
            [service.bad.failure_accrual]
            consecutive_failures = -1
            min_backoff = 5
            max_backoff = 1
            what = 1
            [service.badsrv]
            srv = "example.com"
            [service.none]
            protocol = "h2"
        ''')
        self.assertEqual(sorted(errors), sorted([
            "f.toml: discovery.resolvers[0]: 'nope': expected host:port",
            'f.toml: discovery.resolvers[1]: expected a string "host:port", got an integer',
            "f.toml: discovery.max_ttl: must not be less than min_ttl",
            "f.toml: discovery.bogus: unknown key",
            "f.toml: service.both: exactly one of endpoints, dns or srv, not endpoints and dns",
            "f.toml: service.bad.dns: 'a': expected host:port",
            "f.toml: service.bad.response_timeout: must be a duration in seconds, greater than 0",
            "f.toml: service.bad.retry_statuses: not HTTP status codes: [999, 'x']",
            "f.toml: service.bad.retry_budget_ratio: must be between 0 and 1",
            "f.toml: service.bad.failure_accrual.consecutive_failures: must not be negative",
            "f.toml: service.bad.failure_accrual.max_backoff: must not be less than min_backoff",
            "f.toml: service.bad.failure_accrual.what: unknown key",
            "f.toml: service.badsrv.srv: 'example.com': expected an SRV name such as"
            " _http._tcp.example.com",
            "f.toml: service.none.endpoints: required key is missing",
        ]))


class RouteKeysTests(SynchronousTestCase):

    def test_route_timeout_and_retryable(self):
        with self.assertRaises(ConfigError) as cm:
            parse_text('''
                [service.app]
                endpoints = ["127.0.0.1:1"]
                [[listener]]
                name = "in"
                listen = "tcp:0"
                service = "app"
                [[listener.route]]
                service = "app"
                path_prefix = "/a"
                timeout = 1.5
                retryable = true
                [[listener.route]]
                service = "app"
                timeout = 0
            ''')
        self.assertEqual(cm.exception.errors, [
            "f.toml: listener[0].route[1].timeout: must be a duration in seconds, greater than 0"])
        route = parse_text('''
            [service.app]
            endpoints = ["127.0.0.1:1"]
            [[listener]]
            name = "in"
            listen = "tcp:0"
            service = "app"
            [[listener.route]]
            service = "app"
            timeout = 1.5
            retryable = true
        ''').listeners[0].routes[0]
        self.assertEqual((route.timeout, route.retryable), (1.5, True))
