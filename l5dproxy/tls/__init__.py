"""TLS: certificates (certs), peer identities (identity), termination (server)."""
