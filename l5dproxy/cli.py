"""Command-line options of ``twistd l5dproxy`` and the service they make."""

from __future__ import annotations

import sys

from twisted.python import usage

from l5dproxy.config import ConfigError, default_config_path, load
from l5dproxy.service import ProxyService


class Options(usage.Options):
    synopsis = "[--config PATH] [--check]"
    optParameters = [
        ["config", "c", None, "Config file (TOML). Default: the bundled l5dproxy.toml."],
    ]
    optFlags = [
        ["check", None, "Validate the config, print the result and exit."],
    ]

    def postOptions(self) -> None:
        if self["config"] is None:
            self["config"] = default_config_path()


def make_service(options: Options) -> ProxyService:
    """Load the config; on errors print every one and exit non-zero, binding nothing."""
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
    return ProxyService(config)
