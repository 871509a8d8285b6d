"""What the protocols do to a Twisted stream transport beyond ``write``.

The one place (with ``splice`` and ``batchsend``, which need more) that
relies on how Twisted's transports work inside: handing a connection to
another protocol by assigning ``transport.protocol`` (as Twisted's own
``_GenericHTTPChannelProtocol`` does; canary:
``tests.test_library_internals...test_protocol_switch_by_assignment``), and
ending a connection, or its write side, with a producer still registered.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ITCPTransport,
)
from zope.interface import Attribute


class IStreamTransport(ITCPTransport, IConsumer, IPushProducer):
    """The transport of a connected stream protocol, as the protocols here
    use it: Twisted's TCP and TLS transports provide all three interfaces.

    For the type checker only (zope interfaces have no intersection type):
    a protocol narrows Twisted's ``transport: ITransport | None`` with
    ``transport: IStreamTransport``, true from ``makeConnection`` on.
    Nothing declares it at run time; never ask ``providedBy``.
    """

    connected = Attribute("1 while the connection is open (Twisted's FileDescriptor.connected)")


def switch_protocol(transport: object, old: IProtocol, new: IProtocol) -> bool:
    """Make ``transport`` deliver to ``new`` instead of ``old`` from now on.

    True when the transport's protocol was replaced in place (Twisted's TCP
    transports allow it: ``transport.protocol`` is read on every event);
    False when ``old`` is not the transport's protocol attribute (a wrapping
    transport, some test doubles), so ``old`` must forward to ``new``.
    The caller still calls ``new.makeConnection(transport)``.
    """
    if getattr(transport, "protocol", None) is old:
        setattr(transport, "protocol", new)  # noqa: B010 - not in any interface
        return True
    return False


def close_write(transport: IStreamTransport) -> None:
    """Send EOF once what is buffered is written (a half-close).

    A registered producer would keep the transport from finishing the
    half-close (Twisted waits for it to unregister), so it goes first.
    """
    transport.unregisterProducer()
    transport.loseWriteConnection()


def close(transport: IStreamTransport) -> None:
    """Close once what is buffered is written, producer or not."""
    transport.unregisterProducer()
    transport.loseConnection()


def forward_read_closed(next_protocol: object, transport: Any) -> None:
    """The client's EOF, after a protocol switch, told to the protocol now
    speaking (``next_protocol``): its ``readConnectionLost`` if it takes a
    half-close (``IHalfCloseableProtocol``), else ``transport`` is closed."""
    half_closeable = IHalfCloseableProtocol(next_protocol, None)
    if half_closeable is not None:
        half_closeable.readConnectionLost()
    else:
        transport.loseConnection()


def forward_write_closed(next_protocol: object) -> None:
    """The peer stopped reading: ``next_protocol.writeConnectionLost()`` if
    it takes a half-close, else nothing (as Twisted does)."""
    half_closeable = IHalfCloseableProtocol(next_protocol, None)
    if half_closeable is not None:
        half_closeable.writeConnectionLost()
