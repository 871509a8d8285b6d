"""Log output: the level filter, text or JSON lines, values as text.

Under ``twistd`` the observer built here is set on the application as its
``ILogObserver`` (the component ``twistd`` looks for before it builds its
own), so every event, Twisted's included, passes one level filter
(``[proxy] log_level``, changed at run time at the admin's ``/log-level``, as
Linkerd's ``/proxy-log-level``) before it is written. It writes where
``twistd`` would have: stdout with ``-n`` (or ``--logfile=-``), else the
``--logfile`` (default ``twistd.log``), rotated on SIGUSR1 as ``twistd`` does.
``--syslog`` and ``--logger`` are left to ``twistd`` (no level filter then).

Byte strings in an event (a request's method or target, say) are written as
text, never as Python literals (``b'GET'``): undecodable bytes as ``\\xNN``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from zope.interface import provider

#: The one level filter of the process (every namespace).
LEVELS = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


def set_level(name: str) -> None:
    """Write events of level ``name`` (``l5dproxy.config.model.LOG_LEVELS``) and above.

    Raises ValueError for a name that is not a level."""
    from l5dproxy.config.checks import check_log_level, normal_log_level

    reason = check_log_level(name)
    if reason:
        raise ValueError(reason)
    level = LogLevel.levelWithName(normal_log_level(name))
    LEVELS.defaultLogLevel = level
    LEVELS.clearLogLevels()   # the root namespace takes the default again


def level() -> str:
    """The least severe level written now (``"info"``, ...)."""
    return LEVELS.defaultLogLevel.name


def as_text(value: bytes) -> str:
    """Bytes as text for a log line: ASCII, anything else as ``\\xNN``."""
    return value.decode("ascii", "backslashreplace")


def _texts(event: dict) -> dict:
    """``event`` with its byte-string values as text (a copy when it has any)."""
    if not any(isinstance(v, bytes | bytearray) for v in event.values()):
        return event
    return {k: as_text(bytes(v)) if isinstance(v, bytes | bytearray) else v
            for k, v in event.items()}


def text_observer(out: IO[str]) -> ILogObserver:
    """``twistd``'s text lines, with byte values written as text."""
    inner = textFileLogObserver(out)

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        inner(_texts(event))

    return observe


_JSON_SCALARS = (str, int, float, bool, type(None))


def json_observer(out: IO[str]) -> ILogObserver:
    """One JSON object a line: ``time`` (RFC 3339, UTC), ``level``,
    ``namespace``, ``message`` (the formatted text), the event's own fields
    (non-scalar values as their text) and, for a failure, ``traceback``."""

    @provider(ILogObserver)
    def observe(event: dict) -> None:
        event = _texts(event)
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(event.get("log_time", 0), UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": getattr(event.get("log_level"), "name", "info"),
            "namespace": event.get("log_namespace", ""),
            "message": formatEvent(event),
        }
        for key, value in event.items():
            if key.startswith("log_") or key in record or key == "format":
                continue
            record[key] = value if isinstance(value, _JSON_SCALARS) else str(value)
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()

    return observe


def filtered(observer: ILogObserver) -> ILogObserver:
    """``observer`` behind the process's level filter."""
    return FilteringLogObserver(observer, [LEVELS])


def twistd_observer(server_options: Any, log_format: str) -> ILogObserver | None:
    """The observer ``twistd`` should use, given its options (the parent of
    the plugin's options), or None to leave logging to ``twistd``
    (``--syslog``, ``--logger``)."""
    get: Callable[[str], Any] = getattr(server_options, "get", lambda key: None)
    if get("syslog") or get("logger"):
        return None
    logfile = get("logfile") or ""
    nodaemon = bool(get("nodaemon"))
    if logfile == "-" or (nodaemon and not logfile):
        out: IO[str] = sys.stdout
    else:
        from twisted.python.logfile import LogFile

        out = LogFile.fromFullPath(logfile or "twistd.log")
        _rotate_on_sigusr1(out)
    write = json_observer if log_format == "json" else text_observer
    return filtered(write(out))


def _rotate_on_sigusr1(logfile) -> None:
    """As ``twistd`` does for its own log file: SIGUSR1 rotates it."""
    import signal

    if signal.getsignal(signal.SIGUSR1):
        return

    def rotate(signum, frame) -> None:
        from twisted.internet import reactor
        from twisted.internet.interfaces import IReactorFromThreads

        cast(IReactorFromThreads, reactor).callFromThread(logfile.rotate)

    signal.signal(signal.SIGUSR1, rotate)
