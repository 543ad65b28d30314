"""Sources: where a value captured by the interpreter came from.

A source has two spellings: ``name`` in PyTorch's guard language (``L['x']``,
``L['self'].weight``, ``G['z']``), used in guard failure reasons, and ``expr``,
the Python expression that fetches the value inside generated guard and runner
functions (whose parameters are the frame's arguments).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Source:
    name: str
    expr: str

    def attr(self, attr: str) -> "Source":
        return Source(f"{self.name}.{attr}", f"{self.expr}.{attr}")

    def item(self, key: Any) -> "Source":
        return Source(f"{self.name}[{key!r}]", f"{self.expr}[{key!r}]")

    def module_entry(self, table: str, key: str) -> "Source":
        """A parameter, buffer or submodule: named ``m.key`` as PyTorch names it, read as
        ``m._parameters['key']`` (NOTE: ``m.key`` would run ``nn.Module.__getattr__``, a
        Python call per read, on every guard check of every call)."""
        return Source(f"{self.name}.{key}", f"{self.expr}.{table}[{key!r}]")


def local_source(name: str) -> Source:
    return Source(f"L[{name!r}]", name)


class ObjectTable:
    """Objects embedded by identity into generated code, as ``___cN`` globals."""

    def __init__(self) -> None:
        self.by_id: dict[int, str] = {}
        self.values: dict[str, Any] = {}

    def name_of(self, obj: Any) -> str:
        key = id(obj)
        if key not in self.by_id:
            n = f"___c{len(self.values)}"
            self.by_id[key] = n
            self.values[n] = obj
        return self.by_id[key]

    def source(self, obj: Any, label: str = "") -> Source:
        n = self.name_of(obj)
        return Source(label or n, n)


def global_source(table: ObjectTable, gdict: dict, root_globals: dict, name: str) -> Source:
    if gdict is root_globals:
        return Source(f"G[{name!r}]", f"___G[{name!r}]")
    base = table.name_of(gdict)
    return Source(f"G[{name!r}]", f"{base}[{name!r}]")
