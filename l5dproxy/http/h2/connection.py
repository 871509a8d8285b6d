"""h2's ``H2Connection`` as the proxy needs it (the ``h2`` engine of
``codec.H2Codec``), and h2's error codes.

``ProxyH2Connection`` is the one place that uses h2's private names (listed
in its docstring; ``tests/test_library_internals.py`` fails loudly if one
goes): a received GOAWAY only reports itself, the ends check header blocks
and body lengths, and what a connection keeps is bounded. ``_frame_cost``
tells the abuse budget what each received frame cost. Both ends configure
their connections with ``[h2]`` (``config.model.H2Config``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event
from h2.exceptions import StreamClosedError, StreamIDTooLowError
from h2.settings import SettingCodes, Settings
from h2.stream import H2Stream, StreamState
from hyperframe.frame import (
    DataFrame,
    ExtensionFrame,
    GoAwayFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from l5dproxy.http.h2.abuse import AbuseBudget

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

    from l5dproxy.config.model import H2Config

#: h2's largest stream id; the first GOAWAY of a graceful drain names it.
_MAX_STREAM_ID = 2**31 - 1

#: Header blocks the proxy sends are built by ``translate.py`` (names
#: lowercased, connection headers dropped) from heads a codec end has
#: already validated, so h2's per-field outbound checks, the largest cost
#: per stream after HPACK, are skipped. Inbound blocks are checked where
#: they are translated (``request_head_from_h2`` and its siblings, which
#: also join cookie crumbs), not by h2.
_H2_CONFIG = {"validate_outbound_headers": False, "normalize_outbound_headers": False,
              "validate_inbound_headers": False, "normalize_inbound_headers": False}


class StreamResetError(Exception):
    """The peer reset an HTTP/2 stream (a body fails with this)."""

    def __init__(self, code: int) -> None:
        self.code = _code(code)
        super().__init__(f"stream reset: {code_name(self.code)}")


def code_name(code: int) -> str:
    return code.name if isinstance(code, ErrorCodes) else str(code)


def _code(code: int) -> ErrorCodes | int:
    try:
        return ErrorCodes(code)
    except ValueError:
        return code


class _LengthBlindStream(H2Stream):
    """h2's stream without its own content-length check (h2 raises it as a
    connection error, and misses an end on HEADERS or on trailers): the
    proxy's ``Body`` enforces the declared length instead, as a stream error."""

    def _initialize_content_length(self, headers) -> None:
        self._expected_content_length = None


class _UncheckedStream(_LengthBlindStream):
    """A stream of a connection whose four header checks are all off (the
    proxy's, ``_H2_CONFIG``): h2 builds a ``HeaderValidationFlags`` for
    every block sent and received, read only by those checks, so none is
    built."""

    def _build_hdr_validation_flags(self, events):
        return None


#: Per ``StreamState`` (an IntEnum, 0-6): whether a stream in it counts
#: against the concurrent streams (RFC 9113 5.1.2: open or half-closed),
#: as h2's ``H2Stream.open`` says.
_COUNTS_AS_OPEN = tuple(state in (StreamState.OPEN, StreamState.HALF_CLOSED_LOCAL,
                                  StreamState.HALF_CLOSED_REMOTE)
                        for state in sorted(StreamState))
_CLOSED = StreamState.CLOSED


#: The HPACK dynamic table the proxy's encoders use at most, in bytes (the
#: RFC 7541 default). A peer may allow a larger one (SETTINGS_HEADER_TABLE_SIZE,
#: up to 4 GiB), but an encoder may always use less (RFC 7541 4.2, 6.3): a
#: table as large as the peer allows would keep every distinct field ever
#: sent on the connection, growing with its lifetime.
ENCODER_TABLE_SIZE = 4096

#: The fewest closed streams whose end a connection remembers (see
#: ``closed_streams_kept``).
MIN_CLOSED_STREAMS_KEPT = 128


def server_header_list_cap(settings: H2Config) -> int:
    """The largest request header list a server-side codec decodes, in
    bytes (RFC 9113 6.5.2's size): 4 times ``max_header_list_size``, at least
    256 KiB. Between the advertised size and this the server end answers
    431; past it the codec ends the connection (an HPACK bomb)."""
    return max(4 * settings.max_header_list_size, 256 * 1024)


def client_header_list_size(settings: H2Config) -> int:
    """SETTINGS_MAX_HEADER_LIST_SIZE a client-side codec advertises."""
    return max(settings.max_header_list_size, 64 * 1024)


def closed_streams_kept(settings: H2Config) -> int:
    """How many closed streams one connection remembers how they ended.

    RFC 9113 5.1 needs two things of a closed stream: that it is told from
    an idle one, which the highest stream id opened does for the whole
    history, and that frames the peer sent before it saw the stream end
    (DATA, WINDOW_UPDATE, RST_STREAM, trailers on a stream the proxy reset)
    are answered as stream errors or ignored rather than ending the
    connection. Those frames come within a round trip of the end, from
    streams that were open together, so the last ``max_concurrent_streams``
    ends (at least ``MIN_CLOSED_STREAMS_KEPT``) are enough; h2 itself keeps
    65,536 per connection, about 120 bytes each in Python. A frame for an
    older stream is still handled as h2 handles a closed stream whose end
    it forgot: DATA is answered RST_STREAM(STREAM_CLOSED) and its bytes
    given back to the connection window, WINDOW_UPDATE and RST_STREAM are
    ignored, HEADERS end the connection (PROTOCOL_ERROR), which RFC 9113
    5.1 allows for frames long after a stream closed.
    """
    return max(settings.max_concurrent_streams, MIN_CLOSED_STREAMS_KEPT)


class ProxyH2Connection(H2Connection):
    """h2's connection, except that a received GOAWAY leaves it open,
    received header blocks and body lengths are checked by the ends, and
    what it keeps does not grow with the connection's lifetime.

    Stock h2 goes CLOSED on a GOAWAY and then refuses every later frame,
    received or sent, even on streams the GOAWAY lets finish (a GOAWAY and
    a spared stream's DATA in one read became a connection error), and it
    drops the frames it had queued to send. Here the GOAWAY is only
    reported (``ConnectionTerminated``); the ends decide what it means.

    h2's inbound header validation is off in the configuration (a chain of
    generators looping over every byte in Python, and a malformed block is a
    connection error there, which would end every other stream of the
    connection): the ends check each block where they translate it
    (``request_head_from_h2``, ``response_head_from_h2``, ``trailers_from_h2``)
    and refuse a malformed one as a stream error (RFC 9113 8.1.1). For the
    same reason h2's content-length tracking is off (``_LengthBlindStream``):
    ``Body`` holds a stream's DATA to its content-length.

    h2 private names used, here only (``H2InternalsTests`` fails if they
    go): ``H2Connection._begin_new_stream``, ``_receive_frame`` (the abuse
    budget is told of each frame there), ``_receive_goaway_frame``,
    ``_inbound_flow_control_window_manager``, ``_prepare_for_sending``,
    ``MAX_CLOSED_STREAMS``, ``_closed_streams``, ``H2Stream.acknowledge_received_data``
    (through h2's ``streams`` map), ``H2Stream._initialize_content_length``
    and ``state_machine.state`` (``closed``); for CPU per stream only
    (h2's work, done the same way with less Python): ``_open_streams``,
    ``_get_or_create_stream``, ``_frame_dispatch_table``,
    ``_stream_is_closed_by_reset``, ``_stream_is_closed_by_end``,
    ``StreamClosedError._events``, ``H2Stream.state_machine`` and
    ``_build_hdr_validation_flags``.

    It is the ``h2`` engine of ``codec.H2Codec``: the ends use only what
    that names.

    State bounded per connection, whatever it carries over its life:

    * the record of how closed streams ended: h2 keeps the last
      ``MAX_CLOSED_STREAMS`` (65,536) in ``_closed_streams``; here the last
      ``closed_kept`` (``closed_streams_kept``);
    * the HPACK encoder's dynamic table: at most ``ENCODER_TABLE_SIZE``
      whatever the peer's SETTINGS_HEADER_TABLE_SIZE (the decoder's is ours,
      4096, h2's default);
    * h2's own stream map: h2 drops closed streams from it each time a new
      one opens, so it holds the open streams and those closed since.
    """

    #: The class of its streams: ``_UncheckedStream`` unless a header check is on.
    stream_class: type[H2Stream] = _LengthBlindStream

    def __init__(self, config: H2Configuration, closed_kept: int = MIN_CLOSED_STREAMS_KEPT,
                 ) -> None:
        # h2's __init__ sizes its closed-stream record by this attribute.
        self.MAX_CLOSED_STREAMS = closed_kept
        super().__init__(config)
        checks = (config.validate_outbound_headers or config.normalize_outbound_headers
                  or config.validate_inbound_headers or config.normalize_inbound_headers)
        self.stream_class = _LengthBlindStream if checks else _UncheckedStream

    @classmethod
    def for_server(cls, s: H2Config) -> ProxyH2Connection:
        """``codec.server_codec`` on h2."""
        checks: dict[str, Any] = _H2_CONFIG   # h2's own header checks: off (translate.py)
        h2 = cls(H2Configuration(client_side=False, header_encoding=None, **checks),
                 closed_streams_kept(s))
        advertised = {
            SettingCodes.MAX_CONCURRENT_STREAMS: s.max_concurrent_streams,
            SettingCodes.MAX_HEADER_LIST_SIZE: s.max_header_list_size,
            SettingCodes.INITIAL_WINDOW_SIZE: s.initial_window_size,
        }
        h2.local_settings = Settings(client=False, initial_values=advertised)
        h2.initiate_connection()
        if s.connection_window_size > 65535:
            h2.increment_flow_control_window(s.connection_window_size - 65535)
        # h2 would answer a stream over the limit with a connection-killing
        # GOAWAY; the server end answers REFUSED_STREAM itself, so h2's own
        # check gets a ceiling it never reaches. Headers past the advertised
        # size get a 431 rather than a GOAWAY, up to a hard cap.
        h2.local_settings = Settings(client=False, initial_values={
            **advertised, SettingCodes.MAX_CONCURRENT_STREAMS: _MAX_STREAM_ID})
        h2.decoder.max_header_list_size = server_header_list_cap(s)
        return h2

    @classmethod
    def for_client(cls, s: H2Config) -> ProxyH2Connection:
        """``codec.client_codec`` on h2."""
        checks: dict[str, Any] = _H2_CONFIG   # h2's own header checks: off (translate.py)
        h2 = cls(H2Configuration(client_side=True, header_encoding=None, **checks),
                 closed_streams_kept(s))
        h2.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: s.initial_window_size,
            SettingCodes.MAX_HEADER_LIST_SIZE: client_header_list_size(s),
        })
        h2.initiate_connection()
        if s.connection_window_size > 65535:
            h2.increment_flow_control_window(s.connection_window_size - 65535)
        return h2

    # -- codec.H2Codec's queries beyond h2's own API --

    @property
    def closed(self) -> bool:
        return self.state_machine.state is ConnectionState.CLOSED

    @property
    def remote_max_concurrent_streams(self) -> int:
        return self.remote_settings.max_concurrent_streams

    @property
    def encoder_table_size(self) -> int:
        return self.encoder.header_table_size

    def closed_streams_recorded(self) -> int:
        return len(self._closed_streams)

    def streams_held(self) -> int:
        return len(self.streams)

    def send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        """A raw GOAWAY frame: h2's ``close_connection`` would move the
        connection to CLOSED, refusing the frames of the streams it spares."""
        self._prepare_for_sending([GoAwayFrame(0, last_stream_id=last_stream_id,
                                               error_code=error_code)])

    def receive_data(self, data: Buffer) -> list[Event]:
        events = super().receive_data(data)
        # h2 applies a peer's SETTINGS_HEADER_TABLE_SIZE to the encoder as it
        # is received; nothing has been encoded since, so the smaller size
        # is what the next header block announces (a table size update).
        if self.encoder.header_table_size > ENCODER_TABLE_SIZE:
            self.encoder.header_table_size = ENCODER_TABLE_SIZE
        return events

    #: Told of each received frame that costs work and carries nothing
    #: (``_frame_cost``); set by the protocol end.
    budget: AbuseBudget | None = None

    def _receive_frame(self, frame):
        """h2's ``_receive_frame`` (4.x) line for line, less its
        ``logger.trace("Received frame: %s", repr(frame))``: the repr was
        built for every frame whether anything traced or not (about 4 % of
        the proxy's CPU per h2 request). Then the abuse budget is told."""
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # Closed by RST_STREAM: a stream error; else a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            # A stream h2 has forgotten: closed by RST_STREAM is a stream
            # error, by END_STREAM or implicitly a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        budget = self.budget
        if budget is not None:
            kind = _frame_cost(frame, events)
            if kind is not None:
                budget.spend(kind)
        return events

    def _open_streams(self, remainder: int) -> int:
        """h2's count of open streams with ``stream_id % 2 == remainder``,
        dropping closed streams from ``streams`` into ``_closed_streams`` as
        it goes, without a property call per stream: h2 runs it for every
        new stream over every stream the connection holds (a hundred on a
        busy upstream connection)."""
        count = 0
        closed = None
        counts = _COUNTS_AS_OPEN
        for stream_id, stream in self.streams.items():
            state = stream.state_machine.state
            if counts[state]:
                if stream_id % 2 == remainder:
                    count += 1
            elif state == _CLOSED:
                if closed is None:
                    closed = [stream_id]
                else:
                    closed.append(stream_id)
        if closed is not None:
            streams = self.streams
            record = self._closed_streams
            for stream_id in closed:
                record[stream_id] = streams.pop(stream_id).closed_by
        return count

    def _get_or_create_stream(self, stream_id, allowed_ids):
        # h2's, without raising and catching a KeyError for every new stream.
        stream = self.streams.get(stream_id)
        if stream is None:
            return self._begin_new_stream(stream_id, allowed_ids)
        return stream

    def _begin_new_stream(self, stream_id, allowed_ids):
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = self.stream_class
        return stream

    def acknowledge_stream_data(self, n: int, stream_id: int) -> None:
        """``acknowledge_received_data`` for the stream window only: bytes
        whose connection window was given back when they arrived (held for
        a paused consumer). Nothing for a stream already closed."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.open:
            self._prepare_for_sending(stream.acknowledge_received_data(n))

    def acknowledge_connection_data(self, n: int) -> None:
        """``acknowledge_received_data`` for the connection window only: the
        bytes of streams the peer has ended, whose own windows no longer matter."""
        increment = self._inbound_flow_control_window_manager.process_bytes(n)
        if increment:
            frame = WindowUpdateFrame(0)
            frame.window_increment = increment
            self._prepare_for_sending([frame])

    def _receive_goaway_frame(self, frame: GoAwayFrame):
        event = ConnectionTerminated()
        event.error_code = _code(frame.error_code)
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


def _frame_cost(frame, events) -> str | None:
    """The ``AbuseBudget`` kind a received frame spends a point on, or None
    for a frame that carries something (a request, data, a window a stream
    is waiting for, the end of a stream). PING and SETTINGS are answered
    with an ACK, PRIORITY is not used, an empty DATA frame without
    END_STREAM moves nothing, and a frame h2 turned into no event (a
    WINDOW_UPDATE, RST_STREAM or DATA on a stream already closed, an
    unknown frame type) had no effect."""
    cls = type(frame)
    if cls is DataFrame:
        if not events:
            return "no_effect"
        if not frame.data and "END_STREAM" not in frame.flags:
            return "empty_data"
        return None
    if cls is PingFrame:
        return "ping"
    if cls is SettingsFrame:
        return None if "ACK" in frame.flags else "settings"
    if cls is PriorityFrame:
        return "priority"
    if cls is ExtensionFrame:
        return "no_effect"
    if not events and (cls is WindowUpdateFrame or cls is RstStreamFrame):
        return "no_effect"
    return None
