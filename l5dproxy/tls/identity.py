"""Peer identities: what a verified certificate says its holder is.

Linkerd names a workload by the identity in its certificate; so does SPIFFE
(``spiffe://trust-domain/path`` as a URI SAN). Here:

* :func:`peer_identity` is a certificate's identity: its first URI SAN
  (``spiffe://example.org/ns/web/sa/default``), else its first DNS SAN
  (``web.example.org``), else None. Only a certificate that the handshake
  verified has an identity worth anything; callers ask after verification.
* :func:`allowed` matches an identity against ``allow`` glob patterns
  (``[listener.tls] allow``).

Used by termination (the client's identity: ``l5d-client-id``, logs,
metrics, authorization) and origination (the server's, checked against the
expected name).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from cryptography import x509
from OpenSSL import crypto

__all__ = ["allowed", "compile_patterns", "peer_identity"]


def peer_identity(certificate: x509.Certificate | crypto.X509 | None) -> str | None:
    """The first URI SAN of ``certificate``, else its first DNS SAN, else None.

    Takes a ``cryptography`` certificate or a pyOpenSSL ``X509`` (what
    ``SSL.Connection.get_peer_certificate()`` gives); None gives None.
    The subject's common name is not an identity (RFC 6125 6.4.4: not when
    SANs exist; Linkerd and SPIFFE never use it).
    """
    if certificate is None:
        return None
    if isinstance(certificate, crypto.X509):
        certificate = certificate.to_cryptography()
    try:
        san = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if uris:
        return uris[0]
    names = san.get_values_for_type(x509.DNSName)
    return names[0].lower() if names else None


@lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    """A glob as a regex: ``*`` any run of characters (``/`` and ``.``
    included), ``?`` one character; everything else literal. No ``[...]``
    classes: identities contain no brackets worth matching, and a literal
    ``[`` in a pattern should not change its meaning."""
    parts = []
    for ch in pattern:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(".")
        else:
            parts.append(re.escape(ch))
    return re.compile("".join(parts), re.DOTALL)


def compile_patterns(patterns: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """Compile ``allow`` patterns once (see :func:`allowed`)."""
    return tuple(_compile(p) for p in patterns)


def allowed(identity: str | None, patterns: Iterable[str | re.Pattern[str]]) -> bool:
    """Whether ``identity`` matches one of the glob ``patterns``.

    ``*`` matches any run of characters, ``/`` included (so
    ``spiffe://example.org/ns/web/*`` allows every service account of
    namespace ``web``), ``?`` any one character; the match is over the whole
    identity and case-sensitive (SPIFFE IDs are; DNS identities are
    lowercased by :func:`peer_identity`, so write patterns in lowercase).
    No identity (None: no verified client certificate) matches nothing.
    """
    if identity is None:
        return False
    for pattern in patterns:
        compiled = _compile(pattern) if isinstance(pattern, str) else pattern
        if compiled.fullmatch(identity):
            return True
    return False
