"""Listening endpoints: what Twisted parses from an endpoint string but keeps private.

``serverFromString`` accepts ``tcp:70000`` (any integer is a port to it) and
fails only at bind. ``server_endpoint_port`` reads the port it parsed from the
endpoint's private ``_port`` (``TCP4ServerEndpoint``, ``TCP6ServerEndpoint``,
and ``SSL4ServerEndpoint``), so the config check can refuse it with the file
and key; tests/test_library_internals.py fails loudly if the name goes.
"""

from __future__ import annotations


def server_endpoint_port(endpoint: object) -> int | None:
    """The port a server endpoint made by ``serverFromString`` will bind
    (an int, unchecked: may be out of 0-65535), or None when it has none
    (``unix:``, ``systemd:``) or Twisted no longer keeps it as ``_port``."""
    port = getattr(endpoint, "_port", None)
    return port if isinstance(port, int) else None
