"""Running the proxy: the command, twistd's options, the service built from a config, workers,
logs, the admin server."""
