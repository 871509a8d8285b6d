"""Certificates and keys: loading PEM pairs, choosing one by SNI, reloading.

Shared by termination (``[listener.tls] certificates``) and origination (a
service's client certificate). The API is small on purpose:

* :func:`load_pair` reads one ``cert``/``key`` file pair into a
  :class:`CertificatePair` or raises :class:`CertificateError`, whose text is
  ``FILE: reason`` (the file that is wrong and why).
* :func:`name_matches` and :func:`choose` pick the pair for a ClientHello's
  server name (SNI) the way nginx and Envoy do: an exact SAN DNS name first,
  then a wildcard one, then the first pair (the default).
* :class:`CertificateStore` holds the pairs of one listener or service and
  re-reads them on :meth:`CertificateStore.reload` (SIGHUP, a changed file),
  keeping the old pair of an entry whose file is now broken.

Parsing is ``cryptography``'s; :class:`CertificatePair` also carries the
pyOpenSSL objects a ``SSL.Context`` takes, made once at load time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.logger import Logger

__all__ = [
    "CertificateError", "CertificatePair", "CertificateStore", "choose", "load_pair",
    "name_matches",
]

log = Logger()

#: A PEM file larger than this is refused (a certificate chain is a few KiB).
MAX_PEM_BYTES = 1 << 20


class CertificateError(ValueError):
    """A certificate or key file that cannot be used.

    ``str()`` is ``FILE: reason``, the line an operator needs: config errors
    and reload log lines quote it as is.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True, eq=False)
class CertificatePair:
    """One loaded ``cert``/``key`` pair.

    ``certificate`` is the leaf (the first PEM block of ``cert_path``),
    ``chain`` the intermediates after it, in file order. ``dns_names`` are the
    leaf's SAN DNS names, lowercased, in certificate order (wildcards kept as
    ``*.example.com``); ``uris`` its SAN URIs. ``not_after`` is its expiry as
    UNIX seconds. ``openssl_*`` are the same objects as pyOpenSSL takes them.
    ``stamp`` identifies the files' versions (:func:`file_stamp`).
    """

    cert_path: str
    key_path: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    not_after: float
    openssl_certificate: crypto.X509
    openssl_chain: tuple[crypto.X509, ...]
    openssl_key: crypto.PKey
    stamp: tuple = field(default=())

    @property
    def name(self) -> str:
        """What the certificate is for, for logs and metric labels: the first
        SAN DNS name, else the first SAN URI, else the subject's common name,
        else the certificate file's path."""
        if self.dns_names:
            return self.dns_names[0]
        if self.uris:
            return self.uris[0]
        cns = self.certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        if cns:
            value = cns[0].value
            return value if isinstance(value, str) else value.decode("utf-8", "replace")
        return self.cert_path


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as e:
        raise CertificateError(path, e.strerror or str(e)) from None
    if len(data) > MAX_PEM_BYTES:
        raise CertificateError(path, f"larger than {MAX_PEM_BYTES} bytes: not a PEM file")
    return data


def file_stamp(*paths: str) -> tuple:
    """What identifies the current version of ``paths``: (inode, size,
    mtime_ns) each, or None for a file that cannot be stat'ed. Two equal
    stamps mean the files were (almost certainly) not rewritten."""
    stamps: list[tuple[int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            stamps.append(None)
        else:
            stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def _san(certificate: x509.Certificate) -> tuple[tuple[str, ...], tuple[str, ...]]:
    try:
        ext = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return (), ()
    san = ext.value
    dns = tuple(n.lower() for n in san.get_values_for_type(x509.DNSName))
    uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
    return dns, uris


def load_pair(cert_path: str, key_path: str) -> CertificatePair:
    """Read a PEM certificate (chain allowed: leaf first) and its PEM key.

    Raises :class:`CertificateError` naming the file at fault: unreadable,
    no certificate in it, not a PEM private key (encrypted keys are refused:
    nobody is there to type a passphrase), or a key that is not the
    certificate's.
    """
    stamp = file_stamp(cert_path, key_path)
    cert_pem = _read(cert_path)
    try:
        certificates = x509.load_pem_x509_certificates(cert_pem)
    except ValueError as e:
        raise CertificateError(cert_path, f"not a PEM certificate ({e})") from None
    key_pem = _read(key_path)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise CertificateError(key_path, "the key is encrypted (a passphrase cannot be"
                               " given): store it unencrypted, readable by l5dproxy"
                               " only") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CertificateError(key_path, f"not a PEM private key ({e})") from None
    leaf = certificates[0]
    if _public_bytes(key.public_key()) != _public_bytes(leaf.public_key()):
        raise CertificateError(key_path, f"this key does not belong to the certificate"
                               f" in {cert_path}")
    try:
        openssl_key = crypto.PKey.from_cryptography_key(key)  # type: ignore[arg-type]
    except TypeError:
        raise CertificateError(key_path, f"unsupported key type {type(key).__name__}"
                               " (RSA, ECDSA, Ed25519 and Ed448 are)") from None
    dns, uris = _san(leaf)
    return CertificatePair(
        cert_path=cert_path, key_path=key_path, certificate=leaf,
        chain=tuple(certificates[1:]), dns_names=dns, uris=uris,
        not_after=leaf.not_valid_after_utc.timestamp(),
        openssl_certificate=crypto.X509.from_cryptography(leaf),
        openssl_chain=tuple(crypto.X509.from_cryptography(c) for c in certificates[1:]),
        openssl_key=openssl_key,
        stamp=stamp)


def _public_bytes(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)


def name_matches(pattern: str, server_name: str) -> bool:
    """Whether SAN DNS name ``pattern`` covers ``server_name`` (RFC 6125 6.4).

    Case-insensitive; a trailing dot of ``server_name`` is ignored. A
    wildcard is only a whole leftmost label (``*.example.com``) and covers
    exactly one label: ``a.example.com``, not ``example.com`` nor
    ``a.b.example.com`` (RFC 6125 6.4.3, as browsers and Envoy). A pattern
    with ``*`` anywhere else matches only itself, literally.
    """
    pattern = pattern.lower()
    name = server_name.lower().rstrip(".")
    if not name:
        return False
    if pattern.startswith("*.") and "*" not in pattern[2:]:
        head, dot, rest = name.partition(".")
        return bool(head) and bool(dot) and rest == pattern[2:] and bool(rest)
    return pattern == name


def choose(pairs: Sequence[CertificatePair], server_name: str | None) -> CertificatePair:
    """The pair to present for a ClientHello with ``server_name`` (None: no SNI).

    The first pair with ``server_name`` as a SAN DNS name; else the first with
    a wildcard SAN covering it; else the first pair, the default (nginx's
    order: exact names, then wildcards, then the default server). ``pairs``
    must not be empty.
    """
    if server_name:
        name = server_name.lower().rstrip(".")
        for pair in pairs:
            if name in pair.dns_names:
                return pair
        for pair in pairs:
            if any(p.startswith("*.") and name_matches(p, name) for p in pair.dns_names):
                return pair
    return pairs[0]


class CertificateStore:
    """The certificate pairs of one listener (or service), reloadable.

    ``specs`` are ``(cert_path, key_path)`` in config order. The constructor
    loads them all and raises :class:`CertificateError` for the first broken
    one (a config cannot start with a broken file). ``pairs`` is then always
    one loaded pair per spec; ``generation`` goes up by one whenever a reload
    replaced any, so a holder of contexts built from the pairs knows when to
    build new ones.
    """

    def __init__(self, specs: Sequence[tuple[str, str]], owner: str = "") -> None:
        if not specs:
            raise ValueError("a certificate store needs at least one pair")
        self.specs = tuple(specs)
        #: For log lines: "listener NAME" or "service NAME".
        self.owner = owner
        self.pairs: tuple[CertificatePair, ...] = tuple(load_pair(c, k) for c, k in specs)
        self.generation = 0
        #: Per spec: the stamp of files that failed to load (not retried
        #: by ``reload(only_changed=True)`` until they change again).
        self._failed: list[tuple | None] = [None] * len(self.specs)

    def changed(self) -> bool:
        """Whether any file differs from the version loaded (stat only: cheap
        enough for watch_config's polling)."""
        return any(file_stamp(c, k) not in (pair.stamp, failed)
                   for (c, k), pair, failed in zip(self.specs, self.pairs, self._failed,
                                                   strict=True))

    def reload(self, only_changed: bool = False) -> list[CertificateError]:
        """Re-read every pair (with ``only_changed``, those whose files'
        stamps changed). A pair that fails to load keeps its old version and
        its error is logged as ``FILE: reason`` and returned; the others are
        replaced. New handshakes see the new pairs once the holder rebuilds
        its contexts; connections already made keep theirs."""
        errors: list[CertificateError] = []
        pairs = list(self.pairs)
        replaced = 0
        for i, (cert, key) in enumerate(self.specs):
            stamp = file_stamp(cert, key)
            if only_changed and stamp in (pairs[i].stamp, self._failed[i]):
                continue
            try:
                pair = load_pair(cert, key)
            except CertificateError as e:
                self._failed[i] = stamp
                errors.append(e)
                log.error("{owner}: {error}; keeping the certificate loaded before",
                          owner=self.owner or "tls", error=str(e))
                continue
            pairs[i] = pair
            self._failed[i] = None
            replaced += 1
        if replaced:
            self.pairs = tuple(pairs)
            self.generation += 1
            log.info("{owner}: {n} certificate(s) reloaded", owner=self.owner or "tls",
                     n=replaced)
        return errors

    def expiries(self) -> list[tuple[str, float]]:
        """``(name, not_after)`` of each current pair, for
        ``Metrics.certificate_sources`` (tls_certificate_expiry_timestamp_seconds)."""
        return [(pair.name, pair.not_after) for pair in self.pairs]

    def choose(self, server_name: str | None) -> CertificatePair:
        """:func:`choose` over the current pairs."""
        return choose(self.pairs, server_name)
