"""Live reload in process: a ProxyService on the real reactor, configs on disk."""

from __future__ import annotations

import os
import tempfile

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from l5dproxy.app.service import ProxyService
from l5dproxy.config.parse import load
from tests.support import build_config, metric_value, parse_metrics


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(self.factory.tag + data)


class Client(protocol.Protocol):
    def __init__(self) -> None:
        self.received = b""
        self.lost = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        self.lost.callback(None)


@defer.inlineCallbacks
def poll(condition, timeout: float = 5.0):
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        yield deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("timed out")


class ReloadTests(TestCase):

    def echo(self, tag: bytes) -> str:
        factory = protocol.Factory.forProtocol(Echo)
        factory.tag = tag
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"127.0.0.1:{port.getHost().port}"

    def write(self, text: str) -> None:
        with open(self.path, "w") as f:
            f.write(text)

    def config(self, listeners, services) -> str:
        return build_config(
            [{"opaque": True, **lc} for lc in listeners],
            {name: {"endpoints": eps} for name, eps in services.items()},
            proxy={"log_connections": False, "drain_timeout": 0.1})

    @defer.inlineCallbacks
    def connect(self, port: int):
        client = Client()
        yield protocol.ClientCreator(reactor, lambda: client).connectTCP("127.0.0.1", port)
        self.addCleanup(lambda: client.transport.loseConnection() or client.lost)
        return client

    @defer.inlineCallbacks
    def roundtrip(self, client: Client, data: bytes) -> bytes:
        client.received = b""
        client.transport.write(data)
        yield poll(lambda: client.received.endswith(data))
        return client.received

    def setUp(self):
        directory = tempfile.mkdtemp()
        self.path = os.path.join(directory, "l5dproxy.toml")
        self.a, self.b = self.echo(b"A:"), self.echo(b"B:")
        self.write(self.config([{"name": "one", "service": "app"}], {"app": [self.a]}))
        self.service = ProxyService(load(self.path), reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def reloads(self, result: str) -> float:
        samples = parse_metrics(self.service_metrics())
        return metric_value(samples, "config_reload_total", result=result)

    def service_metrics(self) -> str:
        from prometheus_client.exposition import generate_latest
        return generate_latest(self.service.metrics.registry).decode()

    @defer.inlineCallbacks
    def test_good_config_applied_without_dropping(self):
        one = self.service.port_of("one")
        before = yield self.connect(one)
        self.assertEqual((yield self.roundtrip(before, b"x")), b"A:x")
        # Same listener, new endpoints; a second listener on a new port.
        self.write(self.config(
            [{"name": "one", "service": "app"}, {"name": "two", "service": "other"}],
            {"app": [self.b], "other": [self.a]}))
        self.assertTrue(self.service.reload())
        self.assertEqual(self.service.port_of("one"), one)  # the port was kept
        self.assertEqual((yield self.roundtrip(before, b"y")), b"A:y")  # not cut
        after = yield self.connect(one)
        self.assertEqual((yield self.roundtrip(after, b"z")), b"B:z")
        two = yield self.connect(self.service.port_of("two"))
        self.assertEqual((yield self.roundtrip(two, b"w")), b"A:w")
        self.assertEqual(self.reloads("success"), 1)
        # Listener removed: its port closes, its connections go on.
        self.write(self.config([{"name": "two", "service": "other"}], {"other": [self.a]}))
        self.assertTrue(self.service.reload())
        self.assertNotIn("one", self.service.ports)
        self.assertNotIn("app", self.service.backends)
        self.assertEqual((yield self.roundtrip(after, b"v")), b"B:v")
        # Every listener replaced while it had connections stays until they end.
        self.assertEqual(sorted(lst.name for lst in self.service.retired), ["one", "one", "two"])
        yield self.assertFailure(
            protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", one),
            error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_bad_config_keeps_the_old_one(self):
        one = self.service.port_of("one")
        self.write('[service.app]\nendpoints = ["nope"]\n[[listener]]\nname = "one"\n')
        self.assertFalse(self.service.reload())
        self.assertEqual(self.reloads("failure"), 1)
        self.assertEqual(self.service.port_of("one"), one)
        client = yield self.connect(one)
        self.assertEqual((yield self.roundtrip(client, b"x")), b"A:x")

    @defer.inlineCallbacks
    def test_port_in_use_fails_the_reload(self):
        busy = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(busy.stopListening)
        self.write(self.config(
            [{"name": "one", "service": "app"},
             {"name": "two", "service": "app",
              "listen": f"tcp:{busy.getHost().port}:interface=127.0.0.1"}],
            {"app": [self.b]}))
        self.assertFalse(self.service.reload())
        self.assertEqual(self.reloads("failure"), 1)
        self.assertNotIn("two", self.service.ports)
        client = yield self.connect(self.service.port_of("one"))
        self.assertEqual((yield self.roundtrip(client, b"x")), b"A:x")  # old endpoints

    @defer.inlineCallbacks
    def test_file_watch(self):
        self.write(self.config([{"name": "one", "service": "app"}], {"app": [self.a]})
                   .replace("[proxy]", "[proxy]\nwatch_config = true\nwatch_interval = 0.05"))
        self.assertTrue(self.service.reload())
        yield deferLater(reactor, 0.1, lambda: None)
        self.write(self.config([{"name": "one", "service": "app"}], {"app": [self.b]})
                   .replace("[proxy]", "[proxy]\nwatch_config = true\nwatch_interval = 0.05"))
        yield poll(lambda: self.reloads("success") == 2)
        client = yield self.connect(self.service.port_of("one"))
        self.assertEqual((yield self.roundtrip(client, b"x")), b"B:x")
