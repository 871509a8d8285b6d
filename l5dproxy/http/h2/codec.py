"""The codec end of an HTTP/2 connection: what the proxy's ends use of it.

``H2Codec`` names everything ``protocol.py``, ``server.py``, ``client.py``
and ``pool.py`` ask of the object that turns frames into events and calls
into frames; the ends depend on nothing else of it. ``server_codec`` and
``client_codec`` make one configured from ``[h2]`` (``config.model.H2Config``).

The vocabulary is the ``h2`` library's, kept as the neutral one because the
ends and tests already speak it: events are ``h2.events`` classes (only the
attributes listed on ``H2Codec.receive_data``), refusals are
``h2.exceptions`` (``ProtocolError`` and its subclasses
``FlowControlError``, ``NoAvailableStreamIDError``), error codes
``h2.errors.ErrorCodes`` (or a plain int for a code RFC 9113 7 does not
name). The ``h2``-based codec is ``connection.ProxyH2Connection``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from h2.events import Event

    from l5dproxy.config.model import H2Config
    from l5dproxy.http.h2.abuse import AbuseBudget


class H2Codec(Protocol):
    """One HTTP/2 connection's frames, either side (RFC 9113).

    Stream ids are ints, header blocks are lists of ``(name, value)`` bytes
    pairs as on the wire (pseudo-header fields first). A call that finds the
    stream or the connection closed on this side raises ``ProtocolError``
    (the ends catch it and end that stream only); a peer's connection error
    found by ``receive_data`` raises ``ProtocolError`` after queueing the
    GOAWAY that names it.

    Bounded whatever the peer does: the record of how closed streams ended
    (``connection.closed_streams_kept``), the HPACK encoder's dynamic table
    (``connection.ENCODER_TABLE_SIZE``), and the per-stream state, dropped
    once a stream is closed.
    """

    #: Told of each received frame that costs work and carries nothing
    #: (``AbuseBudget.spend`` with the kind); set by the protocol end.
    budget: AbuseBudget | None

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed the peer's bytes; the events they made, in order:
        ``RequestReceived`` / ``ResponseReceived`` / ``TrailersReceived``
        (``stream_id``, ``headers``, ``stream_ended`` not None when the block
        ended the stream), ``InformationalResponseReceived``,
        ``DataReceived`` (``stream_id``, ``data``, ``flow_controlled_length``
        with padding), ``StreamEnded``, ``StreamReset`` (``stream_id``,
        ``error_code``), ``WindowUpdated`` (``stream_id``, 0 for the
        connection), ``RemoteSettingsChanged`` (``changed_settings``:
        SettingCodes -> object with ``new_value``),
        ``ConnectionTerminated`` (a received GOAWAY: ``error_code``,
        ``last_stream_id``; the connection stays open for the streams it
        spares), and others the ends ignore."""
        ...

    def data_to_send(self) -> bytes:
        """Everything queued to send (frames), or b""."""
        ...

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                     end_stream: bool = False) -> None:
        """A header block on the stream (opening it on the client side, a
        response or a trailer section otherwise)."""
        ...

    def send_data(self, stream_id: int, data: bytes | memoryview,
                  end_stream: bool = False) -> None:
        """One DATA frame; ``data`` fits ``local_flow_control_window`` and
        ``max_outbound_frame_size`` (the caller slices)."""
        ...

    def end_stream(self, stream_id: int) -> None:
        """An empty DATA frame with END_STREAM."""
        ...

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        """RST_STREAM with ``error_code``."""
        ...

    def local_flow_control_window(self, stream_id: int) -> int:
        """Bytes of DATA the stream may send now (the smaller of its own and
        the connection's send windows)."""
        ...

    @property
    def max_outbound_frame_size(self) -> int:
        """The peer's SETTINGS_MAX_FRAME_SIZE: the largest DATA payload."""
        ...

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        """DATA bytes (flow-controlled length) of the stream the consumer
        took: back to both the stream's and the connection's windows
        (WINDOW_UPDATEs once half a window is owed)."""
        ...

    def acknowledge_stream_data(self, n: int, stream_id: int) -> None:
        """``acknowledge_received_data`` for the stream's window only (its
        connection window came back when the bytes arrived). Nothing for a
        stream already closed."""
        ...

    def acknowledge_connection_data(self, n: int) -> None:
        """``acknowledge_received_data`` for the connection's window only:
        bytes of streams the peer has ended."""
        ...

    def close_connection(self, *, error_code: int = 0, last_stream_id: int | None = None,
                         ) -> None:
        """GOAWAY with ``error_code``; the codec refuses every later call
        (``closed`` is then True)."""
        ...

    def send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        """A GOAWAY that leaves the connection open: the streams up to
        ``last_stream_id`` still send and receive (a graceful drain's first
        GOAWAY, RFC 9113 6.8)."""
        ...

    @property
    def closed(self) -> bool:
        """The connection is closed on this side (GOAWAY sent by
        ``close_connection``, or a connection error): every call refuses."""
        ...

    def get_next_available_stream_id(self) -> int:
        """The id the next stream opened from this side gets; raises
        ``NoAvailableStreamIDError`` once they are used up."""
        ...

    @property
    def remote_max_concurrent_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited: 2**32 - 1
        until it says otherwise)."""
        ...

    # -- what tests ask to see that the bounds hold --

    @property
    def encoder_table_size(self) -> int:
        """The HPACK encoder's dynamic table size in use, in bytes."""
        ...

    def closed_streams_recorded(self) -> int:
        """How many closed streams' ends the codec remembers."""
        ...

    def streams_held(self) -> int:
        """How many streams the codec holds state for (open, or closed and
        not yet dropped)."""
        ...


#: ``[h2] engine``'s values.
ENGINES = ("auto", "nghttp2", "h2")

#: The environment variable that overrides ``[h2] engine`` (README: how CI
#: runs the HTTP/2 tests on both engines; an operator trying one without
#: editing the config).
ENGINE_ENV = "L5DPROXY_H2_ENGINE"

_resolved: dict[str, str] = {}


def resolve_engine(name: str) -> str:
    """The engine ``name`` (``[h2] engine``, or ``$L5DPROXY_H2_ENGINE`` when
    set) means here: ``"h2"`` or ``"nghttp2"``; ``"auto"`` is nghttp2 when
    libnghttp2 loads, else h2. Raises ``ValueError`` for an unknown name and
    ``nghttp2_abi.Nghttp2UnavailableError`` (saying what is missing) for
    ``"nghttp2"`` where it does not load."""
    name = os.environ.get(ENGINE_ENV) or name
    engine = _resolved.get(name)
    if engine is not None:
        return engine
    if name not in ENGINES:
        raise ValueError(f"unknown h2 engine {name!r} (one of {', '.join(ENGINES)})")
    engine = "h2"
    if name != "h2":
        from l5dproxy.http.h2.nghttp2_abi import Nghttp2UnavailableError, load

        try:
            load()
            engine = "nghttp2"
        except Nghttp2UnavailableError:
            if name == "nghttp2":
                raise
    _resolved[name] = engine
    return engine


def engine_at_start(name: str, source: str) -> str:
    """``resolve_engine`` for a proxy starting with the config file
    ``source``: a name that cannot be used here ends the start with one line
    naming the file, the key and why (``SystemExit``, as
    ``app.service.StartupError`` does)."""
    try:
        return resolve_engine(name)
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"l5dproxy: {source}: [h2] engine: {e}") from None


def describe_engine(engine: str) -> str:
    """``engine`` with its library's version, for the start-up log line."""
    if engine == "nghttp2":
        from l5dproxy.http.h2.nghttp2_abi import version

        return f"nghttp2 (libnghttp2 {version()} through cffi)"
    import h2

    return f"h2 ({h2.__version__}, pure Python)"


def server_codec(settings: H2Config) -> H2Codec:
    """A server-side codec advertising ``settings``' limits (SETTINGS queued:
    ``data_to_send`` has them), its connection window opened to
    ``connection_window_size``, on the engine ``settings.engine`` resolves
    to. It never refuses a stream for MAX_CONCURRENT_STREAMS itself (the
    server end answers REFUSED_STREAM), and takes header lists up to
    ``connection.server_header_list_cap`` so the end can answer 431 below
    that."""
    if resolve_engine(settings.engine) == "nghttp2":
        from l5dproxy.http.h2.nghttp2 import Nghttp2Codec

        return Nghttp2Codec.for_server(settings)
    from l5dproxy.http.h2.connection import ProxyH2Connection

    return ProxyH2Connection.for_server(settings)


def client_codec(settings: H2Config) -> H2Codec:
    """A client-side codec (push disabled, ``settings``' windows, a
    MAX_HEADER_LIST_SIZE of at least 64 KiB), SETTINGS queued."""
    if resolve_engine(settings.engine) == "nghttp2":
        from l5dproxy.http.h2.nghttp2 import Nghttp2Codec

        return Nghttp2Codec.for_client(settings)
    from l5dproxy.http.h2.connection import ProxyH2Connection

    return ProxyH2Connection.for_client(settings)
