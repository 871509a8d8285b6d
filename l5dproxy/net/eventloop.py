"""The epoll reactor's event dispatch without its per-event log context.

Twisted's ``EPollReactor.doPoll`` hands each ready descriptor to the
reactor's ``_doReadOrWrite`` through ``twisted.python.log.callWithLogger``:
per event it calls the selectable's ``logPrefix()``, builds a context dict
and runs the handler inside ``twisted.python.context.call`` (a copy of the
context stack, a try/finally), only so that Twisted's *legacy* log calls
made meanwhile (``log.msg``/``log.err``) carry a ``[Protocol,fd,addr]``
system prefix. Under ``wrk -c50`` that wrapping was ~10 % of the proxy's CPU
(py-spy: ``callWithLogger``, ``callWithContext``, ``getContext``), and
dropping it took CPU per HTTP/1 request from 152.5 to 139.0 µs (``cpuab``,
2026-12-01). l5dproxy's own log lines never carried that prefix (its
``twisted.logger`` events name their namespace); Twisted's own "Unhandled
Error" lines written while handling an event now show ``[-]`` where they
showed the protocol's prefix (their traceback still names it).

``lighten(reactor)`` replaces ``doPoll`` (and ``doIteration``, the alias
the reactor's loop calls) on the running reactor's instance with
``_do_poll`` below, which is Twisted 26.10's loop calling
``_doReadOrWrite`` directly; an exception escaping it is logged and the next
event handled, as ``callWithLogger`` did. It uses the reactor's private
``_poller``, ``_selectables`` and ``_doReadOrWrite`` (the only module that
does): tests/test_library_internals.py fails loudly if those names go or if
Twisted's ``doPoll`` is no longer the loop this one was written from. Only an
``EPollReactor`` exactly is changed (any other reactor, a subclass, a test's
fake: left as it is).
"""

from __future__ import annotations

import errno
import types
from typing import Any

from twisted.logger import Logger

log = Logger()


def lighten(reactor: Any) -> bool:
    """Dispatch ``reactor``'s events without the per-event log context, if
    it is Twisted's ``EPollReactor`` (exactly); whether it was changed."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:   # no epoll on this platform
        return False
    if type(reactor) is not EPollReactor:
        return False
    do_poll = types.MethodType(_do_poll, reactor)
    # mainLoop and iterate() call doIteration, which EPollReactor makes an
    # alias of doPoll in its class body: both names are replaced.
    reactor.doPoll = reactor.doIteration = do_poll  # type: ignore[method-assign]
    return True


def _do_poll(self: Any, timeout: float | None) -> None:
    """``EPollReactor.doPoll`` (Twisted 26.10) without ``log.callWithLogger``."""
    if timeout is None:
        timeout = -1  # wait indefinitely
    selectables = self._selectables
    try:
        events = self._poller.poll(timeout, len(selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    handle = self._doReadOrWrite
    for fd, event in events:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            handle(selectable, fd, event)
        except Exception:
            log.failure("handling an event of {selectable!r} failed", selectable=selectable)


__all__ = ["lighten"]
