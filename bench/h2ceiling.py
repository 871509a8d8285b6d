"""The in-memory h2 ceiling: how many small GET/200 round trips per second the installed
``h2`` library can do when a client and a server H2Connection hand bytes straight to
each other (no sockets, no reactor, header validation/normalisation off).

One round trip here is the same protocol work an h2->h2 proxy does per request (parse
and emit one request and one response, once on each side), so it is an upper bound for
a pure-Python h2 proxy on this CPU: the proxy adds I/O, scheduling and routing on top.
"""

from __future__ import annotations

import time


def h2_round_trips(seconds: float, inflight: int = 10) -> float:
    """Round trips per second, ``inflight`` requests per exchange (like h2load ``-m``)."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, RequestReceived, StreamEnded

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
    # Exchange prefaces and SETTINGS / SETTINGS-ACK.
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())

    request = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"127.0.0.1"),
               (b":path", b"/")]
    response = [(b":status", b"200"), (b"content-length", b"6")]
    body = b"hello\n"

    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(inflight):
            client.send_headers(client.get_next_available_stream_id(), request, end_stream=True)
        for ev in server.receive_data(client.data_to_send()):
            if isinstance(ev, RequestReceived):
                server.send_headers(ev.stream_id, response)
                server.send_data(ev.stream_id, body, end_stream=True)
        for ev in client.receive_data(server.data_to_send()):
            if isinstance(ev, DataReceived):
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, StreamEnded):
                done += 1
        pending = client.data_to_send()  # WINDOW_UPDATEs
        if pending:
            server.receive_data(pending)
        now = time.perf_counter()
        if now >= deadline:
            return done / (now - start)


if __name__ == "__main__":
    for m in (1, 10, 100):
        print(f"inflight={m}: {h2_round_trips(2.0, m):,.0f} round trips/s")
