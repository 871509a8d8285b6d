"""The admin HTTP server: ``/metrics``, ``/ready``, ``/live``.

Served with twisted.web in the reactor thread: rendering the registry is a
few milliseconds, and staying off a thread pool keeps the metrics consistent
with the connection state they describe.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site


class _Site(Site):
    """twisted.web's site without the access log: scrapes every few
    seconds are not news."""

    displayTracebacks = False
    noisy = False

    def log(self, request) -> None:
        pass


class _Text(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[], tuple[int, bytes, str]]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request) -> bytes:
        status, body, content_type = self._render()
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type.encode())
        return body

    render_HEAD = render_GET


def admin_site(registry: CollectorRegistry, is_ready: Callable[[], bool],
               extra: dict[bytes, Resource] | None = None) -> Site:
    """The admin site; ``extra`` adds resources (for example ``/opaque``)."""
    plain = "text/plain; charset=utf-8"

    def metrics() -> tuple[int, bytes, str]:
        return 200, generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4

    def ready() -> tuple[int, bytes, str]:
        return (200, b"ready\n", plain) if is_ready() else (503, b"not ready\n", plain)

    def live() -> tuple[int, bytes, str]:
        return 200, b"live\n", plain

    root = Resource()
    root.putChild(b"metrics", _Text(metrics))
    root.putChild(b"ready", _Text(ready))
    root.putChild(b"live", _Text(live))
    for name, resource in (extra or {}).items():
        root.putChild(name, resource)
    return _Site(root)
