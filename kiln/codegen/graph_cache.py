"""kiln.codegen.graph_cache: a compiled ATen graph, kept on disk, reloaded without lowering.

In:  a functional ATen ``fx.GraphModule`` and its example inputs (what
     ``compile_aten_graph`` receives).
Out: :func:`lookup` -> the wrapper callable a previous process built for the same graph
     (or None); :func:`store` keeps what :func:`kiln.codegen.wrapper.build` made.

Lowering, scheduling and printing a 200-op graph takes ~0.3 s; a second process compiling
the same model should not pay it again (the C++ library itself is already cached by
:mod:`kiln.codegen.cache`).  The record is plain JSON under ``<cache_dir>/graphs/``: the
wrapper's Python source, the C++ source and each kernel's argument kinds, the wrapper's
constants written as names (dtypes, devices, ATen ops, layouts, memory formats) and the
graph attributes it reads.  A graph whose wrapper needs anything else (an opaque callable,
a Triton kernel) is not cached.  Keyed by the graph's code, every node's traced
metadata, its inputs' and attributes' metadata, the codegen config, kiln's sources and the machine
(:func:`kiln.codegen.cache.record_key`); ``config.graph_cache=False`` turns it off.
"""
from __future__ import annotations

import ctypes
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from kiln.codegen import cache, config, metrics

_KIND = "graphs"


# ----------------------------------------------------------------------------- constants

def _encode(v: Any) -> Optional[list]:
    """A wrapper constant as ``[kind, name]``; None when it has no name to write."""
    if isinstance(v, torch.dtype):
        return ["dtype", str(v).removeprefix("torch.")]
    if isinstance(v, torch.device):
        return ["device", str(v)]
    if isinstance(v, torch.layout):
        return ["layout", str(v).removeprefix("torch.")]
    if isinstance(v, torch.memory_format):
        return ["memory_format", str(v).removeprefix("torch.")]
    if isinstance(v, torch._ops.OpOverload):
        return ["op", v._schema.name, v._overloadname]
    if isinstance(v, (list, tuple)):
        items = [_encode_any(x) for x in v]
        if any(x is None for x in items):
            return None
        return ["tuple" if isinstance(v, tuple) else "list", items]
    return None


def _encode_any(v: Any) -> Optional[list]:
    if v is None or isinstance(v, (bool, int, float, str)):
        return ["py", v]
    return _encode(v)


def _decode(e: list) -> Any:
    kind = e[0]
    if kind == "py":
        return e[1]
    if kind in ("dtype", "layout", "memory_format"):
        v = getattr(torch, e[1])
        expected = {"dtype": torch.dtype, "layout": torch.layout, "memory_format": torch.memory_format}[kind]
        if not isinstance(v, expected):
            raise ValueError(f"torch.{e[1]} is not a {kind}")
        return v
    if kind == "device":
        return torch.device(e[1])
    if kind == "op":
        ns, name = e[1].split("::")
        packet = getattr(getattr(torch.ops, ns), name)
        return getattr(packet, e[2] or "default")
    if kind in ("list", "tuple"):
        items = [_decode(x) for x in e[1]]
        return tuple(items) if kind == "tuple" else items
    raise ValueError(f"unknown constant kind {kind!r}")


# ----------------------------------------------------------------------------- keys

def key_for(gm: fx.GraphModule, example_inputs: list) -> Optional[str]:
    """The record key of ``gm`` compiled for inputs like ``example_inputs`` (None: uncacheable)."""
    from kiln.codegen.cache import kiln_fingerprint, value_meta
    from kiln.settings import options_of

    if not config.graph_cache:
        return None
    try:
        code = gm.code
    except Exception:  # noqa: BLE001 - an unprintable graph is compiled every time
        return None
    attrs = {}
    # NOTE: each node's value metadata too: codegen lays buffers out from it, and the code
    # alone does not fix it (a tracing change can give the same code other shapes).
    metas = [value_meta(n.meta.get("val")) for n in gm.graph.nodes]
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            obj = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, fx.GraphModule):
                return None  # NOTE: a higher-order op's subgraph: its code is not in the key
            attrs[str(n.target)] = value_meta(obj)
    return cache.record_key({
        "graph": code, "metas": metas, "inputs": [value_meta(x) for x in example_inputs], "attrs": attrs,
        "kiln_sources": kiln_fingerprint(),
        "config": {k: getattr(config, k) for k in sorted(options_of(config.__name__))},
    })


# ----------------------------------------------------------------------------- store / lookup

def record_of(*, py: str, cpp_source: str, cpp_kinds: dict, consts: list, ops: dict,
              constant_targets: dict, kernel_count: int) -> Optional[dict]:
    """The JSON record of a built wrapper, or None when a constant has no written form."""
    enc_consts = [_encode_any(c) for c in consts]
    enc_ops = {name: _encode(op) for name, op in ops.items()}
    if any(c is None for c in enc_consts) or any(o is None or o[0] != "op" for o in enc_ops.values()):
        return None
    return {"wrapper": py, "cpp_source": cpp_source, "cpp_kinds": cpp_kinds, "consts": enc_consts,
            "ops": enc_ops, "constant_targets": constant_targets, "kernel_count": kernel_count}


def store(key: Optional[str], record: Optional[dict]) -> None:
    if key and record is not None:
        cache.write_record(_KIND, key, record)


def lookup(key: Optional[str], gm: fx.GraphModule) -> Optional[Callable]:
    """The wrapper callable recorded under ``key``, rebuilt (library loaded, wrapper
    exec'd); None when absent or unusable (then the graph compiles as usual)."""
    if not key:
        return None
    rec = cache.read_record(_KIND, key)
    if rec is None:
        return None
    try:
        call = _rebuild(rec, gm)
    except Exception:  # noqa: BLE001 - a stale or damaged record: compile afresh
        metrics.cache_corrupt_count += 1
        return None
    metrics.graph_cache_hits += 1
    return call


def _rebuild(rec: dict, gm: fx.GraphModule) -> Callable:
    from kiln.codegen.cpp import load_library
    from kiln.codegen.wrapper import WrapperWriter, finish

    ns = WrapperWriter.base_namespace()
    ns["_c"][:] = [_decode(c) for c in rec["consts"]]
    for name, op in rec["ops"].items():
        ns[name] = _decode(op)
    for name, target in rec["constant_targets"].items():
        obj = gm
        for part in target.split("."):
            obj = getattr(obj, part)
        ns[name] = obj
    if rec["cpp_kinds"]:
        lib = load_library(rec["cpp_source"], name="kiln_graph")
        for kname, kinds in rec["cpp_kinds"].items():
            fn = getattr(lib, kname)
            fn.argtypes = [ctypes.c_void_p if k == "ptr" else ctypes.c_int64 for k in kinds] + [ctypes.c_int]
            fn.restype = None
            ns[kname] = fn
    return finish(rec["wrapper"], ns, rec["cpp_source"], rec["kernel_count"], uses_triton=False)


__all__ = ["key_for", "lookup", "store", "record_of"]
