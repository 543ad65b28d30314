"""Python source of compiled entries: guard + graph call + rebuild + resume.

(Not to be confused with ``kiln/codegen/``, the kernel generator: this module writes
the small Python function that checks a frame's guards and calls its graph.)

In: the symbolic state at a return or a graph break.  Out: Python source of an
``___entry`` function with the frame's own signature: a straight-line guard
check (returns ``___MISS`` on failure), the compiled graph call, side-effect
replay, and either the return value or the unsupported instruction followed by
a call of the resume function.  Also the ``___why`` function giving the first
failing guard's reason.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Optional

import torch

from .guard_cse import hoist_guard
from .guards import GuardSet, autocast_state
from .operators import NB_OPS
from .variables.base import VT, NullVT, unsupported

_SIMPLE = (int, str, bool, type(None), bytes)


class EntryWriter:
    """Turns VTs into Python expressions of an entry's body (``collect`` mode finds graph outputs)."""

    def __init__(self, objects, out_index: Optional[dict] = None, symbols=None):
        self.objects = objects
        self.symbols = symbols
        self.out_index = out_index
        self.needed: list = []
        self.lines: list[str] = []
        self._memo: dict[int, str] = {}
        # NOTE: ids of the traced frames' cells (CellVT) that live on after this code (cells
        # of the root frame at a graph break, which its resume function carries on); None:
        # every traced cell may (closures over them are not rebuilt).
        self.live_cells: Optional[set] = None

    def expr(self, vt: VT) -> str:
        from .interpreter import LazyLocal

        if isinstance(vt, LazyLocal):
            return vt.source.code()
        if isinstance(vt, NullVT):
            unsupported("NULL cannot be rebuilt as a value")
        return vt.reconstruct(self)

    def tensor_expr(self, vt) -> str:
        if vt.node.op == "placeholder":
            return vt.source.code()
        if self.out_index is None:
            if all(n is not vt.node for n in self.needed):
                self.needed.append(vt.node)
            return "___o[0]"
        return f"___o[{self.out_index[vt.node]}]"

    def graph_scalar(self, vt) -> str:
        """A value read from tensor data (an unbacked SymInt/SymFloat/SymBool) as a graph
        output: ints and bools as they are; floats as a float64 0-d tensor, read back with
        ``.item()`` (PyTorch's capture returns them so: one ``scalar_tensor`` node)."""
        node = vt.node
        if isinstance(vt.sym, torch.SymFloat):
            wrapped = node.meta.get("kiln_scalar_output")
            if wrapped is None:
                wrapped = node.graph.call_function(torch.scalar_tensor, (node,), {"dtype": torch.float64})
                wrapped.meta["example_value"] = torch.empty((), dtype=torch.float64, device="meta")
                node.meta["kiln_scalar_output"] = wrapped
            return f"{self._graph_output(wrapped)}.item()"
        return self._graph_output(node)

    def _graph_output(self, node) -> str:
        if self.out_index is None:
            if all(n is not node for n in self.needed):
                self.needed.append(node)
            return "___o[0]"
        return f"___o[{self.out_index[node]}]"

    def sym_expr(self, sym: Any) -> str:
        """A symbolic size as Python over the inputs' sizes (``(x.size(0)) * 2``)."""
        from .dynamic import sym_expr_of

        if self.symbols is None:
            unsupported("a symbolic size cannot be rebuilt here")
        return "(" + self.symbols.py(sym_expr_of(sym)) + ")"

    def const_expr(self, v: Any) -> str:
        if type(v) in _SIMPLE or (type(v) is float and math.isfinite(v)):
            return repr(v)
        return self.obj(v)

    def obj(self, v: Any) -> str:
        return self.objects.name_of(v)

    def container(self, vt: VT, body: str) -> str:
        key = id(vt)
        if key not in self._memo:
            name = f"___t{len(self._memo)}"
            self.line(f"{name} = {body}")
            self._memo[key] = name
        return self._memo[key]

    def built(self, vt: VT) -> Optional[str]:
        """The name ``container`` already bound ``vt`` to, or None."""
        return self._memo.get(id(vt))

    def line(self, s: str) -> None:
        self.lines.append(s)


def frame_signature(fn: Callable) -> inspect.Signature:
    """The parameters of ``fn``'s own code object (a bound method's, less ``self``).

    NOTE: not ``inspect.signature``: it returns a function's ``__signature__`` when one is
    set, and decorators set it to the wrapped function's (transformers'
    ``deprecate_kwarg`` gives its ``wrapped_func(*args, **kwargs)`` the signature of
    ``create_causal_mask``): the frame's locals were then bound by the wrong names and the
    resume function lost ``kwargs``."""
    func = getattr(fn, "__func__", fn)
    code = getattr(func, "__code__", None)
    if code is None:
        return inspect.signature(fn, follow_wrapped=False)
    P = inspect.Parameter
    names = code.co_varnames
    n_pos, n_kw = code.co_argcount, code.co_kwonlyargcount
    defaults = func.__defaults__ or ()
    kwdefaults = func.__kwdefaults__ or {}
    params = []
    for i, name in enumerate(names[:n_pos]):
        kind = P.POSITIONAL_ONLY if i < code.co_posonlyargcount else P.POSITIONAL_OR_KEYWORD
        j = i - (n_pos - len(defaults))
        params.append(P(name, kind, default=defaults[j] if j >= 0 else P.empty))
    k = n_pos + n_kw
    if code.co_flags & inspect.CO_VARARGS:
        params.append(P(names[k], P.VAR_POSITIONAL))
        k += 1
    for name in names[n_pos:n_pos + n_kw]:
        params.append(P(name, P.KEYWORD_ONLY, default=kwdefaults.get(name, P.empty)))
    if code.co_flags & inspect.CO_VARKEYWORDS:
        params.append(P(names[k], P.VAR_KEYWORD))
    if func is not fn and params and params[0].kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
        params = params[1:]   # NOTE: a bound method: its first parameter is bound already
    return inspect.Signature(params)


def signature_params(fn: Callable, ns: dict) -> str:
    """The parameter list of ``fn`` as source; defaults go into ``ns``."""
    parts = []
    sig = frame_signature(fn)
    saw_kwonly = False
    pos_only_done = True
    for p in sig.parameters.values():
        s = p.name
        if p.kind == p.POSITIONAL_ONLY:
            pos_only_done = False
        elif not pos_only_done:
            parts.append("/")
            pos_only_done = True
        if p.kind == p.VAR_POSITIONAL:
            s = "*" + s
            saw_kwonly = True
        elif p.kind == p.VAR_KEYWORD:
            s = "**" + s
        elif p.kind == p.KEYWORD_ONLY and not saw_kwonly:
            parts.append("*")
            saw_kwonly = True
        if p.default is not p.empty:
            ns[f"___d_{p.name}"] = p.default
            s += f"=___d_{p.name}"
        parts.append(s)
    if not pos_only_done:
        parts.append("/")
    return ", ".join(parts)


def build_entry(fn: Callable, guards: GuardSet, graph_args: Optional[list], body: list, ns: dict, label: str):
    """exec the generated entry and why functions; returns (entry, why, source).

    ``graph_args``: the sources of the graph's inputs (None when there is no graph);
    the graph call ``___o = ___graph(...)`` is the first statement after the guard.
    """
    params = signature_params(fn, ns)
    # NOTE: the first argument is the called function's closure tuple: the entry reads the
    # frame's cells from it, so that every closure made from one code shares its entries.
    params = "___cl, " + params if "/" in params.split("*")[0] else f"___cl, /, {params}".rstrip(", ")
    guard_expr, args = hoist_guard(guards.guards, graph_args)
    src = [f"def ___entry({params}):",
           "    try:",
           f"        if not ({guard_expr}):",
           "            return ___MISS",
           "    except Exception:",
           "        return ___MISS"]
    if args is not None:
        src.append(f"    ___o = ___graph({args})")
    src += ["    " + line for line in body]
    src += [f"def ___why({params}):", "    try:"]
    src += ["        " + line for line in guards.why_lines()]
    src += ["    except Exception as e:", "        return f'guard raised {type(e).__name__}: {e}'",
            "    return None"]
    text = "\n".join(src) + "\n"
    code = compile(text, f"<kiln {label}>", "exec")
    exec(code, ns)
    ns["___entry"].__kiln_source__ = text
    return ns["___entry"], ns["___why"], text


def _as_f64_tensor(v: float) -> torch.Tensor:
    """An unspecialized float input as the graph takes it (sources.FloatTensorSource)."""
    return torch.tensor(v, dtype=torch.float64)


def base_namespace(output, ctx) -> dict:
    from .cache import MISS

    ns = dict(output.objects.values)
    ns.update({
        "___G": output.root_globals,
        "___grad": torch.is_grad_enabled,
        "___isnan": math.isnan,
        "___as_tensor": _as_f64_tensor,
        "___set_grad": torch._C._set_grad_enabled,
        "___autocast": torch._C._is_any_autocast_enabled,
        "___autocast_state": autocast_state,
        "___MISS": MISS,
        "___kcall": ctx.kcall,
        "___kwrap": ctx.kwrap,
        "___ops": NB_OPS,
        "__builtins__": __builtins__,
    })
    return ns
