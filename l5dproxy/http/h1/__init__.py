"""l5dproxy.http.h1.server."""
