"""kiln.export.save: an exported program to one archive file (format: kiln.export.archive)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import zipfile
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln import exc
from kiln.export.program import (ExportedProgram, ExportGraphSignature, InputKind, InputSpec, LeafMeta,
                                 OutputKind, OutputSpec)
from kiln.export.shapes import INT_MAX, Range, size_bound

from kiln.export.archive import (_BadExpr, _dense, FORMAT, _IDENT, _op_name, _parse_expr, PROGRAM,
                                 _refuse, _resolve_op, SCHEMA_VERSION, _SYMBOL, _tables, WEIGHTS,
                                 _ZIP_TIME)


# --------------------------------------------------------------------------- save


class _Saver:
    def __init__(self, ep: ExportedProgram) -> None:
        self.ep = ep
        self.symbols: dict = {}           # name -> {"kind", "min", "max", "hint"}
        self.tensors: dict = {}           # safetensors key -> contiguous CPU tensor
        self._by_alias: dict = {}         # (storage, offset, sizes, strides, dtype, device) -> record
        self._graph_path = ""
        self._node = ""

    # ------------------------------------------------------------------ helpers
    def fail(self, what: str, why: str = "", hint: str = "") -> exc.SerializationError:
        where = f" (graph {self._graph_path!r}, node {self._node!r})" if self._node else ""
        return _refuse(f"kiln.export.save: {what}{where}", why=why, hint=hint)

    def symbol_info(self, s: Any) -> None:
        node = s.node
        env = getattr(node, "shape_env", None)
        for sym in node.expr.free_symbols:
            name = str(sym)
            if name in self.symbols:
                continue
            m = _SYMBOL.match(name)
            if m is None:
                raise self.fail(f"the symbolic value {s} uses the symbol {name!r}, which cannot be saved",
                                why="only size symbols (s0, s1, ...) and unbacked ones (u0, ...) are saved",
                                hint="export with static shapes there")
            lo = hi = hint = None
            if env is not None:
                vr = env.var_to_range.get(sym)
                if vr is not None:
                    lo, hi = size_bound(vr.lower), size_bound(vr.upper)
                vals = getattr(env, "backed_var_to_val", None) or getattr(env, "var_to_val", {})
                v = vals.get(sym)
                hint = int(v) if v is not None and getattr(v, "is_Integer", False) else None
            self.symbols[name] = {"kind": "size" if m.group(1) == "s" else "unbacked",
                                  "min": lo, "max": hi, "hint": hint}

    def expr(self, s: Any) -> Any:
        """A SymInt/SymFloat/SymBool as an int/float/bool or its expression's text."""
        if not isinstance(s, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return s
        e = s.node.expr
        if not e.free_symbols:
            if isinstance(s, torch.SymBool):
                return bool(e)
            return int(e) if isinstance(s, torch.SymInt) else float(e)
        self.symbol_info(s)
        text = str(e)
        try:
            _parse_expr(text, self.symbols)
        except _BadExpr as err:
            raise self.fail(f"the symbolic value {text} cannot be saved", why=str(err),
                            hint="kiln saves arithmetic over size symbols only") from None
        return text

    def sym(self, s: Any) -> Any:
        v = self.expr(s)
        if not isinstance(v, str):
            return self.value(v)
        kind = "symint" if isinstance(s, torch.SymInt) else "symfloat" if isinstance(s, torch.SymFloat) else "symbool"
        return {kind: v}

    def target(self, t: Any) -> dict:
        if isinstance(t, torch._ops.OpOverload):
            name = _op_name(t)
            if _resolve_op(name) is not t:
                raise self.fail(f"the operator {t} cannot be found again by its name {name!r}",
                                hint="register the operator under a plain namespace::name.overload")
            return {"kind": "op", "name": name}
        hit = _tables()["reverse"].get(id(t))
        if hit is None:
            raise self.fail(f"the target {getattr(t, '__module__', '')}.{getattr(t, '__qualname__', t)!s} "
                            "cannot be saved",
                            why="a saved program names its targets: ATen operators (OpOverloads), the "
                                "operator/math/torch.sym_* functions of symbolic sizes, and kiln's "
                                "higher-order operators; any other Python callable would have to be "
                                "imported or unpickled when the file is loaded",
                            hint="export so that the graph holds ATen operators only (a custom op: "
                                 "register it with torch.library)")
        return {"kind": hit[0], "name": hit[1]}

    def value(self, v: Any, meta: bool = False) -> Any:
        """The tagged JSON tree of an argument (``meta``: of a ``meta["val"]``)."""
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return int(v)
        if isinstance(v, float):
            return {"float": _float(v)}
        if isinstance(v, fx.Node):
            if meta:
                raise self.fail("a node's meta value holds a node")
            return {"node": v.name}
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return self.sym(v)
        if isinstance(v, torch.Tensor):
            if meta:
                return {"tensor": self.tensor_meta(v)}
            raise self.fail("a tensor is an argument of the node",
                            why="tensors reach a saved graph as inputs (parameters, buffers, constants)",
                            hint="export again: constants are then lifted to CONSTANT_TENSOR inputs")
        if isinstance(v, torch.dtype):
            return {"dtype": str(v).split(".", 1)[1]}
        if isinstance(v, torch.device):
            return {"device": str(v)}
        if isinstance(v, torch.layout):
            return {"layout": str(v).split(".", 1)[1]}
        if isinstance(v, torch.memory_format):
            return {"memory_format": str(v).split(".", 1)[1]}
        if type(v) is torch.Size:
            return {"size": [self.value(x, meta) for x in v]}
        if isinstance(v, list):   # NOTE: fx keeps its arguments' lists as immutable_list
            return [self.value(x, meta) for x in v]
        if type(v) is tuple:
            return {"tuple": [self.value(x, meta) for x in v]}
        if isinstance(v, dict):
            if not all(isinstance(k, str) or (isinstance(k, int) and not isinstance(k, bool)) for k in v):
                raise self.fail("a dict argument has keys that are not strings or ints")
            return {"dict": [[k, self.value(x, meta)] for k, x in v.items()]}
        if type(v) is slice:
            return {"slice": [self.value(v.start, meta), self.value(v.stop, meta), self.value(v.step, meta)]}
        if v is Ellipsis:
            return {"ellipsis": None}
        if isinstance(v, complex):
            return {"complex": [_float(v.real), _float(v.imag)]}
        if not meta and (isinstance(v, torch._ops.OpOverload) or id(v) in _tables()["reverse"]):
            return {"target": self.target(v)}
        raise self.fail(f"an argument of type {type(v).__module__}.{type(v).__qualname__} cannot be saved",
                        why="saved arguments are numbers, strings, None, lists/tuples/dicts of those, "
                            "dtypes, devices, layouts, memory formats, slices, symbolic sizes, "
                            "other nodes and operators")

    def tensor_meta(self, t: torch.Tensor) -> dict:
        if t.layout != torch.strided:
            raise self.fail(f"a {t.layout} tensor value cannot be saved", hint="use dense tensors")
        return {"dtype": str(t.dtype).split(".", 1)[1], "shape": [self.expr(s) for s in t.shape],
                "stride": [self.expr(s) for s in t.stride()], "storage_offset": self.expr(t.storage_offset()),
                "device": str(t.device), "requires_grad": bool(t.requires_grad),
                "parameter": isinstance(t, torch.nn.Parameter)}

    # ------------------------------------------------------------------ graphs
    def graph_module(self, gm: fx.GraphModule, path: str) -> dict:
        outer = self._graph_path
        self._graph_path = path
        try:
            return self._graph_module(gm, path)
        finally:
            self._graph_path = outer
            self._node = ""

    def _graph_module(self, gm: fx.GraphModule, path: str) -> dict:
        if type(gm.graph._codegen) is not fx.graph.CodeGen:
            raise self.fail(f"the graph uses the code generator {type(gm.graph._codegen).__name__}",
                            hint="save graphs with fx's plain code generator")
        children = dict(gm.named_children())
        subs: dict = {}
        for name, child in children.items():
            if isinstance(child, fx.GraphModule):
                if not _IDENT.match(name):
                    raise self.fail(f"the subgraph attribute {name!r} is not an identifier")
                subs[name] = self.graph_module(child, f"{path}.{name}" if path else name)
        attrs: dict = {}
        nodes = []
        for n in gm.graph.nodes:
            self._node = n.name
            if n.op in ("get_attr", "call_module"):
                tgt = n.target
                if not isinstance(tgt, str) or not _IDENT.match(tgt):
                    raise self.fail(f"the attribute {tgt!r} is not a plain identifier",
                                    hint="subgraphs and tensor attributes are saved by plain names")
                obj = getattr(gm, tgt, None)
                if isinstance(obj, fx.GraphModule):
                    pass
                elif n.op == "get_attr" and isinstance(obj, torch.Tensor):
                    key = f"attr.{path + '.' if path else ''}{tgt}"
                    attrs[tgt] = self.tensor_record(key, obj, f"attribute {tgt!r}")
                else:
                    raise self.fail(f"{n.op} reads the attribute {tgt!r}, a {type(obj).__name__}",
                                    why="a saved graph's attributes are subgraphs (GraphModules) and tensors")
                target: Any = tgt
            elif n.op == "call_function":
                target = self.target(n.target)
            elif n.op in ("placeholder", "output"):
                if not isinstance(n.target, str) or not (n.op == "output" or _IDENT.match(n.target)):
                    raise self.fail(f"the {n.op} target {n.target!r} is not an identifier")
                target = n.target
            else:
                raise self.fail(f"the node is a {n.op}, which a saved program cannot hold",
                                why="an exported program calls operators (call_function), not methods",
                                hint="export the model again (export gives ATen graphs)")
            meta: dict = {}
            if "val" in n.meta:
                meta["val"] = self.value(n.meta["val"], meta=True)
            if "tensor_meta" in n.meta:
                meta["tensor_meta"] = True
            if isinstance(n.meta.get("seq_nr"), int):
                meta["seq_nr"] = n.meta["seq_nr"]
            if isinstance(n.meta.get("original_aten"), torch._ops.OpOverload):
                meta["original_aten"] = _op_name(n.meta["original_aten"])
            if isinstance(n.meta.get("stack_trace"), str):
                meta["stack_trace"] = n.meta["stack_trace"]  # NOTE: text only (the printed program shows it)
            nodes.append({"op": n.op, "name": n.name, "target": target,
                          "args": [self.value(a) for a in n.args],
                          "kwargs": {k: self.value(v) for k, v in n.kwargs.items()}, "meta": meta})
        self._node = ""
        return {"class_name": gm.__class__.__name__, "nodes": nodes, "submodules": subs,
                "children": [k for k in children if k in subs], "tensor_attrs": attrs}

    # ------------------------------------------------------------------ tensors
    def tensor_record(self, key: str, t: Any, what: str) -> dict:
        from torch._subclasses.fake_tensor import FakeTensor

        if not isinstance(t, torch.Tensor):
            raise self.fail(f"{what} is a {type(t).__name__}, not a tensor")
        if isinstance(t, FakeTensor) or t.device.type == "meta":
            raise self.fail(f"{what} is a fake or meta tensor, which has no data to save",
                            hint="export the model with real parameters and buffers")
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided:
            raise self.fail(f"{what} is a {type(t).__name__} ({t.layout}), which cannot be saved",
                            hint="save dense torch.Tensors")
        import safetensors.torch

        known = getattr(safetensors.torch, "_TYPES", None)
        if known is not None and t.dtype not in known.values():
            raise self.fail(f"{what} has dtype {t.dtype}, which safetensors cannot store")
        rec = {"key": key, "dtype": str(t.dtype).split(".", 1)[1], "shape": list(t.shape),
               "device": str(t.device), "parameter": isinstance(t, torch.nn.Parameter),
               "requires_grad": bool(t.requires_grad)}
        if t.numel() and not t.is_contiguous() and _dense(list(t.shape), list(t.stride())):
            rec["stride"] = list(t.stride())   # NOTE: saved contiguous, given this layout again on load
        alias_key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                     t.dtype, str(t.device)) if t.numel() else None
        first = self._by_alias.get(alias_key) if alias_key is not None else None
        if first is not None:
            rec["alias_of"] = first["key"]
            return rec
        if alias_key is not None:
            self._by_alias[alias_key] = rec
        # NOTE: a fresh contiguous CPU copy: safetensors refuses shared and strided storage
        self.tensors[key] = t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        return rec


def _float(f: float) -> str:
    return repr(float(f))


def _program_json(ep: ExportedProgram) -> tuple[dict, bytes]:
    from safetensors.torch import save as st_save

    if not isinstance(ep, ExportedProgram):
        raise _refuse(f"kiln.export.save takes an ExportedProgram, got {type(ep).__name__}",
                      hint="pass what kiln.export.export returned")
    s = _Saver(ep)
    # NOTE: state and constants first: an alias points at a tensor saved before it (load's order)
    state = {name: s.tensor_record(f"state.{name}", t, f"state_dict[{name!r}]")
             for name, t in ep.state_dict.items()}
    constants = {name: s.tensor_record(f"constant.{name}", t, f"constants[{name!r}]")
                 for name, t in ep.constants.items()}
    graph = s.graph_module(ep.graph_module, "")
    sig = ep.graph_signature
    for spec in sig.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.target not in state:
            raise _refuse(f"kiln.export.save: the signature's {spec.kind.name} {spec.target!r} is not in "
                          "the program's state_dict")
        if spec.kind is InputKind.CONSTANT_TENSOR and spec.target not in constants:
            raise _refuse(f"kiln.export.save: the signature's constant {spec.target!r} is not in the "
                          "program's constants")
    rc = {}
    for name, r in ep.range_constraints.items():
        if not isinstance(r, Range) or not _SYMBOL.match(str(name)):
            raise _refuse(f"kiln.export.save: range constraint {name!r}: {r!r} cannot be saved",
                          why="range constraints map size symbols to kiln.export.Range")
        rc[str(name)] = {"min": int(r.min), "max": None if r.max is None else int(r.max)}
        info = s.symbols.setdefault(str(name), {"kind": "size", "min": None, "max": None, "hint": None})
        info["min"], info["max"] = rc[str(name)]["min"], rc[str(name)]["max"]
    meta = []
    for m in ep.input_meta:
        sizes = None
        if m.sizes is not None:
            sizes = []
            for x in m.sizes:
                if isinstance(x, str):
                    try:
                        _parse_expr(x, s.symbols)
                    except _BadExpr as err:
                        raise _refuse(f"kiln.export.save: input {m.path}'s size {x!r} cannot be saved",
                                      why=str(err)) from None
                    sizes.append(x)
                else:
                    sizes.append(int(x))
        meta.append({"path": m.path, "dtype": None if m.dtype is None else str(m.dtype).split(".", 1)[1],
                     "sizes": sizes, "value": s.value(m.value)})
    specs = {}
    for attr in ("in_spec", "out_spec"):
        spec = getattr(ep, attr)
        try:
            specs[attr] = None if spec is None else pytree.treespec_dumps(spec)
        except Exception as e:   # NOTE: a pytree node type without a serialized name
            raise _refuse(f"kiln.export.save: the program's {attr} {spec} cannot be saved", why=str(e),
                          hint="use tuples, lists, dicts (or register the type's serialization with "
                               "torch.utils._pytree)") from None
    out_constants = []
    for i, v in sorted(getattr(ep, "out_constants", {}).items()):
        if not isinstance(i, int) or not (v is None or isinstance(v, (bool, int, float, str))):
            raise _refuse(f"kiln.export.save: the constant output {i!r}: {v!r} cannot be saved",
                          why="constant outputs are None, bools, ints, floats and strings")
        out_constants.append([i, s.value(v)])
    for dim, sym in ep.dim_names.items():
        if not isinstance(dim, str) or not isinstance(sym, str):
            raise _refuse(f"kiln.export.save: dim name {dim!r}: {sym!r} cannot be saved")
    try:
        weights = st_save(s.tensors, metadata={"format": "pt"})   # NOTE: one key: safetensors orders keys at random
    except Exception as e:
        raise _refuse("kiln.export.save: safetensors could not store the program's tensors", why=str(e)) from None
    program = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "torch_version": str(torch.__version__),
        "graph": graph,
        "signature": {
            "input_specs": [{"kind": i.kind.name, "name": i.name, "target": i.target, "persistent": i.persistent}
                            for i in sig.input_specs],
            "output_specs": [{"kind": o.kind.name, "name": o.name, "target": o.target}
                             for o in sig.output_specs],
        },
        "state_dict": state,
        "constants": constants,
        "symbols": s.symbols,
        "range_constraints": rc,
        "in_spec": specs["in_spec"],
        "out_spec": specs["out_spec"],
        "input_meta": meta,
        "dim_names": dict(ep.dim_names),
        "out_constants": out_constants,
        "members": {WEIGHTS: {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}},
    }
    return program, weights


def _zip_info(name: str, compress: int) -> zipfile.ZipInfo:
    zi = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
    zi.compress_type = compress
    zi.external_attr = 0o644 << 16
    return zi


def save(ep: ExportedProgram, path: Any) -> None:
    """Write ``ep`` to ``path`` (see the module docstring); the file is replaced atomically."""
    program, weights = _program_json(ep)
    try:
        text = json.dumps(program, indent=1, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise _refuse("kiln.export.save: the program does not make valid JSON", why=str(e)) from None
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w") as z:
                z.writestr(_zip_info(PROGRAM, zipfile.ZIP_DEFLATED), text)
                z.writestr(_zip_info(WEIGHTS, zipfile.ZIP_STORED), weights)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:   # NOTE: the rename itself made durable (POSIX); best effort elsewhere
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


