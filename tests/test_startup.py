"""Start-up as an operator sees it: a relative ``--config`` is made absolute
(so SIGHUP re-reads the same file after ``twistd -d`` changed to ``/``) and
the start-up log names the version and the config file."""

from __future__ import annotations

import os

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from l5dproxy import __version__
from l5dproxy.app.cli import Options, make_service
from l5dproxy.app.service import ProxyService

CONFIG = """
[admin]
listen = "tcp:0:interface=127.0.0.1"

[[listener]]
name = "in"
listen = "tcp:0:interface=127.0.0.1"
service = "app"

[service.app]
endpoints = ["127.0.0.1:1"]
"""


class RelativeConfigTests(TestCase):
    def test_relative_config_made_absolute_and_logged(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        with open(os.path.join(directory, "proxy.toml"), "w") as f:
            f.write(CONFIG)
        cwd = os.getcwd()
        os.chdir(directory)
        self.addCleanup(os.chdir, cwd)
        options = Options()
        options.parseOptions(["--config", "proxy.toml"])
        root = make_service(options)
        [service] = [s for s in root if isinstance(s, ProxyService)]
        expected = os.path.abspath("proxy.toml")
        self.assertEqual(service.config.source, expected)
        os.chdir("/")   # what twistd -d does
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertIn(f"l5dproxy {__version__} starting, config {expected}",
                      [formatEvent(e) for e in events])
        self.assertTrue(service.reload())   # the same file, found from /


class EventLoopTests(TestCase):
    """Under twistd (the plugin's options have twistd's as parent) the
    reactor's events are dispatched without the per-event log context
    (``net/eventloop.lighten``); a test calling ``make_service`` directly
    leaves its own reactor as it is."""

    def _options(self, under_twistd: bool) -> Options:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(CONFIG)
        if not under_twistd:
            options = Options()
            options.parseOptions(["--config", path])
            return options
        from twisted.scripts.twistd import ServerOptions

        server = ServerOptions()
        server.parseOptions(["-n", "l5dproxy", "--config", path])
        return server.subOptions

    def test_twistd_reactor_lightened_a_tests_not(self) -> None:
        from twisted.internet import reactor

        from l5dproxy.net import eventloop

        calls: list = []
        self.patch(eventloop, "lighten", calls.append)
        make_service(self._options(under_twistd=False))
        self.assertEqual(calls, [])
        make_service(self._options(under_twistd=True))
        self.assertEqual(calls, [reactor])
