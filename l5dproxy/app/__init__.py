"""l5dproxy.app."""
