"""l5dproxy.detect.protocol."""
