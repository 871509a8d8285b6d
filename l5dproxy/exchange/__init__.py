"""l5dproxy.exchange."""
