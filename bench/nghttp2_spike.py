"""SPIKE, not used by the proxy (issue 16, way in 3): libnghttp2 through cffi in
ABI mode, the smallest binding that runs the proxy's h2 workload in memory, and
the CPU it costs per request next to the ``h2`` library.

What is here:

* ``Session``: one nghttp2 session, server or client side, driven in memory
  (``nghttp2_session_mem_recv`` / ``nghttp2_session_mem_send``). Received frames
  come back from ``receive`` as plain tuples, the shape of the events the
  proxy's h2 ends handle today (``h2.events``):
  ``("head", stream_id, [(name, value), ...], end_stream)`` for a complete
  header block (request, response or trailer section),
  ``("data", stream_id, bytes)`` for a DATA frame's payload,
  ``("end", stream_id)`` when the peer ended its side, and
  ``("close", stream_id, error_code)`` when the stream is closed (after its
  last frame was received, or sent: a stream closed by sending is reported
  by the next ``receive``).
  ``submit_request`` / ``submit_response`` send a header block and, through a
  data provider, a complete body; ``consume`` gives flow-controlled bytes back
  (automatic WINDOW_UPDATEs are off, as in the proxy, which acknowledges DATA
  only once its consumer took it: RFC 9113 6.9).
* ``h2_workload`` and ``nghttp2_workload``: the same exchange as
  ``bench/h2ceiling.py`` (a client and a server session handing bytes
  straight to each other; ``inflight`` GETs, or POSTs with a 6-byte body,
  each answered 200 with a 6-byte body), bounded by a request count,
  returning the CPU seconds (``time.process_time``) it took and what the
  client received.
* ``python -m bench.nghttp2_spike``: both workloads interleaved A/B, medians of
  CPU microseconds per request (one request = the work an h2->h2 proxy does
  per request: parse and emit one request and one response, once on each
  side).

The declarations and the loading are the proxy's engine's
(``l5dproxy.http.h2.nghttp2_abi``): without libnghttp2 or cffi, ``load``
raises ``Nghttp2UnavailableError`` naming what is missing. See
"Round N: HTTP/2 C codec spike" in bench/RESULTS.md for the figures and the
decision.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from l5dproxy.http.h2.nghttp2_abi import load, version

# nghttp2.h constants.
_ERR_CALLBACK_FAILURE = -902
_DATA_FLAG_EOF = 0x01
_FLAG_END_STREAM = 0x01
_DATA = 0x0
_HEADERS = 0x1
_HCAT_HEADERS = 3


class Nghttp2Error(Exception):
    """A libnghttp2 call failed: the connection is unusable (a peer's protocol
    error, or a callback that raised, chained as ``__cause__``)."""


class Session:
    """One libnghttp2 session driven in memory.

    ``receive(data)`` feeds the peer's bytes and returns the events they made
    (see the module docstring); ``data_to_send()`` takes what the session has
    queued. Stream ids, header names and values are as on the wire (bytes).
    nghttp2 checks HTTP messaging itself (RFC 9113 8.1-8.3: pseudo-header
    fields, connection-specific fields, content-length against DATA) and
    resets a stream that breaks it (PROTOCOL_ERROR), which ``h2`` leaves to
    the proxy's ends.
    """

    def __init__(self, server: bool, settings: dict[int, int] | None = None) -> None:
        ffi, lib = load()
        self._ffi = ffi
        self._lib = lib
        self._events: list[tuple] = []
        self._heads: dict[int, list[tuple[bytes, bytes]]] = {}
        #: stream id -> the body still to send (memoryview), for the data provider.
        self._out: dict[int, memoryview] = {}
        self._error: BaseException | None = None
        self._sendp = ffi.new("const char **")

        def failed(exc_type, exc, tb) -> None:
            if self._error is None:
                self._error = exc

        unpack = ffi.unpack
        events = self._events
        heads = self._heads
        out = self._out

        def on_begin_headers(session, frame, user_data):
            heads[frame.hd.stream_id] = []
            return 0

        def on_header(session, frame, name, namelen, value, valuelen, flags, user_data):
            heads[frame.hd.stream_id].append((unpack(name, namelen), unpack(value, valuelen)))
            return 0

        def on_frame_recv(session, frame, user_data):
            hd = frame.hd
            kind = hd.type
            if kind == _HEADERS:
                sid = hd.stream_id
                end = bool(hd.flags & _FLAG_END_STREAM)
                events.append(("head", sid, heads.pop(sid), end))
                if end:
                    events.append(("end", sid))
            elif kind == _DATA and hd.flags & _FLAG_END_STREAM:
                events.append(("end", hd.stream_id))
            return 0

        def on_data_chunk(session, flags, stream_id, data, length, user_data):
            events.append(("data", stream_id, unpack(data, length)))
            return 0

        def on_stream_close(session, stream_id, error_code, user_data):
            out.pop(stream_id, None)
            heads.pop(stream_id, None)
            events.append(("close", stream_id, error_code))
            return 0

        def read_body(session, stream_id, buf, length, data_flags, source, user_data):
            rest = out[stream_id]
            n = len(rest)
            if n <= length:
                ffi.memmove(buf, rest, n)
                del out[stream_id]
                data_flags[0] |= _DATA_FLAG_EOF
                return n
            ffi.memmove(buf, rest[:length], length)
            out[stream_id] = rest[length:]
            return length

        def cb(ctype: str, fn):
            return ffi.callback(ctype, fn, error=_ERR_CALLBACK_FAILURE, onerror=failed)

        # The C callbacks must live as long as the session.
        self._callbacks = [
            cb("nghttp2_on_begin_headers_callback", on_begin_headers),
            cb("nghttp2_on_header_callback", on_header),
            cb("nghttp2_on_frame_recv_callback", on_frame_recv),
            cb("nghttp2_on_data_chunk_recv_callback", on_data_chunk),
            cb("nghttp2_on_stream_close_callback", on_stream_close),
        ]
        self._read_body = cb("nghttp2_data_source_read_callback", read_body)
        self._provider = ffi.new("nghttp2_data_provider *")
        self._provider.read_callback = self._read_body

        cbsp = ffi.new("nghttp2_session_callbacks **")
        self._check(lib.nghttp2_session_callbacks_new(cbsp))
        cbs = cbsp[0]
        try:
            begin, header, frame_recv, chunk, close = self._callbacks
            lib.nghttp2_session_callbacks_set_on_begin_headers_callback(cbs, begin)
            lib.nghttp2_session_callbacks_set_on_header_callback(cbs, header)
            lib.nghttp2_session_callbacks_set_on_frame_recv_callback(cbs, frame_recv)
            lib.nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cbs, chunk)
            lib.nghttp2_session_callbacks_set_on_stream_close_callback(cbs, close)
            optp = ffi.new("nghttp2_option **")
            self._check(lib.nghttp2_option_new(optp))
            try:
                lib.nghttp2_option_set_no_auto_window_update(optp[0], 1)
                sessp = ffi.new("nghttp2_session **")
                new = lib.nghttp2_session_server_new2 if server else lib.nghttp2_session_client_new2
                self._check(new(sessp, cbs, ffi.NULL, optp[0]))
            finally:
                lib.nghttp2_option_del(optp[0])
        finally:
            lib.nghttp2_session_callbacks_del(cbs)
        self._session = ffi.gc(sessp[0], lib.nghttp2_session_del)
        entries = sorted((settings or {}).items())
        iv = ffi.new("nghttp2_settings_entry[]", entries) if entries else ffi.NULL
        self._check(lib.nghttp2_submit_settings(self._session, 0, iv, len(entries)))

    def _check(self, rv: int) -> int:
        if rv < 0:
            error, self._error = self._error, None
            message = self._ffi.string(self._lib.nghttp2_strerror(rv)).decode()
            raise Nghttp2Error(f"nghttp2: {message} ({rv})") from error
        return rv

    def _nva(self, headers: list[tuple[bytes, bytes]]):
        """An ``nghttp2_nv[]`` for one header block; nghttp2 copies it when
        the block is submitted, the buffers need only outlive the call."""
        from_buffer = self._ffi.from_buffer
        return self._ffi.new("nghttp2_nv[]", [
            (from_buffer(name), from_buffer(value), len(name), len(value), 0)
            for name, value in headers])

    def submit_request(self, headers: list[tuple[bytes, bytes]], body: bytes | None = None,
                       ) -> int:
        """Open a stream with a request; ``body`` (complete) follows in DATA
        frames, the last with END_STREAM; None: END_STREAM on the HEADERS.
        Returns the new stream's id."""
        nva = self._nva(headers)
        provider = self._ffi.NULL if body is None else self._provider
        sid = self._check(self._lib.nghttp2_submit_request(
            self._session, self._ffi.NULL, nva, len(headers), provider, self._ffi.NULL))
        if body is not None:
            self._out[sid] = memoryview(body)
        return sid

    def submit_response(self, stream_id: int, headers: list[tuple[bytes, bytes]],
                        body: bytes | None = None) -> None:
        """Answer a stream: its header block, then ``body`` as for
        ``submit_request``."""
        nva = self._nva(headers)
        if body is None:
            provider = self._ffi.NULL
        else:
            self._out[stream_id] = memoryview(body)
            provider = self._provider
        self._check(self._lib.nghttp2_submit_response(
            self._session, stream_id, nva, len(headers), provider))

    def reset(self, stream_id: int, error_code: int) -> None:
        """RST_STREAM with ``error_code`` (RFC 9113 7)."""
        self._check(self._lib.nghttp2_submit_rst_stream(self._session, 0, stream_id, error_code))

    def consume(self, stream_id: int, n: int) -> None:
        """Give ``n`` received DATA bytes of a stream back to the peer's
        windows (stream and connection); nghttp2 sends the WINDOW_UPDATEs
        when half a window was consumed, as h2's window manager does."""
        self._check(self._lib.nghttp2_session_consume(self._session, stream_id, n))

    def receive(self, data: bytes) -> list[tuple]:
        """Feed bytes from the peer; the events they made (and streams closed
        by sending since the last call), in order. A connection error of the
        peer's (RFC 9113 5.4.1) queues a GOAWAY and ends the session
        (``open`` goes false); a fatal one (no connection preface, a flood,
        a callback that raised) raises ``Nghttp2Error``."""
        self._check(self._lib.nghttp2_session_mem_recv(self._session, data, len(data)))
        events = self._events[:]
        self._events.clear()
        return events

    @property
    def open(self) -> bool:
        """False once the session is done: a GOAWAY was sent or received and
        its streams are over, or a connection error ended it."""
        session = self._session
        return bool(self._lib.nghttp2_session_want_read(session)
                    or self._lib.nghttp2_session_want_write(session))

    def data_to_send(self) -> bytes:
        """Everything the session has queued to send (frames), or b""."""
        lib, session, p, buffer = self._lib, self._session, self._sendp, self._ffi.buffer
        chunks = []
        while True:
            n = lib.nghttp2_session_mem_send(session, p)
            if n <= 0:
                self._check(n)
                break
            chunks.append(buffer(p[0], n)[:])
        return b"".join(chunks)


# -- the workload --------------------------------------------------------------

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1"),
           (b":path", b"/")]
RESPONSE = [(b":status", b"200"), (b"content-length", b"6")]
BODY = b"hello\n"


POST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"127.0.0.1"),
        (b":path", b"/upload"), (b"content-length", b"6")]


def h2_workload(requests: int, inflight: int = 10, post: bool = False,
                ) -> tuple[float, int, int]:
    """``bench/h2ceiling.py``'s exchange on the ``h2`` library, bounded by a
    count: ``requests`` GETs (``post``: POSTs with a 6-byte body), ``inflight``
    per exchange of bytes, each answered when its request has ended. Returns
    (CPU seconds, responses ended, response body bytes received)."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, StreamEnded

    fast = {
        "validate_inbound_headers": False,
        "validate_outbound_headers": False,
        "normalize_inbound_headers": False,
        "normalize_outbound_headers": False,
    }
    client = H2Connection(H2Configuration(client_side=True, **fast))
    server = H2Connection(H2Configuration(client_side=False, **fast))
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())

    done = received = 0
    start = time.process_time()
    for _ in range(requests // inflight):
        for _ in range(inflight):
            sid = client.get_next_available_stream_id()
            if post:
                client.send_headers(sid, POST)
                client.send_data(sid, BODY, end_stream=True)
            else:
                client.send_headers(sid, REQUEST, end_stream=True)
        for ev in server.receive_data(client.data_to_send()):
            if isinstance(ev, StreamEnded):
                server.send_headers(ev.stream_id, RESPONSE)
                server.send_data(ev.stream_id, BODY, end_stream=True)
            elif isinstance(ev, DataReceived):
                server.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        for ev in client.receive_data(server.data_to_send()):
            if isinstance(ev, DataReceived):
                received += len(ev.data)
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                done += 1
        pending = client.data_to_send()  # WINDOW_UPDATEs
        if pending:
            server.receive_data(pending)
    return time.process_time() - start, done, received


def nghttp2_workload(requests: int, inflight: int = 10, post: bool = False,
                     ) -> tuple[float, int, int]:
    """The same exchange on ``Session`` (libnghttp2); same return value."""
    client = Session(server=False)
    server = Session(server=True)
    server.receive(client.data_to_send())
    client.receive(server.data_to_send())
    server.receive(client.data_to_send())

    done = received = 0
    start = time.process_time()
    for _ in range(requests // inflight):
        for _ in range(inflight):
            if post:
                client.submit_request(POST, BODY)
            else:
                client.submit_request(REQUEST)
        for ev in server.receive(client.data_to_send()):
            kind = ev[0]
            if kind == "end":
                server.submit_response(ev[1], RESPONSE, BODY)
            elif kind == "data":
                server.consume(ev[1], len(ev[2]))
        for ev in client.receive(server.data_to_send()):
            kind = ev[0]
            if kind == "data":
                received += len(ev[2])
                client.consume(ev[1], len(ev[2]))
            elif kind == "end":
                done += 1
        pending = client.data_to_send()  # WINDOW_UPDATEs
        if pending:
            server.receive(pending)
    return time.process_time() - start, done, received


def compare(requests: int, repetitions: int, inflight: int = 10, post: bool = False,
            ) -> dict[str, list[float]]:
    """Both workloads interleaved (h2, nghttp2, nghttp2, h2, ...: the order
    alternates every repetition); CPU microseconds per request of each run."""
    runs: dict[str, list[float]] = {"h2": [], "nghttp2": []}
    workloads = {"h2": h2_workload, "nghttp2": nghttp2_workload}
    for i in range(repetitions):
        order = ("h2", "nghttp2") if i % 2 == 0 else ("nghttp2", "h2")
        for name in order:
            cpu, done, received = workloads[name](requests, inflight, post)
            if done != requests or received != requests * len(BODY):
                raise AssertionError(f"{name}: {done} responses, {received} body bytes")
            runs[name].append(cpu / requests * 1e6)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--repetitions", type=int, default=6)
    parser.add_argument("--inflight", type=int, default=10)
    parser.add_argument("--post", action="store_true", help="POSTs with a 6-byte body")
    args = parser.parse_args(argv)
    print(f"libnghttp2 {version()}; load average {os.getloadavg()[0]:.2f}; "
          f"{args.requests} {'POST' if args.post else 'GET'}s x {args.repetitions}, "
          f"inflight {args.inflight}")
    runs = compare(args.requests, args.repetitions, args.inflight, args.post)
    for name, values in runs.items():
        print(f"{name:8} CPU us/request median {statistics.median(values):6.1f}  "
              f"runs {' '.join(f'{v:.1f}' for v in values)}")
    ratio = statistics.median(runs["nghttp2"]) / statistics.median(runs["h2"])
    print(f"nghttp2/h2 {ratio:.2f}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
