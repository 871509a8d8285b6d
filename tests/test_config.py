"""Config: TOML values in, frozen dataclasses or ``FILE: key.path: reason`` lines out."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib

from twisted.trial import unittest

from l5dproxy.app import cli
from l5dproxy.config import checks
from l5dproxy.config.checks import parse_host_port
from l5dproxy.config.model import DEFAULT_OPAQUE_PORTS, HostPort, ServiceConfig
from l5dproxy.config.parse import ConfigError, load, parse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MINIMAL = """
[[listener]]
name = "inbound"
listen = "tcp:4143:interface=127.0.0.1"
service = "app"

[service.app]
endpoints = ["127.0.0.1:8080"]
"""

#: One line per problem: ``FILE: key.path: reason``.
ERROR_LINE = re.compile(r"^(?P<file>[^:]+): (?P<key>[^:]+): (?P<reason>.+)$")


def errors_of(text: str, source: str = "f.toml") -> list[str]:
    try:
        parse(tomllib.loads(text), source)
    except ConfigError as e:
        return e.errors
    raise AssertionError("the config was accepted")


class DefaultsTests(unittest.TestCase):
    def test_minimal(self) -> None:
        c = parse(tomllib.loads(MINIMAL), "f.toml")
        self.assertEqual(c.source, "f.toml")
        self.assertEqual(c.admin.listen, "tcp:4191:interface=127.0.0.1")
        self.assertEqual(c.detect.timeout, 10.0)
        self.assertEqual(c.detect.peek_limit, 8192)
        self.assertEqual(c.detect.opaque_ports,
                         frozenset({25, 587, 3306, 4444, 5432, 6379, 9300, 11211}))
        self.assertEqual(c.proxy.drain_timeout, 30.0)
        self.assertTrue(c.proxy.log_connections)
        (listener,) = c.listeners
        self.assertEqual(listener.name, "inbound")
        self.assertEqual(listener.listen, "tcp:4143:interface=127.0.0.1")
        self.assertEqual(listener.service, "app")
        self.assertFalse(listener.opaque)
        app = c.services["app"]
        self.assertEqual(app.endpoints, (HostPort("127.0.0.1", 8080),))
        self.assertFalse(app.opaque)
        self.assertIsNone(app.protocol)
        self.assertEqual(app.connect_timeout, 5.0)

    def test_empty_file(self) -> None:
        c = parse({}, "f.toml")
        self.assertEqual(c.listeners, ())
        self.assertEqual(c.services, {})

    def test_frozen(self) -> None:
        c = parse(tomllib.loads(MINIMAL), "f.toml")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            c.detect.timeout = 1  # type: ignore[misc]
        with self.assertRaises(dataclasses.FrozenInstanceError):
            c.listeners[0].name = "x"  # type: ignore[misc]

    def test_every_value(self) -> None:
        c = parse(tomllib.loads("""
            [admin]
            listen = "tcp:0:interface=127.0.0.1"
            [detect]
            timeout = 0.25
            peek_limit = 100
            opaque_ports = [1234]
            [proxy]
            drain_timeout = 2
            log_connections = false
            [[listener]]
            name = "a"
            listen = "tcp:0"
            service = "db"
            opaque = true
            [service.db]
            endpoints = ["db.example:3306", "[::1]:3307", "[2001:db8::1]:5432"]
            opaque = true
            protocol = "h2"
            connect_timeout = 0.5
        """), "f.toml")
        self.assertEqual(c.detect.timeout, 0.25)
        self.assertIsInstance(c.detect.timeout, float)
        self.assertEqual(c.detect.peek_limit, 100)
        self.assertEqual(c.detect.opaque_ports, frozenset({1234}))
        self.assertEqual(c.proxy.drain_timeout, 2.0)
        self.assertIsInstance(c.proxy.drain_timeout, float)
        self.assertFalse(c.proxy.log_connections)
        self.assertTrue(c.listeners[0].opaque)
        db = c.services["db"]
        self.assertEqual(db.endpoints, (HostPort("db.example", 3306), HostPort("::1", 3307),
                                        HostPort("2001:db8::1", 5432)))
        self.assertTrue(db.opaque)
        self.assertEqual(db.protocol, "h2")
        self.assertEqual(db.connect_timeout, 0.5)

    def test_bundled_default_parses(self) -> None:
        """conf/l5dproxy.toml and the copy shipped in the package both parse,
        and are the same file."""
        conf = os.path.join(REPO, "conf", "l5dproxy.toml")
        c = load(conf)
        self.assertEqual([lc.name for lc in c.listeners], ["inbound"])
        self.assertEqual(c.listeners[0].listen, "tcp:4143:interface=127.0.0.1")
        self.assertEqual(c.services["app"].endpoints, (HostPort("127.0.0.1", 8080),))
        self.assertEqual(c.admin.listen, "tcp:4191:interface=127.0.0.1")
        with open(conf, "rb") as a, open(cli.default_config_path(), "rb") as b:
            self.assertEqual(a.read(), b.read())


class HostPortTests(unittest.TestCase):
    def test_valid(self) -> None:
        self.assertEqual(parse_host_port("127.0.0.1:80"), HostPort("127.0.0.1", 80))
        self.assertEqual(parse_host_port("example.com:65535"), HostPort("example.com", 65535))
        self.assertEqual(parse_host_port("[::1]:8080"), HostPort("::1", 8080))
        self.assertEqual(parse_host_port("[fe80::1%eth0]:1"), HostPort("fe80::1%eth0", 1))

    def test_str_round_trips(self) -> None:
        for text in ("127.0.0.1:80", "[::1]:8080", "h:1"):
            self.assertEqual(str(parse_host_port(text)), text)

    def test_invalid(self) -> None:
        for text in ("127.0.0.1", "h:", ":80", "h:0", "h:65536", "h:http", "h:-1",
                     "[::1]8080", "[::1]", "[]:80", "::1:8080", "1:2:3", ""):
            with self.subTest(text=text), self.assertRaises(ValueError):
                parse_host_port(text)

    def test_unbracketed_ipv6_says_brackets(self) -> None:
        with self.assertRaisesRegex(ValueError, r"brackets"):
            parse_host_port("::1:8080")


class OpaqueTests(unittest.TestCase):
    def service(self, *ports: int, opaque: bool = False) -> ServiceConfig:
        return ServiceConfig("s", tuple(HostPort("h", p) for p in ports), opaque=opaque)

    def test_by_flag(self) -> None:
        self.assertTrue(self.service(8080, opaque=True).is_opaque(DEFAULT_OPAQUE_PORTS))

    def test_all_endpoints_on_opaque_ports(self) -> None:
        self.assertTrue(self.service(3306).is_opaque(DEFAULT_OPAQUE_PORTS))
        self.assertTrue(self.service(25, 587).is_opaque(DEFAULT_OPAQUE_PORTS))

    def test_some_endpoints_not_opaque(self) -> None:
        self.assertFalse(self.service(3306, 8080).is_opaque(DEFAULT_OPAQUE_PORTS))
        self.assertFalse(self.service(8080).is_opaque(DEFAULT_OPAQUE_PORTS))

    def test_configured_ports(self) -> None:
        self.assertTrue(self.service(8080).is_opaque(frozenset({8080})))
        self.assertFalse(self.service(3306).is_opaque(frozenset({8080})))

    def test_no_endpoints_is_not_opaque(self) -> None:
        self.assertFalse(self.service().is_opaque(DEFAULT_OPAQUE_PORTS))

    def test_from_file(self) -> None:
        c = parse(tomllib.loads("""
            [detect]
            opaque_ports = [9999]
            [service.a]
            endpoints = ["h:9999"]
            [service.b]
            endpoints = ["h:3306"]
        """), "f.toml")
        self.assertTrue(c.services["a"].is_opaque(c.detect.opaque_ports))
        self.assertFalse(c.services["b"].is_opaque(c.detect.opaque_ports))


class ErrorTests(unittest.TestCase):
    def assertErrors(self, text: str, *expected: str) -> list[str]:
        """Every line is ``f.toml: key.path: reason``; each ``expected``
        (``key.path: reason`` regular expression) matches one of them."""
        errors = errors_of(text)
        for line in errors:
            self.assertRegex(line, ERROR_LINE)
            self.assertTrue(line.startswith("f.toml: "), line)
        for pattern in expected:
            matching = [e for e in errors if re.fullmatch(r"f\.toml: " + pattern, e)]
            self.assertTrue(matching, f"no error matches {pattern!r} in {errors}")
        return errors

    def test_unknown_keys(self) -> None:
        errors = self.assertErrors(
            MINIMAL + """
                bogus = 1  # goes into [service.app]
                [admin]
                bind = "x"
                [detect]
                timout = 1
                [proxy]
                drain = 1
                [[listener]]
                name = "b"
                listen = "tcp:0"
                service = "app"
                opaqe = true
            """,
            r"service\.app\.bogus: unknown key",
            r"admin\.bind: unknown key",
            r"detect\.timout: unknown key; did you mean 'timeout'\?",
            r"proxy\.drain: unknown key",
            r"listener\[1\]\.opaqe: unknown key; did you mean 'opaque'\?",
        )
        self.assertEqual(len(errors), 5)

    def test_unknown_key_hints(self) -> None:
        """A misspelt key names the closest key of its table; a key of
        another table names the tables that take it (issue 15 part 5)."""
        errors = errors_of(MINIMAL + """
            endpoint = ["127.0.0.1:1"]
            [proxy]
            peek_limit = 4096
            timeout = 10
            drian_timeout = 1
            xyzzy = 1
            [detect]
            drain_timeout = 1
            [[listener]]
            name = "b"
            listen = "tcp:0"
            service = "app"
            [[listener.route]]
            service = "app"
            timeot = 1
        """)
        self.assertEqual(sorted(errors), sorted([
            "f.toml: service.app.endpoint: unknown key; did you mean 'endpoints'?",
            "f.toml: proxy.peek_limit: unknown key; belongs in [detect]",
            "f.toml: proxy.timeout: unknown key; "
            "belongs in [[listener.route]] or [detect] or [discovery]",
            "f.toml: proxy.drian_timeout: unknown key; did you mean 'drain_timeout'?",
            "f.toml: proxy.xyzzy: unknown key",
            "f.toml: detect.drain_timeout: unknown key; belongs in [proxy]",
            "f.toml: listener[1].route[0].timeot: unknown key; did you mean 'timeout'?",
        ]))

    def test_fix_hints_for_values(self) -> None:
        """A duration written as a string and an unparsable listen say what
        is expected, with an example."""
        errors = errors_of(MINIMAL + """
            connect_timeout = "10s"
            [admin]
            listen = "tcp:x"
            [detect]
            timeout = "10s"
            [[listener]]
            name = "b"
            listen = "4143"
            service = "app"
        """)
        hint = "listen takes a Twisted endpoint string such as tcp:4143:interface=127.0.0.1"
        self.assertEqual(sorted(errors), sorted([
            "f.toml: service.app.connect_timeout: expected a number, got a string; "
            "durations are numbers of seconds, e.g. 10",
            "f.toml: detect.timeout: expected a number, got a string; "
            "durations are numbers of seconds, e.g. 10",
            "f.toml: admin.listen: unparsable endpoint string 'tcp:x': "
            f"invalid literal for int() with base 10: 'x'; {hint}",
            "f.toml: listener[1].listen: unparsable endpoint string '4143': "
            f"Unknown endpoint type: '4143'; {hint}",
        ]))

    def test_unknown_top_level_table(self) -> None:
        self.assertErrors(MINIMAL + "[metrics]\nport = 1\n", r"metrics: unknown key")

    def test_wrong_types(self) -> None:
        self.assertErrors(
            """
            [admin]
            listen = 4191
            [detect]
            timeout = "10s"
            peek_limit = 1.5
            opaque_ports = 25
            [proxy]
            drain_timeout = true
            log_connections = "yes"
            [[listener]]
            name = 1
            listen = "tcp:0"
            service = "app"
            opaque = "true"
            [service.app]
            endpoints = "127.0.0.1:8080"
            opaque = 1
            """,
            r"admin\.listen: expected a string, got an integer; listen takes a Twisted "
            r"endpoint string such as tcp:4143:interface=127\.0\.0\.1",
            r"detect\.timeout: expected a number, got a string; "
            r"durations are numbers of seconds, e\.g\. 10",
            r"detect\.peek_limit: expected an integer, got a number",
            r"detect\.opaque_ports: expected an array, got an integer",
            r"proxy\.drain_timeout: expected a number, got true or false; "
            r"durations are numbers of seconds, e\.g\. 10",
            r"proxy\.log_connections: expected true or false, got a string",
            r"listener\[0\]\.name: expected a string, got an integer",
            r"listener\[0\]\.opaque: expected true or false, got a string",
            r"service\.app\.endpoints: expected an array, got a string",
            r"service\.app\.opaque: expected true or false, got an integer",
        )

    def test_tables_of_the_wrong_type(self) -> None:
        self.assertErrors(
            'admin = "x"\nlistener = 5\nservice = []\n',
            r"admin: expected a table, got a string",
            r"listener: expected an array of tables \(\[\[listener\]\]\), got an integer",
            r"service: expected a table, got an array",
        )

    def test_unparsable_endpoint_strings(self) -> None:
        self.assertErrors(
            """
            [admin]
            listen = "nonsense:1"
            [[listener]]
            name = "a"
            listen = "tcp:http"
            service = "app"
            [[listener]]
            name = "b"
            listen = "tcp:0:bogus=1"
            service = "app"
            [[listener]]
            name = "c"
            listen = "tcp:70000"
            service = "app"
            [[listener]]
            name = "d"
            listen = "ssl:0:privateKey=/nonexistent/key.pem"
            service = "app"
            [service.app]
            endpoints = ["127.0.0.1:8080"]
            """,
            r"admin\.listen: unparsable endpoint string 'nonsense:1'.*",
            r"listener\[0\]\.listen: unparsable endpoint string 'tcp:http'.*",
            r"listener\[1\]\.listen: unparsable endpoint string 'tcp:0:bogus=1'.*",
            r"listener\[2\]\.listen: .*port 70000.*",
            r"listener\[3\]\.listen: .*ssl:0.*",
        )

    def test_endpoint_strings_accepted(self) -> None:
        for listen in ("tcp:0", "tcp:4143:interface=127.0.0.1", r"tcp6:0:interface=\:\:1",
                       "systemd:domain=INET:index=0", "systemd:domain=INET:name=inbound",
                       "unix:/tmp/l5dproxy.sock"):
            with self.subTest(listen=listen):
                self.assertIsNone(checks.check_endpoint(listen))

    def test_missing_service(self) -> None:
        self.assertErrors(
            """
            [[listener]]
            name = "a"
            listen = "tcp:0"
            service = "ap"
            [service.app]
            endpoints = ["127.0.0.1:8080"]
            """,
            r"listener\[0\]\.service: no service named 'ap' \(\[service\.ap\]\)",
        )

    def test_required_keys(self) -> None:
        errors = self.assertErrors(
            "[[listener]]\n[service.app]\n",
            r"listener\[0\]\.name: required key is missing",
            r"listener\[0\]\.listen: required key is missing",
            r"listener\[0\]\.service: required key is missing",
            r"service\.app\.endpoints: required key is missing",
        )
        self.assertEqual(len(errors), 4)

    def test_duplicate_listener_names(self) -> None:
        errors = self.assertErrors(
            MINIMAL + """
            [[listener]]
            name = "inbound"
            listen = "tcp:0"
            service = "app"
            """,
            r"listener\[1\]\.name: duplicate listener name 'inbound'",
        )
        self.assertEqual(len(errors), 1)

    def test_two_nameless_listeners_are_not_duplicates(self) -> None:
        errors = self.assertErrors(
            """
            [[listener]]
            listen = "tcp:0"
            service = "app"
            [[listener]]
            listen = "tcp:0"
            service = "app"
            [service.app]
            endpoints = ["127.0.0.1:8080"]
            """,
            r"listener\[0\]\.name: required key is missing",
            r"listener\[1\]\.name: required key is missing",
        )
        self.assertEqual(len(errors), 2)

    def test_empty_listener_name(self) -> None:
        self.assertErrors(MINIMAL.replace('"inbound"', '""'),
                          r"listener\[0\]\.name: must not be empty")

    def test_durations(self) -> None:
        self.assertErrors(
            """
            [detect]
            timeout = -1
            [proxy]
            drain_timeout = -0.5
            [service.app]
            endpoints = ["127.0.0.1:8080"]
            connect_timeout = 0
            """,
            r"detect\.timeout: must be a duration in seconds, not negative",
            r"proxy\.drain_timeout: must be a duration in seconds, not negative",
            r"service\.app\.connect_timeout: must be a duration in seconds, greater than 0",
        )

    def test_zero_durations_allowed_where_they_mean_something(self) -> None:
        c = parse(tomllib.loads("[detect]\ntimeout = 0\n[proxy]\ndrain_timeout = 0\n"))
        self.assertEqual((c.detect.timeout, c.proxy.drain_timeout), (0.0, 0.0))

    def test_bad_values(self) -> None:
        self.assertErrors(
            """
            [detect]
            peek_limit = 10
            opaque_ports = [25, 0, 70000, "x"]
            [service.app]
            endpoints = ["127.0.0.1:8080"]
            protocol = "h3"
            """,
            r"detect\.peek_limit: must be between 64 and 1048576 bytes",
            r"detect\.opaque_ports: not ports: \[0, 70000, 'x'\]",
            r"service\.app\.protocol: must be one of http1, h2",
        )

    def test_bad_host_ports_one_line_each(self) -> None:
        errors = self.assertErrors(
            """
            [service.app]
            endpoints = ["127.0.0.1", "[::1]:8080", "::1:8080", "h:0", "h:http", 5, "[::1]80"]
            """,
            r"service\.app\.endpoints\[0\]: '127\.0\.0\.1': expected host:port",
            r"service\.app\.endpoints\[2\]: '::1:8080': IPv6 addresses go in brackets.*",
            r"service\.app\.endpoints\[3\]: 'h:0': port '0' is not a number from 1 to 65535",
            r"service\.app\.endpoints\[4\]: 'h:http': port 'http' is not a number.*",
            r"service\.app\.endpoints\[5\]: expected a string \"host:port\", got an integer",
            r"service\.app\.endpoints\[6\]: '\[::1\]80': expected host:port",
        )
        self.assertEqual(len(errors), 6)

    def test_ipv6_in_brackets_is_fine(self) -> None:
        c = parse(tomllib.loads('[service.app]\nendpoints = ["[::1]:8080"]\n'))
        self.assertEqual(c.services["app"].endpoints, (HostPort("::1", 8080),))

    def test_many_errors_at_once(self) -> None:
        """Every problem in the file is reported, not just the first."""
        errors = self.assertErrors(
            """
            typo = 1
            [detect]
            timeout = -1
            [[listener]]
            name = "a"
            listen = "tcp:nope"
            service = "missing"
            [[listener]]
            name = "a"
            listen = "tcp:0"
            service = "app"
            [service.app]
            endpoints = ["::1:80"]
            """,
            r"typo: unknown key",
            r"detect\.timeout: .*",
            r"listener\[0\]\.listen: .*",
            r"listener\[0\]\.service: .*",
            r"listener\[1\]\.name: duplicate .*",
            r"service\.app\.endpoints\[0\]: .*",
        )
        self.assertEqual(len(errors), 6)

    def test_error_lines_name_the_file(self) -> None:
        errors = errors_of("[detect]\ntimeout = -1\n", source="/etc/l5dproxy/x.toml")
        self.assertEqual(errors, ["/etc/l5dproxy/x.toml: detect.timeout: "
                                  "must be a duration in seconds, not negative"])

    def test_config_error_message_is_every_line(self) -> None:
        try:
            parse(tomllib.loads("a = 1\nb = 2\n"), "f.toml")
        except ConfigError as e:
            self.assertEqual(str(e), "f.toml: a: unknown key\nf.toml: b: unknown key")
        else:
            self.fail("accepted")


class LoadTests(unittest.TestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_load(self) -> None:
        path = self.write(MINIMAL)
        self.assertEqual(load(path).source, path)

    def test_missing_file(self) -> None:
        path = self.mktemp()
        with self.assertRaises(ConfigError) as cm:
            load(path)
        self.assertEqual(cm.exception.errors,
                         [f"{path}: cannot read: No such file or directory"])

    def test_invalid_toml(self) -> None:
        path = self.write("[admin\n")
        with self.assertRaises(ConfigError) as cm:
            load(path)
        (line,) = cm.exception.errors
        self.assertTrue(line.startswith(f"{path}: invalid TOML: "), line)

    def test_errors_name_the_path(self) -> None:
        path = self.write("[detect]\ntimeout = -1\n")
        with self.assertRaises(ConfigError) as cm:
            load(path)
        self.assertEqual(cm.exception.errors,
                         [f"{path}: detect.timeout: must be a duration in seconds, not negative"])


class HttpTimeoutsTests(unittest.TestCase):
    def test_defaults(self) -> None:
        http = parse(tomllib.loads(MINIMAL), "f.toml").http
        self.assertEqual((http.request_header_timeout, http.idle_timeout, http.pool_max_idle),
                         (10.0, 60.0, 256))

    def test_set_and_zero(self) -> None:
        http = parse(tomllib.loads(MINIMAL + "\n[http]\nrequest_header_timeout = 2.5\n"
                                   "idle_timeout = 0\n"), "f.toml").http
        self.assertEqual((http.request_header_timeout, http.idle_timeout), (2.5, 0.0))

    def test_negative_is_an_error(self) -> None:
        errors = errors_of(MINIMAL + "\n[http]\nrequest_header_timeout = -1\n"
                                     "idle_timeout = \"1m\"\n")
        self.assertEqual(len(errors), 2, errors)
        self.assertTrue(any("http.request_header_timeout" in e for e in errors), errors)
        self.assertTrue(any("http.idle_timeout" in e for e in errors), errors)


class UpgradesTests(unittest.TestCase):
    """``[[listener]] upgrades``: the HTTP/1 upgrades a listener forwards."""

    def listener(self, extra: str):
        text = MINIMAL.replace('service = "app"\n', 'service = "app"\n' + extra, 1)
        return parse(tomllib.loads(text), "f.toml").listeners[0]

    def test_default_is_websocket(self) -> None:
        self.assertEqual(self.listener("").upgrades, ("websocket",))

    def test_names_are_case_insensitive(self) -> None:
        self.assertEqual(self.listener('upgrades = ["WebSocket", "Foo"]\n').upgrades,
                         ("websocket", "foo"))

    def test_empty_forwards_none(self) -> None:
        self.assertEqual(self.listener("upgrades = []\n").upgrades, ())

    def test_bad_values(self) -> None:
        for value, reason in (
            ('["h2c"]', "h2c cannot be relayed"),
            ('["websocket", "H2C"]', "h2c cannot be relayed"),
            ('["web socket"]', "not protocol names"),
            ('[""]', "not protocol names"),
            ("[1]", "not protocol names"),
            ('"websocket"', "expected"),
        ):
            text = MINIMAL.replace('service = "app"\n', f'service = "app"\nupgrades = {value}\n')
            errors = errors_of(text)
            self.assertEqual(len(errors), 1, errors)
            self.assertTrue(errors[0].startswith("f.toml: listener[0].upgrades: " + reason),
                            errors)


class LogConfigTests(unittest.SynchronousTestCase):
    """``[proxy] log_level`` and ``log_format`` (issue 15 part 4)."""

    def test_defaults(self):
        c = parse(tomllib.loads(MINIMAL))
        self.assertEqual((c.proxy.log_level, c.proxy.log_format), ("info", "text"))

    def test_levels_any_case(self):
        for given, level in (("DEBUG", "debug"), ("Info", "info"), ("warning", "warn"),
                             ("warn", "warn"), ("error", "error"), ("critical", "critical")):
            c = parse(tomllib.loads(MINIMAL + f'\n[proxy]\nlog_level = "{given}"\n'))
            self.assertEqual(c.proxy.log_level, level)
        c = parse(tomllib.loads(MINIMAL + '\n[proxy]\nlog_format = "json"\n'))
        self.assertEqual(c.proxy.log_format, "json")

    def test_bad_values(self):
        self.assertEqual(errors_of(MINIMAL + '\n[proxy]\nlog_level = "verbose"\n'
                                   'log_format = "xml"\n'), [
            "f.toml: proxy.log_level: expected one of debug, info, warn, error, critical, "
            "got 'verbose'",
            "f.toml: proxy.log_format: expected one of text, json, got 'xml'"])
        self.assertEqual(errors_of(MINIMAL + '\n[proxy]\nlog_level = 10\n'),
                         ["f.toml: proxy.log_level: expected a string, got an integer"])
