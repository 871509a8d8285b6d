"""The wire: HTTP/1 (h1/) and HTTP/2 (h2/) to and from the neutral exchange, both
ends, no policy."""
