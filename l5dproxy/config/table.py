"""Reading one TOML table: typed getters that record ``FILE: key.path: reason``
lines instead of raising, so every problem of a file is reported at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from l5dproxy.config.checks import TYPE_HINTS, is_kind, kind_name, type_name


class Table:
    """One TOML table being read: typed getters that record errors and
    remember which keys were used, so the leftovers can be reported.

    ``kind`` names the table as a config file spells it (``[detect]``,
    ``[service.<name>]``, ``[[listener.route]]``); ``registry``, when given,
    collects the keys each kind reads (see ``l5dproxy.config.parse``);
    ``hint(kind, key)``, when given, says how to fix an unknown key (or None).
    Inner tables share the errors, registry and hint of the table they are in."""

    def __init__(self, data: Any, source: str, path: str, errors: list[str],
                 kind: str = "", registry: dict[str, set[str]] | None = None,
                 hint: Callable[[str, str], str | None] | None = None) -> None:
        self.source = source
        self.path = path
        self.errors = errors
        self.kind = kind
        self.registry = registry
        self.hint = hint
        self.used: set[str] = set()
        if not isinstance(data, dict):
            self.error("", f"expected a table, got {type_name(data)}")
            data = {}
        self.data: dict[str, Any] = data

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path and key else (self.path or key)

    def error(self, key: str, reason: str) -> None:
        self.errors.append(f"{self.source}: {self.key_path(key) or '(top level)'}: {reason}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any,
            check: Callable[[Any], str | None] | None = None) -> Any:
        """The value of ``key`` if it has the right type and passes ``check``
        (which returns a reason when the value is wrong), else ``default``."""
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if not is_kind(value, kind):
            hint = TYPE_HINTS.get(check) if check else None
            self.error(key, f"expected {kind_name(kind)}, got {type_name(value)}"
                       + (f"; {hint}" if hint else ""))
            return default
        reason = check(value) if check else None
        if reason:
            self.error(key, reason)
            return default
        return value

    def required(self, key: str, kind: type | tuple[type, ...],
                 check: Callable[[Any], str | None] | None = None) -> Any:
        if key not in self.data:
            self.used.add(key)
            self.error(key, "required key is missing")
            return None
        return self.get(key, kind, None, check)

    def table(self, key: str, kind: str | None = None) -> Table:
        self.used.add(key)
        inner = self.kind.strip("[]")
        if kind is None:
            kind = f"[{inner}.{key}]" if inner else f"[{key}]"
        return Table(self.data.get(key, {}), self.source, self.key_path(key), self.errors,
                     kind, self.registry, self.hint)

    def array(self, key: str) -> list[Table]:
        self.used.add(key)
        items = self.data.get(key, [])
        if not isinstance(items, list):
            self.error(key, f"expected an array of tables ([[{key}]]), got {type_name(items)}")
            return []
        inner = self.kind.strip("[]")
        kind = f"[[{inner}.{key}]]" if inner else f"[[{key}]]"
        return [Table(item, self.source, f"{self.key_path(key)}[{i}]", self.errors,
                      kind, self.registry, self.hint)
                for i, item in enumerate(items)]

    def finish(self) -> None:
        if self.registry is not None:
            self.registry.setdefault(self.kind, set()).update(self.used)
        for key in self.data:
            if key not in self.used:
                hint = self.hint(self.kind, key) if self.hint else None
                self.error(key, "unknown key" + (f"; {hint}" if hint else ""))
