"""``torch.autocast`` regions captured into the graph.

In:  ``with torch.autocast(...)`` (also ``torch.amp.autocast``, ``torch.cpu.amp.autocast``,
     ``torch.cuda.amp.autocast``, an autocast object read from the caller, so the
     ``@torch.autocast(...)`` decorator too) and ``torch.amp._enter_autocast`` /
     ``_exit_autocast`` calls (graphs kiln captures again).
Out: graph nodes ``torch.amp._enter_autocast(device, dtype, enabled, cache_enabled)``
     and ``torch.amp._exit_autocast(mode)`` around the region's ops, as PyTorch records
     them; the region is also entered for real while tracing, so fake tensors get the
     dtypes autocast gives and ``torch.is_autocast_enabled()`` reads the live state.

Invariants:
- a graph leaves the autocast state as it found it: regions still open when it ends
  (a graph break inside them) are closed by nodes at its end, and the generated code
  enters them again after the graph call, so the break and the resume function run
  inside the region (the entry guards of the resume function see it on);
- the ``__exit__`` that a resume function receives for such a region is a
  :class:`kiln.tracing.autocast.AutocastExit` (plain data, guarded by value); leaving the
  region in the resume function's graph is a ``restore_autocast`` node (undone at the
  graph's end, replayed after it, like any state change the graph cannot keep);
- the trace's own changes are undone when a trace ends or aborts (``unwind``), so a
  restarted trace or the caller never sees them;
- ``enabled=False`` while autocast is off everywhere stays a no-op context (no nodes);
  anything else that changes autocast state directly is a graph break.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch

from kiln.tracing.autocast import AutocastExit, enter_autocast, exit_autocast, region_state, restore_autocast

from .base import VT, ConstantVT, unsupported
from .objects import NullContextVT, ReplayableExitVT


# --------------------------------------------------------------------------- per-graph log
class AutocastRegions:
    """What a trace did to the autocast state that its graph has not undone yet.

    ``ops``: ("enter", region VT, enter node) and ("exit", AutocastExit, None), in order;
    ``live``: the same changes made for real while tracing (the mode objects entered)."""

    def __init__(self) -> None:
        self.ops: list = []
        self.live: list = []

    def enter(self, tx, region: "AutocastVT") -> None:
        out = tx.output
        region.prev = region_state(region.values[0])
        mode = enter_autocast(*region.values)
        node = out.graph.call_function(enter_autocast, region.values)
        node.meta["example_value"] = None
        region.node = node
        self.ops.append(("enter", region, node))
        self.live.append(("enter", mode, region))

    def exit(self, tx, region: "AutocastVT") -> None:
        if not self.ops or self.ops[-1][1] is not region or not self.live or self.live[-1][2] is not region:
            unsupported("leaving an autocast region that is not the innermost one entered in the compiled region",
                        why="regions must nest as with-blocks do")
        _, _, node = self.ops.pop()
        _, mode, _ = self.live.pop()
        exit_autocast(mode)
        tx.output.graph.call_function(exit_autocast, (node,))
        region.node = None

    def cross_exit(self, tx, done: AutocastExit) -> None:
        """Leave a region entered before this frame's graph began (a graph break inside it)."""
        if any(op == "enter" for op, *_ in self.ops):
            unsupported("leaving an outer autocast region while a region entered here is still open",
                        why="regions must nest as with-blocks do")
        done()
        tx.output.graph.call_function(restore_autocast, (done.device, *done.prev))
        self.ops.append(("exit", done, None))
        self.live.append(("exit", done, None))

    def sets_dtype_of(self, device: str) -> bool:
        """Whether a change this graph made (and has not undone) fixes ``device``'s autocast
        dtype: a region entered here, or an outer one left here (its earlier state is guarded)."""
        # NOTE: then the dtype a nested ``autocast(device)`` defaults to is the graph's own,
        # not the caller's: a guard on the caller's would fail on every call.
        return any((what.values[0] if op == "enter" else what.device) == device for op, what, _ in self.ops)

    def close_graph(self, graph) -> None:
        """Nodes at the end of ``graph`` that undo what is still open (innermost first)."""
        for op, what, node in reversed(self.ops):
            if op == "enter":
                graph.call_function(exit_autocast, (node,))
            else:
                graph.call_function(enter_autocast, what.values)

    def unwind(self) -> None:
        """Undo the real changes of the trace (innermost first)."""
        while self.live:
            op, what, _ = self.live.pop()
            if op == "enter":
                exit_autocast(what)
            else:
                enter_autocast(*what.values)

    def emit_replay(self, cg) -> None:
        """After the graph call: redo, in order, what the graph undid at its end."""
        for op, what, _ in self.ops:
            if op == "enter":
                cg.line(f"{cg.obj(enter_autocast)}(*{cg.obj(what.values)})")
            else:
                cg.line(f"{cg.obj(what)}()")


def regions_of(output) -> AutocastRegions:
    regions = output.__dict__.get("kiln_autocast")
    if regions is None:
        regions = output.__dict__["kiln_autocast"] = AutocastRegions()
    return regions


def finish_graph(output) -> None:
    """At compile time: close what is open in the graph and give the backend the state the
    frame started with."""
    regions = output.__dict__.get("kiln_autocast")
    if regions is not None:
        regions.close_graph(output.graph)
        regions.unwind()


def replay_after_graph(output, cg) -> None:
    regions = output.__dict__.get("kiln_autocast")
    if regions is not None:
        regions.emit_replay(cg)


def unwind(output) -> None:
    regions = output.__dict__.get("kiln_autocast")
    if regions is not None:
        regions.unwind()


def depth(output) -> int:
    """How many unbalanced autocast changes the graph under construction has."""
    regions = output.__dict__.get("kiln_autocast")
    return len(regions.ops) if regions is not None else 0


# --------------------------------------------------------------------------- VTs
class AutocastVT(VT):
    """An autocast object: ``values`` = (device_type, dtype, enabled, cache_enabled)."""

    def __init__(self, values: tuple, pytype: type = torch.autocast, source=None):
        self.values = tuple(values)
        self.pytype = pytype
        self.source = source
        self.prev: Optional[tuple] = None
        self.node = None

    def python_type(self) -> type:
        return self.pytype

    def call_method(self, tx, name: str, args: list, kwargs: dict) -> VT:
        if name == "__enter__":
            if self.node is not None:
                unsupported("entering an autocast object that is already entered")
            regions_of(tx.output).enter(tx, self)
            return self
        if name == "__exit__":
            return self.getattr(tx, "__exit__").call(tx, args, kwargs)
        unsupported(f"method {name} of an autocast object",
                    why="only its use as a context manager is captured (a decorator applied inside "
                        "the compiled region is not)")

    def getattr(self, tx, name: str) -> VT:
        if name == "__exit__":
            return AutocastExitVT(region=self)
        fields = {"device": 0, "fast_dtype": 1, "_enabled": 2}
        if name in fields:
            return ConstantVT(self.values[fields[name]])
        unsupported(f"attribute {name} of an autocast object")

    def reconstruct(self, cg) -> str:
        # NOTE: a new object with the same values (not entered): what escapes is the object a
        # later `with` may enter again.
        return f"{cg.obj(torch.autocast)}(*{cg.obj(self.values)})"

    def __repr__(self) -> str:
        return f"AutocastVT{self.values}"


class AutocastExitVT(ReplayableExitVT):
    """The ``__exit__`` of a region: entered in this frame (``region``), or before a graph
    break (``done``, an AutocastExit received by a resume function)."""

    def __init__(self, region: Optional[AutocastVT] = None, done: Optional[AutocastExit] = None,
                 source=None):
        self.region = region
        self.done = done
        self.source = source

    def python_type(self) -> type:
        return AutocastExit

    def call(self, tx, args: list, kwargs: dict) -> VT:
        regions = regions_of(tx.output)
        if self.region is not None:
            regions.exit(tx, self.region)
        else:
            regions.cross_exit(tx, self.done)
        return ConstantVT(None)

    def reconstruct(self, cg) -> str:
        if self.done is not None:
            return cg.obj(self.done)
        r = self.region
        if r.prev is None:
            unsupported("the __exit__ of an autocast region that was never entered")
        return f"{cg.obj(AutocastExit)}({cg.obj(r.values)}, {cg.obj(r.prev)})"


# --------------------------------------------------------------------------- construction
def _given_cache(bound: inspect.BoundArguments) -> Any:
    return bound.arguments.get("cache_enabled")


def _guard_default_dtype(tx, device: str, dtype: torch.dtype) -> None:
    """A region without ``dtype=`` uses the device's autocast dtype of the moment: guarded."""
    from ..guards import GuardKind

    g = tx.output.guards
    o = tx.output.objects
    g._one(GuardKind.AUTOCAST, None, (f"{o.name_of(torch.get_autocast_dtype)}({device!r}) is {o.name_of(dtype)}",),
           f"GLOBAL_STATE changed: autocast dtype of {device} (expected {dtype})",
           detail=f"{device} dtype {dtype}", key=(GuardKind.AUTOCAST, "dtype", device))


def build_region(tx, cls: type, args: list, kwargs: dict) -> VT:
    """``cls(*args, **kwargs)`` for an autocast class: its values are constants, read by
    building the real object now (same validation, warnings and defaults as eager)."""
    try:
        bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
    except TypeError as e:
        unsupported(f"{cls.__qualname__}{tuple(args)}: {e}")
    consts = {}
    for k, v in bound.arguments.items():
        if k == "self":
            continue
        if not v.is_const():
            unsupported(f"{cls.__qualname__} with a non-constant argument {k}",
                        why="the region's device, dtype and flags must be known while tracing")
        consts[k] = v.const()
    try:
        obj = cls(**consts)
    except Exception as e:  # noqa: BLE001 - eager raises the same when it builds the object
        unsupported(f"{cls.__qualname__}(...) raised {type(e).__name__}: {e}", why="eager raises it too")
    values = (obj.device, obj.fast_dtype, bool(obj._enabled), consts.get("cache_enabled"))
    if not values[2] and not torch._C._is_any_autocast_enabled():
        # NOTE: disabling while nothing is enabled changes nothing the graph computes (the
        # entry's autocast guard re-checks that autocast is off).
        return NullContextVT(ConstantVT(None))
    dtype_param = inspect.signature(cls.__init__).parameters.get("dtype")
    if consts.get("dtype", getattr(dtype_param, "default", None)) is None and \
            not regions_of(tx.output).sets_dtype_of(obj.device):
        _guard_default_dtype(tx, obj.device, obj.fast_dtype)
    return AutocastVT(values, cls)


def _class_handler(cls: type):
    def run(tx, *args: VT, **kwargs: VT) -> VT:
        return build_region(tx, cls, list(args), dict(kwargs))

    return run


def _autocast_classes() -> list:
    import torch.amp.autocast_mode as m

    out = [torch.autocast, torch.cpu.amp.autocast, torch.cuda.amp.autocast]
    if hasattr(m, "_UnmanagedAutocast"):
        out.append(m._UnmanagedAutocast)
    return out


def autocast_types() -> dict:
    """Handlers for calls of the autocast classes (the builtin-types table)."""
    return {cls: _class_handler(cls) for cls in _autocast_classes()}


# --------------------------------------------------------------------------- values from the caller
def wrap_autocast(tx, value: Any, source, guard: bool) -> VT:
    """An autocast object read from the caller (e.g. the closure of ``@torch.autocast``)."""
    if getattr(value, "_enabled", None) is None or not hasattr(value, "fast_dtype"):
        unsupported("an autocast object without its settings")
    values = (value.device, value.fast_dtype, bool(value._enabled), value._cache_enabled)
    if guard:
        g = tx.output.guards
        g.type_of(source, value)
        for attr, v in (("device", values[0]), ("fast_dtype", values[1]), ("_enabled", value._enabled),
                        ("_cache_enabled", values[3])):
            g.const(source.attr(attr), v)
    return AutocastVT(values, type(value), source)


def wrap_exit(tx, value: AutocastExit, source, guard: bool) -> VT:
    """The ``__exit__`` a resume function receives for a region cut by a graph break."""
    if guard:
        g = tx.output.guards
        g.type_of(source, value)
        g.const(source.attr("values"), value.values)
        g.const(source.attr("prev"), value.prev)
    return AutocastExitVT(done=value, source=source)


def autocast_wrappers() -> dict:
    return {**{cls: wrap_autocast for cls in _autocast_classes()}, AutocastExit: wrap_exit}


# --------------------------------------------------------------------------- torch functions
def _enter_call(tx, *args: VT) -> VT:
    """``torch.amp._enter_autocast(*values)``: a region entered by a graph kiln captures again."""
    region = build_region(tx, torch.autocast, list(args), {})
    if isinstance(region, NullContextVT):
        return region
    return region.call_method(tx, "__enter__", [], {})


def _exit_call(tx, mode: VT) -> VT:
    if isinstance(mode, NullContextVT):
        return ConstantVT(None)
    if not isinstance(mode, AutocastVT):
        unsupported(f"torch.amp._exit_autocast of {mode}")
    return mode.call_method(tx, "__exit__", [ConstantVT(None)] * 3, {})


def _break(what: str):
    def run(tx, *args: VT, **kwargs: VT) -> VT:
        unsupported(what, why="the autocast state is changed outside a region; capture keeps only regions",
                    hint="use `with torch.autocast(...)`")

    return run


def autocast_functions() -> dict:
    """The torch-function table's entries: PyTorch's graph functions, and the raw state setters
    (graph breaks: their changes have no region that undoes them)."""
    table = {enter_autocast: _enter_call, exit_autocast: _exit_call}
    for name in ("set_autocast_enabled", "set_autocast_dtype", "set_autocast_cache_enabled",
                 "autocast_increment_nesting", "autocast_decrement_nesting", "clear_autocast_cache",
                 "set_autocast_cpu_enabled", "set_autocast_cpu_dtype", "set_autocast_gpu_dtype",
                 "set_autocast_ipu_enabled", "set_autocast_ipu_dtype", "set_autocast_xla_enabled",
                 "set_autocast_xla_dtype"):
        fn = getattr(torch, name, None)
        if fn is not None:
            table[fn] = _break(f"call to torch.{name}")
    table[restore_autocast] = _break("call to restore_autocast")
    return table


__all__ = ["AutocastRegions", "AutocastVT", "AutocastExitVT", "build_region", "autocast_types",
           "autocast_wrappers", "autocast_functions", "finish_graph", "replay_after_graph", "unwind",
           "depth", "regions_of"]
