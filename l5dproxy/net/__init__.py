"""l5dproxy.net."""
