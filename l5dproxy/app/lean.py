"""Keep what a config does not use out of the process.

pyOpenSSL and cryptography (a 14 MB Rust extension) cost ~12 MiB of resident
memory, and Twisted imports them whether or not anything speaks TLS: its
endpoints and TCP modules try ``import OpenSSL`` and carry on without TLS when
that fails. So when the config names no TLS (no ``ssl:`` endpoint string,
nothing called tls), ``twistd l5dproxy`` makes that import fail before Twisted
tries it. A config that adds TLS on reload is refused (its endpoint string
is reported unusable) and needs a restart; ``L5DPROXY_OPENSSL=1`` in the
environment keeps OpenSSL importable whatever the config says.
"""

from __future__ import annotations

import os
import sys
from importlib.abc import MetaPathFinder

_BLOCKED = ("OpenSSL", "cryptography", "service_identity")


class _NoOpenSSL(MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname.split(".", 1)[0] in _BLOCKED:
            raise ModuleNotFoundError(
                f"{fullname}: l5dproxy started without TLS (its config names none), so "
                "OpenSSL is not loaded; restart it to use TLS", name=fullname)
        return None


def config_needs_tls(text: bytes) -> bool:
    """Whether a config's text may use TLS (errs on the side of yes)."""
    lowered = text.lower()
    return b"ssl:" in lowered or b"tls" in lowered


def skip_openssl_unless_needed(config_path: str) -> bool:
    """Make ``import OpenSSL`` fail unless the config at ``config_path`` (or
    the environment) asks for TLS. True if it was blocked."""
    if os.environ.get("L5DPROXY_OPENSSL") == "1" or any(
            m in sys.modules for m in _BLOCKED):
        return False
    try:
        with open(config_path, "rb") as f:
            text = f.read()
    except OSError:
        return False  # the config loader reports it
    if config_needs_tls(text):
        return False
    if not any(isinstance(f, _NoOpenSSL) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoOpenSSL())
    return True
