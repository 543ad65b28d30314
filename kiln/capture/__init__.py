"""capture/: Python bytecode -> torch-level fx graphs + guards (kiln's TorchDynamo).

In:  a Python function or ``nn.Module`` and the arguments of a call.
Out: a compiled wrapper.  Each call checks the cache of generated entries for
     the function (one generated Python guard function per entry); on a miss the
     function's bytecode is executed symbolically over fake tensors
     (``FakeTensorMode``), recording a torch-level ``fx.GraphModule``
     (call_function / call_method nodes of torch functions, ``operator.*`` and
     Tensor methods; one placeholder per input tensor named after its source,
     e.g. ``L_x_``), which goes to the backend ``callable(gm, example_inputs)``.

Invariants:
- Never a wrong answer: whatever cannot be captured runs eagerly (a graph
  break with a recorded reason and the user's file:line), or raises
  ``kiln.exc.Unsupported`` under ``fullgraph=True`` / ``nopython=True``.
- Python side effects seen while tracing (list/dict mutation of inputs,
  attribute writes, global writes, closure-cell writes, grad-mode changes,
  ``Tensor.register_hook`` on inputs) are replayed after the graph runs.
- Every captured value has a source (sources.py): a small tree (local, global,
  closure cell, attribute, item, module table entry, ...) that prints PyTorch's
  name (``L['self']._parameters['weight']``) and writes the code that reads it
  (``self._parameters['weight']``).  Guards are records (guards.Guard: a kind,
  a source, checks with their reasons), rendered into the entry's guard
  function with repeated access chains bound once (guard_cse.py).
- Guards cover tensor dtype/device/shape/stride/requires_grad and type,
  aliasing between input tensors, constants, object identity, types, list
  lengths, dict keys, globals and closure cells read, and grad mode.  A user
  function read from an input is guarded by its code object (PyTorch's
  CLOSURE_MATCH), its cells and defaults by what they hold.  Failure
  reasons use PyTorch's words (``tensor 'L['y']' requires_grad mismatch.
  expected requires_grad=1``, ``L['a'] is L['b']``).
- No C eval-frame hook: compiling happens when a wrapper is called; callees
  that break inside inlining are compiled as frames of their own when the
  generated code calls them; resume functions are real code objects (the
  original bytecode with a prefix that rebuilds the stack) compiled on their
  first call.  A frame that runs eagerly because of a graph break inside one
  of its loops (as PyTorch skips such a frame), an eager remainder, and a
  ``disable(recursive=False)`` frame run a copy of their code whose every call
  goes through ``CompileContext.kwrap`` first (routed_calls.py), so the
  functions they call are compiled, as PyTorch's eval-frame callback does.

CPython versions: 3.11, 3.12 and 3.13.  Each opcode handler declares the versions it
was tested on (``bytecode.handles``), and the stack conventions the graph-break code
relies on are one ``bytecode.StackLayout`` per version (3.13 pushes CALL's NULL after
the callable, has CALL_KW, TO_BOOL, the LOAD_FAST_LOAD_FAST family, FORMAT_SIMPLE /
FORMAT_WITH_SPEC, SET_FUNCTION_ATTRIBUTE, and builds closures with LOAD_FAST).  3.13 was
tested with PyPI's torch 2.13 wheel for it, running tests/capture, tests/seeds and
tests/unit (tests/capture/test_version_constructs.py compiles each changed construct).
On any other interpreter capture warns once and every frame runs eagerly.

Python covered:
locals/globals/closures (LOAD/STORE_FAST, _DEREF, _GLOBAL, MAKE_CELL), constants,
arithmetic/comparison/identity/containment operators, tuples/lists/dicts/slices
and their literals, unpacking (incl. starred), subscripts and slices, attribute
reads/writes, calls with positional/keyword/*args/**kwargs, inlined user
functions, methods, nested functions and closures, properties, nn.Modules
(inlined forward, Sequential/ModuleList/ModuleDict, parameters and buffers as
graph inputs), torch functions / Tensor methods / torch.ops / operator /
math, autograd.Function.apply (forward and backward as the subgraphs of
``kiln.ops.autograd_function_apply`` under grad, else one call), builtins (len, isinstance, getattr, range,
enumerate, zip, min/max on constants, ...), for loops over known sequences,
if/else on Python values, ``with torch.no_grad()/enable_grad()/
set_grad_enabled()``, ``with contextlib.nullcontext()`` and
``torch.autocast(..., enabled=False)`` outside autocast (transformers' rotary
embeddings; a break inside these blocks still resumes compiled), try/finally bodies, comprehensions and generator
expressions (generators are unrolled when they have no side effects),
``super()``, ``functools.partial``, imports of loaded modules, dataclass
results built in the region (e.g. HF ``ModelOutput``), reads of dict-subclass
registries, ``os.environ`` and weak references (guarded on what was read),
objects with a custom ``__getattribute__`` (read through it, guarded).

Python's own types and modules (variables/pylib.py merges their tables): set and
frozenset (sets.py; members keyed as Python hashes them: constants by value, tensors
and plain objects by identity), dict / OrderedDict / defaultdict / Counter with their
methods and live views, key views set-like, keys that are enum members, modules or
tensors (dicts.py, collections_vt.py), deque, named tuples and C struct sequences
such as ``torch.return_types.max`` (namedtuples.py; ``.values`` works), itertools
(itertools_vt.py; ``count``/``cycle`` lazily), functools.reduce / wraps and
``lru_cache`` wrappers (inlined through ``__wrapped__``), operator.itemgetter /
attrgetter / methodcaller (functools_vt.py), enum members as constants,
dataclasses.fields / replace / asdict (dataclasses_vt.py), typing subscripts
(evaluated while tracing), ``yield from`` in unrolled generators, ``max``/``min`` of
tensors and sizes (tensor_values.py), ``id()`` of inputs (guarded), user ``__bool__`` /
``__len__`` / ``__iter__``.  Sets, dicts and deques read from the caller are guarded
on their contents / keys / length and their mutations replayed.

NumPy (numpy_vt.py) is traced as torch ops, as PyTorch's capture does: arrays read
from the caller are graph inputs (``torch.as_tensor``, same memory), ``Tensor.numpy()``
is the same tensor, NumPy functions, methods and operators are graph nodes running
``torch._numpy``; arrays that leave the region are rebuilt with ``.numpy()``.
``numpy.random``, ``item`` and NumPy scalars entering a graph are graph breaks;
``ndarray.tolist`` is the tensor's ``tolist``; ``min``/``max`` of arrays are ``np.minimum`` /
``np.maximum`` (as in PyTorch).

Graph breaks (the rest runs eagerly, then capture resumes): a data-dependent
``if`` on a tensor or on a value read from one (both branches become resume functions),
``print``, ``.item()`` (unless ``config.capture_scalar_outputs``), ``.tolist()`` of a
non-integer tensor, ``kiln.graph_break()``, calls that fail on fake
tensors, unknown C functions, construction of objects whose classes kiln cannot build,
an exception that no ``except`` in the region catches.  A call, attribute read, subscript or operator that breaks is run by
the generated code, then a compiled resume function continues.  A call or
tensor-dependent jump that breaks inside a loop body (a jump back follows it
before any return: PyTorch's heuristic) makes the whole frame run eagerly
instead, its callees compiled; another break there compiles the graph so far
and runs the rest of the frame eagerly.  Inside a
``try``/``with`` region the rest of that frame runs eagerly instead (so the
frame's own exception handling stays in charge), but a breaking call's
callee is still compiled as a frame of its own.

Exceptions (handlers_except.py, variables/exceptions.py): ``raise`` of an exception built in
the region (builtin classes and subclasses without their own ``__init__``), and a lookup eager
fails for certain (a missing dict key), raise it in the trace; the frame's exception table
(CPython 3.11+) finds the handler, as CPython unwinds: ``try`` / ``except`` / ``finally``,
``raise from`` and bare ``raise`` stay in the graph.  One nothing catches is a graph break at
the instruction that raised it, so eager raises it for real.  An exception inside a
``with`` block of the region is a graph break too (``__exit__`` is not called with it), and a
graph break inside an ``except`` block makes the frame run eagerly.

Dynamic shapes (capture/dynamic.py): ``dynamic=None`` (default) compiles static
first and, when a recompile is caused by a changed size, makes the dims that
changed symbolic (SymInts of a ``ShapeEnv``; ``config.automatic_dynamic_shapes``);
``dynamic=True`` makes every dim symbolic from the first compile (sizes 0 and 1
specialised); ``dynamic=False`` specialises every shape.  Symbolic dims get one
graph input per size symbol (``s0``, fed ``x.size(0)``), placeholders carry fake
tensors with SymInt sizes in ``meta["val"]``, symbolic graphs get fake example
inputs, and the entry's guards are the ShapeEnv's guards printed over the
inputs' sizes (duck-sized equal dims share a symbol).  Ints read from the frame's
arguments (or closure cells, or items/attributes of them; not from nn.Modules,
globals or defaults) follow the same rule: static first, then, after a recompile
where the value changed, a ``Sym(s0)`` graph input guarded by its type and by the
ShapeEnv's guards over it (``dynamic=True``: from the first compile, 0 and 1 not
specialised; export keeps them static).  Floats stay specialised (one entry per
value; PyTorch 2.13 passes them as float64 0-dim tensors instead).  Python uses of a size
(``range(n)``, ``if n > 4``) are decided by the ShapeEnv and guarded.  With a
ShapeEnv, torch calls on fake tensors go through the Python dispatcher (as in
PyTorch), so that C++ composite kernels reading ``sizes()`` do not specialise.

Statistics (stats.py): ``kiln.capture.counters`` is filled under PyTorch's keys
(``counters["graph_break"][reason]``, ``["frames"]["total"/"ok"]``,
``["stats"]["calls_captured"/"unique_graphs"]``, ``["unimplemented"]``); ``kiln.reset()``
clears it.

Global state guarded on every entry: grad mode and autocast (off, or the exact
per-device state seen), so that ``torch.is_autocast_enabled()`` read while tracing
stays true; deterministic algorithms (and warn-only), cuBLAS TF32 and the default dtype.  A function that cannot be captured at all runs eagerly, recorded as a
fallback (``kiln.fallbacks.record_fallback``, a ``kiln.exc.FallbackWarning``), and
``explain`` lists it under "Eager Frames" and "Fallbacks" with the reason.  An
unexpected exception inside an opcode handler (a kiln bug) is a graph break
"internal limitation: <Type>: <msg>"; under ``KILN_STRICT=1`` it raises instead.
Under fullgraph, :class:`kiln.exc.Unsupported` names the user's file:line and source
line, and its traceback keeps only the user's frames and the compiled wrapper.

On CUDA, ``nn.LSTM``/``GRU`` calls break the graph and run eagerly (cuDNN): their
C++ kernel packs weights by data pointer, which fake tensors do not have (on CPU
they are captured; PyTorch's capture skips RNN modules altogether).

Other context managers: ``torch.profiler.profile`` / ``record_function`` are ignored
(variables/profiler.py), ``torch.autograd.graph.disable_saved_tensors_hooks`` is graph nodes
switching the hooks (variables/saved_hooks.py); a graph break inside the with-block of a
user-defined context manager runs the frame eagerly, its callees compiled (as in PyTorch).
Graph nodes are named after the local they are first stored to (``x = a + 1`` is node ``x``)
and carry ``meta["stack_trace"]`` (the user's frames), as PyTorch's capture makes them.

``torch.autocast`` regions (variables/autocast.py) are ``torch.amp._enter_autocast`` /
``_exit_autocast`` nodes, entered for real while tracing; a break inside one keeps the
state across it (the resume function receives a ``kiln.tracing.autocast.AutocastExit``).
``Tensor.register_hook`` on an intermediate tensor is a ``kiln.ops.register_hook`` node
with the hook's body as a subgraph (variables/tensor_hooks.py); untraceable hooks break.

Tensor data read into Python (variables/scalars.py): ``.tolist()`` of an integer tensor,
and ``.item()`` under ``config.capture_scalar_outputs``, are ``item`` nodes whose values are
unbacked SymInts/SymFloats (the frame's fake mode gets a ShapeEnv at the first read; the
backend gets fake inputs); they size factories, ``cat``, slices, and leave the graph as
Python numbers.  ``torch._check`` / ``_check_is_size`` / ``assert`` on them become
``aten._assert_scalar`` nodes (``assert`` on a tensor, ``torch._assert_async``); a Python
decision on one is a graph break ("data-dependent guard on ..."); a torch call that
fails on fake tensors with such sizes raises ``kiln.exc.TorchRuntimeError``, as in
PyTorch.  Input dims marked by PyTorch's ``mark_unbacked`` (or made dynamic under
``config.automatic_dynamic_shapes_mark_as = "unbacked"``) are unbacked symbols too.
"""
from __future__ import annotations

import importlib
from typing import Any

from . import config

# NOTE: names resolve lazily so that the bytecode layer (capture/bytecode.py) stays
# importable on an interpreter without torch.  No submodule may share a lazy name: a
# submodule's import binds it as an attribute of this package, hiding the function
# (explain() lived in explain.py, so kiln.capture.export() made kiln.explain a module).
_LAZY = {
    "compile": "api", "optimize": "api", "optimize_assert": "api", "disable": "api", "reset": "api",
    "graph_break": "api", "OptimizedModule": "api", "DEFAULT_BACKEND": "api",
    "explain": "explain_export", "export": "explain_export",
    "counters": "stats",
    "mark_dynamic": "marked_dims", "maybe_mark_dynamic": "marked_dims", "mark_static": "marked_dims",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"kiln.capture.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kiln.capture' has no attribute {name!r}")


__all__ = sorted(_LAZY) + ["config"]
