"""l5dproxy.balance.backends."""
