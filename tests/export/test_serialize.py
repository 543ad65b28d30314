"""kiln.export.save / load: round trips (bit-identical results, the same printed
program) and a corpus of bad files, each refused with a SerializationError; nothing
in a file is ever unpickled, imported or called."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import pickle
import sys
import zipfile

import pytest
import torch
import torch.utils._pytree as pytree

import kiln
from kiln.exc import ExportInputError, SerializationError
from kiln.export import Dim, export, load, mark_strict, save

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
import zoo  # noqa: E402


# --------------------------------------------------------------------------- helpers


def _roundtrip(ep, tmp_path, name="prog.kiln"):
    path = tmp_path / name
    save(ep, path)
    ep2 = load(path)
    assert isinstance(ep2, kiln.export.ExportedProgram)
    assert str(ep2) == str(ep)
    assert ep2.graph_module.code == ep.graph_module.code
    assert ep2.graph_signature == ep.graph_signature
    assert ep2.range_constraints == ep.range_constraints
    assert ep2.dim_names == ep.dim_names
    assert ep2.input_meta == ep.input_meta
    assert ep2.in_spec == ep.in_spec and ep2.out_spec == ep.out_spec
    assert ep2.out_constants == ep.out_constants
    assert [type(v) for v in ep2.out_constants.values()] == [type(v) for v in ep.out_constants.values()]
    assert ep2.example_inputs is None
    assert set(ep2.state_dict) == set(ep.state_dict)
    for k, v in ep.state_dict.items():
        w = ep2.state_dict[k]
        assert type(w) is type(v) and w.requires_grad == v.requires_grad
        assert w.dtype == v.dtype and torch.equal(w.detach(), v.detach())
    assert set(ep2.constants) == set(ep.constants)
    for k, v in ep.constants.items():
        assert torch.equal(ep2.constants[k], v)
    assert [_describe(n.meta.get("val")) for n in ep2.graph.nodes] == [_describe(n.meta.get("val"))
                                                                       for n in ep.graph.nodes]
    return ep2, path


def _describe(v):
    """A meta value as what a program needs of it (a tensor's grad_fn is not saved)."""
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, str(v.shape), str(v.stride()), v.device, v.requires_grad,
                isinstance(v, torch.nn.Parameter))
    if isinstance(v, (list, tuple)):
        return type(v), [_describe(x) for x in v]
    return type(v), str(v)


def _equal(a, b):
    la, sa = pytree.tree_flatten(a)
    lb, sb = pytree.tree_flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), (x, y)
        else:
            assert type(x) is type(y) and x == y, (x, y)


def _copy(ep):
    """A program with its own state (ep.module() writes buffer mutations into ep's state)."""
    out = copy.copy(ep)
    out.state_dict = {k: (torch.nn.Parameter(v.detach().clone(), requires_grad=v.requires_grad)
                          if isinstance(v, torch.nn.Parameter) else v.clone()) for k, v in ep.state_dict.items()}
    out._module = None
    return out


# --------------------------------------------------------------------------- round trips


class ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).sum(dim=[1], keepdim=True)


@pytest.mark.parametrize("strict", [False, True])
def test_linear_with_dim(tmp_path, strict):
    lin = torch.nn.Linear(3, 4)
    lin.bias.requires_grad_(False)
    ep = export(lin, (torch.randn(5, 3),), dynamic_shapes={"input": {0: Dim("batch", max=100)}}, strict=strict)
    ep2, _ = _roundtrip(ep, tmp_path)
    assert isinstance(ep2.state_dict["weight"], torch.nn.Parameter) and ep2.state_dict["weight"].requires_grad
    assert not ep2.state_dict["bias"].requires_grad
    m, m2 = ep.module(), ep2.module()
    for n in (5, 7, 2, 100):
        x = torch.randn(n, 3)
        assert torch.equal(m(x), m2(x)) and torch.equal(m2(x), lin(x))
    with pytest.raises(ExportInputError, match="outside the range of Dim 'batch'"):
        m2(torch.randn(101, 3))
    with pytest.raises(ExportInputError, match="dtype"):
        m2(torch.randn(4, 3, dtype=torch.float64))
    assert ep2.graph_module.meta["fake_mode"].shape_env is not None


def test_conv_batchnorm_train_mutates_buffers(tmp_path):
    torch.manual_seed(0)
    ep = export(ConvBN().train(), (torch.randn(2, 3, 8, 8),), strict=False)
    assert any(s.kind is kiln.export.OutputKind.BUFFER_MUTATION for s in ep.graph_signature.output_specs)
    orig = _copy(ep)
    ep2, _ = _roundtrip(ep, tmp_path)
    m, m2 = orig.module(), ep2.module()
    before = {k: v.clone() for k, v in ep2.state_dict.items()}
    for _ in range(2):
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(m(x), m2(x))
    for k in ("bn.running_mean", "bn.running_var", "bn.num_batches_tracked"):
        assert torch.equal(dict(m.named_buffers())[k], dict(m2.named_buffers())[k])
        assert not torch.equal(dict(m2.named_buffers())[k], before[k]), k
    assert int(dict(m2.named_buffers())["bn.num_batches_tracked"]) == 2


def test_tensor_constant_and_shared_state(tmp_path):
    class C(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.arange(4.0) - 1.5
            self.register_buffer("a", torch.randn(4))
            self.register_buffer("b", torch.randn(4))
            self.w = torch.nn.Parameter(torch.randn(4, 4))
            self.register_buffer("wt", self.w.detach().t())   # a transposed view of w

        def forward(self, x):
            return x * self.c + self.a * self.b + x @ self.w + x @ self.wt

    ep = export(C(), (torch.randn(2, 4),), strict=False)
    assert ep.graph_signature.lifted_tensor_constants == ["lifted_tensor_0"]
    ep2, _ = _roundtrip(ep, tmp_path)
    x = torch.randn(2, 4)
    assert torch.equal(ep.module()(x), ep2.module()(x))
    # NOTE: a view of another tensor comes back with its layout, in storage of its own
    wt, w = ep2.state_dict["wt"], ep2.state_dict["w"]
    assert wt.stride() == (1, 4) and torch.equal(wt, w.detach().t())
    assert wt.untyped_storage().data_ptr() != w.untyped_storage().data_ptr()
    # NOTE: two names for one tensor: saved once, back as one tensor
    ep.state_dict["b"] = ep.state_dict["a"]
    ep3, path = _roundtrip(ep, tmp_path, "alias.kiln")
    assert ep3.state_dict["a"] is ep3.state_dict["b"]
    assert torch.equal(ep.module()(x), ep3.module()(x))
    with zipfile.ZipFile(path) as z:
        from safetensors.torch import load as st_load

        assert sorted(st_load(z.read("weights.safetensors"))) == ["constant.lifted_tensor_0", "state.a", "state.w",
                                                                   "state.wt"]


def test_nested_inputs_outputs_and_kwargs(tmp_path):
    class N(torch.nn.Module):
        def forward(self, xs, d, *, scale):
            a, b = xs
            return {"s": a + d["k"] * scale, "none": None, "k": (3, 0.5, "x", True),
                    "t": (b.sum(1, keepdim=True), b.to(torch.float64), torch.clamp(a, min=-0.5, max=float("inf")),
                          a.masked_fill(a > 100.0, float("nan")))}

    args = ((torch.randn(3, 4), torch.randn(3, 4)), {"k": torch.randn(3, 4)})
    kwargs = {"scale": torch.tensor(3.0)}
    ep = export(N(), args, kwargs, strict=False)
    code = ep.graph_module.code
    assert "sum.dim_IntList" in code and "torch.float64" in code and "inf" in code and "nan" in code
    assert sorted(ep.out_constants.values(), key=repr) == sorted([None, 3, 0.5, "x", True], key=repr)
    ep2, _ = _roundtrip(ep, tmp_path)
    _equal(ep.module()(*args, **kwargs), ep2.module()(*args, **kwargs))
    with pytest.raises(ExportInputError, match="structure"):
        ep2.module()(*args, scale=torch.tensor(3.0), extra=1)


def test_symbolic_sizes(tmp_path):
    class S(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

        def forward(self, x, y):
            n = y.shape[0]
            v = y.view(n * 2, -1)
            z = torch.zeros(n, 2, dtype=torch.float16, device="cpu", layout=torch.strided)
            e = torch.empty_like(y, memory_format=torch.contiguous_format)
            return (self.conv(x), v.sum() + z.sum() + y.new_ones(n + 1).sum(), e.shape[0] * y,
                    torch.nn.functional.pad(y, (0, 1)), x.reshape(-1)[: x.shape[2] // 2], y[:, 1::2])

    x, y = torch.randn(2, 3, 9, 9), torch.randn(6, 4)
    ep = export(S(), (x, y), dynamic_shapes={"x": {2: Dim("h", min=4), 3: Dim("w", min=3)}, "y": {0: Dim("n")}},
                strict=False)
    code = ep.graph_module.code
    assert "sym_size" in code and "//" in str(ep)
    ep2, _ = _roundtrip(ep, tmp_path)
    for xs, ys in ((x, y), (torch.randn(2, 3, 12, 7), torch.randn(11, 4))):
        _equal(ep.module()(xs, ys), ep2.module()(xs, ys))
    ph = [n for n in ep2.graph.nodes if n.op == "placeholder"]
    n = ph[-1].meta["val"].shape[0]
    assert isinstance(n, torch.SymInt) and str(n) == ep.dim_names["n"]


def test_strict_mode_subgraph(tmp_path):
    @mark_strict
    class B(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("buffer1", torch.ones(3))

        def forward(self, x):
            y = x + 2
            y.add_(4)
            return x.sum() + y.sum() + (self.buffer1 + 6).sum()

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.submodule = B()

        def forward(self, x):
            return (self.submodule(x.sin()), x + 3)

    ep = export(M(), (torch.randn(3),), strict=False)
    assert "strict_graph_0" in ep.graph_module.code
    ep2, _ = _roundtrip(ep, tmp_path)
    assert isinstance(ep2.graph_module.strict_graph_0, torch.fx.GraphModule)
    assert ep2.graph_module.strict_graph_0.code == ep.graph_module.strict_graph_0.code
    node = next(n for n in ep2.graph.nodes if n.name == "strict_mode")
    assert node.target is kiln.ops.strict_mode
    x = torch.randn(3)
    _equal(ep.module()(x), ep2.module()(x))


def test_zoo_model(tmp_path):
    model, args, _ = zoo.build("nanogpt")
    ep = export(model, args, strict=False)
    ep2, _ = _roundtrip(ep, tmp_path)
    with torch.no_grad():
        _equal(ep.module()(*args), ep2.module()(*args))
        _equal(model(*args), ep2.module()(*args))


def test_run_decompositions(tmp_path):
    torch.manual_seed(0)
    ep = export(ConvBN().train(), (torch.randn(2, 3, 8, 8),), dynamic_shapes={"x": {0: Dim("b")}}, strict=False)
    dec = ep.run_decompositions()
    assert "convolution" in dec.graph_module.code
    orig = _copy(dec)
    dec2, path = _roundtrip(dec, tmp_path)
    m, m2 = orig.module(), dec2.module()
    for n in (2, 5):
        x = torch.randn(n, 3, 8, 8)
        assert torch.equal(m(x), m2(x))
    for (k, a), (k2, b) in zip(m.named_buffers(), m2.named_buffers()):
        assert k == k2 and torch.equal(a, b)
    # NOTE: a loaded program is an ExportedProgram like any other: it decomposes again
    again = load(path).run_decompositions()
    assert again.graph_module.code == dec.graph_module.code


def test_save_is_atomic_and_deterministic(tmp_path, monkeypatch):
    ep = export(torch.nn.Linear(3, 2), (torch.randn(4, 3),), strict=False)
    a, b = tmp_path / "a.kiln", tmp_path / "b.kiln"
    save(ep, a)
    save(ep, str(b))
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(a) as z:
        assert z.namelist() == ["program.json", "weights.safetensors"]
        assert json.loads(z.read("program.json"))["schema_version"] == kiln.export.archive.SCHEMA_VERSION
    old = a.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        save(export(torch.nn.Linear(3, 5), (torch.randn(4, 3),), strict=False), a)
    assert a.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.kiln", "b.kiln"]


def test_save_refuses_unnamed_targets(tmp_path):
    ep = export(torch.nn.Linear(3, 2), (torch.randn(4, 3),), strict=False)
    g = ep.graph
    out = next(n for n in g.nodes if n.op == "output")
    with g.inserting_before(out):
        bad = g.call_function(torch.nn.functional.relu, (out.args[0][0],))
    out.args = ((bad,),)
    ep.graph_module.recompile()
    with pytest.raises(SerializationError, match=r"relu.*cannot be saved.*node 'relu'"):
        save(ep, tmp_path / "x.kiln")
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- bad files


CALLS: list = []


def _record(*args):
    CALLS.append(args)
    return 0


class _Evil:
    """Unpickling this calls _record (a stand-in for os.system)."""

    def __reduce__(self):
        return (_record, ("unpickled!",))


def _members(path):
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def _write(path, members, rehash=True):
    members = dict(members)
    if rehash and "program.json" in members:
        prog = json.loads(members["program.json"])
        prog["members"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                           for n, b in members.items() if n != "program.json" and n in prog["members"]}
        members["program.json"] = json.dumps(prog).encode()
    with zipfile.ZipFile(path, "w") as z:
        for n, b in members.items():
            z.writestr(n, b)


def _edit(path, out, fn):
    members = _members(path)
    prog = json.loads(members["program.json"])
    fn(prog)
    members["program.json"] = json.dumps(prog).encode()
    _write(out, members)


def _node(prog, name):
    return next(n for n in prog["graph"]["nodes"] if n["name"] == name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    ep = export(torch.nn.Linear(3, 4), (torch.randn(5, 3),), dynamic_shapes={"input": {0: Dim("batch", max=100)}},
                strict=False)
    save(ep, d / "good.kiln")
    return d / "good.kiln"


def _set(prog, keys, value):
    d = prog
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


def _case_not_zip(good, p):
    p.write_text("hello, I am a text file\n")


def _case_pickle_file(good, p):
    p.write_bytes(pickle.dumps({"weights": _Evil()}))


def _case_torch_save(good, p):
    torch.save({"w": torch.randn(2)}, p)


def _case_no_program(good, p):
    _write(p, {"weights.safetensors": _members(good)["weights.safetensors"]}, rehash=False)


def _case_truncated(good, p):
    p.write_bytes(good.read_bytes()[:-200])


def _case_truncated_half(good, p):
    p.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])


def _case_flipped_in_archive(good, p):
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as z:
        info = z.getinfo("weights.safetensors")
    assert info.compress_type == zipfile.ZIP_STORED
    # NOTE: the last byte of the weights' data: the local header is 30 bytes, the name, the extra field
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.file_size - 1] ^= 0xFF
    p.write_bytes(bytes(data))


def _case_flipped_weights(good, p):
    m = _members(good)
    w = bytearray(m["weights.safetensors"])
    w[-3] ^= 0x55
    m["weights.safetensors"] = bytes(w)
    _write(p, m, rehash=False)   # NOTE: a valid zip (CRC recomputed), but the SHA-256 no longer matches


def _case_unknown_op(good, p):
    _edit(good, p, lambda prog: _set(_node(prog, "t"), ["target", "name"], "aten::definitely_not_an_op.default"))


def _case_os_system_target(good, p):
    _edit(good, p, lambda prog: _set(_node(prog, "t"), ["target"], {"kind": "python", "name": "os.system"}))


def _case_os_system_op(good, p):
    _edit(good, p, lambda prog: _set(_node(prog, "t"), ["target"], {"kind": "op", "name": "os::system.default"}))


def _case_code_in_placeholder(good, p):
    def fn(prog):
        n = _node(prog, "input_1")
        n["target"] = "input_1=__import__('os').system('echo pwned')"
    _edit(good, p, fn)


def _case_code_in_kwarg(good, p):
    _edit(good, p, lambda prog: _set(_node(prog, "t"), ["kwargs"], {"x=__import__('os').system('x'),y": 1}))


def _case_code_in_expr(good, p):
    def fn(prog):
        _node(prog, "input_1")["meta"]["val"]["tensor"]["shape"][0] = "__import__('os').system('echo pwned')"
    _edit(good, p, fn)


def _case_code_in_input_meta(good, p):
    _edit(good, p, lambda prog: _set(prog["input_meta"][0]["sizes"], [0], "os.system('echo pwned') or s53"))


def _case_unknown_symbol(good, p):
    _edit(good, p, lambda prog: _set(_node(prog, "input_1")["meta"]["val"]["tensor"]["shape"], [0], "zz + 1"))


def _case_schema_version(good, p):
    _edit(good, p, lambda prog: _set(prog, ["schema_version"], 2))


def _case_not_kiln_json(good, p):
    _write(p, {"program.json": b'{"hello": "world"}'}, rehash=False)


def _case_bad_json(good, p):
    m = _members(good)
    m["program.json"] = m["program.json"][:-10]
    _write(p, m, rehash=False)


def _case_pickle_as_weights(good, p):
    m = _members(good)
    m["weights.safetensors"] = pickle.dumps(_Evil())
    _write(p, m)


def _case_pickle_member(good, p):
    m = _members(good)
    m["data.pkl"] = pickle.dumps(_Evil())
    _write(p, m)


def _case_pickle_member_listed(good, p):
    m = _members(good)
    m["data.pkl"] = pickle.dumps(_Evil())
    prog = json.loads(m["program.json"])
    prog["members"]["data.pkl"] = {"sha256": hashlib.sha256(m["data.pkl"]).hexdigest(), "size": len(m["data.pkl"])}
    m["program.json"] = json.dumps(prog).encode()
    _write(p, m)


def _case_missing_weights(good, p):
    m = _members(good)
    del m["weights.safetensors"]
    _write(p, m, rehash=False)


def _case_weights_lack_tensor(good, p):
    from safetensors.torch import load as st_load, save as st_save

    m = _members(good)
    w = st_load(m["weights.safetensors"])
    del w["state.bias"]
    m["weights.safetensors"] = st_save(w)
    _write(p, m)


def _case_weights_wrong_shape(good, p):
    from safetensors.torch import load as st_load, save as st_save

    m = _members(good)
    w = st_load(m["weights.safetensors"])
    w["state.weight"] = torch.zeros(4, 5)
    m["weights.safetensors"] = st_save(w)
    _write(p, m)


def _case_weights_wrong_dtype(good, p):
    from safetensors.torch import load as st_load, save as st_save

    m = _members(good)
    w = st_load(m["weights.safetensors"])
    w["state.weight"] = w["state.weight"].double()
    m["weights.safetensors"] = st_save(w)
    _write(p, m)


def _case_bad_strides(good, p):
    _edit(good, p, lambda prog: _set(prog["state_dict"]["weight"], ["stride"], [10 ** 12, 1]))


def _case_duplicate_member(good, p):
    m = _members(good)
    with zipfile.ZipFile(p, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        for n in ("program.json", "weights.safetensors", "weights.safetensors"):
            z.writestr(n, m[n])


def _case_signature_names_missing_state(good, p):
    _edit(good, p, lambda prog: _set(prog["signature"]["input_specs"][1], ["target"], "ghost"))


BAD_FILES = {
    "not_zip": (_case_not_zip, "not a kiln program (not a zip archive)"),
    "pickle_file": (_case_pickle_file, "looks like a pickle"),
    "torch_save_file": (_case_torch_save, "looks like a torch.save file"),
    "no_program_json": (_case_no_program, "no program.json"),
    "truncated": (_case_truncated, "truncated or damaged"),
    "truncated_half": (_case_truncated_half, "truncated or damaged"),
    "flipped_in_archive": (_case_flipped_in_archive, "truncated or damaged"),
    "flipped_weights": (_case_flipped_weights, "does not match its SHA-256"),
    "unknown_op": (_case_unknown_op, "'aten::definitely_not_an_op.default', which this PyTorch does not have"),
    "os_system_target": (_case_os_system_target, "calls 'os.system' (python), which is not a target"),
    "os_system_op": (_case_os_system_op, "'os::system.default', which this PyTorch does not have"),
    "code_in_placeholder": (_case_code_in_placeholder, "the placeholder target"),
    "code_in_kwarg": (_case_code_in_kwarg, "the keyword"),
    "code_in_expr": (_case_code_in_expr, "holds Call"),
    "code_in_input_meta": (_case_code_in_input_meta, "expression is refused"),
    "unknown_symbol": (_case_unknown_symbol, "names 'zz', which is not a symbol of the program"),
    "schema_version": (_case_schema_version, "schema version 2; this kiln reads version 1"),
    "not_kiln_json": (_case_not_kiln_json, "'format': 'kiln.export.program'"),
    "bad_json": (_case_bad_json, "program.json is not valid JSON"),
    "pickle_as_weights": (_case_pickle_as_weights, "weights.safetensors is not a safetensors file"),
    "pickle_member": (_case_pickle_member, "members a kiln program does not have: ['data.pkl']"),
    "pickle_member_listed": (_case_pickle_member_listed, "members a kiln program does not have: ['data.pkl']"),
    "missing_weights": (_case_missing_weights, "has no member 'weights.safetensors'"),
    "weights_lack_tensor": (_case_weights_lack_tensor, "has no tensor 'state.bias'"),
    "weights_wrong_shape": (_case_weights_wrong_shape,
                            "float32[4, 5], the program's state_dict['weight'] is float32[4, 3]"),
    "weights_wrong_dtype": (_case_weights_wrong_dtype, "is float64[4, 3]"),
    "state_missing": (_case_signature_names_missing_state, "PARAMETER 'ghost' is not in the saved state_dict"),
    "bad_strides": (_case_bad_strides, "which are not a dense layout of [4, 3]"),
    "duplicate_member": (_case_duplicate_member, "holds a member twice"),
}


@pytest.fixture
def no_unpickling(monkeypatch):
    """pickle, torch.load and os.system all fail loudly (and are recorded) if called."""
    calls = []

    def forbidden(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called during kiln.export.load")
        return f

    for mod, name in ((pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load"),
                      (os, "system"), (os, "popen")):
        monkeypatch.setattr(mod, name, forbidden(f"{mod.__name__}.{name}"))
    CALLS.clear()
    yield calls
    assert not CALLS, CALLS


@contextlib.contextmanager
def _no_eval(monkeypatch, calls):
    """Around a load: eval, sympy's text parser (it evaluates) and importlib are refused."""
    import builtins
    import importlib

    import sympy.parsing.sympy_parser as sympy_parser

    def forbidden(name):
        def f(*a, **k):
            calls.append(name)
            raise AssertionError(f"{name} called during kiln.export.load")
        return f

    with monkeypatch.context() as m:
        m.setattr(builtins, "eval", forbidden("eval"))
        m.setattr(importlib, "import_module", forbidden("importlib.import_module"))
        m.setattr(sympy_parser, "parse_expr", forbidden("sympy.parse_expr"))
        yield


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_refused(case, saved, tmp_path, no_unpickling, monkeypatch):
    make, fragment = BAD_FILES[case]
    bad = tmp_path / f"{case}.kiln"
    make(saved, bad)
    with pytest.raises(SerializationError) as info, _no_eval(monkeypatch, no_unpickling):
        load(bad)
    msg = str(info.value)
    assert fragment in msg, msg
    assert info.value.hint and "Hint:" in msg
    assert info.value.where == str(bad)
    assert not no_unpickling and not CALLS


def test_good_file_loads_without_pickle(saved, no_unpickling, monkeypatch):
    with _no_eval(monkeypatch, no_unpickling):
        ep = load(saved)
    x = torch.randn(6, 3)
    assert ep.module()(x).shape == (6, 4)
    assert not no_unpickling


def test_missing_file(tmp_path):
    with pytest.raises(SerializationError, match="cannot read"):
        load(tmp_path / "nope.kiln")
