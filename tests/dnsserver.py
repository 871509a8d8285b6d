"""A small authoritative DNS server on twisted.names, for the discovery tests.

Records are a dict, changed while the server runs::

    {"app.test": [("A", "127.0.0.1", 5), ("AAAA", "::1", 5)],
     "_http._tcp.app.test": [("SRV", 10, 60, 8080, "a.app.test", 5)],
     "broken.test": "servfail",      # answers SERVFAIL
     "silent.test": "drop"}          # never answers (the client times out)

A name that is absent answers NXDOMAIN; a name without records of the asked
type answers empty. In the test's reactor: ``DnsServer(records).start()``;
as a subprocess (for the end-to-end tests, whose reactor does not run):
``python -m tests.dnsserver RECORDS.json`` prints ``port N`` and re-reads the
JSON file whenever it changes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
from typing import Any

from twisted.internet import defer
from twisted.names import common, dns, error, server


def _payload(record: list | tuple) -> tuple[int, Any, int]:
    kind = record[0]
    if kind == "A":
        return dns.A, dns.Record_A(record[1], ttl=record[2]), record[2]
    if kind == "AAAA":
        return dns.AAAA, dns.Record_AAAA(str(ipaddress.ip_address(record[1])), ttl=record[2]), \
            record[2]
    if kind == "SRV":
        _, priority, weight, port, target, ttl = record
        return dns.SRV, dns.Record_SRV(priority, weight, port, target, ttl=ttl), ttl
    raise ValueError(f"unknown record type {kind!r}")


class RecordsAuthority(common.ResolverBase):
    """Answers from ``records`` (or from ``load()``, called per query)."""

    def __init__(self, records: dict | None = None, load=None) -> None:
        super().__init__()
        self.records = records if records is not None else {}
        self.load = load
        self.queries: list[tuple[str, int]] = []

    def _lookup(self, name, cls, type, timeout):
        if self.load is not None:
            self.records = self.load()
        key = (name.decode() if isinstance(name, bytes) else name).lower().rstrip(".")
        self.queries.append((key, type))
        entry = self.records.get(key)
        if entry is None:
            return defer.fail(error.AuthoritativeDomainError(name))
        if entry == "servfail":
            return defer.fail(RuntimeError("servfail"))
        if entry == "drop":
            return defer.Deferred()
        answers = []
        for record in entry:
            rtype, payload, ttl = _payload(record)
            if rtype == type:
                answers.append(dns.RRHeader(name, rtype, dns.IN, ttl, payload, auth=True))
        return defer.succeed((answers, [], []))


class DnsServer:
    """The authority served over UDP on 127.0.0.1, port 0."""

    def __init__(self, records: dict | None = None, load=None, reactor=None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.authority = RecordsAuthority(records, load)
        self.factory = server.DNSServerFactory(authorities=[self.authority])
        self.factory.noisy = False
        self.port = None

    @property
    def records(self) -> dict:
        return self.authority.records

    def start(self) -> int:
        protocol = dns.DNSDatagramProtocol(self.factory)
        protocol.noisy = False
        self.port = self.reactor.listenUDP(0, protocol, interface="127.0.0.1")
        return self.port.getHost().port

    def stop(self):
        return self.port.stopListening()


def _file_loader(path: str):
    state: dict[str, Any] = {"mtime": None, "records": {}}

    def load() -> dict:
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return state["records"]
        if mtime != state["mtime"]:
            try:
                with open(path) as f:
                    state["records"] = json.load(f)
                state["mtime"] = mtime
            except (OSError, ValueError):
                pass  # half-written: keep the last records
        return state["records"]

    return load


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    dns_server = DnsServer(load=_file_loader(argv[1]), reactor=reactor)
    port = dns_server.start()
    print(f"port {port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv)
