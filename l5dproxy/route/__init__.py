"""l5dproxy.route."""
