"""The configuration: a TOML file in, frozen records out (import-free).

* ``model``: the records (``Config``, ``ListenerConfig``, ``ServiceConfig``, ...).
* ``parse``: ``load``/``parse`` a file into a ``Config``; ``ConfigError`` lists
  every problem as ``FILE: key.path: reason``.
* ``table``: ``Table``, the reader of one TOML table that records those lines.
* ``checks``: one value -> the reason it cannot be used, or None.
"""
