"""l5dproxy.accept."""
