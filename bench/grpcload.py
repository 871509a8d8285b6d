"""A gRPC backend and an honest gRPC client for the ``abuse`` and ``soak`` scenarios.

    python -m bench.grpcload serve --port P
    python -m bench.grpcload load --port P --seconds S [--concurrency C] [--rate R]

``serve``: a grpcio server with one unary method, ``/bench.Echo/Unary``, that
answers the request bytes back (generic handler, no protobuf: the messages are raw
bytes). ``load``: ``--concurrency`` threads, each calling it in a loop (grpcio's
blocking stub, 5 s deadline per call) for ``--seconds``, at most ``--rate`` calls/s
in all when given; prints one JSON object (:func:`bench.tools.parse_grpc_load`):
calls, ok, failed, per-status-code counts, calls/s, p50/p99 ms of the successful
calls.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import threading
import time
from concurrent import futures
from typing import Any

METHOD = "/bench.Echo/Unary"
PAYLOAD = b"hello"


def make_server(port: int) -> tuple[Any, int]:
    """A started grpcio server answering ``/bench.Echo/Unary`` with the request bytes, on
    ``port`` (0: any free one); returns it and its port."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler("bench.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req),
    })
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, bound


def serve(port: int, seconds: float) -> int:
    server, _ = make_server(port)
    server.wait_for_termination(timeout=seconds)
    return 0


def load(port: int, seconds: float, concurrency: int, rate: float) -> dict[str, object]:
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_unary(METHOD)
    lock = threading.Lock()
    durations: list[float] = []
    codes: dict[str, int] = {}
    start = time.monotonic()
    deadline = start + seconds
    gap = concurrency / rate if rate > 0 else 0.0

    def worker(k: int) -> None:
        due = start + gap * k / max(1, concurrency)
        while True:
            now = time.monotonic()
            if now >= deadline:
                return
            if gap:
                if due > now:
                    time.sleep(min(due - now, deadline - now))
                    continue
                due += gap
            t0 = time.monotonic()
            try:
                call(PAYLOAD, timeout=5)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name if exc.code() is not None else "UNKNOWN"
            dt = (time.monotonic() - t0) * 1000.0
            with lock:
                codes[code] = codes.get(code, 0) + 1
                if code == "OK":
                    durations.append(dt)

    threads = [threading.Thread(target=worker, args=(k,), daemon=True)
               for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 10)
    elapsed = time.monotonic() - start
    channel.close()
    ok = codes.get("OK", 0)
    calls = sum(codes.values())
    durations.sort()

    def pct(p: float) -> float | None:
        if not durations:
            return None
        rank = max(1, math.ceil(p / 100 * len(durations)))  # nearest rank
        return durations[min(rank, len(durations)) - 1]

    return {"calls": calls, "ok": ok, "failed": calls - ok, "codes": codes,
            "seconds": round(elapsed, 3), "rps": ok / elapsed if elapsed else 0.0,
            "p50_ms": pct(50), "p99_ms": pct(99)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpcload")
    p.add_argument("mode", choices=("serve", "load"))
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--rate", type=float, default=0.0, help="calls/s in all (0: closed loop)")
    a = p.parse_args(argv)
    if a.mode == "serve":
        return serve(a.port, a.seconds)
    print(json.dumps(load(a.port, a.seconds, max(1, a.concurrency), a.rate)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
