"""Connection sink for the idle-connections memory test: accept on each port given on
the command line, read and discard, never close first. Standalone (stdlib only).

    python bench/sink.py PORT [PORT ...]
"""

from __future__ import annotations

import asyncio
import resource
import sys


async def _discard(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(65536):
            pass
    except OSError:
        pass
    finally:
        writer.close()


async def _main(ports: list[int]) -> None:
    servers = [
        await asyncio.start_server(_discard, "127.0.0.1", port, backlog=4096) for port in ports
    ]
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(_main([int(p) for p in sys.argv[1:]]))


if __name__ == "__main__":
    main()
