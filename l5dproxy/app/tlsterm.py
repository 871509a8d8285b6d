"""The terminating listeners' TLS state, kept across reloads.

Imported only when a config has a ``[listener.tls]`` (app/service.py), so a
process without TLS never loads OpenSSL (l5dproxy.app.lean).

:class:`Terminations` holds one :class:`~l5dproxy.tls.server.ServerContexts`
per terminating listener. A reload (SIGHUP, a changed config file) keeps a
listener's contexts while its ``[listener.tls]`` is unchanged and re-reads
their files (rotation: new handshakes get the new certificates, open
connections keep theirs); a changed table gets new contexts. With
``watch_config``, :meth:`Terminations.reload_changed` re-reads the
certificate files whose stamps changed. Each loaded certificate's expiry is
exported as ``tls_certificate_expiry_timestamp_seconds{listener, name}``.
"""

from __future__ import annotations

from collections.abc import Mapping

from l5dproxy.config.model import DetectConfig, ListenerConfig, ListenerTlsConfig
from l5dproxy.detect.terminate import Handler, plaintext_refused, tls_handler
from l5dproxy.telemetry import Metrics
from l5dproxy.tls.certs import CertificateError, CertificateStore
from l5dproxy.tls.server import ServerContexts, ServerSettings


class Terminations:
    """See the module doc. ``reactor`` provides IReactorTime."""

    def __init__(self, metrics: Metrics, reactor) -> None:
        self.metrics = metrics
        self.reactor = reactor
        #: listener name -> (its [listener.tls], its contexts)
        self.contexts: dict[str, tuple[ListenerTlsConfig, ServerContexts]] = {}
        metrics.certificate_sources.append(self._expiries)

    def _expiries(self) -> list[tuple[str, str, str, float]]:
        return [(name, "", cert_name, not_after)
                for name, (_, contexts) in sorted(self.contexts.items())
                for cert_name, not_after in contexts.store.expiries()]

    def prepare(self, listeners: tuple[ListenerConfig, ...]) -> dict[str, ServerContexts]:
        """The contexts for a config's terminating listeners, reusing (and
        re-reading the files of) those whose table is unchanged. Nothing is
        kept until :meth:`commit`; raises :class:`CertificateError` for a
        file that cannot be loaded (the config was checked, but a file can
        change in between)."""
        prepared: dict[str, ServerContexts] = {}
        for lc in listeners:
            tls = lc.tls
            if tls is None:
                continue
            current = self.contexts.get(lc.name)
            if current is not None and current[0] == tls:
                current[1].reload()
                prepared[lc.name] = current[1]
                continue
            store = CertificateStore([(c.cert, c.key) for c in tls.certificates],
                                     owner=f"listener {lc.name}")
            prepared[lc.name] = ServerContexts(store, ServerSettings(
                alpn=tls.alpn, min_version=tls.min_version,
                session_tickets=tls.session_tickets, client_ca=tls.client_ca))
        return prepared

    def commit(self, listeners: tuple[ListenerConfig, ...],
               prepared: dict[str, ServerContexts]) -> None:
        """Keep ``prepared`` (from :meth:`prepare`) as the running contexts."""
        self.contexts = {lc.name: (lc.tls, prepared[lc.name])
                         for lc in listeners if lc.tls is not None}

    def handlers(self, lc: ListenerConfig, detect: DetectConfig,
                 handlers: Mapping[str, Handler], contexts: ServerContexts,
                 ) -> dict[str, Handler]:
        """``handlers`` plus the ``tls`` verdict's handler for listener ``lc``."""
        tls = lc.tls
        assert tls is not None
        terminating = dict(handlers)
        terminating["tls"] = tls_handler(
            contexts, handlers, self.reactor, self.metrics, lc.name,
            tls.handshake_timeout, tls.allow, detect.peek_limit, detect.timeout)
        if tls.client_ca is not None:   # mTLS required: no plaintext past it
            terminating.update(plaintext_refused(handlers, self.metrics, lc.name))
        return terminating

    def changed(self) -> bool:
        """Whether a certificate file of a terminating listener changed."""
        return any(contexts.changed() for _, contexts in self.contexts.values())

    def reload_changed(self) -> list[CertificateError]:
        """Re-read the certificate files that changed (watch_config)."""
        errors: list[CertificateError] = []
        for _, contexts in self.contexts.values():
            if contexts.changed():
                errors.extend(contexts.reload())
        return errors
