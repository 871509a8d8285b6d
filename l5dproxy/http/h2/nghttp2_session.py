"""The session under the ``nghttp2`` codec engine: libnghttp2's callbacks as
h2 events, the read fed to it one frame at a time, the bytes it writes.

``Session`` is the receiving half of ``nghttp2.Nghttp2Codec`` (which adds
the calls that send); see that module for what the engine promises.
"""

from __future__ import annotations

import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    InformationalResponseReceived,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError
from h2.settings import ChangedSetting, SettingCodes

from l5dproxy.http.h2.connection import (
    _MAX_STREAM_ID,
    ENCODER_TABLE_SIZE,
    _code,
    closed_streams_kept,
    server_header_list_cap,
)
from l5dproxy.http.h2.nghttp2_abi import load

if TYPE_CHECKING:
    from l5dproxy.config.model import H2Config
    from l5dproxy.http.h2.abuse import AbuseBudget

# nghttp2.h constants.
_ERR_DEFERRED = -508
_ERR_CALLBACK_FAILURE = -902
_DATA_FLAG_EOF = 0x01
_DATA_FLAG_NO_END_STREAM = 0x02
_END_STREAM = 0x01
_ACK = 0x01
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, SETTINGS_FRAME = 0, 1, 2, 3, 4
_PING, GOAWAY_FRAME, _WINDOW_UPDATE, _CONTINUATION = 6, 7, 8, 9
#: Frame types past this are extensions (h2's ``ExtensionFrame``; 0xa is ALTSVC).
_LAST_KNOWN_TYPE = 0xA
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
#: The client connection preface (RFC 9113 3.4), before the server's first frame.
MAGIC_LENGTH = 24
#: PING and SETTINGS ACKs nghttp2 may queue unsent before it calls the peer a
#: flood (its default is 1,000): high enough that one read's worth of them
#: (at most 64 KiB) reaches the abuse budget, which answers ENHANCE_YOUR_CALM.
_MAX_OUTBOUND_ACK = 8192
_UNLIMITED = 2**63
#: nghttp2's library error codes of a stream error, as RST_STREAM codes.
_STREAM_ERRORS = {-524: ErrorCodes.FLOW_CONTROL_ERROR, -533: ErrorCodes.REFUSED_STREAM,
                  -510: ErrorCodes.STREAM_CLOSED}


class Stream:
    """What the codec keeps of one open stream."""

    __slots__ = ("chunks", "end_out", "fields", "head_in", "head_out", "out", "providing",
                 "queued", "reset", "size", "trailers", "waiting")

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] | None = None   # a header block coming in
        self.size = 0                       # its header list size so far
        self.head_in = False                # the request's or final response's head came
        self.head_out = False               # ours was submitted
        self.chunks: list[bytes] = []       # the DATA frame coming in
        self.out: deque[memoryview | bytes] = deque()   # DATA to send, pulled by nghttp2
        self.queued = 0                     # bytes in ``out``
        self.end_out = False                # END_STREAM after ``out`` (and trailers)
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.providing = False              # a data provider is attached and not at EOF
        self.waiting = False                # the provider is deferred: resume it
        self.reset = False                  # reset by either side: its close is known


class Session:
    """One libnghttp2 session, driven in memory: what it receives becomes
    h2 events (``receive_data``), what it queued becomes bytes (``data_to_send``)."""

    budget: AbuseBudget | None = None

    def __init__(self, server: bool, settings: H2Config) -> None:
        ffi, lib = load()
        self._ffi = ffi
        self._lib = lib
        self._server = server
        self._events: list[Event] = []
        self._streams: dict[int, Stream] = {}
        #: stream id -> None: the last ``closed_streams_kept`` streams closed.
        self._closed_ends: dict[int, None] = {}
        self._closed_kept = closed_streams_kept(settings)
        self._header_cap = server_header_list_cap(settings) if server else 1 << 30
        self._queued = 0                   # bytes in every stream's ``out``
        self._prefix: list[bytes] = []     # bytes to send before nghttp2's next
        self._closed = False
        self._goaway_last: int | None = None   # the peer's GOAWAY's last stream id
        self._last_peer = 0                # highest stream id the peer opened
        self._remote: dict[int, int] = {}  # the peer's SETTINGS so far
        # Frame-by-frame reading: bytes to the end of the preface, of the
        # current frame's header (or its start, buffered) or its payload.
        self._magic_left = MAGIC_LENGTH if server else 0
        self._head = b""
        self._payload_left = 0
        self._frame: tuple[int, int, int] | None = None   # type, flags, stream id
        self._made = 0                     # events before the current frame
        self._data_empty = False
        self._error: BaseException | None = None
        self._sendp = ffi.new("const char **")
        self._make_session(settings)

    # -- construction --

    def _make_session(self, settings: H2Config) -> None:
        ffi, lib = self._ffi, self._lib
        cb = self._callbacks()
        self._keep = cb     # the C callbacks live as long as the session
        cbsp = ffi.new("nghttp2_session_callbacks **")
        self._check(lib.nghttp2_session_callbacks_new(cbsp))
        cbs = cbsp[0]
        optp = ffi.new("nghttp2_option **")
        try:
            lib.nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, cb[0])
            lib.nghttp2_session_callbacks_set_on_header_callback(cbs, cb[1])
            lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, cb[2])
            lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, cb[3])
            lib.nghttp2_session_callbacks_set_on_stream_close_callback(cbs, cb[4])
            lib.nghttp2_session_callbacks_set_on_invalid_frame_recv_callback(cbs, cb[6])
            self._check(lib.nghttp2_option_new(optp))
            opt = optp[0]
            lib.nghttp2_option_set_no_auto_window_update(opt, 1)
            lib.nghttp2_option_set_no_http_messaging(opt, 1)
            lib.nghttp2_option_set_no_closed_streams(opt, 1)
            lib.nghttp2_option_set_max_deflate_dynamic_table_size(opt, ENCODER_TABLE_SIZE)
            lib.nghttp2_option_set_max_outbound_ack(opt, _MAX_OUTBOUND_ACK)
            # nghttp2's own rapid-reset limit (1,000 RST_STREAMs, then
            # GOAWAY INTERNAL_ERROR) would pre-empt the abuse budget's
            # ENHANCE_YOUR_CALM within one read: the budget is the rule.
            set_limit = getattr(lib, "nghttp2_option_set_stream_reset_rate_limit", None)
            if set_limit is not None:
                set_limit(opt, _UNLIMITED, _UNLIMITED)
            sessp = ffi.new("nghttp2_session **")
            new = (lib.nghttp2_session_server_new2 if self._server
                   else lib.nghttp2_session_client_new2)
            self._check(new(sessp, cbs, ffi.NULL, opt))
        finally:
            if optp[0] != ffi.NULL:
                lib.nghttp2_option_del(optp[0])
            lib.nghttp2_session_callbacks_del(cbs)
        self._session = ffi.gc(sessp[0], lib.nghttp2_session_del)
        self._provider = ffi.new("nghttp2_data_provider *")
        self._provider.read_callback = cb[5]

    def _callbacks(self) -> list[Any]:
        """The C callbacks, closures over this codec's state. They hold the
        codec weakly: the session (C memory, ~20 KiB) is freed as soon as the
        codec is dropped, not at the next cyclic garbage collection."""
        me = weakref.proxy(self)
        ffi = self._ffi
        unpack = ffi.unpack
        streams = self._streams
        server = self._server

        def failed(exc_type, exc, tb) -> None:
            if me._error is None:
                me._error = exc

        # The stream whose header block is being received (nghttp2 reads one
        # block at a time: CONTINUATIONs cannot interleave, RFC 9113 6.10).
        current: Stream | None = None
        cap = me._header_cap

        def on_begin_headers(session, frame, user_data):
            nonlocal current
            sid = frame.hd.stream_id
            st = streams.get(sid)
            if st is None:
                current = None
                if not server or sid <= me._last_peer:
                    return 0
                me._last_peer = sid
                st = streams[sid] = Stream()
            st.fields = []
            st.size = 0
            current = st
            return 0

        def on_header(session, frame, name, namelen, value, valuelen, flags, user_data):
            st = current
            if st is None or st.fields is None:
                return 0
            st.size += namelen + valuelen + 32
            if st.size > cap:   # an HPACK bomb: h2's DenialOfServiceError
                st.fields = None
                me._terminate(ErrorCodes.ENHANCE_YOUR_CALM)
                return 0
            st.fields.append((unpack(name, namelen), unpack(value, valuelen)))
            return 0

        def on_frame_recv(session, frame, user_data):
            hd = frame.hd
            kind = hd.type
            sid = hd.stream_id
            if kind == _DATA:
                st = streams.get(sid)
                if st is not None:
                    chunks = st.chunks
                    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                    st.chunks = []
                    me._data_empty = not data
                    ev = DataReceived(stream_id=sid, data=data,
                                      flow_controlled_length=hd.length)
                    me._events.append(ev)
                    if hd.flags & _END_STREAM:
                        ended = StreamEnded(stream_id=sid)
                        ev.stream_ended = ended
                        me._events.append(ended)
            elif kind == _HEADERS:
                me._on_headers(sid, hd.flags)
            elif kind == _WINDOW_UPDATE:
                if sid == 0 or sid in streams:
                    me._events.append(WindowUpdated(
                        stream_id=sid, delta=frame.window_update.window_size_increment))
            elif kind == _RST_STREAM:
                st = streams.get(sid)
                if st is not None and not st.reset:
                    st.reset = True
                    me._events.append(StreamReset(
                        stream_id=sid, error_code=_code(frame.rst_stream.error_code)))
            elif kind == SETTINGS_FRAME:
                if not hd.flags & _ACK:
                    me._on_settings(frame.settings)
            elif kind == GOAWAY_FRAME:
                g = frame.goaway
                term = ConnectionTerminated()
                term.error_code = _code(g.error_code)
                term.last_stream_id = me._goaway_last = g.last_stream_id
                term.additional_data = (unpack(g.opaque_data, g.opaque_data_len)
                                        if g.opaque_data_len else None)
                me._events.append(term)
            return 0

        def on_data_chunk(session, flags, stream_id, data, length, user_data):
            st = streams.get(stream_id)
            if st is not None:
                st.chunks.append(unpack(data, length))
            return 0

        def on_stream_close(session, stream_id, error_code, user_data):
            st = streams.pop(stream_id, None)
            if st is None:
                return 0
            me._queued -= st.queued
            closed = me._closed_ends
            closed[stream_id] = None
            if len(closed) > me._closed_kept:
                del closed[next(iter(closed))]
            last = me._goaway_last
            if error_code and not st.reset and (last is None or stream_id <= last):
                # nghttp2 ended it on its own (a stream error it found).
                me._events.append(StreamReset(stream_id=stream_id,
                                                error_code=_code(error_code),
                                                remote_reset=False))
            return 0

        def on_invalid_frame(session, frame, lib_error_code, user_data):
            # A stream error nghttp2 found (its RST_STREAM is queued): the
            # frame had an effect, reported now as the h2 engine does.
            sid = frame.hd.stream_id
            st = streams.get(sid)
            if st is not None and not st.reset:
                st.reset = True
                me._events.append(StreamReset(
                    stream_id=sid, remote_reset=False,
                    error_code=_STREAM_ERRORS.get(lib_error_code, ErrorCodes.PROTOCOL_ERROR)))
            return 0

        def read_body(session, stream_id, buf, length, data_flags, source, user_data):
            st = streams.get(stream_id)
            if st is None:
                data_flags[0] |= _DATA_FLAG_EOF
                return 0
            out = st.out
            n = 0
            while out and n < length:
                chunk = out[0]
                k = len(chunk)
                if k <= length - n:
                    out.popleft()
                else:
                    k = length - n
                    out[0] = chunk[k:]
                    chunk = chunk[:k]
                ffi.memmove(buf + n, chunk, k)
                n += k
            st.queued -= n
            me._queued -= n
            if not out:
                if st.end_out:
                    st.providing = False
                    trailers = st.trailers
                    if trailers is not None:
                        st.trailers = None
                        data_flags[0] |= _DATA_FLAG_EOF | _DATA_FLAG_NO_END_STREAM
                        nva = me._nva(trailers)
                        me._check(me._lib.nghttp2_submit_trailer(
                            session, stream_id, nva, len(trailers)))
                    else:
                        data_flags[0] |= _DATA_FLAG_EOF
                elif n == 0:
                    st.waiting = True
                    return _ERR_DEFERRED
            return n

        def c(ctype: str, fn):
            return ffi.callback(ctype, fn, error=_ERR_CALLBACK_FAILURE, onerror=failed)

        return [c("nghttp2_on_begin_headers_callback", on_begin_headers),
                c("nghttp2_on_header_callback", on_header),
                c("nghttp2_on_frame_recv_callback", on_frame_recv),
                c("nghttp2_on_data_chunk_recv_callback", on_data_chunk),
                c("nghttp2_on_stream_close_callback", on_stream_close),
                c("nghttp2_data_source_read_callback", read_body),
                c("nghttp2_on_invalid_frame_recv_callback", on_invalid_frame)]

    # -- receiving --

    def _on_headers(self, sid: int, flags: int) -> None:
        st = self._streams.get(sid)
        if st is None or st.fields is None:
            return
        fields, st.fields = st.fields, None
        end = flags & _END_STREAM
        ev: Any
        if not st.head_in:
            if not self._server and fields and fields[0][0] == b":status" and \
                    fields[0][1][:1] == b"1":
                self._events.append(InformationalResponseReceived(
                    stream_id=sid, headers=fields))
                return
            st.head_in = True
            if self._server:
                ev = RequestReceived(stream_id=sid, headers=fields)
            else:
                ev = ResponseReceived(stream_id=sid, headers=fields)
        elif not end:   # h2: "Trailers must have END_STREAM set", a connection error
            self._terminate(ErrorCodes.PROTOCOL_ERROR)
            return
        else:
            ev = TrailersReceived(stream_id=sid, headers=fields)
        self._events.append(ev)
        if end:
            ended = StreamEnded(stream_id=sid)
            ev.stream_ended = ended
            self._events.append(ended)

    def _on_settings(self, settings: Any) -> None:
        ev = RemoteSettingsChanged()
        changed = {}
        remote = self._remote
        for i in range(settings.niv):
            entry = settings.iv[i]
            code: SettingCodes | int
            try:
                code = SettingCodes(entry.settings_id)
            except ValueError:
                code = entry.settings_id
            changed[code] = ChangedSetting(code, remote.get(entry.settings_id),
                                           entry.value)
            remote[entry.settings_id] = entry.value
        ev.changed_settings = changed
        self._events.append(ev)

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed the peer's bytes to nghttp2 one whole frame at a time (a
        frame cut by the read's end is finished by the next read), so
        that each frame is seen before nghttp2 reads it (``_closed_stream``)
        and its cost known after (``_spend``)."""
        if self._closed:
            return []
        if not isinstance(data, bytes):
            data = bytes(data)
        events = self._events = []
        recv = self._lib.nghttp2_session_mem_recv
        session = self._session
        buf = self._ffi.from_buffer(data)
        n = len(data)
        pos = 0
        if self._magic_left:
            pos = min(self._magic_left, n)
            self._fed(recv(session, buf, pos))
            self._magic_left -= pos
        if self._frame is not None or self._head:
            pos = self._continue(data, buf, pos)
        streams = self._streams
        while pos < n:
            if n - pos < 9:   # a frame header cut by the read's end
                self._head = data[pos:]
                self._fed(recv(session, buf + pos, n - pos))
                break
            kind = data[pos + 3]
            sid = int.from_bytes(data[pos + 5:pos + 9], "big") & _MAX_STREAM_ID
            end = pos + 9 + ((data[pos] << 16) | (data[pos + 1] << 8) | data[pos + 2])
            if kind <= _HEADERS and sid and sid not in streams:
                self._closed_stream(kind, sid)
            made = len(events)
            if end > n:   # its payload goes on in the next read
                self._frame = (kind, data[pos + 4], sid)
                self._made = made
                self._payload_left = end - n
                self._fed(recv(session, buf + pos, n - pos))
                break
            rv = recv(session, buf + pos, end - pos)
            if rv < 0:
                self._fed(rv)
            if kind != _HEADERS and kind != _CONTINUATION:
                self._spend(kind, data[pos + 4], len(events) > made)
            pos = end
        self.data_to_send_early()
        return events

    def _continue(self, data: bytes, buf: Any, pos: int) -> int:
        """Finish the frame an earlier read began: the rest of its header,
        then of its payload. Returns where the next frame starts."""
        recv = self._lib.nghttp2_session_mem_recv
        session = self._session
        n = len(data)
        if self._frame is None:
            head = self._head
            take = min(9 - len(head), n - pos)
            head += data[pos:pos + take]
            self._fed(recv(session, buf + pos, take))
            pos += take
            if len(head) < 9:
                self._head = head
                return n
            self._head = b""
            kind = head[3]
            sid = int.from_bytes(head[5:9], "big") & _MAX_STREAM_ID
            if kind <= _HEADERS and sid and sid not in self._streams:
                self._closed_stream(kind, sid)
            self._frame = (kind, head[4], sid)
            self._made = len(self._events)
            self._payload_left = int.from_bytes(head[0:3], "big")
        else:
            self._made = 0   # this read's events are all after the frame began
        k = min(self._payload_left, n - pos)
        if k:
            self._fed(recv(session, buf + pos, k))
            pos += k
            self._payload_left -= k
        if not self._payload_left:
            kind, flags, _sid = self._frame
            self._frame = None
            if kind != _HEADERS and kind != _CONTINUATION:
                self._spend(kind, flags, len(self._events) > self._made)
        return pos

    def _closed_stream(self, kind: int, sid: int) -> None:
        """DATA or HEADERS on a stream the codec does not have open: on a
        closed stream (not idle) answered as the ``h2`` engine does."""
        if (sid & 1) == (not self._server):   # our own stream ids
            idle = sid >= self._lib.nghttp2_session_get_next_stream_id(self._session)
        else:
            idle = sid > self._last_peer
        if idle:
            return   # a new stream (the peer's), or nghttp2's connection error
        if kind == _DATA or sid in self._closed_ends:
            self._lib.nghttp2_submit_rst_stream(self._session, 0, sid, ErrorCodes.STREAM_CLOSED)
        else:   # HEADERS on a stream closed and forgotten (RFC 9113 5.1)
            self._terminate(ErrorCodes.PROTOCOL_ERROR)

    def _spend(self, kind: int, flags: int, made: bool) -> None:
        """A whole frame was read: tell the budget what it cost
        (``connection._frame_cost``'s kinds; no event: no effect)."""
        budget = self.budget
        if budget is None:
            return
        cost = None
        if kind == _DATA:
            if not made:
                cost = "no_effect"
            elif self._data_empty and not flags & _END_STREAM:
                cost = "empty_data"
        elif kind == _PING:
            cost = "ping"
        elif kind == SETTINGS_FRAME:
            cost = None if flags & _ACK else "settings"
        elif kind == _PRIORITY:
            cost = "priority"
        elif kind > _LAST_KNOWN_TYPE or (not made and kind in (_WINDOW_UPDATE, _RST_STREAM)):
            cost = "no_effect"
        if cost is not None:
            budget.spend(cost)

    def _fed(self, rv: int) -> None:
        """A fatal error of ``nghttp2_session_mem_recv`` (a flood it caught,
        too many CONTINUATIONs, a callback that raised) ends the connection
        as a connection error does: a GOAWAY, then ``ProtocolError``."""
        if rv < 0:
            self._closed = True
            error, self._error = self._error, None
            self._lib.nghttp2_session_terminate_session2(
                self._session, self._lib.nghttp2_session_get_last_proc_stream_id(self._session),
                ErrorCodes.ENHANCE_YOUR_CALM if rv in (-904, -905) else ErrorCodes.PROTOCOL_ERROR)
            raise ProtocolError(f"nghttp2: {self._strerror(rv)}") from error

    def data_to_send_early(self) -> None:
        """Take what the read queued (ACKs, WINDOW_UPDATEs, a GOAWAY): a
        session that has sent its last GOAWAY wants no more reads, which is
        how a connection error nghttp2 found shows."""
        out = self.data_to_send()
        if out:
            self._prefix.append(out)
        if not self._closed and not self._lib.nghttp2_session_want_read(self._session) \
                and self._goaway_last is None:
            self._closed = True
            raise ProtocolError("nghttp2 ended the connection (a protocol error of the peer's)")

    def _terminate(self, code: int) -> None:
        self._lib.nghttp2_session_terminate_session2(
            self._session, self._lib.nghttp2_session_get_last_proc_stream_id(self._session),
            code)

    # -- sending --

    def data_to_send(self) -> bytes:
        chunks, self._prefix = self._prefix, []
        lib, session, p, buffer = self._lib, self._session, self._sendp, self._ffi.buffer
        while True:
            n = lib.nghttp2_session_mem_send(session, p)
            if n <= 0:
                if n < 0:
                    self._fed(n)
                break
            chunks.append(buffer(p[0], n)[:])
        if not chunks:
            return b""
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _nva(self, headers: list[tuple[bytes, bytes]]) -> Any:
        """An ``nghttp2_nv[]`` for a header block; nghttp2 copies it when
        the block is submitted, so the buffers need only outlive the call."""
        from_buffer = self._ffi.from_buffer
        return self._ffi.new("nghttp2_nv[]", [
            (from_buffer(name), from_buffer(value), len(name), len(value), 0)
            for name, value in headers])

    # -- errors --

    def _strerror(self, rv: int) -> str:
        return self._ffi.string(self._lib.nghttp2_strerror(rv)).decode()

    def _check(self, rv: int) -> int:
        if rv < 0:
            error, self._error = self._error, None
            raise ProtocolError(f"nghttp2: {self._strerror(rv)} ({rv})") from error
        return rv

