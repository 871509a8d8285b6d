"""A small HTTP/2 (prior knowledge) server for the end-to-end tests.

Run as ``python -m tests.h2backend PORTFILE``: it binds 127.0.0.1:0, writes
the port to PORTFILE and serves until killed. asyncio and h2, nothing of the
proxy, so it checks the proxy against an independent peer. Paths:

* ``/bytes/N``: N bytes of body, sent as the client's windows allow;
* ``/echo``: the request body back, and a ``x-echo-trailer`` trailer;
* ``/hang``: headers, then nothing until the client resets the stream;
* ``/silent``: nothing at all (not even headers) until the client resets
  the stream, printed as ``SILENT <stream>`` when the request has come;
* anything else: ``ok``.

Every stream reset by the client is printed as ``RESET <stream> <code>``.
"""

from __future__ import annotations

import asyncio
import sys
import traceback

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError

CHUNK = 16384
ZEROS = b"\0" * (1 << 20)


class Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.requests: dict[int, dict] = {}
        self.window_open = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.peer = writer.get_extra_info("peername")
        self.gone: set[int] = set()   # streams reset in the current read
        self.goaway = False           # a GOAWAY came: h2 sends nothing more

    def spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        self.h2.initiate_connection()
        await self.flush()
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    print(f"EOF {self.peer}", flush=True)
                    break
                try:
                    events = self.h2.receive_data(data)
                except ProtocolError as e:
                    # A connection error of the proxy's: h2 has queued its
                    # GOAWAY. Say why, with the read that broke the
                    # connection, and send the GOAWAY.
                    print(f"ERROR {self.peer} {e!r} in {data[:200].hex()}", flush=True)
                    await self.flush()
                    return
                self.handle_read(events)
                await self.flush()
        except Exception as e:  # a test peer: report, never raise
            if not isinstance(e, ConnectionError):
                print(f"ERROR {self.peer} {e!r}", flush=True)
                traceback.print_exc(file=sys.stdout)
                sys.stdout.flush()
        finally:
            self.writer.close()

    def received(self, data: bytes) -> None:
        """One read (``run``'s, without its error report)."""
        self.handle_read(self.h2.receive_data(data))

    def handle_read(self, events: list) -> None:
        """One read's events, handled in order. h2 has read the
        whole of it first, so a request may already be gone when its
        event is handled: reset later in the read (and forgotten by h2 if
        a newer stream opened: answering it would raise
        ``StreamIDTooLowError``), or the connection closed by a GOAWAY (h2
        sends nothing after one). Those requests are not answered."""
        self.gone = {e.stream_id for e in events if isinstance(e, StreamReset)}
        if any(isinstance(e, ConnectionTerminated) for e in events):
            self.goaway = True
        for event in events:
            self.handle(event)

    async def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)
            await self.writer.drain()

    def handle(self, event) -> None:
        if isinstance(event, RequestReceived):
            headers = dict(event.headers)
            self.requests[event.stream_id] = {"headers": headers, "body": bytearray()}
            if event.stream_ended is not None:
                self.respond(event.stream_id)
        elif isinstance(event, DataReceived):
            request = self.requests.get(event.stream_id)
            if request is not None:
                request["body"] += event.data
            self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, StreamEnded):
            if event.stream_id in self.requests and "answered" not in self.requests[
                    event.stream_id]:
                self.respond(event.stream_id)
        elif isinstance(event, StreamReset):
            print(f"RESET {event.stream_id} {int(event.error_code)}", flush=True)
            self.requests.pop(event.stream_id, None)
            self.window_open.set()
        elif isinstance(event, ConnectionTerminated):
            # The code as a number: "NO_ERROR" would read as an ERROR line.
            print(f"GOAWAY {self.peer} {int(event.error_code)} {event.additional_data!r}",
                  flush=True)
            self.window_open.set()
        elif isinstance(event, WindowUpdated):
            self.window_open.set()

    def respond(self, sid: int) -> None:
        if sid in self.gone or self.goaway:   # see ``handle_read``
            self.requests.pop(sid, None)
            return
        self._respond(sid)

    def _respond(self, sid: int) -> None:
        request = self.requests[sid]
        request["answered"] = True
        path = request["headers"].get(b":path", b"/")
        if path.startswith(b"/bytes/"):
            size = int(path[len(b"/bytes/"):])
            self.h2.send_headers(sid, [(b":status", b"200"),
                                       (b"content-length", str(size).encode())])
            self.spawn(self.stream_bytes(sid, size))
        elif path == b"/echo":
            body = bytes(request["body"])
            self.h2.send_headers(sid, [(b":status", b"200")])
            self.spawn(self.stream_data(sid, body, [(b"x-echo-trailer", b"yes")]))
        elif path == b"/hang":
            self.h2.send_headers(sid, [(b":status", b"200")])
            print(f"HANG {sid}", flush=True)
        elif path == b"/silent":
            print(f"SILENT {sid}", flush=True)
        else:
            self.h2.send_headers(sid, [(b":status", b"200"), (b"content-length", b"3")])
            self.h2.send_data(sid, b"ok\n", end_stream=True)
            self.requests.pop(sid, None)

    async def wait_window(self, sid: int) -> int:
        while True:
            if sid not in self.requests:
                return 0
            try:
                window = self.h2.local_flow_control_window(sid)
            except Exception:  # the stream is gone
                return 0
            if window > 0:
                return window
            self.window_open.clear()
            await self.window_open.wait()

    async def stream_bytes(self, sid: int, size: int) -> None:
        sent = 0
        while sent < size:
            window = await self.wait_window(sid)
            if not window:
                return
            n = min(window, CHUNK, size - sent, self.h2.max_outbound_frame_size)
            self.h2.send_data(sid, ZEROS[:n], end_stream=sent + n == size)
            sent += n
            await self.flush()
        self.requests.pop(sid, None)

    async def stream_data(self, sid: int, body: bytes, trailers) -> None:
        view = memoryview(body)
        while view:
            window = await self.wait_window(sid)
            if not window:
                return
            n = min(window, CHUNK, len(view), self.h2.max_outbound_frame_size)
            self.h2.send_data(sid, bytes(view[:n]))
            view = view[n:]
            await self.flush()
        self.h2.send_headers(sid, trailers, end_stream=True)
        self.requests.pop(sid, None)
        await self.flush()


async def main(portfile: str) -> None:
    async def serve(reader, writer) -> None:
        await Connection(reader, writer).run()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with open(portfile + ".tmp", "w") as f:
        f.write(str(port))
    import os
    os.replace(portfile + ".tmp", portfile)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
