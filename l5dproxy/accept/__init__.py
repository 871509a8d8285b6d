"""A connection arrives: the listener (admit, count, start detection) and PROXY protocol in."""
