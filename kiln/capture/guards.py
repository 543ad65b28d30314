"""Guards: the conditions under which a compiled entry may be reused.

In: checks added by the variable builder while tracing (each over a source).
Out: Python source of one straight-line boolean expression (the fast path)
and of a "why" function that returns the first failing check, worded as
PyTorch words it (``tensor 'L['y']' requires_grad mismatch. expected
requires_grad=1``, ``L['a'] is L['b']``).
"""
from __future__ import annotations

from typing import Any

import torch

from .sources import ObjectTable, Source

_DTYPE_NAMES = {v: k for k, v in vars(torch).items() if isinstance(v, torch.dtype)}


def _dtype_word(dt: torch.dtype) -> str:
    # PyTorch prints e.g. Float / Double in its tensor-guard reasons.
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int64: "Long", torch.int32: "Int", torch.bool: "Bool"}.get(dt, str(dt))


_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_state() -> tuple:
    """(device, enabled, dtype name) for the devices autocast regions usually name."""
    return tuple((d, torch.is_autocast_enabled(d), str(torch.get_autocast_dtype(d))) for d in _AUTOCAST_DEVICES)


class GuardSet:
    """Ordered, de-duplicated checks: (expr, reason) pairs of Python source."""

    def __init__(self, objects: ObjectTable):
        self.objects = objects
        self.checks: list[tuple[str, str]] = []
        self._seen: set = set()
        self.names: list[str] = []  # human readable guard list (export's guards)

    def _add(self, key: Any, expr: str, reason: str, human: str) -> None:
        if key in self._seen:
            return
        self._seen.add(key)
        self.checks.append((expr, reason))
        self.names.append(human)

    def tensor(self, src: Source, t: torch.Tensor, dyn: Any = None) -> None:
        """Tensor metadata; ``dyn`` = (shape checks, stride checks) when some dims are symbolic."""
        e, n = src.expr, src.name
        o = self.objects
        tn = f"tensor '{n}'"
        parts = [
            (f"type({e}) is {o.name_of(type(t))}", f"{tn} type mismatch. expected {type(t).__name__}"),
            (f"{e}.dtype is {o.name_of(t.dtype)}", f"{tn} dtype mismatch. expected {_dtype_word(t.dtype)}"),
            (f"{e}.device == {o.name_of(t.device)}", f"{tn} device mismatch. expected {t.device}"),
            (f"{e}.requires_grad is {bool(t.requires_grad)}",
             f"{tn} requires_grad mismatch. expected requires_grad={int(t.requires_grad)}"),
        ]
        if dyn is None:
            parts += [
                (f"{e}.shape == {tuple(t.shape)!r}", f"{tn} size mismatch. expected {tuple(t.shape)}"),
                (f"{e}.stride() == {tuple(t.stride())!r}", f"{tn} stride mismatch. expected {tuple(t.stride())}"),
            ]
        else:
            parts += [(p, f"{tn} size mismatch. expected {p}") for p in dyn[0]]
            parts += [(p, f"{tn} stride mismatch. expected {p}") for p in dyn[1]]
        expr = " and ".join(p for p, _ in parts)
        self._add(("tensor", n), expr, "", f"TENSOR_MATCH: {n}")
        # NOTE: the fast path uses the joined expression; the reason path checks each part.
        self.checks[-1] = (expr, parts)

    def const(self, src: Source, value: Any) -> None:
        if value is None or isinstance(value, bool):
            expr = f"{src.expr} is {value!r}"
        elif isinstance(value, (int, float, str, bytes)) and type(value) in (int, float, str, bytes):
            expr = f"type({src.expr}) is {type(value).__name__} and {src.expr} == {value!r}"
        else:
            expr = f"{src.expr} == {self.objects.name_of(value)}"
        self._add(("const", src.name), expr, f"{src.name} == {value!r}", f"CONSTANT_MATCH: {src.name} == {value!r}")

    def ident(self, src: Source, obj: Any) -> None:
        self._add(("id", src.name), f"{src.expr} is {self.objects.name_of(obj)}",
                  f"{src.name} is not the object seen at compile time", f"ID_MATCH: {src.name}")

    def type_of(self, src: Source, obj: Any) -> None:
        t = type(obj)
        self._add(("type", src.name), f"type({src.expr}) is {self.objects.name_of(t)}",
                  f"type({src.name}) is not {t.__qualname__}", f"TYPE_MATCH: {src.name}")

    def length(self, src: Source, obj: Any) -> None:
        t = type(obj)
        self._add(("len", src.name), f"type({src.expr}) is {self.objects.name_of(t)} and len({src.expr}) == {len(obj)}",
                  f"len({src.name}) != {len(obj)}", f"SEQUENCE_LENGTH: {src.name} len={len(obj)}")

    def dict_keys(self, src: Source, d: dict) -> None:
        keys = list(d.keys())
        self._add(("keys", src.name), f"type({src.expr}) is dict and list({src.expr}.keys()) == {keys!r}",
                  f"keys of {src.name} changed", f"DICT_KEYS: {src.name}")

    def custom(self, key: Any, expr: str, reason: str) -> None:
        self._add(key, expr, reason, reason)

    def alias(self, a: Source, b: Source) -> None:
        self._add(("alias", a.name, b.name), f"{b.expr} is {a.expr}", f"{a.name} is {b.name}",
                  f"{a.name} is {b.name}")

    def distinct(self, srcs: list) -> None:
        if len(srcs) < 2:
            return
        if len(srcs) == 2:
            expr = f"{srcs[0].expr} is not {srcs[1].expr}"
        else:
            expr = "len({" + ", ".join(f"id({s.expr})" for s in srcs) + f"}}) == {len(srcs)}"
        self._add(("distinct",), expr, ("distinct", srcs), "DUPLICATE_INPUTS")

    def grad_mode(self, mode: bool) -> None:
        self._add(("grad",), f"___grad() is {mode}", f"GLOBAL_STATE changed: grad_mode (expected {mode})",
                  f"GRAD_MODE: {mode}")

    def autocast(self) -> None:
        """The autocast state seen while tracing (PyTorch's global-state guard covers it too):
        a graph traced without autocast must not serve a call made inside an autocast region."""
        if not torch._C._is_any_autocast_enabled():
            self._add(("autocast",), "not ___autocast()", "GLOBAL_STATE changed: autocast (expected disabled)",
                      "AUTOCAST: disabled")
            return
        state = autocast_state()
        self._add(("autocast",), f"___autocast_state() == {state!r}",
                  f"GLOBAL_STATE changed: autocast (expected {state})", f"AUTOCAST: {state}")

    # ------------------------------------------------------------ source of the guard functions
    def fast_expr(self) -> str:
        return " and ".join(f"({e})" for e, _ in self.checks) or "True"

    def why_lines(self) -> list[str]:
        """Body lines of the function that returns the first failure reason."""
        lines = []
        for expr, reason in self.checks:
            if isinstance(reason, list):
                for part, r in reason:
                    lines.append(f"if not ({part}): return {r!r}")
            elif isinstance(reason, tuple) and reason[0] == "distinct":
                srcs = reason[1]
                for i in range(len(srcs)):
                    for j in range(i + 1, len(srcs)):
                        r = f"{srcs[i].name} is not {srcs[j].name}"
                        lines.append(f"if {srcs[i].expr} is {srcs[j].expr}: return {r!r}")
            else:
                lines.append(f"if not ({expr}): return {reason!r}")
        return lines or ["pass"]
