"""Checks of single config values: each returns the reason a value cannot
be used (for a ``FILE: key: reason`` line), or None when it can.

Also the names of TOML value kinds for "expected X, got Y", and the hints
added to those lines (``TYPE_HINTS``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.endpoints import serverFromString

from l5dproxy.config.model import (
    FORWARDED_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    PROTOCOLS,
    PROXY_PROTOCOL_MODES,
    PROXY_PROTOCOL_VERSIONS,
    HostPort,
)
from l5dproxy.net.listening import server_endpoint_port


def parse_host_port(text: str) -> HostPort:
    """``host:port`` or ``[v6addr]:port``; raises ValueError with a reason."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
        if ":" in host:
            raise ValueError("IPv6 addresses go in brackets, as [::1]:8080")
    if not sep or not host:
        raise ValueError("expected host:port")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    return HostPort(host, int(port))


def check_endpoint(text: str) -> str | None:
    """Why a Twisted server endpoint string cannot be used, or None."""
    from twisted.internet import reactor

    try:
        endpoint = serverFromString(reactor, text)
    except (KeyError, IndexError):
        if text.startswith("systemd:"):
            return None  # the descriptor is looked up when systemd hands it over
        return f"unparsable endpoint string {text!r}; {LISTEN_HINT}"
    except (ValueError, TypeError, AttributeError) as e:
        return f"unparsable endpoint string {text!r}: {e}; {LISTEN_HINT}"
    except ImportError as e:  # TLS, in a process started without OpenSSL (l5dproxy.app.lean)
        return f"unusable endpoint string {text!r}: {e}"
    except OSError as e:  # ssl: reads its certificate files while parsing
        return f"unusable endpoint string {text!r}: {e.strerror or e}: {e.filename}"
    # TCP endpoints take any integer as the port; catch it here, not at bind.
    port = server_endpoint_port(endpoint)
    if port is not None and not 0 <= port <= 65535:
        return f"unparsable endpoint string {text!r}: port {port} is not from 0 to 65535"
    return None


LISTEN_HINT = "listen takes a Twisted endpoint string such as tcp:4143:interface=127.0.0.1"
DURATION_HINT = "durations are numbers of seconds, e.g. 10"


def check_duration(value: float) -> str | None:
    return "must be a duration in seconds, not negative" if value < 0 else None


def check_h2_engine(value: str) -> str | None:
    """``[h2] engine``: a name; whether libnghttp2 loads is checked at start
    (``http.h2.codec.resolve_engine``)."""
    engines = ("auto", "nghttp2", "h2")
    return None if value in engines else f"must be one of {', '.join(engines)}"


def check_positive_duration(value: float) -> str | None:
    return "must be a duration in seconds, greater than 0" if value <= 0 else None


#: What to add to "expected X, got Y", by the check the key has.
TYPE_HINTS: dict[Callable[[Any], str | None], str] = {
    check_duration: DURATION_HINT, check_positive_duration: DURATION_HINT,
    check_endpoint: LISTEN_HINT}
def check_peek_limit(value: int) -> str | None:
    return None if 64 <= value <= 1 << 20 else "must be between 64 and 1048576 bytes"


def check_learned_max(value: int) -> str | None:
    return None if value >= 1 else "must be at least 1"


TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789"
                   "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def check_upgrades(value: list[Any]) -> str | None:
    """Protocol names (RFC 9110 7.8 tokens). ``h2c`` is refused: after its
    101 the client speaks HTTP/2 straight to the endpoint, past every route
    and limit (the "h2c smuggling" attack); h2 clients use prior knowledge."""
    bad = [u for u in value if not isinstance(u, str) or not u or not set(u) <= TCHARS]
    if bad:
        return f"not protocol names (tokens): {bad!r}"
    if any(u.lower() == "h2c" for u in value):
        return ("h2c cannot be relayed: after its 101 the client would speak HTTP/2 "
                "straight to the endpoint, past routes and limits")
    return None


def check_ports(value: list[Any]) -> str | None:
    bad = [p for p in value if not is_kind(p, int) or not 0 < p < 65536]
    return f"not ports: {bad!r}" if bad else None


def normal_log_level(value: str) -> str:
    """``value`` (checked by ``check_log_level``) as one of ``LOG_LEVELS``."""
    value = value.strip().lower()
    return "warn" if value == "warning" else value


def check_log_level(value: str) -> str | None:
    """A reason when ``value`` names no log level (case-insensitive)."""
    if normal_log_level(value) not in LOG_LEVELS:
        return f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}"
    return None


def check_log_format(value: str) -> str | None:
    if value not in LOG_FORMATS:
        return f"expected one of {', '.join(LOG_FORMATS)}, got {value!r}"
    return None

def check_host_port(value: str) -> str | None:
    try:
        parse_host_port(value)
    except ValueError as e:
        return f"{value!r}: {e}"
    return None


def check_srv(value: str) -> str | None:
    labels = value.rstrip(".").split(".")
    if len(labels) < 3 or not labels[0].startswith("_") or not labels[1].startswith("_"):
        return f"{value!r}: expected an SRV name such as _http._tcp.example.com"
    return None


def check_statuses(value: list[Any]) -> str | None:
    bad = [v for v in value if not is_kind(v, int) or not 100 <= v <= 599]
    return f"not HTTP status codes: {bad!r}" if bad else None


def check_count(value: int) -> str | None:
    return "must not be negative" if value < 0 else None


def check_ratio(value: float) -> str | None:
    return None if 0 <= value <= 1 else "must be between 0 and 1"

def check_protocol(value: str) -> str | None:
    return None if value in PROTOCOLS else f"must be one of {', '.join(PROTOCOLS)}"


def one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    """A check that the value is one of ``choices``."""
    return lambda value: (None if value in choices
                          else f"expected one of {', '.join(choices)}, got {value!r}")


check_proxy_protocol = one_of(PROXY_PROTOCOL_MODES)
check_forwarded = one_of(FORWARDED_MODES)
check_proxy_protocol_version = one_of(PROXY_PROTOCOL_VERSIONS)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[Any]) -> tuple[IPNetwork, ...]:
    """``trusted_proxies``: ``"10.0.0.0/8"``, ``"::1"`` (a single address is a
    /32 or /128). Raises ValueError naming the value for anything else, or a
    network with host bits set (``10.0.0.1/8``: probably a typo)."""
    networks = []
    for cidr in cidrs:
        try:
            if not isinstance(cidr, str):
                raise ValueError(f"expected a string, got {type_name(cidr)}")
            networks.append(ipaddress.ip_network(cidr, strict=True))
        except ValueError as e:
            raise ValueError(f"{cidr!r} is not an address or CIDR network ({e})") from None
    return tuple(networks)


def check_networks(value: list[Any]) -> str | None:
    try:
        parse_networks(value)
    except ValueError as e:
        return str(e)
    return None


def check_name(value: str) -> str | None:
    return None if value else "must not be empty"


def check_path_prefix(value: str) -> str | None:
    return None if value.startswith("/") else "must start with '/'"


def is_kind(value: Any, kind: type | tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # bool is an int in Python, never in a config
        return kind is bool or (isinstance(kind, tuple) and bool in kind)
    return isinstance(value, kind)


KIND_NAMES = {str: "a string", bool: "true or false", int: "an integer",
               float: "a number", list: "an array", dict: "a table"}


def kind_name(kind: type | tuple[type, ...]) -> str:
    if kind == (int, float):
        return "a number"
    if isinstance(kind, tuple):
        return " or ".join(KIND_NAMES.get(k, k.__name__) for k in kind)
    return KIND_NAMES.get(kind, kind.__name__)


def type_name(value: Any) -> str:
    return kind_name(type(value))
