"""l5dproxy.http.h2.protocol."""
