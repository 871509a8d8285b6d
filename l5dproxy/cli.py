"""Command-line options of ``twistd l5dproxy`` and the service they make.

Nothing heavy is imported at module level (twistd imports this with its
plugins): the config is read first, so what it does not use can be left out
of the process (``l5dproxy.lean``).
"""

from __future__ import annotations

import sys
from importlib import resources

from twisted.python import usage

from l5dproxy import lean


def _default_config_path() -> str:
    # As l5dproxy.config.default_config_path, without importing Twisted's endpoints.
    return str(resources.files("l5dproxy") / "data" / "l5dproxy.toml")


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
            self["config"] = _default_config_path()
        lean.skip_openssl_unless_needed(self["config"])


def make_service(options: Options):
    """Load the config; on errors print every one and exit non-zero, binding nothing."""
    from l5dproxy.config import ConfigError, load
    from l5dproxy.service import ProxyService

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
