"""Guards: the conditions under which a compiled entry may be reused.

In: guards added by the variable builder while tracing, each a :class:`Guard`
record (a kind, the source it is about, and its checks: Python tests written as
fragments of text and :class:`~kiln.capture.sources.Source` nodes, each with the
reason PyTorch gives when it fails: ``tensor 'L['y']' requires_grad mismatch.
expected requires_grad=1``, ``L['a'] is L['b']``).
Out: the Python source of one straight-line boolean expression (the fast path,
repeated access chains bound once: guard_cse.py) and the body of a "why"
function that returns the first failing check's reason.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from .sources import ObjectTable, Source, literal_key

# A test is a tuple of fragments: text, and sources rendered in place.
Fragment = Union[str, Source]


def _dtype_word(dt: torch.dtype) -> str:
    # PyTorch prints e.g. Float / Double in its tensor-guard reasons.
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int64: "Long", torch.int32: "Int", torch.bool: "Bool"}.get(dt, str(dt))


_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_state() -> tuple:
    """(device, enabled, dtype name) for the devices autocast regions usually name."""
    return tuple((d, torch.is_autocast_enabled(d), str(torch.get_autocast_dtype(d))) for d in _AUTOCAST_DEVICES)


class GuardKind(str, enum.Enum):
    """What a guard checks (PyTorch's guard names where it has one)."""

    TENSOR_MATCH = "TENSOR_MATCH"
    CONSTANT_MATCH = "CONSTANT_MATCH"
    ID_MATCH = "ID_MATCH"
    CLOSURE_MATCH = "CLOSURE_MATCH"
    TYPE_MATCH = "TYPE_MATCH"
    SEQUENCE_LENGTH = "SEQUENCE_LENGTH"
    DICT_KEYS = "DICT_KEYS"
    ITERATOR_MATCH = "ITERATOR_MATCH"
    OBJECT_ALIASING = "OBJECT_ALIASING"
    DUPLICATE_INPUTS = "DUPLICATE_INPUTS"
    GRAD_MODE = "GRAD_MODE"
    GLOBAL_STATE = "GLOBAL_STATE"
    AUTOCAST = "AUTOCAST"
    SHAPE_ENV = "SHAPE_ENV"
    STORAGE_OVERLAP = "STORAGE_OVERLAP"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Check:
    """One test (true when the guard holds) and PyTorch's words for its failure."""

    test: tuple  # of Fragment
    reason: str

    def render(self, code_of: Callable[[Source], str]) -> str:
        return "".join(f if isinstance(f, str) else code_of(f) for f in self.test)

    def sources(self) -> list[Source]:
        return [f for f in self.test if isinstance(f, Source)]


@dataclass(frozen=True)
class Guard:
    """A guard record: ``kind`` over ``source`` (None for global state); every check must
    hold, and a failing call reports the first failing check's reason.  ``fast`` is an
    optional cheaper test equal to all checks together (used on the fast path).

    NOTE: a test is an ``and`` chain of expressions that are all evaluated when it holds
    (no ``or``, conditional expression or lambda around a source): guard_cse.py binds a
    repeated source at its first occurrence and relies on that.
    """

    kind: GuardKind
    source: Optional[Source]
    checks: tuple  # of Check
    fast: Optional[tuple] = None  # of Fragment
    detail: str = ""  # printed after the source, e.g. " == 3"

    def fast_test(self) -> tuple:
        if self.fast is not None:
            return self.fast
        parts: list = []
        for i, c in enumerate(self.checks):
            if i:
                parts.append(" and ")
            parts.extend(c.test)
        return tuple(parts)

    def code(self, code_of: Callable[[Source], str] = lambda s: s.code()) -> str:
        """The fast-path test as Python source."""
        return "".join(f if isinstance(f, str) else code_of(f) for f in self.fast_test())

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks]

    def __str__(self) -> str:
        if self.source is None:
            return f"{self.kind}: {self.detail}" if self.detail else str(self.kind)
        return f"{self.kind}: {self.source.name()}{self.detail}"


def _t(*parts: Fragment) -> tuple:
    return tuple(parts)


def same_keys(d: dict, expected: list) -> bool:
    """The keys of ``d`` are ``expected``, in order: literal keys by equality, every other
    key (a tensor, a module, an enum member) by identity.

    NOTE: never ``==`` on a key that is not a literal: a tensor key would compare by value."""
    keys = list(d.keys())
    return len(keys) == len(expected) and all(
        k is e or (literal_key(e) and type(k) is type(e) and k == e) for k, e in zip(keys, expected))


class GuardSet:
    """Ordered, de-duplicated guard records of one entry."""

    def __init__(self, objects: ObjectTable):
        self.objects = objects
        self.guards: list[Guard] = []
        self._seen: set = set()
        # NOTE: frame locals guarded by identity (PyTorch's id_matched_objs): the recompile
        # limit counts only the entries compiled for the same such objects (cache.py).
        self.id_matched: dict[str, Any] = {}

    def add(self, guard: Guard, key: Any = None) -> None:
        key = (guard.kind, guard.source) if key is None else key
        if key in self._seen:
            return
        self._seen.add(key)
        self.guards.append(guard)

    def _one(self, kind: GuardKind, src: Optional[Source], test: tuple, reason: str, detail: str = "",
             key: Any = None) -> None:
        self.add(Guard(kind, src, (Check(test, reason),), detail=detail), key)

    # ------------------------------------------------------------ guards over sources
    def tensor(self, src: Source, t: torch.Tensor, dyn: Any = None, marks: bool = False) -> None:
        """Tensor metadata; ``dyn`` = (shape tests, stride tests), each a fragment tuple,
        when some dims are symbolic; ``marks``: also the dims marked dynamic/static on it."""
        o = self.objects
        tn = f"tensor '{src.name()}'"
        checks = [
            Check(_t("type(", src, f") is {o.name_of(type(t))}"), f"{tn} type mismatch. expected {type(t).__name__}"),
            Check(_t(src, f".dtype is {o.name_of(t.dtype)}"), f"{tn} dtype mismatch. expected {_dtype_word(t.dtype)}"),
            Check(_t(src, f".device == {o.name_of(t.device)}"), f"{tn} device mismatch. expected {t.device}"),
            Check(_t(src, f".requires_grad is {bool(t.requires_grad)}"),
                  f"{tn} requires_grad mismatch. expected requires_grad={int(t.requires_grad)}"),
        ]
        if dyn is None:
            checks += [
                Check(_t(src, f".shape == {tuple(t.shape)!r}"), f"{tn} size mismatch. expected {tuple(t.shape)}"),
                Check(_t(src, f".stride() == {tuple(t.stride())!r}"),
                      f"{tn} stride mismatch. expected {tuple(t.stride())}"),
            ]
        else:
            checks += [Check(p, f"{tn} size mismatch. expected {_plain(p)}") for p in dyn[0]]
            checks += [Check(p, f"{tn} stride mismatch. expected {_plain(p)}") for p in dyn[1]]
        if marks:
            checks.append(self._dim_marks(src, t))
        self.add(Guard(GuardKind.TENSOR_MATCH, src, tuple(checks)))

    def const(self, src: Source, value: Any) -> None:
        if value is None or isinstance(value, bool):
            test = _t(src, f" is {value!r}")
        elif type(value) is float and (value != value or value in (float("inf"), float("-inf"))):
            # NOTE: NaN equals nothing and repr(inf) is no Python name: test them by value.
            test = (_t("type(", src, ") is float and ___isnan(", src, ")") if value != value else
                    _t("type(", src, ") is float and ", src, f" == float({str(value)!r})"))
        elif isinstance(value, (int, float, str, bytes)) and type(value) in (int, float, str, bytes):
            test = _t("type(", src, f") is {type(value).__name__} and ", src, f" == {value!r}")
        elif type(value).__module__ == "numpy":
            # NOTE: np.float64(1.0) == 1.0: a NumPy scalar's guard checks its type too.
            test = _t("type(", src, f") is {self.objects.name_of(type(value))} and ", src,
                      f" == {self.objects.name_of(value)}")
        else:
            test = _t(src, f" == {self.objects.name_of(value)}")
        self._one(GuardKind.CONSTANT_MATCH, src, test, f"{src.name()} == {value!r}", detail=f" == {value!r}")

    def ident(self, src: Source, obj: Any) -> None:
        if type(src).__name__ == "LocalSource":
            self.id_matched.setdefault(src.local, obj)
        self._one(GuardKind.ID_MATCH, src, _t(src, f" is {self.objects.name_of(obj)}"),
                  f"{src.name()} is not the object seen at compile time")

    def closure_match(self, src: Source, fn: Any) -> None:
        """A function by its code object (PyTorch's CLOSURE_MATCH): closures made anew from one
        ``def`` share an entry; what they capture is guarded where the trace reads it."""
        self._one(GuardKind.CLOSURE_MATCH, src,
                  _t("type(", src, f") is {self.objects.name_of(type(fn))} and ", src,
                     f".__code__ is {self.objects.name_of(fn.__code__)}"),
                  f"{src.name()}.__code__ is not the code object seen at compile time")

    def type_of(self, src: Source, obj: Any) -> None:
        t = type(obj)
        self._one(GuardKind.TYPE_MATCH, src, _t("type(", src, f") is {self.objects.name_of(t)}"),
                  f"type({src.name()}) is not {t.__qualname__}")

    def length(self, src: Source, obj: Any) -> None:
        t = type(obj)
        self._one(GuardKind.SEQUENCE_LENGTH, src,
                  _t("type(", src, f") is {self.objects.name_of(t)} and len(", src, f") == {len(obj)}"),
                  f"len({src.name()}) != {len(obj)}", detail=f" len={len(obj)}")

    def dict_keys(self, src: Source, d: dict) -> None:
        """The exact type and the keys, in order, of a dict (keys that are not literals are
        compared with a snapshot list of them, which compares them by identity first)."""
        keys = list(d.keys())
        tname = self.objects.name_of(type(d))
        if all(literal_key(k) for k in keys):
            test = _t("type(", src, f") is {tname} and list(", src, f".keys()) == {keys!r}")
        else:
            test = _t("type(", src, f") is {tname} and {self.objects.name_of(same_keys)}(", src,
                      f", {self.objects.name_of(keys)})")
        self._one(GuardKind.DICT_KEYS, src, test, f"keys of {src.name()} changed")

    def attr_presence(self, src: Source, name: str, present: bool) -> None:
        """``hasattr(src, name)`` gave ``present`` while tracing."""
        test = _t("" if present else "not ", f"{self.objects.name_of(hasattr)}(", src, f", {name!r})")
        self._one(GuardKind.CONSTANT_MATCH, src, test, f"hasattr({src.name()}, {name!r}) != {present}",
                  key=(GuardKind.CONSTANT_MATCH, "hasattr", src, name))

    def _dim_marks(self, src: Source, t: torch.Tensor) -> Check:
        """The dims marked dynamic/static on a tensor input (mark_dynamic): a later input with
        marks it was not compiled with fails the check (PyTorch's guard on the same attributes)."""
        from .marked_dims import MARK_ATTRS, marks_within

        parts = []
        for attr in MARK_ATTRS:
            if hasattr(t, attr):
                allowed = frozenset(getattr(t, attr))
                parts.append(_t(f"{self.objects.name_of(marks_within)}(", src,
                                f", {attr!r}, {self.objects.name_of(allowed)})"))
            else:
                parts.append(_t(f"not {self.objects.name_of(hasattr)}(", src, f", {attr!r})"))
        test = parts[0]
        for p in parts[1:]:
            test = test + (" and ",) + p
        return Check(test, f"tensor '{src.name()}' dims marked dynamic or static changed")

    def not_in_instance_dict(self, src: Source, name: str) -> None:
        """``name`` is not an instance attribute of ``src`` (a method of its class is used)."""
        self._one(GuardKind.CONSTANT_MATCH, src, _t(f"{name!r} not in ", src, ".__dict__"),
                  f"{src.name()}.{name} was set on the instance",
                  key=(GuardKind.CONSTANT_MATCH, "not_in_dict", src, name))

    def set_contents(self, src: Source, value: Any) -> None:
        """A set or frozenset: its exact type and members (equal to a snapshot of them)."""
        snap = frozenset(value)
        self._one(GuardKind.CONSTANT_MATCH, src,
                  _t("type(", src, f") is {self.objects.name_of(type(value))} and ", src,
                     f" == {self.objects.name_of(snap)}"),
                  f"{src.name()} == {set(value)!r}", detail=f" == {set(value)!r}")

    def mapping_keys(self, src: Source, keys: list) -> None:
        """The keys of a dict subclass, read past its own methods."""
        self._one(GuardKind.DICT_KEYS, src, _t("list(dict.keys(", src, f")) == {keys!r}"),
                  f"keys of {src.name()} changed", key=(GuardKind.DICT_KEYS, "raw", src))

    def iterator(self, src: Source, it: Any, pos: int, length: int) -> None:
        """A live tuple/list iterator: its type, position and the length of what it iterates."""
        red = src.method_call("__reduce__")
        self._one(GuardKind.ITERATOR_MATCH, src,
                  _t("type(", src, f") is {self.objects.name_of(type(it))} and ", red.item(2), f" == {pos} and len(",
                     red.item(1).item(0), f") == {length}"),
                  f"iterator {src.name()} changed")

    def alias(self, a: Source, b: Source) -> None:
        self.add(Guard(GuardKind.OBJECT_ALIASING, b, (Check(_t(b, " is ", a), f"{a.name()} is {b.name()}"),)),
                 key=(GuardKind.OBJECT_ALIASING, a.name(), b.name()))

    def distinct(self, srcs: list) -> None:
        if len(srcs) < 2:
            return
        checks = tuple(Check(_t(srcs[i], " is not ", srcs[j]), f"{srcs[i].name()} is not {srcs[j].name()}")
                       for i in range(len(srcs)) for j in range(i + 1, len(srcs)))
        fast = None
        if len(srcs) > 2:
            parts: list = ["len({"]
            for i, s in enumerate(srcs):
                parts += [", " if i else "", "id(", s, ")"]
            fast = tuple(parts + [f"}}) == {len(srcs)}"])
        self.add(Guard(GuardKind.DUPLICATE_INPUTS, None, checks, fast=fast), key=(GuardKind.DUPLICATE_INPUTS,))

    def storage_overlap(self, overlapping: list, non_overlapping: list) -> None:
        """Which of these aliased inputs overlap in memory (PyTorch's StorageOverlap guard):
        exactly ``overlapping``, as when the graph was compiled (capture/overlap.py)."""
        from .overlap import storage_overlap_holds

        srcs = list(overlapping) + list(non_overlapping)
        if len(srcs) < 2:
            return
        parts: list = [f"{self.objects.name_of(storage_overlap_holds)}(("]
        for s in srcs:
            parts += [s, ", "]
        parts.append(f"), {len(overlapping)})")
        names = f"overlapping=[{', '.join(s.name() for s in overlapping)}], " \
                f"non_overlapping=[{', '.join(s.name() for s in non_overlapping)}]"
        self._one(GuardKind.STORAGE_OVERLAP, None, tuple(parts), f"storage overlap changed: expected {names}",
                  detail=names, key=(GuardKind.STORAGE_OVERLAP, tuple(s.name() for s in srcs)))

    # ------------------------------------------------------------ global state
    def grad_mode(self, mode: bool) -> None:
        self._one(GuardKind.GRAD_MODE, None, _t(f"___grad() is {mode}"),
                  f"GLOBAL_STATE changed: grad_mode (expected {mode})", detail=str(mode))

    def autocast(self) -> None:
        """The autocast state seen while tracing (PyTorch's global-state guard covers it too):
        a graph traced without autocast must not serve a call made inside an autocast region."""
        if not torch._C._is_any_autocast_enabled():
            self._one(GuardKind.AUTOCAST, None, _t("not ___autocast()"),
                      "GLOBAL_STATE changed: autocast (expected disabled)", detail="disabled")
            return
        state = autocast_state()
        self._one(GuardKind.AUTOCAST, None, _t(f"___autocast_state() == {state!r}"),
                  f"GLOBAL_STATE changed: autocast (expected {state})", detail=str(state))

    def global_state(self) -> None:
        """The other process-wide switches PyTorch's global-state guard checks: deterministic
        algorithms (and warn-only), cuBLAS TF32, the default dtype (factory calls in the graph
        were traced with it)."""
        for fn, name in ((torch._C._get_deterministic_algorithms, "deterministic_algorithms"),
                         (torch._C._get_deterministic_algorithms_warn_only, "deterministic_algorithms_warn_only"),
                         (torch._C._get_cublas_allow_tf32, "allow_tf32"),
                         (torch.get_default_dtype, "default_dtype")):
            value = fn()
            rhs = repr(value) if isinstance(value, bool) else self.objects.name_of(value)
            self._one(GuardKind.GLOBAL_STATE, None, _t(f"{self.objects.name_of(fn)}() is {rhs}"),
                      f"GLOBAL_STATE changed: {name} (expected {value})", detail=f"{name} {value}",
                      key=(GuardKind.GLOBAL_STATE, name))

    def shape(self, code: str, reason: str) -> None:
        """A ShapeEnv guard, printed over the inputs' sizes (dynamic.shape_guards).

        NOTE: kept as text: sympy may print ``or`` / conditional expressions, where no
        access chain may be bound to a local (guard_cse.py leaves it alone)."""
        self._one(GuardKind.SHAPE_ENV, None, _t(code), reason, detail=reason, key=(GuardKind.SHAPE_ENV, code))

    # ------------------------------------------------------------ source of the guard functions
    def why_lines(self) -> list[str]:
        """Body lines of the function that returns the first failure reason."""
        code_of = _plain_code
        lines = [f"if not ({c.render(code_of)}): return {c.reason!r}" for g in self.guards for c in g.checks]
        return lines or ["pass"]

    @property
    def names(self) -> list[str]:
        """Human-readable guard list (export's guards, explain's out_guards)."""
        return [str(g) for g in self.guards]


def _plain_code(src: Source) -> str:
    return src.code()


def _plain(test: tuple) -> str:
    return "".join(f if isinstance(f, str) else f.code() for f in test)


__all__ = ["Guard", "GuardKind", "Check", "GuardSet", "autocast_state"]
