"""Benchmark harness for l5dproxy: see bench/README.md."""
