"""The middle of the HTTP pipeline: routing, retries, gRPC classification, the proxy's answers to
upstream failures, metric labels."""
