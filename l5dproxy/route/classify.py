"""gRPC, as the proxy sees it: a status in the trailers, a deadline in a header.

Pure functions, no reactor: the dispatcher uses them to label and classify
responses the way Linkerd does, and to bound a request by its ``grpc-timeout``.
"""

from __future__ import annotations

from l5dproxy.exchange.message import Headers

#: Linkerd's failure set: these statuses classify a response as failure even
#: under HTTP 200 (UNKNOWN, DEADLINE_EXCEEDED, PERMISSION_DENIED, INTERNAL,
#: UNAVAILABLE, DATA_LOSS).
FAILURE_STATUSES = frozenset({2, 4, 7, 13, 14, 15})

GRPC_UNKNOWN = 2

_TIMEOUT_UNITS = {
    ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0,
    ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9,
}


def parse_timeout(value: bytes | None) -> float | None:
    """A ``grpc-timeout`` value (``1S``, ``250m``, at most 8 digits and a
    unit) in seconds, or None when absent or malformed."""
    if not value or len(value) < 2 or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1]
    if not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        return None
    return int(digits) * _TIMEOUT_UNITS[unit]


def classify(status_code: int, grpc_status: int | None, is_grpc: bool) -> str:
    """``success`` or ``failure``, as Linkerd classifies a response.

    For gRPC a missing status (the stream ended without one) counts as
    UNKNOWN; otherwise 5xx is failure.
    """
    if is_grpc:
        if grpc_status is None:
            grpc_status = GRPC_UNKNOWN
        return "failure" if grpc_status in FAILURE_STATUSES or status_code >= 500 else "success"
    return "failure" if status_code >= 500 else "success"


def status_text(trailers: Headers | None, headers: Headers) -> str:
    """The ``grpc-status`` of a response as text, from its trailers or else
    its head (a trailers-only response); "" when it has none (the
    ``grpc_status`` label's value)."""
    for source in (trailers, headers):
        if source:
            for name, value in source:
                if len(name) == 11 and name.lower() == b"grpc-status":
                    return value.decode("latin-1")
    return ""


def status_int(grpc_status: str) -> int | None:
    """``status_text``'s value as a number for ``classify``: None when
    empty, UNKNOWN when not digits."""
    if not grpc_status:
        return None
    return int(grpc_status) if grpc_status.isdigit() else GRPC_UNKNOWN
