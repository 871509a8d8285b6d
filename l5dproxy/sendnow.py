"""Write at once when nothing is queued, as asyncio's transports do.

Twisted's ``transport.write`` never sends: it queues the bytes, asks the
reactor to watch the socket for writability (an ``epoll_ctl``), and sends on
the next loop turn, after which it stops watching (another ``epoll_ctl``).
For a proxy that writes one small head per request on each side, that is two
system calls and a reactor dispatch per write for nothing: the socket buffer
is almost always empty. ``SendNow`` tries ``socket.send`` first when the
transport has nothing queued, and hands whatever the kernel did not take
(or any error) to ``transport.write``, so ordering, backpressure, producers
and error handling stay Twisted's.

Only plain TCP transports (``twisted.internet.tcp``, not TLS) qualify; any
other transport (``StringTransport`` in tests, a TLS wrapper) gets
``transport.write``.
"""

from __future__ import annotations

from twisted.internet import tcp


class SendNow:
    """``write(data)`` for one transport."""

    __slots__ = ("sock", "transport")

    def __init__(self, transport) -> None:
        self.transport = transport
        sock = None
        if isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False):
            sock = getattr(transport, "socket", None)
        self.sock = sock

    def write(self, data: bytes) -> None:
        t = self.transport
        sock = self.sock
        if (sock is not None and not t._tempDataLen and not t.dataBuffer and t.connected
                and not t.disconnecting and not t._writeDisconnecting and not t.TLS):
            try:
                sent = sock.send(data)
            except OSError:   # EAGAIN, or an error Twisted will find and report
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        t.write(data)
