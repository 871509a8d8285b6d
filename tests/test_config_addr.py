"""Config keys of the client's address (issue 14): parsed, defaults, and
every bad value refused with its key and reason."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from l5dproxy.config.parse import ConfigError, parse


def config(listener: dict | None = None, service: dict | None = None,
           listener_opaque: bool = False) -> dict:
    return {"listener": [{"name": "in", "listen": "tcp:0", "service": "app",
                          **({"opaque": True} if listener_opaque else {}),
                          **(listener or {})}],
            "service": {"app": {"endpoints": ["127.0.0.1:1"], **(service or {})}}}


class AddressConfigTests(SynchronousTestCase):
    def errors(self, data: dict) -> list[str]:
        with self.assertRaises(ConfigError) as cm:
            parse(data, "f.toml")
        return cm.exception.errors

    def test_defaults(self) -> None:
        c = parse(config())
        [listener] = c.listeners
        self.assertEqual((listener.proxy_protocol, listener.proxy_protocol_timeout,
                          listener.forwarded, listener.trusted_proxies),
                         ("off", 5.0, "append", ()))
        self.assertIsNone(c.services["app"].send_proxy_protocol)

    def test_values(self) -> None:
        c = parse(config({"proxy_protocol": "optional", "proxy_protocol_timeout": 2,
                          "forwarded": "replace", "trusted_proxies": ["10.0.0.0/8", "::1"]},
                         {"send_proxy_protocol": "v2"}, listener_opaque=True))
        [listener] = c.listeners
        self.assertEqual((listener.proxy_protocol, listener.proxy_protocol_timeout,
                          listener.forwarded, listener.trusted_proxies),
                         ("optional", 2.0, "replace", ("10.0.0.0/8", "::1")))
        self.assertEqual(c.services["app"].send_proxy_protocol, "v2")

    def test_bad_values(self) -> None:
        errors = self.errors(config({"proxy_protocol": "on", "proxy_protocol_timeout": 0,
                                     "forwarded": "prepend",
                                     "trusted_proxies": ["10.0.0.1/8", 7]},
                                    {"send_proxy_protocol": "v3"}, listener_opaque=True))
        self.assertEqual(errors, [
            "f.toml: service.app.send_proxy_protocol: expected one of v1, v2, got 'v3'",
            "f.toml: listener[0].proxy_protocol: expected one of off, required, optional,"
            " got 'on'",
            "f.toml: listener[0].proxy_protocol_timeout: must be a duration in seconds,"
            " greater than 0",
            "f.toml: listener[0].forwarded: expected one of append, replace, off,"
            " got 'prepend'",
            "f.toml: listener[0].trusted_proxies: '10.0.0.1/8' is not an address or CIDR"
            " network (10.0.0.1/8 has host bits set)",
        ])

    def test_send_proxy_protocol_refused_where_http_reaches(self) -> None:
        [error] = self.errors(config(service={"send_proxy_protocol": "v1"}))
        self.assertTrue(error.startswith(
            "f.toml: service.app.send_proxy_protocol: HTTP traffic reaches this service"
            " (listener 'in' detects protocols)"), error)
        routed = config(listener={"route": [{"path_prefix": "/", "service": "app"}]},
                        service={"send_proxy_protocol": "v1"}, listener_opaque=True)
        [error] = self.errors(routed)
        self.assertIn("(a route of listener 'in' sends requests to it)", error)
        # An opaque service is relayed whatever the listener detects.
        parse(config(service={"send_proxy_protocol": "v1", "opaque": True}))


class TransparentConfigTests(SynchronousTestCase):
    def test_original_dst_is_built_in(self) -> None:
        c = parse({"listener": [{"name": "t", "listen": "tcp:0", "service": "original_dst",
                                 "transparent": True}]})
        self.assertEqual((c.listeners[0].transparent, c.services["original_dst"].endpoints),
                         (True, ()))
        # Its settings may be set, its endpoints not.
        c = parse({"listener": [{"name": "t", "listen": "tcp:0", "service": "original_dst",
                                 "transparent": True}],
                   "service": {"original_dst": {"protocol": "http1", "connect_timeout": 1}}})
        self.assertEqual(c.services["original_dst"].protocol, "http1")

    def test_refused(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            parse({"listener": [{"name": "t", "listen": "tcp:0", "service": "original_dst"}],
                   "service": {"original_dst": {"endpoints": ["127.0.0.1:1"]}}}, "f.toml")
        self.assertEqual(cm.exception.errors, [
            "f.toml: service.original_dst.endpoints: the original_dst service's endpoint is"
            " each connection's original destination (transparent listeners)",
            "f.toml: listener[0].service: 'original_dst' needs transparent = true (the"
            " original destination of each connection is where it goes)",
        ])
