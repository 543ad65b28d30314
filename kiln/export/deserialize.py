"""kiln.export.load: an archive file back to an ExportedProgram, refusing anything that is
not a program kiln wrote (format and rules: kiln.export.archive)."""
from __future__ import annotations

import hashlib
import json
import keyword
import os
import re
import zipfile
import zlib
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from kiln import exc
from kiln.export.program import (ExportedProgram, ExportGraphSignature, InputKind, InputSpec, LeafMeta,
                                 OutputKind, OutputSpec)
from kiln.export.shapes import INT_MAX, Range

from kiln.export.archive import (_BadExpr, _dense, _DTYPES, _eval_expr, FORMAT, _IDENT, _LAYOUTS,
                                 _LoadError, _malformed, _MALFORMED_HINT, _MAX_PROGRAM_BYTES,
                                 _MEMORY_FORMATS, PROGRAM, _resolve_op, SUPPORTED_VERSIONS,
                                 _SYMBOL, _tables, WEIGHTS)


# --------------------------------------------------------------------------- load: the archive


def _read_archive(path: str) -> tuple[dict, bytes]:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise _LoadError(f"kiln.export.load: cannot read {path!r}", why=str(e)) from None
    if head[:1] == b"\x80":
        raise _LoadError("kiln.export.load: the file is not a kiln program (it looks like a pickle, "
                         "e.g. a torch.save file)", why="kiln never unpickles: unpickling runs code",
                         hint="export the model with kiln.export.export and save it with kiln.export.save")
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if head == b"PK\x03\x04":
            raise _LoadError("kiln.export.load: the archive is truncated or damaged", why=str(e),
                             hint="the file was cut short (an interrupted copy?); save the program again") from None
        raise _LoadError("kiln.export.load: the file is not a kiln program (not a zip archive)", why=str(e),
                         hint="pass a file written by kiln.export.save") from None
    with z:
        infos = z.infolist()
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise _LoadError("kiln.export.load: the archive holds a member twice",
                             why=f"members: {names}", hint=_MALFORMED_HINT)
        if PROGRAM not in names:
            pickled = any(n.endswith(".pkl") for n in names)
            raise _LoadError(f"kiln.export.load: the file is not a kiln program (no {PROGRAM} in the archive)",
                             why=f"its members are {names[:8]}" + (
                                 "; it looks like a torch.save file (pickled), which kiln never loads"
                                 if pickled else ""),
                             hint="pass a file written by kiln.export.save")
        info = {i.filename: i for i in infos}
        if info[PROGRAM].file_size > _MAX_PROGRAM_BYTES:
            raise _LoadError(f"kiln.export.load: {PROGRAM} is {info[PROGRAM].file_size} bytes, too large")
        raw = _read_member(z, PROGRAM)
        program = _parse_program(raw)
        members = program.get("members")
        if not isinstance(members, dict) or not all(isinstance(v, dict) for v in members.values()):
            raise _malformed("'members' is not a table of the archive's members")
        extra = [n for n in names if n not in (PROGRAM, WEIGHTS)]
        if extra:
            raise _LoadError(f"kiln.export.load: the archive holds members a kiln program does not have: {extra}",
                             why=f"a kiln program is {PROGRAM} and {WEIGHTS} (checked by its SHA-256); anything "
                                 "else was added to the file afterwards, and kiln reads nothing it cannot check",
                             hint="save the program again; never add files to the archive")
        if sorted(members) != [WEIGHTS]:
            raise _malformed(f"'members' lists {sorted(members)}, not [{WEIGHTS!r}]")
        data = {}
        for name, rec in members.items():
            if name not in info:
                raise _LoadError(f"kiln.export.load: the archive has no member {name!r}",
                                 why=f"{PROGRAM} lists it; the archive holds {names}",
                                 hint="the file is incomplete; save the program again")
            size, digest = rec.get("size"), rec.get("sha256")
            if not isinstance(size, int) or not isinstance(digest, str):
                raise _malformed(f"the record of member {name!r} has no size and sha256")
            if info[name].file_size != size:
                raise _LoadError(f"kiln.export.load: member {name!r} is {info[name].file_size} bytes, "
                                 f"{PROGRAM} says {size}", why="the file was modified after it was saved",
                                 hint="save the program again from the original model")
            blob = _read_member(z, name)
            if hashlib.sha256(blob).hexdigest() != digest:
                raise _LoadError(f"kiln.export.load: member {name!r} does not match its SHA-256 in {PROGRAM}",
                                 why="the file was tampered with or damaged after it was saved",
                                 hint="save the program again from the original model")
            data[name] = blob
    return program, data[WEIGHTS]


def _read_member(z: zipfile.ZipFile, name: str) -> bytes:
    try:
        return z.read(name)
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, ValueError, RuntimeError,
            NotImplementedError) as e:
        raise _LoadError(f"kiln.export.load: member {name!r} of the archive is truncated or damaged",
                         why=str(e), hint="save the program again") from None


def _parse_program(raw: bytes) -> dict:
    def no_constants(c: str) -> Any:
        raise ValueError(f"the JSON constant {c} (floats are written as text)")

    def pairs(kv: list) -> dict:
        out = {}
        for k, v in kv:
            if k in out:
                raise ValueError(f"the key {k!r} appears twice in one object")
            out[k] = v
        return out

    try:
        program = json.loads(raw.decode("utf-8"), parse_constant=no_constants, object_pairs_hook=pairs)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _LoadError(f"kiln.export.load: {PROGRAM} is not valid JSON", why=str(e), hint=_MALFORMED_HINT) from None
    if not isinstance(program, dict) or program.get("format") != FORMAT:
        raise _LoadError(f"kiln.export.load: the file is not a kiln program ({PROGRAM} has no "
                         f"'format': {FORMAT!r})", hint="pass a file written by kiln.export.save")
    version = program.get("schema_version")
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise _LoadError(f"kiln.export.load: the program has schema version {version!r}; this kiln reads "
                         f"version{'s' if len(SUPPORTED_VERSIONS) > 1 else ''} "
                         f"{', '.join(map(str, SUPPORTED_VERSIONS))}",
                         why="the file was written by another version of kiln",
                         hint="load it with the kiln that saved it, or export and save the model again")
    return program


# --------------------------------------------------------------------------- load: the program


def _need(d: Any, key: str, types: Any, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _malformed(f"{where} has no {key!r}")
    v = d[key]
    if not isinstance(v, types) or (isinstance(v, bool) and types is int):
        raise _malformed(f"{where}[{key!r}] is {v!r}")
    return v


class _Loader:
    def __init__(self, program: dict) -> None:
        self.p = program
        self.mode: Any = None
        self.env: dict = {}      # saved symbol name -> SymInt (or int)
        self.renamed = False     # a symbol came back under another name
        self._where = ""

    # ------------------------------------------------------------------ symbols
    def fake_mode(self) -> None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        symbols = _need(self.p, "symbols", dict, "the program")
        if not symbols:
            self.mode = FakeTensorMode()
            return
        from kiln.capture.dynamic import new_fake_mode

        self.mode = new_fake_mode(shape_env=True)
        for name in sorted(symbols, key=lambda n: (n[:1], int(n[1:]) if _SYMBOL.match(n) else 0)):
            m = _SYMBOL.match(name)
            info = symbols[name]
            if m is None or not isinstance(info, dict):
                raise _malformed(f"symbol {name!r}")
            lo, hi, hint = info.get("min"), info.get("max"), info.get("hint")
            for v in (lo, hi, hint):
                if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                    raise _malformed(f"symbol {name!r} has the bound {v!r}")
            if m.group(1) == "u":
                self.env[name] = self.mode.shape_env.create_unbacked_symint()
            else:
                self.env[name] = self._size_symbol(int(m.group(2)), lo, hi, hint, name)
            self.renamed |= str(self.env[name]) != name

    def _size_symbol(self, idx: int, lo: Optional[int], hi: Optional[int], hint: Optional[int], name: str) -> Any:
        from kiln.export.shapes import _root_symint

        lo = 2 if lo is None else lo
        hi = INT_MAX if hi is None else hi
        low = max(lo, 2)
        if hi < low:
            raise _malformed(f"symbol {name!r} has the empty range [{lo}, {hi}]")
        if hint is None or not low <= hint <= hi:
            hint = low
        env = self.mode.shape_env
        # NOTE: the ShapeEnv numbers a new symbol by a hash of its source's name; here it is
        # given the saved number, so the program's symbols keep their names (s53 stays s53)
        patched = hasattr(env, "_generate_unique_id") and idx not in getattr(env, "unique_ids", {idx})
        if patched:
            def unique_id(_source_name: str) -> int:
                env.unique_ids.add(idx)
                return idx
            env._generate_unique_id = unique_id
        try:
            return _root_symint(self.mode, hint, lo, hi)
        finally:
            if patched:
                del env._generate_unique_id

    def expr(self, text: Any, kind: str = "symint") -> Any:
        try:
            v = _eval_expr(text, self.env)
        except _BadExpr as e:
            raise _malformed(f"{self._where}: a symbolic {kind[3:]} expression is refused",
                             why=str(e)) from None
        except (ArithmeticError, TypeError, ValueError) as e:
            raise _malformed(f"{self._where}: the expression {text!r} cannot be evaluated", why=str(e)) from None
        return v

    def size(self, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return v
        if isinstance(v, str):
            return self.expr(v)
        raise _malformed(f"{self._where}: the size {v!r}")

    # ------------------------------------------------------------------ values
    def value(self, v: Any, nodes: Optional[dict], meta: bool = False) -> Any:
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, int):
            return v
        if isinstance(v, list):
            return [self.value(x, nodes, meta) for x in v]
        if not isinstance(v, dict) or len(v) != 1:
            raise _malformed(f"{self._where}: the value {v!r}")
        (tag, x), = v.items()
        if tag == "float":
            return self.float(x)
        if tag == "node" and nodes is not None and not meta:
            if not isinstance(x, str) or x not in nodes:
                raise _malformed(f"{self._where}: a reference to the node {x!r}, which is not defined before it")
            return nodes[x]
        if tag in ("symint", "symfloat", "symbool"):
            return self.expr(x, tag)
        if tag == "tuple" and isinstance(x, list):
            return tuple(self.value(e, nodes, meta) for e in x)
        if tag == "size" and isinstance(x, list):
            return torch.Size([self.value(e, nodes, meta) for e in x])
        if tag == "dict" and isinstance(x, list):
            out = {}
            for kv in x:
                if not (isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int))):
                    raise _malformed(f"{self._where}: a dict entry {kv!r}")
                out[kv[0]] = self.value(kv[1], nodes, meta)
            return out
        if tag == "slice" and isinstance(x, list) and len(x) == 3:
            return slice(*(self.value(e, nodes, meta) for e in x))
        if tag == "ellipsis" and x is None:
            return Ellipsis
        if tag == "complex" and isinstance(x, list) and len(x) == 2:
            return complex(self.float(x[0]), self.float(x[1]))
        if tag == "dtype":
            return self.named(_DTYPES, x, "dtype")
        if tag == "layout":
            return self.named(_LAYOUTS, x, "layout")
        if tag == "memory_format":
            return self.named(_MEMORY_FORMATS, x, "memory format")
        if tag == "device":
            return self.device(x)
        if tag == "tensor" and meta:
            return self.fake(x)
        if tag == "target" and not meta:
            return self.target(x)
        raise _malformed(f"{self._where}: the value {v!r}")

    def float(self, x: Any) -> float:
        if not isinstance(x, str) or len(x) > 64:
            raise _malformed(f"{self._where}: the float {x!r}")
        try:
            return float(x)
        except ValueError:
            raise _malformed(f"{self._where}: the float {x!r}") from None

    def named(self, table: dict, x: Any, what: str) -> Any:
        if not isinstance(x, str) or x not in table:
            raise _malformed(f"{self._where}: unknown {what} {x!r}")
        return table[x]

    def device(self, x: Any) -> torch.device:
        if not isinstance(x, str) or not re.match(r"^[a-z_]+(:[0-9]{1,4})?$", x):
            raise _malformed(f"{self._where}: the device {x!r}")
        try:
            return torch.device(x)
        except RuntimeError as e:
            raise _malformed(f"{self._where}: the device {x!r}", why=str(e)) from None

    def fake(self, rec: Any) -> torch.Tensor:
        w = f"{self._where}: a tensor value"
        dtype = self.named(_DTYPES, _need(rec, "dtype", str, w), "dtype")
        shape = [self.size(s) for s in _need(rec, "shape", list, w)]
        stride = [self.size(s) for s in _need(rec, "stride", list, w)]
        if len(shape) != len(stride):
            raise _malformed(f"{w} has {len(shape)} sizes and {len(stride)} strides")
        offset = self.size(rec.get("storage_offset", 0))
        device = self.device(_need(rec, "device", str, w))
        with self.mode:
            t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
            if isinstance(offset, int) and offset:
                base = torch.empty_strided((offset + max(1, sum((s - 1) * st for s, st in zip(shape, stride)) + 1),),
                                           (1,), dtype=dtype, device=device)
                t = base.as_strided(shape, stride, offset)
        if rec.get("parameter") is True:
            t = torch.nn.Parameter(t, requires_grad=rec.get("requires_grad") is True)
        elif rec.get("requires_grad") is True and (dtype.is_floating_point or dtype.is_complex):
            t.requires_grad_(True)
        return t

    def target(self, rec: Any) -> Any:
        kind = _need(rec, "kind", str, f"{self._where}: the target")
        name = _need(rec, "name", str, f"{self._where}: the target")
        if kind == "op":
            op = _resolve_op(name)
            if op is None:
                raise _LoadError(f"kiln.export.load: {self._where} calls the operator {name!r}, which this "
                                 "PyTorch does not have", why="operators are looked up on torch.ops by name; "
                                 "nothing named in the file is imported",
                                 hint="load the program where its custom operators are registered (import "
                                      "their library first), or export it again")
            return op
        table = _tables().get(kind) if kind in ("python", "hop") else None
        if table is None or name not in table:
            raise _LoadError(f"kiln.export.load: {self._where} calls {name!r} ({kind}), which is not a target "
                             "a kiln program may call",
                             why="a saved program calls ATen operators, a fixed table of operator/math/"
                                 "torch.sym_* functions and kiln's higher-order operators; nothing else is "
                                 "looked up or imported",
                             hint="the file was edited or written by something else; export and save the "
                                  "model again")
        return table[name]

    # ------------------------------------------------------------------ graphs
    def graph_module(self, rec: Any, path: str, tensors: dict) -> fx.GraphModule:
        where = f"graph {path or '<root>'}"
        cls = _need(rec, "class_name", str, where)
        if not _IDENT.match(cls):
            raise _malformed(f"{where}: the class name {cls!r}")
        subs_rec = _need(rec, "submodules", dict, where)
        root = torch.nn.Module()
        subs = {}
        for name, sub in subs_rec.items():
            if not _IDENT.match(name) or keyword.iskeyword(name):
                raise _malformed(f"{where}: the subgraph name {name!r}")
            subs[name] = self.graph_module(sub, f"{path}.{name}" if path else name, tensors)
            root.add_module(name, subs[name])
        for name, trec in _need(rec, "tensor_attrs", dict, where).items():
            if not _IDENT.match(name) or keyword.iskeyword(name) or name in subs:
                raise _malformed(f"{where}: the attribute name {name!r}")
            t = tensors.get(_need(trec, "key", str, where)) if isinstance(trec, dict) else None
            if t is None:
                raise _malformed(f"{where}: the attribute {name!r} has no tensor")
            if isinstance(t, torch.nn.Parameter):
                root.register_parameter(name, t)
            else:
                root.register_buffer(name, t)
        graph = fx.Graph()
        nodes: dict = {}
        has_output = False
        for i, n in enumerate(_need(rec, "nodes", list, where)):
            self._where = f"{where}, node {i}"
            op = _need(n, "op", str, self._where)
            name = _need(n, "name", str, self._where)
            if not _IDENT.match(name) or keyword.iskeyword(name) or name in nodes:
                raise _malformed(f"{self._where}: the node name {name!r}")
            self._where = f"{where}, node {name!r}"
            if has_output:
                raise _malformed(f"{self._where} comes after the output")
            raw_target = n.get("target")
            if op == "call_function":
                target = self.target(raw_target)
            elif op in ("placeholder", "get_attr", "call_module", "output"):
                if not isinstance(raw_target, str) or not (_IDENT.match(raw_target) or
                                                           (op == "output" and raw_target == "output")):
                    raise _malformed(f"{self._where}: the {op} target {raw_target!r}")
                if keyword.iskeyword(raw_target):
                    raise _malformed(f"{self._where}: the {op} target {raw_target!r}")
                if op == "get_attr" and raw_target not in subs and raw_target not in root._buffers \
                        and raw_target not in root._parameters:
                    raise _malformed(f"{self._where} reads the attribute {raw_target!r}, which the graph lacks")
                if op == "call_module" and raw_target not in subs:
                    raise _malformed(f"{self._where} calls the module {raw_target!r}, which the graph lacks")
                target = raw_target
            else:
                raise _LoadError(f"kiln.export.load: {self._where} is a {op!r} node, which a kiln program "
                                 "cannot hold", hint=_MALFORMED_HINT)
            args = self.value({"tuple": _need(n, "args", list, self._where)}, nodes)
            kwargs_rec = _need(n, "kwargs", dict, self._where)
            kwargs = {}
            for k, v in kwargs_rec.items():
                if not _IDENT.match(k) or keyword.iskeyword(k):
                    raise _malformed(f"{self._where}: the keyword {k!r}")
                kwargs[k] = self.value(v, nodes)
            if op == "placeholder" and any(isinstance(a, fx.Node) for a in pytree.tree_leaves(args)):
                raise _malformed(f"{self._where}: a placeholder's default refers to a node")
            node = graph.create_node(op, target, args, kwargs, name=name)
            if node.name != name:
                raise _malformed(f"{self._where}: the name {name!r} is taken (it became {node.name!r})")
            self.node_meta(node, n.get("meta", {}))
            nodes[name] = node
            has_output |= op == "output"
        if not has_output:
            raise _malformed(f"{where} has no output node")
        self._where = where
        try:
            gm = fx.GraphModule(root, graph, class_name=cls)
        except Exception as e:
            raise _LoadError(f"kiln.export.load: {where} cannot be rebuilt", why=f"{type(e).__name__}: {e}",
                             hint=_MALFORMED_HINT) from None
        order = _need(rec, "children", list, where)
        for name in [c for c in order if c in subs] + [c for c in subs if c not in order]:
            if name in gm._modules:
                del gm._modules[name]
            gm.add_module(name, subs[name])
        gm.meta["fake_mode"] = self.mode
        return gm

    def node_meta(self, node: fx.Node, meta: Any) -> None:
        if not isinstance(meta, dict):
            raise _malformed(f"{self._where}: the meta {meta!r}")
        if "val" in meta:
            try:
                node.meta["val"] = self.value(meta["val"], None, meta=True)
            except _LoadError:
                raise
            except Exception as e:   # NOTE: fake-tensor construction refused the saved sizes
                raise _malformed(f"{self._where}: the value cannot be rebuilt",
                                 why=f"{type(e).__name__}: {e}") from None
        if meta.get("tensor_meta") is True and isinstance(node.meta.get("val"), torch.Tensor):
            from torch.fx.passes.shape_prop import _extract_tensor_metadata

            try:
                node.meta["tensor_meta"] = _extract_tensor_metadata(node.meta["val"])
            except Exception:
                pass
        if isinstance(meta.get("seq_nr"), int):
            node.meta["seq_nr"] = meta["seq_nr"]
        if isinstance(meta.get("original_aten"), str):
            op = _resolve_op(meta["original_aten"])
            if op is not None:
                node.meta["original_aten"] = op
        if isinstance(meta.get("stack_trace"), str):
            node.meta["stack_trace"] = meta["stack_trace"]

    # ------------------------------------------------------------------ tensors
    def tensors(self, weights: bytes) -> tuple[dict, dict, dict]:
        """(state_dict, constants, {key: tensor}) from the weights, checked against the records."""
        from safetensors.torch import load as st_load

        try:
            loaded = st_load(weights)
        except Exception as e:
            raise _LoadError(f"kiln.export.load: {WEIGHTS} is not a safetensors file", why=str(e),
                             hint="the file was damaged or edited; save the program again") from None
        records: list = []
        for section in ("state_dict", "constants"):
            for name, rec in _need(self.p, section, dict, "the program").items():
                records.append((section, name, rec))
        self._attr_records(_need(self.p, "graph", dict, "the program"), "", records)
        by_key: dict = {}
        sections: dict = {"state_dict": {}, "constants": {}, "attr": {}}
        used = set()
        for section, name, rec in records:
            w = f"{section}[{name!r}]"
            key = _need(rec, "key", str, w)
            dtype = self.named(_DTYPES, _need(rec, "dtype", str, w), "dtype")
            shape = _need(rec, "shape", list, w)
            alias = rec.get("alias_of")
            if alias is not None:
                base = by_key.get(alias)
                if base is None:
                    raise _malformed(f"{w} is an alias of {alias!r}, which comes later or not at all")
                if base.dtype != dtype or list(base.shape) != shape:
                    raise _malformed(f"{w} is an alias of {alias!r}, which has another dtype or shape")
                t = _as_kind(base, rec.get("parameter") is True, rec.get("requires_grad") is True)
            else:
                t = loaded.get(key)
                if t is None:
                    raise _LoadError(f"kiln.export.load: {WEIGHTS} has no tensor {key!r}",
                                     why=f"the program's {w} is stored there",
                                     hint="the weights do not belong to this program; save it again")
                if t.dtype != dtype or list(t.shape) != shape:
                    raise _LoadError(f"kiln.export.load: the tensor {key!r} in {WEIGHTS} is "
                                     f"{str(t.dtype)[6:]}{list(t.shape)}, the program's {w} is "
                                     f"{str(dtype)[6:]}{shape}",
                                     hint="the weights do not belong to this program; save it again")
                used.add(key)
                if rec.get("stride") is not None:
                    t = _restride(t, rec["stride"], w)
                device = self.device(_need(rec, "device", str, w))
                if device.type != "cpu":
                    try:
                        t = t.to(device)
                    except (RuntimeError, AssertionError) as e:
                        raise _LoadError(f"kiln.export.load: {w} was saved on {device}, which this machine "
                                         "cannot use", why=str(e),
                                         hint="load it where that device exists, or export on the CPU") from None
                t = _as_kind(t, rec.get("parameter") is True, rec.get("requires_grad") is True)
            if key in by_key:
                raise _malformed(f"the key {key!r} is used twice")
            by_key[key] = t
            sections["attr" if section == "attr" else section][key if section == "attr" else name] = t
        unused = sorted(set(loaded) - used)
        if unused:
            raise _LoadError(f"kiln.export.load: {WEIGHTS} holds tensors the program does not name: "
                             f"{unused[:5]}", hint="the weights do not belong to this program; save it again")
        return sections["state_dict"], sections["constants"], sections["attr"]

    def _attr_records(self, g: dict, path: str, out: list) -> None:
        for name, rec in _need(g, "tensor_attrs", dict, f"graph {path or '<root>'}").items():
            out.append(("attr", f"{path}.{name}" if path else name, rec))
        for name, sub in _need(g, "submodules", dict, f"graph {path or '<root>'}").items():
            self._attr_records(sub, f"{path}.{name}" if path else name, out)

    # ------------------------------------------------------------------ the program
    def program(self, weights: bytes) -> ExportedProgram:
        state, constants, attrs = self.tensors(weights)
        self.fake_mode()
        gm = self.graph_module(_need(self.p, "graph", dict, "the program"), "", attrs)
        self._where = "the signature"
        sig_rec = _need(self.p, "signature", dict, "the program")
        ins, outs = [], []
        for r in _need(sig_rec, "input_specs", list, "the signature"):
            kind = self.enum(InputKind, _need(r, "kind", str, "an input spec"))
            persistent = r.get("persistent")
            if persistent is not None and not isinstance(persistent, bool):
                raise _malformed(f"the input spec {r!r}")
            ins.append(InputSpec(kind, _need(r, "name", str, "an input spec"), self.opt_str(r.get("target")),
                                 persistent))
        for r in _need(sig_rec, "output_specs", list, "the signature"):
            kind = self.enum(OutputKind, _need(r, "kind", str, "an output spec"))
            outs.append(OutputSpec(kind, _need(r, "name", str, "an output spec"), self.opt_str(r.get("target"))))
        sig = ExportGraphSignature(ins, outs)
        self.check_signature(gm, sig, state, constants)
        rc = {}
        for name, r in _need(self.p, "range_constraints", dict, "the program").items():
            lo, hi = _need(r, "min", int, f"range {name!r}"), r.get("max")
            if name not in self.env or (hi is not None and (not isinstance(hi, int) or isinstance(hi, bool))):
                raise _malformed(f"the range constraint {name!r}: {r!r}")
            rc[self.rename(name)] = Range(lo, hi)
        self._where = "the input meta"
        meta = []
        for r in _need(self.p, "input_meta", list, "the program"):
            path = _need(r, "path", str, "an input meta")
            dtype = r.get("dtype")
            sizes = r.get("sizes")
            if sizes is not None:
                if not isinstance(sizes, list):
                    raise _malformed(f"the input meta {path!r}")
                sizes = [self.rename(s) if isinstance(s, str) else self.int(s) for s in sizes]
            meta.append(LeafMeta(path, None if dtype is None else self.named(_DTYPES, dtype, "dtype"), sizes,
                                 self.value(r.get("value"), None)))
        dim_names = {}
        for dim, sym in _need(self.p, "dim_names", dict, "the program").items():
            if not isinstance(sym, str):
                raise _malformed(f"the dim name {dim!r}: {sym!r}")
            dim_names[dim] = self.rename(sym)
        specs = {}
        for attr in ("in_spec", "out_spec"):
            text = self.p.get(attr)
            if text is None:
                specs[attr] = None
                continue
            if not isinstance(text, str):
                raise _malformed(f"{attr} is {text!r}")
            try:
                specs[attr] = pytree.treespec_loads(text)
            except Exception as e:
                raise _malformed(f"{attr} is not a pytree spec", why=f"{type(e).__name__}: {e}") from None
        out_constants = {}
        for entry in self.p.get("out_constants", []):
            if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int)
                    and not isinstance(entry[0], bool) and entry[0] >= 0 and entry[0] not in out_constants):
                raise _malformed(f"the constant output {entry!r}")
            v = self.value(entry[1], None)
            if not (v is None or isinstance(v, (bool, int, float, str))):
                raise _malformed(f"the constant output {entry!r}")
            out_constants[entry[0]] = v
        # NOTE: inputs that are not tensors are leaves of in_spec and entries of the
        # input meta, but not graph inputs
        n_user = sum(1 for s in ins if s.kind is InputKind.USER_INPUT)
        n_leaves = len(meta) if meta else n_user
        if specs["in_spec"] is not None and specs["in_spec"].num_leaves != n_leaves:
            raise _malformed(f"in_spec has {specs['in_spec'].num_leaves} leaves for {n_leaves} inputs")
        if meta and sum(1 for m in meta if m.dtype is not None) != n_user:
            raise _malformed(f"the input meta has {sum(1 for m in meta if m.dtype is not None)} tensor "
                             f"entries for {n_user} user inputs")
        return ExportedProgram(gm, sig, state, rc, constants=constants, example_inputs=None,
                               in_spec=specs["in_spec"], out_spec=specs["out_spec"], input_meta=meta,
                               dim_names=dim_names, out_constants=out_constants)

    def enum(self, cls: Any, name: str) -> Any:
        if name not in cls.__members__:
            raise _malformed(f"unknown {cls.__name__} {name!r}")
        return cls[name]

    def opt_str(self, v: Any) -> Optional[str]:
        if v is not None and not isinstance(v, str):
            raise _malformed(f"{self._where}: {v!r} is not a name")
        return v

    def int(self, v: Any) -> int:
        if not isinstance(v, int) or isinstance(v, bool):
            raise _malformed(f"{self._where}: {v!r} is not an int")
        return v

    def rename(self, text: str) -> str:
        """A saved expression of symbols as the loaded program writes it (the same text
        unless a symbol came back under another name)."""
        v = self.expr(text)
        if not self.renamed:
            return text
        return str(v.node.expr) if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)) else str(v)

    def check_signature(self, gm: fx.GraphModule, sig: ExportGraphSignature, state: dict, constants: dict) -> None:
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if [p.name for p in phs] != [s.name for s in sig.input_specs]:
            raise _malformed("the signature's inputs are not the graph's placeholders",
                             why=f"{[s.name for s in sig.input_specs]} vs {[p.name for p in phs]}")
        out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
        if len(flat) != len(sig.output_specs):
            raise _malformed(f"the signature has {len(sig.output_specs)} outputs, the graph {len(flat)}")
        for s, ph in zip(sig.input_specs, phs):
            if s.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                table, what = state, "state_dict"
            elif s.kind is InputKind.CONSTANT_TENSOR:
                table, what = constants, "constants"
            else:
                continue
            t = table.get(s.target)
            if t is None:
                raise _LoadError(f"kiln.export.load: the signature's {s.kind.name} {s.target!r} is not in the "
                                 f"saved {what}", hint="the file was edited; save the program again")
            val = ph.meta.get("val")
            if isinstance(val, torch.Tensor) and (val.dtype != t.dtype or list(val.shape) != list(t.shape)):
                raise _LoadError(f"kiln.export.load: the weights' {s.target!r} is {str(t.dtype)[6:]}"
                                 f"{list(t.shape)}, the graph's {ph.name} takes {str(val.dtype)[6:]}"
                                 f"{list(val.shape)}", hint="the weights do not belong to this program")


def _restride(t: torch.Tensor, stride: Any, where: str) -> torch.Tensor:
    """``t`` (contiguous) copied into the dense layout ``stride`` it was saved from."""
    if (not isinstance(stride, list) or len(stride) != t.dim()
            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in stride)
            or not _dense(list(t.shape), stride)):
        # NOTE: checked before anything is allocated (a dense layout needs numel elements)
        raise _malformed(f"{where} has the strides {stride!r}, which are not a dense layout of {list(t.shape)}")
    if not t.numel():
        return t
    return torch.empty_strided(t.shape, stride, dtype=t.dtype).copy_(t)


def _as_kind(t: torch.Tensor, parameter: bool, requires_grad: bool) -> torch.Tensor:
    grad = requires_grad and (t.dtype.is_floating_point or t.dtype.is_complex)
    if parameter:
        if isinstance(t, torch.nn.Parameter) and t.requires_grad == grad:
            return t
        return torch.nn.Parameter(t.detach(), requires_grad=grad)
    if isinstance(t, torch.nn.Parameter):
        t = t.detach()
    return t.requires_grad_(True) if grad and not t.requires_grad else t


def load(path: Any) -> ExportedProgram:
    """The program saved at ``path`` by :func:`save` (see the module docstring)."""
    path = os.fspath(path)
    try:
        program, weights = _read_archive(path)
        loader = _Loader(program)
        try:
            return loader.program(weights)
        except (_LoadError, exc.SerializationError):
            raise
        except Exception as e:   # NOTE: whatever else a bad file makes fail is a refusal too
            raise _malformed(f"{loader._where or 'the program'} cannot be rebuilt",
                             why=f"{type(e).__name__}: {e}") from None
    except _LoadError as e:
        raise exc.SerializationError(e.what, why=e.why, where=path, hint=e.hint) from None


__all__ = ["save", "load", "SCHEMA_VERSION", "FORMAT"]
