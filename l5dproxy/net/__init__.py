"""Connections and transports: the connection record, batched writes, splice, DNS and listening
helpers; the only users of Twisted's internals."""
