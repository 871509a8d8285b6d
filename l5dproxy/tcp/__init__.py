"""l5dproxy.tcp.relay."""
