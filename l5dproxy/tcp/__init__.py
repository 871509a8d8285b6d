"""Opaque connections: the TCP relay."""
