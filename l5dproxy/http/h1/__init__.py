"""The HTTP/1 ends: framing, request, upgrade, server, pool, client."""
