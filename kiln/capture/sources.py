"""Sources: where a value captured by the interpreter came from.

A source is a small immutable tree: a root (a local, a global, a closure cell, an
object embedded by identity) and access steps over it (attribute, item, module
table entry, method call, ...).  Each node answers two questions:

- ``name()``: the name in PyTorch's guard language (``L['x']``,
  ``L['self']._parameters['weight']``, ``G['z']``), used in guard failure reasons and graph
  placeholder names;
- ``code()``: the Python expression that fetches the value inside generated guard
  and entry functions (whose parameters are the frame's arguments).

Generated code is built by walking the tree (``render``), so that a pass can
replace a repeated sub-chain by a local (guard_cse.py), and export can turn a
source into graph nodes (explain_export.py), without parsing text back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


class Source:
    """Base of the source tree; subclasses are frozen dataclasses (hashable, structural ==)."""

    # NOTE: True where code() is an attribute/constant-subscript step that is cheap to
    # repeat and free of side effects, so that binding it once to a local is safe.
    hoistable = False

    def base(self) -> Optional["Source"]:
        """The source this one reads from (None for a root)."""
        return None

    def name(self) -> str:
        raise NotImplementedError

    def render(self, base_code: Optional[str]) -> str:
        """``code()`` given the code of ``base()`` (None for a root)."""
        raise NotImplementedError

    def code(self) -> str:
        return self.render_with(lambda s: s.code())

    def render_with(self, code_of: Callable[["Source"], str]) -> str:
        """``code()``, with ``code_of`` producing the code of the base (hoisting hook)."""
        b = self.base()
        return self.render(None if b is None else code_of(b))

    def chain(self) -> list["Source"]:
        """This source and its bases, innermost (the root) last."""
        out: list[Source] = []
        s: Optional[Source] = self
        while s is not None:
            out.append(s)
            s = s.base()
        return out

    def root(self) -> "Source":
        return self.chain()[-1]

    # ------------------------------------------------------------ builders
    def attr(self, attr: str) -> "AttrSource":
        return AttrSource(self, attr)

    def item(self, key: Any) -> "ItemSource":
        return ItemSource(self, key)

    def module_entry(self, table: str, key: str) -> "ModuleEntrySource":
        return ModuleEntrySource(self, table, key)

    def method_call(self, method: str, *args: Any) -> "MethodCallSource":
        return MethodCallSource(self, method, tuple(args))

    def __str__(self) -> str:
        return self.name()


# ---------------------------------------------------------------- roots
@dataclass(frozen=True)
class LocalSource(Source):
    """An argument of the compiled frame: ``L['x']``, read as ``x``."""

    local: str

    def name(self) -> str:
        return f"L[{self.local!r}]"

    def render(self, base_code: Optional[str]) -> str:
        # NOTE: a comprehension's ``.0`` is the entry's parameter ``implicit0`` (its signature's name).
        return self.local if self.local.isidentifier() else f"implicit{self.local[1:]}"


@dataclass(frozen=True)
class GlobalSource(Source):
    """A global of the frame's module (``table`` = ``___G``) or of another module
    (``table`` = the ``___cN`` name of that module's dict): ``G['z']``."""

    key: str
    table: str = "___G"
    hoistable = True

    def name(self) -> str:
        return f"G[{self.key!r}]"

    def render(self, base_code: Optional[str]) -> str:
        return f"{self.table}[{self.key!r}]"


@dataclass(frozen=True)
class ObjectSource(Source):
    """An object embedded by identity into generated code as a ``___cN`` global."""

    ref: str
    label: str = ""

    def name(self) -> str:
        return self.label or self.ref

    def render(self, base_code: Optional[str]) -> str:
        return self.ref


@dataclass(frozen=True)
class ClosureSource(Source):
    """The contents of a closure cell of the frame (``cell`` is its ``___cN`` name):
    named ``L['var']`` as PyTorch names free variables of the frame."""

    cell: str
    var: str
    hoistable = True

    def name(self) -> str:
        return f"L[{self.var!r}]"

    def render(self, base_code: Optional[str]) -> str:
        return f"{self.cell}.cell_contents"


# ---------------------------------------------------------------- steps
@dataclass(frozen=True)
class AttrSource(Source):
    of: Source
    attr_name: str
    hoistable = True

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return f"{self.of.name()}.{self.attr_name}"

    def render(self, base_code: Optional[str]) -> str:
        return f"{base_code}.{self.attr_name}"


@dataclass(frozen=True)
class ItemSource(Source):
    """``base[key]`` for a constant key."""

    of: Source
    key: Any
    hoistable = True

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return f"{self.of.name()}[{self.key!r}]"

    def render(self, base_code: Optional[str]) -> str:
        return f"{base_code}[{self.key!r}]"


@dataclass(frozen=True)
class ObjectItemSource(Source):
    """``base[key]`` for a key embedded by identity (``ref``, its ``___cN`` name): an
    enum member, a module, any key whose repr is not Python source."""

    of: Source
    ref: str
    label: str
    hoistable = True

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return f"{self.of.name()}[{self.label}]"

    def render(self, base_code: Optional[str]) -> str:
        return f"{base_code}[{self.ref}]"


@dataclass(frozen=True)
class DictKeySource(Source):
    """The ``index``-th key of a dict (a tensor or an object used as a key)."""

    of: Source
    index: int

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return f"list({self.of.name()}.keys())[{self.index}]"

    def render(self, base_code: Optional[str]) -> str:
        return f"list({base_code}.keys())[{self.index}]"


_LITERAL_KEYS = (int, str, bytes, bool, type(None))


def literal_key(key: Any) -> bool:
    """``repr(key)`` is Python source that rebuilds an equal key."""
    if type(key) is tuple:
        return all(literal_key(k) for k in key)
    return type(key) in _LITERAL_KEYS or (type(key) is float and key == key and key not in (float("inf"), -float("inf")))


def key_source(table: "ObjectTable", of: Source, key: Any) -> Source:
    """The source of ``of[key]``: a literal subscript, or the key embedded by identity."""
    if literal_key(key):
        return ItemSource(of, key)
    return ObjectItemSource(of, table.name_of(key), repr(key))


@dataclass(frozen=True)
class ModuleTableSource(Source):
    """A module's ``_parameters`` / ``_buffers`` / ``_modules`` table (read once, it serves
    every entry)."""

    of: Source
    table: str  # "_parameters" | "_buffers" | "_modules"
    hoistable = True

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return f"{self.of.name()}.{self.table}"

    def render(self, base_code: Optional[str]) -> str:
        return f"{base_code}.{self.table}"


@dataclass(frozen=True)
class ModuleEntrySource(Source):
    """A parameter, buffer or submodule reached as ``m.key``: named and read as
    ``m._parameters['key']``, as PyTorch names it (``L['self']._modules['fc']._parameters['weight']``,
    placeholder ``L_self_modules_fc_parameters_weight_``): ``nn.Module.__getattr__`` reads it there.

    NOTE: ``m.key`` would run ``nn.Module.__getattr__``, a Python call per read, on
    every guard check of every call.
    """

    of: Source
    table: str  # "_parameters" | "_buffers" | "_modules"
    key: str
    hoistable = True

    def base(self) -> Source:
        return ModuleTableSource(self.of, self.table)

    def name(self) -> str:
        return f"{self.of.name()}.{self.table}[{self.key!r}]"

    def render(self, base_code: Optional[str]) -> str:
        return f"{base_code}[{self.key!r}]"


@dataclass(frozen=True)
class DictItemSource(Source):
    """An entry of a dict subclass read past its own ``__getitem__``:
    named ``base[key]``, read as ``dict.__getitem__(base, key)``."""

    of: Source
    key: Any

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return f"{self.of.name()}[{self.key!r}]"

    def render(self, base_code: Optional[str]) -> str:
        return f"dict.__getitem__({base_code}, {self.key!r})"


@dataclass(frozen=True)
class MethodCallSource(Source):
    """The result of a side-effect-free method call with constant arguments
    (``os.environ.get('K')``, ``it.__reduce__()``)."""

    of: Source
    method: str
    args: tuple = ()

    def base(self) -> Source:
        return self.of

    def _call(self) -> str:
        return f".{self.method}({', '.join(repr(a) for a in self.args)})"

    def name(self) -> str:
        return self.of.name() + self._call()

    def render(self, base_code: Optional[str]) -> str:
        return base_code + self._call()


@dataclass(frozen=True)
class CallSource(Source):
    """``base()``: the referent of a weak reference."""

    of: Source

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return f"{self.of.name()}()"

    def render(self, base_code: Optional[str]) -> str:
        return f"{base_code}()"


@dataclass(frozen=True)
class SizeSource(Source):
    """One size of a tensor: named ``L['x'].size()[0]`` as PyTorch names it, read as ``x.size(0)``."""

    of: Source
    dim: int

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return f"{self.of.name()}.size()[{self.dim}]"

    def render(self, base_code: Optional[str]) -> str:
        return f"{base_code}.size({self.dim})"


@dataclass(frozen=True)
class FloatTensorSource(Source):
    """A float input passed to the graph as a 0-d float64 tensor (PyTorch's unspecialized
    float: the graph reads it back with ``.item()``); read as ``___as_tensor(y)``."""

    of: Source

    def base(self) -> Source:
        return self.of

    def name(self) -> str:
        return f"___as_tensor({self.of.name()})"

    def render(self, base_code: Optional[str]) -> str:
        return f"___as_tensor({base_code})"


def local_source(name: str) -> LocalSource:
    return LocalSource(name)


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

    def bind_closure(self, closure: "tuple | None", param: str = "___cl") -> None:
        """The cells of the compiled frame's own closure are read from the entry's closure
        argument (``___cl[i]``), not embedded: the entry serves every closure of the code."""
        for i, cell in enumerate(closure or ()):
            self.by_id[id(cell)] = f"{param}[{i}]"

    def bind_cell_arg(self, cell: Any, param: str) -> None:
        """A cell object the compiled frame receives as its argument ``param`` (a resume
        function's cell variables): read from that argument, not embedded."""
        self.by_id[id(cell)] = param

    def source(self, obj: Any, label: str = "") -> ObjectSource:
        return ObjectSource(self.name_of(obj), label)


def global_source(table: ObjectTable, gdict: dict, root_globals: dict, name: str) -> GlobalSource:
    if gdict is root_globals:
        return GlobalSource(name)
    return GlobalSource(name, table.name_of(gdict))


__all__ = [
    "Source", "LocalSource", "GlobalSource", "ObjectSource", "ClosureSource", "AttrSource", "ItemSource",
    "ObjectItemSource", "DictKeySource", "literal_key", "key_source",
    "ModuleTableSource", "ModuleEntrySource", "DictItemSource", "MethodCallSource", "CallSource", "SizeSource",
    "local_source", "global_source", "ObjectTable",
]
