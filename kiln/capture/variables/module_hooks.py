"""Forward hooks of an nn.Module called inside the compiled region, inlined as eager runs them.

``Module._call_impl`` runs the forward pre-hooks, ``forward``, then the forward hooks; capture
does the same with each hook inlined as user code (its side effects replayed after the graph,
as any other), so the hooks' tensors stay in the graph. The hook dicts are guarded by their
keys: adding or removing a hook on a module that had hooks at compile time recompiles.

Backward hooks and global (``register_module_forward_hook``) hooks are graph breaks with a reason.
"""
from __future__ import annotations

from typing import Callable

import torch

from .base import VT, ConstantVT, unsupported
from .containers import TupleVT


def has_forward_hooks(m: torch.nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def call_with_hooks(tx, mod_vt: VT, args: list, kwargs: dict, forward: Callable[[list, dict], VT]) -> VT:
    """``mod(*args, **kwargs)`` for a module with forward hooks: ``forward(args, kwargs)`` is the
    module's own forward, inlined."""
    m = mod_vt.mod
    name = type(m).__name__
    if m._backward_hooks or m._backward_pre_hooks:
        unsupported(f"call to module {name} with backward hooks",
                    why="backward hooks wrap the module's inputs and outputs in autograd functions")
    if mod_vt.source is None:
        unsupported(f"call to module {name} with hooks, built without a source")
    for hook, with_kwargs in _hooks(tx, mod_vt, "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
        if with_kwargs:
            res = hook.call(tx, [mod_vt, TupleVT(list(args)), _dict_vt(tx, kwargs)], {})
            if not _is_none(res):
                args, kwargs = _args_kwargs(res, name)
        else:
            res = hook.call(tx, [mod_vt, TupleVT(list(args))], {})
            if not _is_none(res):
                args = list(res.items) if isinstance(res, TupleVT) and res.pytype is tuple else [res]
    result = forward(args, kwargs)
    for hook, with_kwargs in _hooks(tx, mod_vt, "_forward_hooks", "_forward_hooks_with_kwargs"):
        hook_args = [mod_vt, TupleVT(list(args))] + ([_dict_vt(tx, kwargs)] if with_kwargs else []) + [result]
        res = hook.call(tx, hook_args, {})
        if not _is_none(res):
            result = res
    return result


def init_lazy(tx, mod_vt: VT, args: list, kwargs: dict) -> None:
    """A lazy module's first call (``LazyLinear``...): its parameters are made now, outside the
    graph, from the shapes of the example inputs, as its initialization pre-hook does eagerly;
    the module is then called as the class it becomes."""
    m = mod_vt.mod
    try:
        fake_args = [_example(a) for a in args]
        fake_kwargs = {k: _example(v) for k, v in kwargs.items()}
        m._infer_parameters(m, tuple(fake_args), fake_kwargs)
    except _NotExample as e:
        unsupported(f"first call of the lazy module {type(m).__name__} with {e}",
                    why="its parameters are made from the inputs' shapes before tracing")


class _NotExample(Exception):
    pass


def _example(vt: VT):
    from .tensor import TensorVT

    if isinstance(vt, TensorVT):
        if any(not isinstance(d, int) for d in vt.fake.shape):
            raise _NotExample("an input of symbolic shape")
        return vt.fake
    if isinstance(vt, ConstantVT):
        return vt.value
    if isinstance(vt, TupleVT):
        return tuple(_example(i) for i in vt.items)
    items = getattr(vt, "items", None)
    if isinstance(items, list):
        return [_example(i) for i in items]
    raise _NotExample(f"the argument {vt}")


def _hooks(tx, mod_vt: VT, table: str, kw_table: str) -> list:
    """(hook VT, takes kwargs) for each hook of ``mod.<table>``, in order, with the dicts guarded."""
    m = mod_vt.mod
    hooks = getattr(m, table)
    kw = getattr(m, kw_table)
    src = mod_vt.source.attr(table)
    tx.output.guards.dict_keys(src, hooks)
    tx.output.guards.dict_keys(mod_vt.source.attr(kw_table), kw)
    return [(tx.wrap(h, src.item(k)), k in kw) for k, h in hooks.items()]


def _is_none(vt: VT) -> bool:
    return isinstance(vt, ConstantVT) and vt.value is None


def _args_kwargs(res: VT, name: str):
    if not (isinstance(res, TupleVT) and len(res.items) == 2):
        unsupported(f"a forward pre-hook of {name} returned {res}",
                    why="eager raises RuntimeError: it must return None or (new_args, new_kwargs)")
    new_args, new_kwargs = res.items
    return list(new_args.unpack(None)), _kwargs_of(new_kwargs, name)


def _kwargs_of(vt: VT, name: str) -> dict:
    from .dicts import DictVT

    if not isinstance(vt, DictVT) or not all(isinstance(k, ConstantVT) and isinstance(k.value, str)
                                              for k in vt.keys()):
        unsupported(f"a forward pre-hook of {name} returned kwargs kiln cannot read ({vt})")
    return {k.value: vt.items[h] for h, k in zip(vt.items, vt.keys())}


def _dict_vt(tx, kwargs: dict) -> VT:
    from .dicts import DictVT

    d = DictVT({})
    for k, v in kwargs.items():
        d.put(ConstantVT(k), v)
    return d
