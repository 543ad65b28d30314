"""FunctionalizeMode: a TorchDispatchMode that turns mutations and views into functional ops.

Design (a side table, no wrapper tensors):

* Every tensor the traced code holds is a *handle*: a plain (real or fake)
  tensor produced by the layer below us (usually kiln's tracer).  The mode keeps
  a record per handle (keyed by its TensorImpl) saying which *base* it aliases,
  the chain of view ops from that base, and its last computed value.
* A base owns the current functional value of an aliasing group and a version
  number, bumped on every write.  Reading a handle whose cached value is older
  than its base re-plays the view chain on the base's value (so views see the
  new data, and the graph shows the view ops applied to the updated base).
* ``op_`` / ``op.out`` / ``_native_batch_norm_legit`` ... run as their functional
  siblings (see mutations.py); the new values are scattered back into the base
  through the inverse of the view chain (see views.py).
* Effectful ops (kiln.ops.effects registry) become ``with_effects(token, op, ...)``
  with the token threaded in program order.
* Decompositions (and composite ops, which reach a mode below autograd
  undecomposed) run with the mode re-entered, so their parts are functionalized
  too; a decomposition whose outputs do not have the op's shapes is not used.

The mode's dispatch runs below autograd, so autograd still sees the user's
handles (in-place ops, views, version counters, leaf checks behave as eager),
and the ops this mode emits are what a tracing mode underneath records.
"""
from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from kiln import exc
from kiln.functionalize.metadata import InputInfo
from kiln.tracing.tracer import current_tracer
from kiln.functionalize.mutations import is_mutating, plan_for
from kiln.functionalize.views import INPLACE_VIEWS, ViewStep, is_view_op, replay, scatter_chain
from kiln.ops.effects import with_effects
from kiln.tracing.effects import is_effectful

aten = torch.ops.aten


class Base:
    """An aliasing group: the current functional value of one tensor's memory."""

    __slots__ = ("value", "version", "input_index", "handle", "external")

    def __init__(self, value: torch.Tensor, input_index: Optional[int] = None, external: bool = False):
        self.value = value
        self.version = 0
        self.input_index = input_index
        self.handle = value
        self.external = external


def _refuse_as_strided_in_chain(chain: tuple) -> None:
    """A write through a view chain with an ``as_strided`` after its first step is refused.

    NOTE: ``as_strided`` addresses the storage, not its input: its inverse scatter into the
    previous view of the chain is not the same write (it is non-compositional). PyTorch's
    functionalization refuses it with the same words; as the first step (on the base) it is
    exact, and so it is after identity views only (``alias``, ``detach``: a factory's
    result); an ``as_strided`` that a decomposition made (of ``diagonal``) is not the user's."""
    for i, step in enumerate(chain[1:], 1):
        moved = any(s.op not in _IDENTITY_VIEWS for s in chain[:i])
        if step.op is aten.as_strided.default and moved and not step.decomposed:
            raise exc.BannedInCompile(
                f"During compilation, encountered a mutation on a view chain of length {len(chain)}, where "
                f"view {i} was an as_strided() call. as_strided() is non-compositional, and therefore is not "
                "possible to functionalize properly today, so this behavior is banned in compile",
                why="as_strided addresses the storage, not the view it is called on; a write through it "
                    "cannot be replayed on the views before it (PyTorch refuses it too)",
                hint="remove the mutation, or insert kiln.graph_break() right before it")


class Rec:
    """What one handle is: ``replay(base.value, chain)``, cached as ``value``."""

    __slots__ = ("handle", "base", "chain", "value", "version")

    def __init__(self, handle, base: Base, chain: tuple, value, version: int):
        self.handle = handle
        self.base = base
        self.chain = chain
        self.value = value
        self.version = version


def _key(t: torch.Tensor) -> int:
    return t._cdata


class FunctionalizeMode(TorchDispatchMode):
    """Records handles and emits functional ops (see module docstring).

    decompositions: optional {OpOverload: fn} applied *above* functionalization
    (their in-place internals are functionalized too).
    tokens: None (effectful ops run as they are) or a list of token tensors
    threaded through ``with_effects``; ``discover_tokens`` creates one when needed.
    """

    kiln_hop_key = "functionalize"

    def __init__(self, decompositions: Optional[dict] = None, tokens: Optional[list] = None,
                 discover_tokens: bool = False):
        super().__init__()
        self.decompositions = decompositions or {}
        self.table: dict[int, Rec] = {}
        self.inputs: list[Optional[Base]] = []
        self.input_info: list[InputInfo] = []
        self.tokens = tokens
        self.discover_tokens = discover_tokens
        # set when the code reads a tensor that requires grad but is not an input
        self.external_requires_grad = False
        self.decomposing = 0  # depth of decompositions running (their view steps are marked)

    # ------------------------------------------------------------------ records
    def register_input(self, t: torch.Tensor, index: int) -> None:
        """Make ``t`` the handle (and base) of graph input ``index``."""
        while len(self.inputs) <= index:
            self.inputs.append(None)
            self.input_info.append(InputInfo())
        base = Base(t, index)
        self.inputs[index] = base
        self.input_info[index].orig_meta = (tuple(t.shape), tuple(t.stride()), t.storage_offset())
        self.table[_key(t)] = Rec(t, base, (), t, 0)

    def register_non_tensor_input(self, index: int) -> None:
        """Input ``index`` is not a tensor (an int captured as a SymInt): no handle, no writes."""
        while len(self.inputs) <= index:
            self.inputs.append(None)
            self.input_info.append(InputInfo())

    def rec(self, t: torch.Tensor) -> Rec:
        r = self.table.get(_key(t))
        if r is None or r.handle is not t and not _same_impl(r.handle, t):
            # NOTE: a tensor we never produced (a constant, a closure tensor):
            # it is its own base; writing to it is refused in _write.
            r = Rec(t, Base(t, external=True), (), t, 0)
            self.table[_key(t)] = r
            if t.requires_grad:
                self.external_requires_grad = True
        return r

    def current(self, r: Rec) -> torch.Tensor:
        """The handle's value now (re-plays its views if the base changed)."""
        if r.version != r.base.version:
            r.value = replay(r.base.value, r.chain)
            r.version = r.base.version
        return r.value

    def value_of(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            return self.current(self.rec(t))
        return t

    def _unwrap(self, tree: Any) -> Any:
        return pytree.tree_map_only(torch.Tensor, self.value_of, tree)

    def new_base(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor) and _key(t) not in self.table:
            base = Base(t)
            self.table[_key(t)] = Rec(t, base, (), t, 0)
        return t

    def _new_view(self, parent: Rec, step: ViewStep, out: torch.Tensor) -> torch.Tensor:
        self.table[_key(out)] = Rec(out, parent.base, parent.chain + (step,), out, parent.base.version)
        return out

    # ------------------------------------------------------------------ writes
    def write(self, h: torch.Tensor, new: torch.Tensor) -> None:
        """Give handle ``h`` the value ``new`` (and every alias of it)."""
        r = self.rec(h)
        base = r.base
        if base.external:
            raise exc.FunctionalizationError(
                "an in-place op writes to a tensor that is neither an input nor made inside the traced code",
                why="the mutation of a captured (global or closure) tensor cannot be written back",
                where=exc.user_location(),
                hint="pass the tensor as an argument (or register it as a module buffer)",
            )
        if r.chain:
            _refuse_as_strided_in_chain(r.chain)
            base.value = scatter_chain(base.value, r.chain, new, self._geometry(r))
        else:
            base.value = new
        base.version += 1
        r.value, r.version = new, base.version
        if base.input_index is not None:
            self.input_info[base.input_index].note_data_mutation(torch.is_grad_enabled())

    def _geometry(self, r: Rec) -> Optional[tuple]:
        from kiln.functionalize.views import INVERSES

        if all(s.op in INVERSES for s in r.chain):
            return None
        with _disable_current_modes():
            g = torch.empty(tuple(r.base.value.shape), device="meta")
            g = replay(g, r.chain)
            if torch._debug_has_internal_overlap(g) == 1:
                raise RuntimeError(
                    "unsupported operation: more than one element of the written-to tensor refers "
                    "to a single memory location. Please clone() the tensor before performing the "
                    "operation."
                )
            return tuple(g.shape), tuple(g.stride()), g.storage_offset()

    # ------------------------------------------------------------------ dispatch
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        special = _SPECIAL.get(func)
        if special is not None:
            return special(self, func, args, kwargs)
        if self.tokens is not None or self.discover_tokens:
            if is_effectful(func):
                return self._effect(with_effects, func, args, kwargs)
        if func in self.decompositions:
            self.decomposing += 1
            try:
                with self:
                    out = self.decompositions[func](*args, **kwargs)
            finally:
                self.decomposing -= 1
            if out is not NotImplemented and (is_mutating(func)
                                              or _matches_op_meta(func, args, kwargs, out)):
                return out
        if _is_composite_implicit(func):
            # NOTE: below autograd, composite ops (aten.to, aten.reshape) called by
            # decompositions or backward formulas reach us undecomposed; run their
            # composite kernel so only their parts are recorded.
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if func in INPLACE_VIEWS:
            return self._inplace_view(func, args, kwargs)
        if is_mutating(func):
            return self._mutation(func, args, kwargs)
        if is_view_op(func):
            return self._view(func, args, kwargs)
        return self._functional(func, args, kwargs)

    def _functional(self, func, args, kwargs):
        out = func(*self._unwrap(args), **self._unwrap(kwargs))
        return pytree.tree_map_only(torch.Tensor, self.new_base, out)

    def _view(self, func, args, kwargs):
        parent = self.rec(args[0])
        value = self.current(parent)
        rest = tuple(args[1:])
        out = func(value, *rest, **kwargs)
        inner = self.decomposing > 0
        if isinstance(out, (list, tuple)):
            return type(out)(
                self._new_view(parent, ViewStep(func, rest, dict(kwargs), i, inner), o) for i, o in enumerate(out)
            )
        return self._new_view(parent, ViewStep(func, rest, dict(kwargs), decomposed=inner), out)

    def _inplace_view(self, func, args, kwargs):
        h = args[0]
        r = self.rec(h)
        step = ViewStep(INPLACE_VIEWS[func], tuple(args[1:]), dict(kwargs))
        new_value = step.apply(self.current(r))
        self._detach_value(r.base, h)
        tracer = current_tracer()
        if tracer is not None:
            tracer.freeze_meta(h)
        with _disable_current_modes():
            func(h, *args[1:], **kwargs)  # the handle's own sizes/strides follow
        r.chain = r.chain + (step,)
        r.value, r.version = new_value, r.base.version
        if r.base.input_index is not None and r.base.handle is h:
            self.input_info[r.base.input_index].mutates_metadata = True
        return h

    def _detach_value(self, base: Base, h: torch.Tensor) -> None:
        """Before changing ``h``'s own metadata: the base's value must not be ``h``
        itself (a handle is its base's first value)."""
        if base.value is h:
            base.value = aten.alias.default(h)

    def _mutation(self, func, args, kwargs):
        plan = plan_for(func)
        schema = func._schema
        bound = _bind(schema, args, kwargs)
        if plan.functional is not None:
            call_args, call_kwargs = _functional_call_args(schema, bound, plan.drop)
            out = plan.functional(*self._unwrap(call_args), **self._unwrap(call_kwargs))
            results = list(out) if isinstance(out, (tuple, list)) and plan.n_plain + len(plan.written) > 1 \
                else [out]
            plain, new_vals = results[: plan.n_plain], results[plan.n_plain:]
        else:
            plain, new_vals = self._clone_and_mutate(func, schema, plan, bound, args, kwargs)
        for pos, new in zip(plan.written, new_vals):
            self._write_arg(bound[pos], new)
        return self._returns(schema, bound, plain)

    def _clone_and_mutate(self, func, schema, plan, bound, args, kwargs):
        # NOTE: no functional sibling: mutate fresh clones inside the graph, which
        # keeps graph inputs and aliases untouched and stays correct.
        clones = {}
        for pos in plan.written:
            clones[pos] = pytree.tree_map_only(
                torch.Tensor, lambda t: aten.clone.default(self.value_of(t)), bound[pos])
        new_args = list(self._unwrap(args))
        new_kwargs = dict(self._unwrap(kwargs))
        for pos, c in clones.items():
            name = schema.arguments[pos].name
            if pos < len(new_args):
                new_args[pos] = c
            else:
                new_kwargs[name] = c
        out = func(*new_args, **new_kwargs)
        outs = list(out) if isinstance(out, (tuple, list)) else ([] if out is None else [out])
        n_ret = len(schema.returns)
        plain = [o for o, r in zip(outs[:n_ret], schema.returns) if r.alias_info is None]
        return plain, [clones[p] for p in plan.written]

    def _write_arg(self, h: Any, new: Any) -> None:
        if h is None:
            return
        if isinstance(h, (list, tuple)):
            for hi, ni in zip(h, new):
                self._write_arg(hi, ni)
            return
        if new.dtype != h.dtype:
            new = aten._to_copy.default(new, dtype=h.dtype)
        if tuple(new.shape) != tuple(h.shape):
            self._resize_handle(h, new)
            return
        self.write(h, new)

    def _resize_handle(self, h: torch.Tensor, new: torch.Tensor) -> None:
        r = self.rec(h)
        if r.chain and r.base.input_index is None and all(s.op in _IDENTITY_VIEWS for s in r.chain):
            # NOTE: factories hand out a detached alias of the tensor they made;
            # resizing it is resizing a fresh tensor: it becomes its own base.
            with _disable_current_modes():
                h.resize_(tuple(new.shape))
            base = Base(new)
            base.handle = h
            self.table[_key(h)] = Rec(h, base, (), new, 0)
            return
        if r.chain:
            raise exc.FunctionalizationError(
                f"an in-place op resized a view (from {tuple(h.shape)} to {tuple(new.shape)})",
                why="a view's size cannot change without changing its base's storage",
                where=exc.user_location(),
                hint="clone() the view before resizing it, or write to a fresh tensor",
            )
        with _disable_current_modes():
            h.resize_(tuple(new.shape))
        r.base.value = new
        r.base.version += 1
        r.value, r.version = new, r.base.version
        if r.base.input_index is not None:
            info = self.input_info[r.base.input_index]
            info.mutates_metadata = True
            info.note_data_mutation(torch.is_grad_enabled())

    def _returns(self, schema, bound, plain):
        outs = []
        plain_it = iter(plain)
        for ret in schema.returns:
            if ret.alias_info is not None and ret.alias_info.is_write:
                outs.append(bound[_aliased_arg(schema, ret)])
            else:
                outs.append(self.new_base(next(plain_it)))
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else tuple(outs)

    # ------------------------------------------------------------------ effects
    def _effect(self, with_effects, func, args, kwargs):
        if self.tokens is None:
            self.tokens = []
        if not self.tokens:
            if not self.discover_tokens:
                raise exc.FunctionalizationError(
                    f"effectful op {func} met while tracing without effect tokens",
                    why="the token count was fixed before tracing and did not include this op",
                    where=exc.user_location(),
                )
            self.tokens.append(aten.empty.memory_format([0]))
        res = with_effects(self.tokens[0], func, *self._unwrap(args), **self._unwrap(kwargs))
        self.tokens[0] = res[0]
        outs = [self.new_base(o) for o in res[1:]]
        if not outs:
            return None
        return outs[0] if len(outs) == 1 else tuple(outs)


# ---------------------------------------------------------------------- helpers
_IDENTITY_VIEWS = (aten.detach.default, aten.alias.default)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    return x


# NOTE: outputs whose meta kernel's shape differs from the op's real kernels, by op:
# ``native_batch_norm`` in eval mode returns empty save_mean/save_rstd on CPU and CUDA
# (and in its decomposition) but [C] from its meta kernel; nothing reads them (its
# backward in eval mode uses the running statistics).  Without this entry every eval
# BatchNorm stayed an opaque ATen call that codegen could not fuse.
_META_DIFFERS = {
    torch.ops.aten.native_batch_norm.default:
        lambda args, kwargs: (1, 2) if not (args[5] if len(args) > 5 else kwargs.get("training")) else (),
    # NOTE: ``native_layer_norm`` of a bf16/fp16 CPU input: its meta kernel run on the meta
    # device gives float32 mean/rstd, its fake (CPU) result and decomposition the input's
    # dtype, the real CPU kernel float32 when the weight is float32 (autocast's case).  Kept
    # as an op, its graph says bf16 where the kernel writes float32 (the compiled backward
    # read garbage); decomposed, the graph is one consistent computation (as PyTorch's
    # inductor decomposes it).
    torch.ops.aten.native_layer_norm.default:
        lambda args, kwargs: (1, 2) if args[0].device.type == "cpu"
        and args[0].dtype in (torch.bfloat16, torch.float16) else (),
}


def _matches_op_meta(func, args, kwargs, out) -> bool:
    """Whether a decomposition's outputs have the op's own shapes and dtypes.

    NOTE: decompositions run below autograd, so the op's backward formula later
    consumes their outputs; a decomposition that returns, say, a transposed
    logsumexp (sdpa flash attention for CPU) would give wrong gradients.  When
    the outputs differ from the op's meta kernel, the op itself is recorded.
    """
    try:
        with _disable_current_modes():
            ref = func(*pytree.tree_map(_to_meta, args), **pytree.tree_map(_to_meta, kwargs))
    except Exception:  # noqa: BLE001 - no meta kernel or symbolic sizes: trust the table
        return True
    got, want = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    if len(got) != len(want):
        return False
    skip = _META_DIFFERS.get(func, lambda a, k: ())(args, kwargs)
    for i, (g, w) in enumerate(zip(got, want)):
        if i in skip:
            continue
        if isinstance(w, torch.Tensor):
            if not isinstance(g, torch.Tensor) or g.shape != w.shape or g.dtype != w.dtype:
                return False
    return True


@functools.lru_cache(maxsize=None)
def _is_composite_implicit(func) -> bool:
    # NOTE: never raise here: some callers (prim::device queries) come from C++
    # code that cannot propagate Python exceptions.
    if not isinstance(func, torch._ops.OpOverload) or func.namespace == "prim":
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")
    except Exception:  # noqa: BLE001
        return False


def _same_impl(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a._cdata == b._cdata


def _bind(schema, args, kwargs) -> list:
    """Argument values by schema position (None where omitted)."""
    vals = []
    for i, a in enumerate(schema.arguments):
        if i < len(args) and not a.kwarg_only:
            vals.append(args[i])
        else:
            vals.append(kwargs.get(a.name, None))
    return vals


def _functional_call_args(schema, bound: list, drop: tuple) -> tuple[list, dict]:
    """Arguments for the functional sibling: every kept argument, with the
    mutating op's defaults filled in (the sibling may not share them)."""
    args, kwargs = [], {}
    for i, a in enumerate(schema.arguments):
        if i in drop:
            continue
        v = bound[i]
        if v is None and a.has_default_value():
            v = a.default_value
        if a.kwarg_only:
            kwargs[a.name] = v
        else:
            args.append(v)
    return args, kwargs


def _aliased_arg(schema, ret) -> int:
    want = set(ret.alias_info.before_set)
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and set(a.alias_info.before_set) & want:
            return i
    raise AssertionError(f"no argument aliases return of {schema}")


def _set_(mode: FunctionalizeMode, func, args, kwargs):
    """``x.set_(src)``: x becomes another alias of src's memory."""
    h, src = args[0], args[1] if len(args) > 1 else kwargs.get("source")
    if not isinstance(src, torch.Tensor) or len(args) > 2:
        raise exc.FunctionalizationError(
            f"{func} cannot be functionalized",
            why="only Tensor.set_(Tensor) is supported (no storages or explicit strides)",
            where=exc.user_location(),
            hint="use a functional op instead of set_",
        )
    old = mode.rec(h)
    src_rec = mode.rec(src)
    mode._detach_value(old.base, h)
    tracer = current_tracer()
    if tracer is not None:
        tracer.freeze_meta(h)  # the node that made h keeps h's metadata before the set_
    with _disable_current_modes():
        func(h, src)
    value = mode.current(src_rec)
    mode.table[_key(h)] = Rec(h, src_rec.base, src_rec.chain, value, src_rec.version)
    if old.base.input_index is not None and old.base.handle is h:
        info = mode.input_info[old.base.input_index]
        info.mutates_storage = True
        info.mutates_metadata = True
        info.storage_rec = mode.table[_key(h)]
    return h


def _lift_fresh(mode: FunctionalizeMode, func, args, kwargs):
    return mode._functional(aten.lift_fresh_copy.default, args, kwargs)


def _refuse(mode, func, args, kwargs):
    raise exc.FunctionalizationError(
        f"{func} cannot be functionalized",
        why="it changes a tensor's storage in a way kiln does not model",
        where=exc.user_location(),
        hint="rewrite the code with functional ops (clone, cat, index_put...)",
    )


# NOTE: ops with their own rule, keyed by op.
_SPECIAL = {
    aten.set_.source_Tensor: _set_,
    aten.set_.source_Storage: _refuse,
    aten.set_.source_Storage_storage_offset: _refuse,
    aten.set_.source_Tensor_storage_offset: _refuse,
    aten.lift_fresh.default: _lift_fresh,
}
