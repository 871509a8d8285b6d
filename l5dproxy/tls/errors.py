"""What a failed TLS connection to an endpoint is: ``TlsError``.

Pure (no OpenSSL), so the dispatcher's error mapping (``route.errors``) may
name it in a process whose config has no TLS (``app/lean.py``).
"""

from __future__ import annotations


class TlsError(Exception):
    """A TLS connection to an endpoint failed (``l5dproxy.tls.client``): the
    dispatcher answers it as 502 (``status``; 504 for the handshake timeout)
    with ``l5d-proxy-error`` naming ``detail``.

    ``reason`` is one of a small fixed set, the ``error`` label of
    ``response_total``: ``tls: certificate verify failed``, ``tls: handshake
    failed``, ``tls: handshake timeout``, ``tls: ALPN``, or ``tls: error``
    (after the handshake). ``detail`` adds what was seen
    (``tls: certificate verify failed: unable to get local issuer
    certificate``), and is ``str()``."""

    #: The ``errno`` label of ``endpoint_connect_errors_total`` and
    #: ``tcp_close_total`` (``net.connection.errno_name`` reads it).
    errno = "tls"

    def __init__(self, reason: str, what: str = "", status: int = 502) -> None:
        self.reason = reason
        self.status = status
        self.detail = f"{reason}: {what}" if what else reason
        super().__init__(self.detail)

    def __str__(self) -> str:
        return self.detail


__all__ = ["TlsError"]
