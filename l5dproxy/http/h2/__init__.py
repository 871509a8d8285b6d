"""The HTTP/2 ends: translate, connection, stream, protocol, server, pool, client."""
