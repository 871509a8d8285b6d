"""What does the client speak? Sniffing the first bytes, the detect protocol,
server-speaks-first."""
