"""The ``nghttp2`` engine of ``codec.H2Codec``: libnghttp2 (C) through cffi.

``Nghttp2Codec`` drives one libnghttp2 session in memory
(``nghttp2_session_mem_recv`` / ``_mem_send``) and speaks the same
vocabulary as the ``h2`` engine (``connection.ProxyH2Connection``): h2's
event classes out, h2's exceptions for refusals, so the ends cannot tell
them apart. It behaves as the ``h2`` engine does where the proxy relies on
it:

* nghttp2's HTTP messaging checks are off (``no_http_messaging``): the ends
  check each header block in ``translate.py`` and answer a malformed
  request with its 400 or stream reset, and ``Body`` holds DATA to the
  declared content-length;
* no automatic WINDOW_UPDATE: DATA is given back
  (``nghttp2_session_consume*``) as the ends acknowledge it;
* the HPACK encoder's table is at most ``ENCODER_TABLE_SIZE``
  (``max_deflate_dynamic_table_size``); nghttp2 keeps no closed streams
  (``no_closed_streams``); the codec remembers the ends of the last
  ``closed_streams_kept`` streams, as the ``h2`` engine does, to answer
  frames on them: DATA gets RST_STREAM(STREAM_CLOSED) (its bytes go back
  to the connection window: nghttp2 counts ignored DATA as consumed),
  trailers on a remembered stream get RST_STREAM(STREAM_CLOSED), HEADERS
  on a stream closed and forgotten end the connection (PROTOCOL_ERROR);
* every received frame is seen whole (the read is fed to nghttp2 one
  frame at a time), so the abuse budget is told of each with the same
  kinds as ``connection._frame_cost``: a frame that made no event had no
  effect;
* the server never refuses a stream for MAX_CONCURRENT_STREAMS itself (the
  server end answers REFUSED_STREAM): nghttp2's own limit stays unlimited,
  and the advertised value is an entry added to the SETTINGS frame it writes;
* a received GOAWAY only reports itself (``ConnectionTerminated``): the
  streams it spares carry on; the drain's GOAWAY (``send_goaway``) is a raw
  frame nghttp2 does not know of, so it keeps serving the streams it spares.

Costs beyond h2's: none per byte; per frame a C call and the callbacks
(begin headers, one per header field, frame received, data chunk, stream
closed), and per DATA frame sent a pull through the data provider.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from h2.exceptions import NoAvailableStreamIDError, ProtocolError, StreamClosedError

from l5dproxy.http.h2.connection import _MAX_STREAM_ID, client_header_list_size
from l5dproxy.http.h2.nghttp2_session import (
    GOAWAY_FRAME,
    INITIAL_WINDOW_SIZE,
    MAGIC_LENGTH,
    MAX_CONCURRENT_STREAMS,
    MAX_FRAME_SIZE,
    SETTINGS_FRAME,
    Session,
    Stream,
)

if TYPE_CHECKING:
    from l5dproxy.config.model import H2Config


class Nghttp2Codec(Session):
    """One HTTP/2 connection's frames on libnghttp2 (``codec.H2Codec``)."""

    @classmethod
    def for_server(cls, s: H2Config) -> Nghttp2Codec:
        """``codec.server_codec`` on libnghttp2."""
        codec = cls(True, s)
        codec._start([(INITIAL_WINDOW_SIZE, s.initial_window_size),
                      (0x6, s.max_header_list_size)],
                     s.connection_window_size,
                     advertised=(MAX_CONCURRENT_STREAMS, s.max_concurrent_streams))
        return codec

    @classmethod
    def for_client(cls, s: H2Config) -> Nghttp2Codec:
        """``codec.client_codec`` on libnghttp2."""
        codec = cls(False, s)
        codec._start([(0x2, 0), (INITIAL_WINDOW_SIZE, s.initial_window_size),
                      (0x6, client_header_list_size(s))], s.connection_window_size)
        return codec

    def _start(self, entries: list[tuple[int, int]], connection_window: int,
               advertised: tuple[int, int] | None = None) -> None:
        ffi, lib, session = self._ffi, self._lib, self._session
        iv = ffi.new("nghttp2_settings_entry[]", entries)
        self._check(lib.nghttp2_submit_settings(session, 0, iv, len(entries)))
        if connection_window > 65535:
            self._check(lib.nghttp2_session_set_local_window_size(
                session, 0, 0, connection_window))
        if advertised is None:
            return
        # The SETTINGS frame gets one more entry that nghttp2 does not
        # enforce (its own stays at "unlimited"); the peer ACKs the frame whole.
        out = self.data_to_send()
        start = 0 if self._server else MAGIC_LENGTH
        length = int.from_bytes(out[start:start + 3], "big")
        if out[start + 3] != SETTINGS_FRAME:
            raise RuntimeError("nghttp2's first frame is not SETTINGS")
        entry = advertised[0].to_bytes(2, "big") + advertised[1].to_bytes(4, "big")
        self._prefix.append(out[:start] + (length + 6).to_bytes(3, "big")
                            + out[start + 3:start + 9 + length] + entry
                            + out[start + 9 + length:])

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise ProtocolError("the connection is closed")

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                     end_stream: bool = False) -> None:
        self._refuse_if_closed()
        lib, ffi, session = self._lib, self._ffi, self._session
        st = self._streams.get(stream_id)
        provider = ffi.NULL if end_stream else self._provider
        if st is None:   # a request opening a stream
            if self._server or stream_id != lib.nghttp2_session_get_next_stream_id(session):
                raise StreamClosedError(stream_id)
            st = Stream()
            nva = self._nva(headers)
            sid = self._check(lib.nghttp2_submit_request(
                session, ffi.NULL, nva, len(headers), provider, ffi.NULL))
            if sid != stream_id:
                raise ProtocolError(f"nghttp2 opened stream {sid}, not {stream_id}")
            self._streams[sid] = st
        elif st.reset:
            raise StreamClosedError(stream_id)
        elif not st.head_out:   # a response
            nva = self._nva(headers)
            self._check(lib.nghttp2_submit_response(session, stream_id, nva, len(headers),
                                                    provider))
        else:   # trailers: after the DATA still queued, ending the stream
            if not end_stream or not st.providing or st.end_out:
                raise StreamClosedError(stream_id)
            st.trailers = headers
            st.end_out = True
            self._resume(stream_id, st)
            return
        st.head_out = True
        st.providing = not end_stream
        st.end_out = end_stream

    def send_data(self, stream_id: int, data: bytes | memoryview,
                  end_stream: bool = False) -> None:
        self._refuse_if_closed()
        st = self._streams.get(stream_id)
        if st is None or not st.providing or st.end_out or st.reset:
            raise StreamClosedError(stream_id)
        n = len(data)
        if n:
            st.out.append(data)
            st.queued += n
            self._queued += n
        if end_stream:
            st.end_out = True
        self._resume(stream_id, st)

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def _resume(self, stream_id: int, st: Stream) -> None:
        if st.waiting:
            st.waiting = False
            self._check(self._lib.nghttp2_session_resume_data(self._session, stream_id))

    def reset_stream(self, stream_id: int, error_code: int = 0) -> None:
        self._refuse_if_closed()
        st = self._streams.get(stream_id)
        if st is None or st.reset:
            raise StreamClosedError(stream_id)
        # What was submitted before goes out before the RST_STREAM, as with
        # h2 (nghttp2 sends RST_STREAM first and drops the stream's pending
        # frames: a response's HEADERS ending the stream would be lost).
        self._hold_output()
        st.reset = True
        st.out.clear()
        self._queued -= st.queued
        st.queued = 0
        self._check(self._lib.nghttp2_submit_rst_stream(self._session, 0, stream_id,
                                                        int(error_code)))

    def _hold_output(self) -> None:
        """Serialize what is submitted now (kept for ``data_to_send``)."""
        out = self.data_to_send()
        if out:
            self._prefix.append(out)

    def local_flow_control_window(self, stream_id: int) -> int:
        st = self._streams.get(stream_id)
        if st is None:
            raise StreamClosedError(stream_id)
        lib, session = self._lib, self._session
        window = lib.nghttp2_session_get_stream_remote_window_size(session, stream_id)
        if window < 0:   # a request whose HEADERS nghttp2 has not sent yet
            window = lib.nghttp2_session_get_remote_settings(session, INITIAL_WINDOW_SIZE)
        return min(window - st.queued,
                   lib.nghttp2_session_get_remote_window_size(session) - self._queued)

    @property
    def max_outbound_frame_size(self) -> int:
        return self._lib.nghttp2_session_get_remote_settings(self._session, MAX_FRAME_SIZE)

    def acknowledge_received_data(self, acknowledged_size: int, stream_id: int) -> None:
        if acknowledged_size:
            self._lib.nghttp2_session_consume(self._session, stream_id, acknowledged_size)

    def acknowledge_stream_data(self, n: int, stream_id: int) -> None:
        if n and stream_id in self._streams:
            self._lib.nghttp2_session_consume_stream(self._session, stream_id, n)

    def acknowledge_connection_data(self, n: int) -> None:
        if n:
            self._lib.nghttp2_session_consume_connection(self._session, n)

    def close_connection(self, *, error_code: int = 0, last_stream_id: int | None = None,
                         ) -> None:
        self._refuse_if_closed()
        self._hold_output()   # frames submitted before go out before the GOAWAY
        self._closed = True
        lib, session = self._lib, self._session
        if last_stream_id is None:
            last_stream_id = lib.nghttp2_session_get_last_proc_stream_id(session)
        self._check(lib.nghttp2_session_terminate_session2(session, last_stream_id,
                                                           int(error_code)))

    def send_goaway(self, last_stream_id: int, error_code: int = 0) -> None:
        out = self.data_to_send()
        frame = (b"\x00\x00\x08" + bytes((GOAWAY_FRAME, 0)) + b"\x00\x00\x00\x00"
                 + last_stream_id.to_bytes(4, "big") + int(error_code).to_bytes(4, "big"))
        self._prefix.append(out + frame)

    @property
    def closed(self) -> bool:
        return self._closed

    def get_next_available_stream_id(self) -> int:
        sid = self._lib.nghttp2_session_get_next_stream_id(self._session)
        if sid > _MAX_STREAM_ID:
            raise NoAvailableStreamIDError("stream ids used up")
        return sid

    @property
    def remote_max_concurrent_streams(self) -> int:
        return self._lib.nghttp2_session_get_remote_settings(self._session,
                                                             MAX_CONCURRENT_STREAMS)

    @property
    def encoder_table_size(self) -> int:
        return self._lib.nghttp2_session_get_hd_deflate_dynamic_table_size(self._session)

    def closed_streams_recorded(self) -> int:
        return len(self._closed_ends)

    def streams_held(self) -> int:
        return len(self._streams)

