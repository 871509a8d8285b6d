"""A listener's routes, compiled: which service a request goes to, and the
``authority`` label its metrics get.

``[[listener.route]]`` entries (``host`` and/or ``path_prefix``; those with
``sni`` are the TCP relay's) are matched in order, the first match wins,
else the listener's ``service``. Used by ``route.dispatcher`` once per
listener, kept per connection.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from l5dproxy.route.forwarded import ForwardedRule
from l5dproxy.route.labels import OTHER

if TYPE_CHECKING:
    from l5dproxy.config.model import ListenerConfig, RouteConfig


class RouteTable:
    """A listener's routes, compiled: (host, path prefix, service), first match wins."""

    __slots__ = ("default", "forwarded", "hosts", "routes")

    def __init__(self, config: ListenerConfig) -> None:
        self.default: str = config.service
        self.forwarded = ForwardedRule.from_config(config.forwarded, config.trusted_proxies)
        self.routes: list[tuple[bytes | None, bytes | None, str, RouteConfig]] = [
            (route.host.lower().encode("idna") if route.host else None,
             route.path_prefix.encode() if route.path_prefix else None,
             route.service, route)
            for route in config.routes if route.sni is None
        ]
        #: The routes' hosts (as matched) -> their ``authority`` label.
        self.hosts: dict[bytes, str] = {
            want_host: want_host.decode("ascii")
            for want_host, _prefix, _service, _route in self.routes if want_host is not None}

    def authority_label(self, authority: bytes) -> str:
        """The ``authority`` label of a request: the ``host`` of a route of
        this listener that the authority matches (with or without its port,
        in any case, as routing matches it), else ``other``. The set of
        values is the listener's configured hosts plus one, whatever Host or
        ``:authority`` clients send (issue 18)."""
        hosts = self.hosts
        if not hosts:
            return OTHER
        authority = authority.lower()
        label = hosts.get(authority)
        if label is None:
            label = hosts.get(host_of(authority), OTHER)
        return label

    def match_route(self, authority: bytes, target: bytes) -> tuple[str, RouteConfig | None]:
        if not self.routes:
            return self.default, None
        authority = authority.lower()
        host = host_of(authority)
        for want_host, prefix, service, route in self.routes:
            if want_host is not None and want_host != host and want_host != authority:
                continue
            if prefix is not None and not target.startswith(prefix):
                continue
            return service, route
        return self.default, None


def host_of(authority: bytes) -> bytes:
    """``host`` of ``host:port`` / ``[v6]:port``."""
    if authority.startswith(b"["):
        end = authority.find(b"]")
        return authority[:end + 1] if end > 0 else authority
    host, _, _ = authority.partition(b":")
    return host
