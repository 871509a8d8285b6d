"""Zero-copy relaying of an opaque connection with ``splice(2)`` (Linux).

Once a relayed connection is steady (the upstream is connected and the client
has not half-closed), nothing in Python needs to see its bytes. A ``Splice``
takes both sockets out of the reactor's read and write sets (the Twisted
transports keep owning the sockets) and registers a descriptor of its own on
each file descriptor. Bytes move socket -> pipe -> socket inside the kernel,
one pipe per direction taken from a small shared pool while bytes are in
flight (an idle connection holds no pipe), non-blocking on both ends:

* backpressure: when the destination would block, the bytes stay in the pipe,
  the source is no longer read and the destination is watched for
  writability, so a direction holds at most one pipe's capacity;
* a half-close travels: an EOF from one side, once the pipe is drained, is a
  ``shutdown(SHUT_WR)`` of the other, and the other direction goes on; once
  both have ended, both sockets are closed cleanly;
* on an error (a reset, a broken pipe) or anything splice cannot do, the
  connection is *handed back*: what is still in a pipe or queued is given to
  the destination transport, the relay's producers are registered again and
  Twisted reads the sockets as before (seeing a sticky EOF itself), and an
  error is reported to the transport that hit it as the reactor would
  (``connectionLost`` with ``ConnectionLost``, counted as ECONNRESET).

The byte counters are fed from splice's return values: what is read from a
socket counts as read when it enters the pipe, what is written when it leaves.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.internet import error
from twisted.internet.interfaces import IReadWriteDescriptor
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from l5dproxy.net.transport import IStreamTransport
    from l5dproxy.telemetry import TcpSideMetrics

log = Logger()

_splice = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

#: Whether relays splice. Off with ``L5DPROXY_SPLICE=0`` in the environment,
#: off where ``os.splice`` does not exist, and off for good after splice
#: refuses a pair of sockets (EINVAL, ENOSYS: the kernel cannot do it).
ENABLED = _splice is not None and os.environ.get("L5DPROXY_SPLICE", "1") != "0"

#: The capacity asked for each pipe (fewer, larger splices per byte). The
#: kernel may give less (pipe-max-size, the per-user pipe page limits).
PIPE_SIZE = int(os.environ.get("L5DPROXY_PIPE_SIZE", 256 * 1024))

#: Idle pipes kept for reuse; more are closed when they come back.
POOL_MAX = 64

#: Splices per readiness event before the reactor gets a turn (fairness
#: between connections).
ROUNDS = 16

_pool: list[tuple[int, int]] = []

#: splice's errors that mean "not on these file descriptors", not a failed
#: connection: hand back to the Python relay and stop splicing.
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})


def _get_pipe() -> tuple[int, int]:
    if _pool:
        return _pool.pop()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):  # else the default capacity (64 KiB) will do
        fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


def _put_pipe(pipe: tuple[int, int]) -> None:
    """Give back an *empty* pipe."""
    if len(_pool) < POOL_MAX:
        _pool.append(pipe)
    else:
        _close_pipe(pipe)


def _close_pipe(pipe: tuple[int, int]) -> None:
    for fd in pipe:
        with contextlib.suppress(OSError):
            os.close(fd)


def _unsent(transport) -> int | None:
    """Bytes a Twisted socket transport still has to write (None: not a
    transport this module knows how to look into)."""
    try:
        return len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    except (AttributeError, TypeError):
        return None


def can_splice(*transports) -> bool:
    """Plain TCP socket transports, open, with nothing left to write."""
    if not ENABLED:
        return False
    for t in transports:
        # Exactly a TCP socket transport: not TLS (whose getHandle is the
        # socket under the ciphertext), not a test double.
        if not isinstance(t, Connection) or not t.connected or t.disconnecting \
                or t._writeDisconnecting or _unsent(t) != 0:
            return False
        sock = t.getHandle()
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_STREAM:
            return False
    return True


class ByteCounts(Protocol):
    """Where a connection's client-side bytes are counted
    (``l5dproxy.net.connection.InboundConnection``)."""

    def count_read(self, n: int) -> None: ...
    def count_written(self, n: int) -> None: ...


class SpliceOwner(Protocol):
    """The client side of a relayed connection, as a ``Splice`` uses it
    (``l5dproxy.tcp.relay.RelayProtocol``)."""

    transport: IStreamTransport

    @property
    def conn(self) -> ByteCounts:
        """Counts the client's bytes."""
    #: How the connection ended, for its log line; set when splice saw both EOFs.
    ended_by: str

    def splice_ended(self, spliced: Splice, restore: bool = True) -> None:
        """The splice gave the sockets back (``restore``: relay on in Python)."""


class SpliceUpstream(Protocol):
    """The server side of a relayed connection, as a ``Splice`` uses it
    (``l5dproxy.tcp.relay.UpstreamProtocol``)."""

    transport: IStreamTransport
    #: The dst-side metrics (``read_bytes``, ``write_bytes``).
    dst: TcpSideMetrics


class _Direction:
    """Bytes from one socket to the other."""

    __slots__ = ("count_in", "count_out", "done", "dst", "in_pipe", "pipe", "queued",
                 "src")

    def __init__(self, src: _Side, dst: _Side, count_in: Callable[[int], None],
                 count_out: Callable[[int], None]) -> None:
        self.src = src
        self.dst = dst
        self.count_in = count_in
        self.count_out = count_out
        self.pipe: tuple[int, int] | None = None
        self.in_pipe = 0
        #: Bytes written by Python (already counted), sent before the pipe's.
        self.queued: list[bytes] = []
        self.done = False


@implementer(IReadWriteDescriptor)
class _Side:
    """The reactor's view of one socket while it is spliced: readable means
    its outgoing direction can move, writable its incoming one."""

    __slots__ = ("fd", "incoming", "name", "outgoing", "reading", "sock", "splice", "transport",
                 "writing")

    def __init__(self, splice: Splice, name: str, transport) -> None:
        self.splice = splice
        self.name = name
        self.transport = transport
        self.sock = transport.getHandle()
        self.fd = transport.fileno()
        self.reading = False
        self.writing = False
        self.outgoing: _Direction = None  # type: ignore[assignment]
        self.incoming: _Direction = None  # type: ignore[assignment]

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return f"splice-{self.name}"

    def doRead(self) -> None:
        self.splice.pump(self.outgoing)

    def doWrite(self) -> None:
        self.splice.pump(self.incoming)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor saw a hang-up or an error on the descriptor (it has
        # already stopped watching it): Twisted takes the sockets back and
        # finds out what happened itself.
        self.reading = self.writing = False
        self.splice.hand_back()


class Splice:
    """Splices one relayed connection (client <-> upstream) in the kernel."""

    def __init__(self, relay: SpliceOwner, upstream: SpliceUpstream, reactor) -> None:
        self.relay = relay
        self.upstream = upstream
        self.reactor = reactor
        self.active = False
        #: How the relay ended, when splice saw both EOFs.
        self.first_end: str | None = None
        conn = relay.conn
        dst = upstream.dst
        self.client = _Side(self, "client", relay.transport)
        self.server = _Side(self, "server", upstream.transport)
        self.c2s = _Direction(self.client, self.server, conn.count_read, dst.write_bytes.inc)
        self.s2c = _Direction(self.server, self.client, dst.read_bytes.inc, conn.count_written)
        self.client.outgoing = self.server.incoming = self.c2s
        self.server.outgoing = self.client.incoming = self.s2c

    def start(self) -> None:
        """Take both sockets from Twisted and start moving bytes."""
        for side in (self.client, self.server):
            t = side.transport
            if t.producer is not None:
                t.unregisterProducer()
            t.stopReading()
            t.stopWriting()
        self.active = True
        self._watch(self.client, read=True, write=False)
        self._watch(self.server, read=True, write=False)

    # -- writes from Python (bytes held before the splice, early server bytes) --

    def send_to_client(self, data: bytes) -> None:
        self._queue(self.s2c, data)

    def send_to_server(self, data: bytes) -> None:
        self._queue(self.c2s, data)

    def _queue(self, d: _Direction, data: bytes) -> None:
        if not self.active:  # handed back meanwhile
            d.dst.transport.write(data)
            return
        d.queued.append(data)
        self.pump(d)

    # -- the pump --

    def pump(self, d: _Direction) -> None:
        """Move what can move from ``d.src`` to ``d.dst`` without blocking."""
        if not self.active or d.done:
            return
        splice = _splice
        assert splice is not None  # no Splice is made unless ENABLED
        flags = _FLAGS
        src_fd = d.src.fd
        dst_fd = d.dst.fd
        for _ in range(ROUNDS):
            # Out first: what Python queued, then the pipe.
            if d.queued:
                try:
                    if not self._send_queued(d):
                        return self._blocked(d)
                except OSError as e:
                    return self._failed(d.dst, e)
            if d.in_pipe:
                assert d.pipe is not None  # bytes in the pipe: it exists
                try:
                    n = splice(d.pipe[0], dst_fd, d.in_pipe, flags=flags)
                except BlockingIOError:
                    return self._blocked(d)
                except OSError as e:
                    return self._failed(d.dst, e)
                d.count_out(n)
                d.in_pipe -= n
                if d.in_pipe:
                    return self._blocked(d)
            # Then in, through an empty pipe.
            pipe = d.pipe
            if pipe is None:
                d.pipe = pipe = _get_pipe()
            try:
                n = splice(src_fd, pipe[1], PIPE_SIZE, flags=flags)
            except BlockingIOError:
                n = -1
            except OSError as e:
                return self._failed(d.src, e)
            if n <= 0:
                d.pipe = None
                _put_pipe(pipe)
                if n == 0:
                    return self._ended(d)
                return self._flowing(d)
            d.count_in(n)
            d.in_pipe = n
        # Still going after ROUNDS: give the reactor a turn, then go on
        # (the destination is almost surely writable).
        return self._blocked(d)

    def _send_queued(self, d: _Direction) -> bool:
        """Send what Python queued; False when the socket would block."""
        while d.queued:
            data = d.queued[0]
            try:
                n = d.dst.sock.send(data)
            except BlockingIOError:
                return False
            if n < len(data):
                d.queued[0] = data[n:]
                return False
            d.queued.pop(0)
        return True

    def _blocked(self, d: _Direction) -> None:
        """The destination is full: stop reading the source until it drains."""
        self._watch(d.src, read=False, write=d.src.writing)
        self._watch(d.dst, read=d.dst.reading, write=True)

    def _flowing(self, d: _Direction) -> None:
        """Everything moved: wait for the source."""
        self._watch(d.dst, read=d.dst.reading, write=False)
        self._watch(d.src, read=True, write=d.src.writing)

    def _ended(self, d: _Direction) -> None:
        """The source's EOF, after every byte: half-close the destination."""
        d.done = True
        self._watch(d.src, read=False, write=d.src.writing)
        self._watch(d.dst, read=d.dst.reading, write=False)
        with contextlib.suppress(OSError):  # gone: Twisted finds out on hand-back
            d.dst.sock.shutdown(socket.SHUT_WR)
        if self.first_end is None:
            self.first_end = "client closed" if d is self.c2s else "server closed"
        if self.c2s.done and self.s2c.done:
            self._finish()

    def _finish(self) -> None:
        """Both directions ended, every byte delivered: close both sockets
        cleanly, now. (Handing them back would not do: a socket shut down
        both ways polls as hung up, which Twisted takes for a lost connection.)"""
        self.hand_back(restore=False)
        if self.first_end is not None:
            self.relay.ended_by = self.first_end
        done = Failure(error.ConnectionDone())
        # The client's first, so the relay sees itself closed, then the
        # upstream's, before the reactor turns.
        for side in (self.client, self.server):
            if side.transport.connected:
                side.transport.connectionLost(done)

    def _failed(self, side: _Side, e: OSError) -> None:
        if e.errno in _UNSUPPORTED:
            global ENABLED
            ENABLED = False
            log.warn("splice failed ({error}): relaying in Python from now on", error=e)
            self.hand_back()
            return
        # As Twisted's own read and write report a socket error.
        self.hand_back(failed=side, reason=Failure(error.ConnectionLost(str(e))))

    def _watch(self, side: _Side, read: bool, write: bool) -> None:
        if read != side.reading:
            side.reading = read
            if read:
                self.reactor.addReader(side)
            else:
                self.reactor.removeReader(side)
        if write != side.writing:
            side.writing = write
            if write:
                self.reactor.addWriter(side)
            else:
                self.reactor.removeWriter(side)

    # -- giving the sockets back to Twisted --

    def hand_back(self, failed: _Side | None = None, reason: Failure | None = None,
                  gone=None, restore: bool = True) -> None:
        """Stop splicing and give the sockets back to Twisted.

        Bytes still queued or in a pipe go to their destination transport
        (unless it failed or is ``gone``: a transport closed under us, whose
        connectionLost is running). Unless a transport is gone, the relay
        reads and writes through Twisted again (``RelayProtocol.splice_ended``);
        then ``failed`` is closed with ``reason``, as the reactor would."""
        if not self.active:
            return
        self.active = False
        for side in (self.client, self.server):
            if side.transport is gone:
                # Its connectionLost stopped reading and writing the fd,
                # which removed our registrations (the reactor keys by fd).
                side.reading = side.writing = False
            self._watch(side, read=False, write=False)
        leftovers = []
        for d in (self.c2s, self.s2c):
            chunks = d.queued
            d.queued = []
            if d.pipe is not None:
                while d.in_pipe > 0:
                    try:
                        chunk = os.read(d.pipe[0], d.in_pipe)
                    except OSError:
                        break
                    if not chunk:
                        break
                    chunks.append(chunk)
                    d.count_out(len(chunk))
                    d.in_pipe -= len(chunk)
                if d.in_pipe:
                    _close_pipe(d.pipe)
                else:
                    _put_pipe(d.pipe)
                d.pipe = None
                d.in_pipe = 0
            if chunks and d.dst is not failed and d.dst.transport is not gone:
                leftovers.append((d.dst.transport, b"".join(chunks)))
        self.relay.splice_ended(self, restore=restore and gone is None)
        # After the producers are back, so a full buffer pauses the source.
        for transport, data in leftovers:
            transport.write(data)
        if failed is not None:
            failed.transport.connectionLost(reason)
