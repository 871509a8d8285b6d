"""``[listener.tls]`` (TLS termination), the ``sni`` of a route and
``[service.NAME.tls]`` (TLS origination).

The certificate, key and ``client_ca`` files are read here, so ``--check``
and a reload report a broken one with its file, key and reason. l5dproxy.tls
(pyOpenSSL, cryptography) is imported only when a config has the table, so
a process whose config names no TLS never loads OpenSSL (app/lean.py).
Relative paths are relative to the config file's folder.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from l5dproxy.config.checks import check_positive_duration
from l5dproxy.config.model import CertificateConfig, ListenerTlsConfig, ServiceTlsConfig
from l5dproxy.config.table import Table

#: ALPN protocol names a terminating listener can speak after the handshake.
TLS_ALPN = ("h2", "http/1.1")


def config_relative(source: str, path: str) -> str:
    """``path`` as given if absolute, else relative to the config file's folder."""
    return os.path.join(os.path.dirname(os.path.abspath(source)), path)


def parse_listener_tls(t: Table) -> ListenerTlsConfig:
    """``[listener.tls]`` (see the module doc)."""
    from l5dproxy.tls.certs import CertificateError, load_pair
    from l5dproxy.tls.server import MIN_VERSIONS, load_client_ca

    D = ListenerTlsConfig
    certificates = []
    items = t.get("certificates", list, [])
    if "certificates" not in t.data:
        t.error("certificates", 'required key is missing: certificates = [{ cert = "PATH",'
                ' key = "PATH" }]')
    elif not items:
        t.error("certificates", "at least one { cert, key } is needed")
    for i, item in enumerate(items):
        c = Table(item, t.source, t.key_path(f"certificates[{i}]"), t.errors,
                  "[listener.tls.certificates]", t.registry, t.hint)
        cert = c.required("cert", str)
        key = c.required("key", str)
        c.finish()
        if cert is None or key is None:
            continue
        pair = CertificateConfig(config_relative(t.source, cert),
                                 config_relative(t.source, key))
        try:
            load_pair(pair.cert, pair.key)
        except CertificateError as e:
            c.error("cert" if e.path == pair.cert else "key", str(e))
        certificates.append(pair)

    def check_alpn(value: list[Any]) -> str | None:
        bad = [v for v in value if v not in TLS_ALPN]
        return f"unknown protocols {bad!r}: choose from {list(TLS_ALPN)}" if bad else None

    def check_version(value: str) -> str | None:
        return None if value in MIN_VERSIONS else (
            f"{value!r}: one of {', '.join(repr(v) for v in MIN_VERSIONS)} (nothing below"
            " TLS 1.2: RFC 8996)")

    client_ca = t.get("client_ca", str, None)
    if client_ca is not None:
        client_ca = config_relative(t.source, client_ca)
        try:
            load_client_ca(client_ca)
        except CertificateError as e:
            t.error("client_ca", str(e))
    allow = t.get("allow", list, None, check_strings)
    if allow is not None and client_ca is None:
        t.error("allow", "allow matches client identities: it needs client_ca (the roots"
                " client certificates are verified against)")
    tls = ListenerTlsConfig(
        certificates=tuple(certificates),
        alpn=tuple(t.get("alpn", list, list(D.alpn), check_alpn)),
        min_version=t.get("min_version", str, D.min_version, check_version),
        handshake_timeout=float(t.get("handshake_timeout", (int, float), D.handshake_timeout,
                                      check_positive_duration)),
        session_tickets=t.get("session_tickets", bool, D.session_tickets),
        client_ca=client_ca,
        allow=tuple(allow) if allow is not None else None,
    )
    t.finish()
    return tls


def check_strings(value: list[Any]) -> str | None:
    bad = [v for v in value if not isinstance(v, str) or not v]
    return f"expected non-empty strings, got {bad!r}" if bad else None


def check_sni_glob(value: str) -> str | None:
    """A route's ``sni``: visible ASCII, ``*`` and ``?`` as wildcards."""
    if not value or any(not 0x21 <= ord(ch) <= 0x7E for ch in value):
        return f"{value!r}: a server name glob (visible ASCII, * and ? as wildcards)"
    return None


#: ALPN protocol a client end needs (``protocol`` of the service -> name).
_ALPN_OF = {"h2": "h2", "http1": "http/1.1"}


def parse_service_tls(t: Table, protocol: Any) -> ServiceTlsConfig:
    """``[service.NAME.tls]``: TLS origination. The ``ca``, ``cert`` and
    ``key`` files are read here (``l5dproxy.tls.client``, so OpenSSL is
    imported only for a config naming them), so ``--check``, the start and
    a reload refuse a broken one with its file, key and reason."""
    def path(key: str) -> str | None:
        value = t.get(key, str, None, _check_path)
        return None if value is None else config_relative(t.source, value)

    alpn = t.get("alpn", list, None, _check_alpn)
    settings = ServiceTlsConfig(
        ca=path("ca"),
        server_name=t.get("server_name", str, None, _check_server_name),
        alpn=tuple(alpn) if alpn is not None else None,
        cert=path("cert"),
        key=path("key"),
    )
    need = _ALPN_OF.get(protocol) if isinstance(protocol, str) else None
    if need is not None and settings.alpn is not None and need not in settings.alpn:
        t.error("alpn", f"protocol = {protocol!r} speaks {need}: list it (or leave alpn out,"
                f" which offers [{need!r}])")
    if (settings.cert is None) != (settings.key is None):
        t.error("key" if settings.key is None else "cert",
                "cert and key go together (the client certificate and its private key)")
    elif any(v is not None for v in (settings.ca, settings.cert)):
        from l5dproxy.tls.client import TlsSettingsError, client_tls_for
        try:
            client_tls_for(settings)
        except TlsSettingsError as e:
            t.error(e.key, str(e))
    t.finish()
    return settings


def _check_path(value: str) -> str | None:
    return None if value else "must name a file"


def _check_alpn(value: list[Any]) -> str | None:
    bad = [v for v in value if not isinstance(v, str) or not 0 < len(v.encode()) < 256
           or not v.isascii()]
    if bad or not value:
        return f"expected protocol names (e.g. [\"h2\"], [\"http/1.1\"]), got {value!r}"
    return None


def _check_server_name(value: str) -> str | None:
    """A DNS name (no wildcard: it is the identity verified) or an IP address."""
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(
            label and len(label) <= 63 and all(c.isalnum() or c == "-" for c in label)
            and label.isascii() and not label.startswith("-") for label in labels):
        return f"{value!r}: expected a DNS name (as the endpoints' certificates name it) or an" \
               " IP address"
    return None
