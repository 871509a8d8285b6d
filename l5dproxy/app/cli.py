"""Command-line options of ``twistd l5dproxy`` and the service they make.

Nothing heavy is imported at module level (twistd imports this with its
plugins): the config is read first, so what it does not use can be left out
of the process (``l5dproxy.app.lean``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from importlib import resources

from twisted.application.service import MultiService
from twisted.logger import ILogObserver
from twisted.python import usage

from l5dproxy.app import lean


def default_config_path() -> str:
    """The bundled default config (a copy of ``conf/l5dproxy.toml``)."""
    return str(resources.files("l5dproxy") / "data" / "l5dproxy.toml")


class Options(usage.Options):
    synopsis = "[--config PATH] [--check] [--workers N]"
    optParameters = [
        ["config", "c", None, "Config file (TOML). Default: the bundled l5dproxy.toml."],
        ["workers", "w", 1, "Processes sharing the tcp: listeners (SO_REUSEPORT); the admin "
         "port's /metrics merges them all, worker I serves its own on the admin port + I.",
         int],
        # Internal: set by worker 0 on the workers it spawns.
        ["worker-index", None, None, None, int],
        ["report-fd", None, None, None, int],  # where to report the admin address
        ["admin-dir", None, None, None, str],  # for the admin socket (non-tcp: admin)
    ]
    optFlags = [
        ["check", None, "Validate the config, print the result and exit."],
    ]

    def postOptions(self) -> None:
        if self["config"] is None:
            self["config"] = default_config_path()
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["worker-index"] is not None:
            from l5dproxy.app.workers import die_with_parent

            die_with_parent()
        lean.skip_openssl_unless_needed(self["config"])


def make_service(options: Options):
    """Load the config; on errors print every one and exit non-zero, binding nothing."""
    from l5dproxy.app.service import ProxyService
    from l5dproxy.config.parse import ConfigError, load

    path = options["config"]
    try:
        config = load(path)
    except ConfigError as e:
        for line in e.errors:
            print(line, file=sys.stderr)
        raise SystemExit(2) from None
    if options["check"]:
        print(f"{path}: ok")
        raise SystemExit(0)
    # Absolute from here on: twistd -d changes to / before SIGHUP re-reads it.
    path = os.path.abspath(path)
    config = dataclasses.replace(config, source=path)
    from l5dproxy.app import logs
    logs.set_level(config.proxy.log_level)
    if getattr(options, "parent", None) is not None:   # under twistd (not a test's reactor)
        from twisted.internet import reactor

        from l5dproxy.net import eventloop
        eventloop.lighten(reactor)   # no per-event log context (net/eventloop.py)
    index = options["worker-index"]
    count = options["workers"]
    if index is None and count > 1:
        index = 0
    service = ProxyService(config, worker=index)
    parent = _Root(logs.twistd_observer(getattr(options, "parent", None),
                                        config.proxy.log_format))
    service.setServiceParent(parent)
    if index is None:
        return parent
    from l5dproxy.app import workers

    if index != 0:
        service.private_admin_dir = options["admin-dir"]
        if options["report-fd"] is not None:
            workers.AdminReport(lambda: service.admin_port,
                                options["report-fd"]).setServiceParent(parent)
        return parent
    from twisted.internet import reactor

    gatherer = workers.MetricsGatherer(reactor, count, service.metrics.registry.collect)
    service.gather = gatherer.gather
    admin_dir = (None if workers.shareable(config.admin.listen)
                 else workers.private_admin_dir(reactor))
    workers.WorkerSupervisor(reactor, count, path, config.proxy.drain_timeout,
                             gatherer, admin_dir).setServiceParent(parent)
    return parent


class _Root(MultiService):
    """The service ``twistd`` runs; joining the application sets the log
    observer (l5dproxy.app.logs) that ``twistd`` is about to start logging to."""

    def __init__(self, observer) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent) -> None:
        set_component = getattr(parent, "setComponent", None)
        if (self.observer is not None and set_component is not None
                and parent.getComponent(ILogObserver, None) is None):
            set_component(ILogObserver, self.observer)
        super().setServiceParent(parent)
