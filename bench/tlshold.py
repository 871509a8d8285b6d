"""Hold N idle TLS connections: ``python bench/tlshold.py HOST PORT N``.

Opens N connections (at most 100 handshakes at a time), completes the TLS handshake
on each (no certificate verification: the harness's self-signed one), prints
``held N`` (those that succeeded) and sends nothing more until stdin closes; then
closes them all and exits. Errors go to stderr as one line each (the first 5).
"""

from __future__ import annotations

import asyncio
import ssl
import sys


async def main(host: str, port: int, count: int) -> None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    gate = asyncio.Semaphore(100)
    writers: list[asyncio.StreamWriter] = []
    errors: list[str] = []

    async def one() -> None:
        async with gate:
            try:
                _, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, ssl=context), 30)
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            writers.append(writer)

    await asyncio.gather(*(one() for _ in range(count)))
    for e in errors[:5]:
        print(e, file=sys.stderr)
    print(f"held {len(writers)}", flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    for w in writers:
        w.transport.abort()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
