"""Dynamic shapes: which tensor dims are symbolic, and the guards that keep them valid.

In:  ``dynamic=`` of the compile call (None: automatic, True: all dims, False:
     none), the sizes seen by earlier compiles of the same code object, and
     the ShapeEnv that traced the frame.
Out: per input tensor the dims to make symbolic (``DimDynamic.DYNAMIC``), and
     Python guard expressions over the inputs (``x.size(0) >= 2``,
     ``x.size(0) % 2 == 0``, ``y.size(1) == x.size(0)``) equal to the ShapeEnv's
     guards with each size symbol printed as the source that produced it.

Ints (PyTorch's automatic dynamic for scalars, ``specialize_int=False``): an int
argument whose value changed between compiles becomes a symbolic graph input
(``FrameState.int_is_dynamic``, ``symbolic_int``); module attributes, globals and
defaults stay constants (``int_may_be_dynamic``).  Floats follow the same rule
(PyTorch's unspecialized floats, ``specialize_float=False``): a float input whose value
changed becomes a SymFloat graph input (``symbolic_float``); NaN and infinities stay
constants, and every entry with a float symbol guards that the float is not NaN.

Invariants:
- dynamic=False (and the first compile under dynamic=None) never creates a
  ShapeEnv: shapes are specialised exactly as before.
- Automatic dynamic (dynamic=None): a dim becomes symbolic on the compile
  after one where its size differed from the recorded one, and stays symbolic.
- nn.Parameters keep static shapes (as in PyTorch).
- Every fact the trace relied on is a ShapeEnv guard (or a range bound of a
  symbol), so an entry never accepts an input it would compute wrongly.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch

from .sources import Source

# NOTE: size symbols s0, unbacked u0, float symbols zf0.
_NAME = re.compile(r"\b[a-z]{1,2}\d+\b")

# NOTE: these backends compile the torch-level graph for its example sizes (ONNX/TVM
# export with real inputs) or take every untyped graph input as a Tensor (TorchScript):
# given symbolic sizes they would fail at run time, so shapes stay static for them.
STATIC_ONLY_BACKENDS = frozenset({"ts", "onnxrt", "tvm"})
# NOTE: export specialises int inputs (only tensor dims named by Dim are symbolic).
NO_DYNAMIC_INT_BACKENDS = STATIC_ONLY_BACKENDS | {"export"}


def effective_mode(dynamic: Optional[bool], backend_name: str) -> Optional[bool]:
    """``dynamic=`` as it applies to ``backend_name`` (False for static-only backends)."""
    return False if backend_name in STATIC_ONLY_BACKENDS else dynamic


class FrameState:
    """Sizes seen per tensor source, and values per int source, over the compiles of one
    code object."""

    def __init__(self) -> None:
        self.sizes: dict[str, list] = {}
        self.ints: dict[str, Any] = {}  # int source name -> value seen, or DYNAMIC_INT
        self.compiles = 0

    def int_is_dynamic(self, mode: Optional[bool], name: str, value: int) -> bool:
        """Whether the int at ``name`` becomes a symbolic graph input (PyTorch's
        ``automatic_dynamic`` for scalars: static first, symbolic from the compile
        after one where its value differed; every compile under dynamic=True)."""
        if mode is False:
            return False
        if mode is True:
            return True
        from . import config

        if not config.automatic_dynamic_shapes:
            return False
        if name in self.sizes:
            # NOTE: a tensor before, an int now: dynamic at once (PyTorch merges the two kinds
            # of entry of one source into an unknown scalar and unknown sizes).
            self.sizes[name] = None
            self.ints[name] = DYNAMIC_INT
            return True
        seen = self.ints.get(name, _UNSEEN)
        if seen is _UNSEEN:
            self.ints[name] = value
            return False
        if seen is DYNAMIC_INT or seen != value:
            self.ints[name] = DYNAMIC_INT
            return True
        return False

    def dynamic_dims(self, mode: Optional[bool], name: str, t: torch.Tensor, is_param: bool) -> Optional[list]:
        """Which dims of ``t`` (at ``name``) to make symbolic; None: all static."""
        from . import config

        if mode is False or (is_param and config.force_parameter_static_shapes):
            return None
        shape = list(t.shape)
        if mode is True:
            return [True] * len(shape)

        if not config.automatic_dynamic_shapes:
            return None
        if name in self.ints:
            # NOTE: an int before, a tensor now: every dim dynamic (see int_is_dynamic).
            self.ints[name] = DYNAMIC_INT
            self.sizes[name] = None
        if name in self.sizes and self.sizes[name] is None:
            return [True] * len(shape)
        seen = self.sizes.get(name)
        if seen is None or len(seen) != len(shape):
            # NOTE: automatic dynamic starts static; a rank change is not a size change.
            if seen is None or self.compiles == 0:
                self.sizes[name] = shape
            return None
        merged = [None if (a is None or a != b) else a for a, b in zip(seen, shape)]
        self.sizes[name] = merged
        dyn = [m is None for m in merged]
        if config.automatic_dynamic_shapes_mark_as == UNBACKED:
            dyn = [UNBACKED if d else False for d in dyn]
        return dyn if any(dyn) else None


_UNSEEN = object()
DYNAMIC_INT = object()  # NOTE: FrameState.ints marker: the int changed once, it stays symbolic

# NOTE: ints read through these sources stay constants, as in PyTorch
# (``is_int_specialization_case``): globals, objects embedded by identity, and
# anything under an nn.Module (its int attributes are configuration) or a function's
# defaults.
_DYNAMIC_INT_ROOTS = ("LocalSource", "ClosureSource")
_STATIC_INT_ATTRS = frozenset({"__defaults__", "__kwdefaults__"})


def int_may_be_dynamic(source: "Source", module_sources: set) -> bool:
    """Whether an int read at ``source`` may become a symbolic input: rooted at a local
    or closure cell of the frame, not read from a module (``module_sources``: names of
    the sources that hold nn.Modules) nor from function defaults."""
    chain = source.chain()
    if type(chain[-1]).__name__ not in _DYNAMIC_INT_ROOTS:
        return False
    for s in chain[1:]:
        if s.name() in module_sources or getattr(s, "attr_name", None) in _STATIC_INT_ATTRS:
            return False
    return type(source).__name__ in ("LocalSource", "ClosureSource", "AttrSource", "ItemSource")


def _shape_env_source(name: str):
    """A ``torch._guards.Source`` naming an int input for the ShapeEnv (its symbol's origin)."""
    return _scalar_source_class()(name)


_SCALAR_SOURCE: list = []


def _scalar_source_class() -> type:
    import functools
    import inspect

    from torch._guards import GuardSource, Source as TorchSource

    if _SCALAR_SOURCE:
        return _SCALAR_SOURCE[0]

    def as_declared(attr: str, fn):
        # NOTE: torch 2.13 declares ``name`` / ``guard_source`` as properties, older
        # versions as methods: declare ours the way this torch reads them.
        declared = inspect.getattr_static(TorchSource, attr, None)
        return property(fn) if isinstance(declared, (property, functools.cached_property)) else fn

    class ScalarInputSource(TorchSource):
        def __init__(self, text: str) -> None:
            object.__setattr__(self, "text", text)

        def __hash__(self) -> int:
            return hash(("kiln-int", self.text))

        def __eq__(self, other: object) -> bool:
            return type(other) is type(self) and other.text == self.text

        name = as_declared("name", lambda self: self.text)
        guard_source = as_declared("guard_source", lambda self: GuardSource.LOCAL)

        @property
        def _name_template(self) -> str:
            return self.text

    _SCALAR_SOURCE.append(ScalarInputSource)
    return ScalarInputSource


def symbolic_int(shape_env, value: int, name: str) -> torch.SymInt:
    """A SymInt of a new unspecified symbol for the int input ``name`` (hint ``value``):
    any integer, 0 and 1 not specialised (PyTorch's ``create_unspecified_symint_and_symbol``)."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    return shape_env.create_unspecified_symint_and_symbol(value, _shape_env_source(name), DimDynamic.DYNAMIC)


def symbolic_float(shape_env, value: float, name: str) -> torch.SymFloat:
    """A backed SymFloat of a new symbol for the float input ``name`` (hint ``value``), as
    PyTorch's unspecialized float (``create_unspecified_symbol`` + ``create_symfloatnode``)."""
    from torch.fx.experimental.symbolic_shapes import DimDynamic

    src = _shape_env_source(name)
    sym = shape_env.create_unspecified_symbol(value, src, DimDynamic.DYNAMIC)
    return shape_env.create_symfloatnode(sym, hint=value, source=src)


def is_float_symbol(sym) -> bool:
    """Whether ``sym`` (a sympy symbol of the ShapeEnv) stands for a float input."""
    from torch.utils._sympy.symbol import SymT, symbol_is_type

    return symbol_is_type(sym, SymT.FLOAT)


def fake_with_dims(fake_mode, value: torch.Tensor, dims: Optional[list], marked: Optional[dict] = None):
    """A fake tensor of ``value`` with ``dims`` (booleans) symbolic, the rest static;
    ``marked``: {dim: (min, max, constrained)} of dims the user marked dynamic (own symbols)."""
    if dims is None or fake_mode.shape_env is None:
        return fake_mode.from_tensor(value, static_shapes=True)
    from torch.fx.experimental.symbolic_shapes import DimDynamic, StatelessSymbolicContext

    marked = marked or {}
    # NOTE: DUCK: equal sizes share one symbol (PyTorch's duck sizing), guarded equal; a dim
    # the user marked gets a symbol of its own (DYNAMIC), as in PyTorch.
    # NOTE: UNBACKED: a size-like symbol without a hint (older torch names it SIZE_LIKE_UNBACKED).
    unbacked = getattr(DimDynamic, "UNBACKED", None) or getattr(DimDynamic, "SIZE_LIKE_UNBACKED")
    sizes = [unbacked if d is UNBACKED else DimDynamic.DYNAMIC if i in marked else DimDynamic.DUCK if d
             else DimDynamic.STATIC for i, d in enumerate(dims)]
    ctx = StatelessSymbolicContext(dynamic_sizes=sizes, constraint_sizes=[_range_constraint(marked.get(i))
                                                                          for i in range(len(dims))])
    return fake_mode.from_tensor(value, symbolic_context=ctx)


def _range_constraint(mark: Optional[tuple]):
    """The ShapeEnv constraint of a marked dim with bounds (None: none); a size outside its
    range raises ConstraintViolationError when its symbol is made."""
    if mark is None or (mark[0] is None and mark[1] is None):
        return None
    from torch.fx.experimental.symbolic_shapes import StrictMinMaxConstraint
    from torch.utils._sympy.value_ranges import ValueRanges
    import sympy

    lo, hi = mark[0], mark[1]
    return StrictMinMaxConstraint(vr=ValueRanges(lower=0 if lo is None else lo,
                                                 upper=sympy.oo if hi is None else hi), warn_only=False)


UNBACKED = "unbacked"  # NOTE: a dynamic_dims entry: the dim is an unbacked (size-like) symbol


def marked_unbacked(output, t: torch.Tensor, dims: Optional[list]) -> Optional[list]:
    """``dims`` with the dims PyTorch's ``mark_unbacked(t, i)`` marked (the tensor's
    ``_dynamo_unbacked_indices``) as UNBACKED: symbols without a hint, no 0/1 specialisation,
    size-oblivious reasoning; such a frame gets a ShapeEnv (variables/scalars.py)."""
    marked = getattr(t, "_dynamo_unbacked_indices", None)
    if not marked or isinstance(t, torch.nn.Parameter):
        return dims
    from .variables.scalars import scalar_outputs

    scalar_outputs(output)
    dims = list(dims) if dims is not None else [False] * t.dim()
    for i in marked:
        if -t.dim() <= i < t.dim():
            dims[i] = UNBACKED
    return dims


def new_fake_mode(shape_env: bool):
    from torch._subclasses.fake_tensor import FakeTensorMode

    if not shape_env:
        return FakeTensorMode()
    return FakeTensorMode(shape_env=new_shape_env())


def new_shape_env(scalar_outputs: bool = False):
    """A ShapeEnv for a frame's fake mode; ``scalar_outputs``: fake ``item()`` gives unbacked
    symbols (variables/scalars.py; else they come only where that module allows them)."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    # NOTE: ops whose output size depends on data (nonzero, unique...) stay graph
    # breaks, as without a ShapeEnv: no unbacked symbols (they have no input source).
    try:
        return ShapeEnv(allow_dynamic_output_shape_ops=False, allow_scalar_outputs=scalar_outputs)
    except TypeError:  # NOTE: older ShapeEnv signature; data-dependent ops still break elsewhere
        return ShapeEnv()


class SymbolTable:
    """Size symbols of the inputs and the Python expressions that read them."""

    def __init__(self) -> None:
        self.exprs: dict[Any, str] = {}   # sympy.Symbol -> Python source (e.g. "x.size(0)")
        self.names: dict[Any, str] = {}   # sympy.Symbol -> guard-language name ("L['x'].size()[0]")

    def add(self, sym, expr: str, name: str) -> bool:
        """Record a symbol's first source; False when it was already known."""
        if sym in self.exprs:
            return False
        self.exprs[sym] = expr
        self.names[sym] = name
        return True

    def _render(self, expr, table: dict) -> str:
        from torch.utils._sympy.printers import PythonPrinter

        text = PythonPrinter().doprint(expr)
        by_name = {str(s): v for s, v in table.items()}
        missing = [s for s in expr.free_symbols if s not in table]
        if missing:
            raise KeyError(f"size symbol {missing[0]} has no source")
        return _NAME.sub(lambda m: f"({by_name[m.group(0)]})" if m.group(0) in by_name else m.group(0), text)

    def py(self, expr) -> str:
        """``expr`` (sympy, over the input symbols) as Python over the sources."""
        return self._render(expr, self.exprs)

    def human(self, expr) -> str:
        return self._render(expr, self.names)


def sym_expr_of(v: Any):
    """The sympy expression of a SymInt / SymFloat / int."""
    if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return v.node.expr
    import sympy

    return sympy.Integer(int(v))


def _bound(b) -> Optional[int]:
    """A finite integer range bound, or None for +-infinity."""
    try:
        v = int(b)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    return v if abs(v) < 2 ** 62 else None


def shape_guards(shape_env, table: SymbolTable) -> list[tuple[str, str]]:
    """(Python expression, reason) for every guard the ShapeEnv recorded, plus symbol ranges."""
    import sympy

    out: list[tuple[str, str]] = []
    seen: set = set()

    def add(expr) -> None:
        if expr in seen or expr is sympy.true:
            return
        seen.add(expr)
        out.append((table.py(expr), table.human(expr)))

    ranges = getattr(shape_env, "var_to_range", {})
    for sym in table.exprs:
        vr = ranges.get(sym)
        if vr is None:
            continue
        lo, hi = _bound(vr.lower), _bound(vr.upper)
        if lo is not None:
            add(sympy.Ge(sym, lo, evaluate=False))
        if hi is not None:
            add(sympy.Le(sym, hi, evaluate=False))
    for g in shape_env.guards:
        add(g.expr)
    for sym in table.exprs:
        if is_float_symbol(sym):
            # NOTE: as PyTorch, NaN is specialised (it breaks equality reasoning): an entry
            # with a float symbol rejects NaN, which compiles an entry of its own.
            out.append((f"not ___isnan({table.exprs[sym]})", f"not math.isnan({table.names[sym]})"))
    return out


def tensor_shape_checks(src: "Source", fake: torch.Tensor, table: SymbolTable) -> Optional[tuple]:
    """``_tensor_shape_checks``, or None (the table unchanged) when a stride or size
    cannot be written over known sources."""
    saved = dict(table.exprs), dict(table.names)
    try:
        return _tensor_shape_checks(src, fake, table)
    except KeyError:
        table.exprs, table.names = saved
        return None


def _tensor_shape_checks(src: "Source", fake: torch.Tensor, table: SymbolTable) -> tuple[list, list, list]:
    """Shape and stride checks of a tensor with symbolic dims, registering its new symbols.

    Static dims are compared exactly; a dim whose symbol is new binds it (its range
    and relations come from the ShapeEnv guards); a duck-sized repeat of a known
    symbol is compared with the symbol's first source.  Returns (shape checks,
    stride checks, [(dim, SymInt) for each new size symbol]); a check is a guard test
    (a tuple of text and the source itself, see guards.Check).
    """
    import sympy

    e, name = src.code(), src.name()
    shape_parts = [(src, f".dim() == {fake.dim()}")]
    new = []
    for i, s in enumerate(fake.shape):
        if not (isinstance(s, torch.SymInt) and not s.node.is_constant()):
            shape_parts.append((src, f".size({i}) == {int(s)}"))
            continue
        x = s.node.expr
        if isinstance(x, sympy.Symbol) and table.add(x, f"{e}.size({i})", f"{name}.size()[{i}]"):
            new.append((i, s))
        else:
            shape_parts.append((src, f".size({i}) == {table.py(x)}"))
    strides: list = []
    for i, s in enumerate(fake.stride()):
        strides.append(", " if i else "")
        if not isinstance(s, torch.SymInt) or s.node.is_constant():
            strides.append(str(int(s)))
            continue
        x = s.node.expr
        if isinstance(x, sympy.Symbol) and table.add(x, f"{e}.stride({i})", f"{name}.stride()[{i}]"):
            strides += [src, f".stride({i})"]
        else:
            strides.append(table.py(x))
    stride_part = (src, ".stride() == (", *strides, f"{',' if fake.dim() == 1 else ''})")
    off = fake.storage_offset()
    if isinstance(off, torch.SymInt) and isinstance(off.node.expr, sympy.Symbol):
        table.add(off.node.expr, f"{e}.storage_offset()", f"{name}.storage_offset()")
    return shape_parts, [stride_part], new
