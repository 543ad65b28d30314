"""The source tree (PyTorch's names, generated code) and guard records."""
from __future__ import annotations

import os
import weakref

import torch

import kiln
from kiln.capture.guards import Guard, GuardKind, GuardSet
from kiln.capture.sources import (AttrSource, CallSource, ClosureSource, DictItemSource, GlobalSource, ItemSource,
                                  LocalSource, ModuleEntrySource, ModuleTableSource, ObjectSource, ObjectTable, SizeSource,
                                  global_source)


def test_names_and_code():
    self_ = LocalSource("self")
    w = self_.module_entry("_modules", "blocks").module_entry("_parameters", "weight")
    cases = [
        (LocalSource("x"), "L['x']", "x"),
        (GlobalSource("z"), "G['z']", "___G['z']"),
        (GlobalSource("z", "___c4"), "G['z']", "___c4['z']"),
        (ObjectSource("___c1"), "___c1", "___c1"),
        (ClosureSource("___c2", "k"), "L['k']", "___c2.cell_contents"),
        (self_.attr("cfg").attr("eps"), "L['self'].cfg.eps", "self.cfg.eps"),
        (LocalSource("xs").item(0).item("a"), "L['xs'][0]['a']", "xs[0]['a']"),
        (w, "L['self']._modules['blocks']._parameters['weight']", "self._modules['blocks']._parameters['weight']"),
        (DictItemSource(LocalSource("reg"), "k"), "L['reg']['k']", "dict.__getitem__(reg, 'k')"),
        (GlobalSource("os").attr("environ").method_call("get", "HOME"),
         "G['os'].environ.get('HOME')", "___G['os'].environ.get('HOME')"),
        (CallSource(LocalSource("ref")), "L['ref']()", "ref()"),
        (SizeSource(LocalSource("x"), 1), "L['x'].size()[1]", "x.size(1)"),
    ]
    for src, name, code in cases:
        assert (src.name(), src.code(), str(src)) == (name, code, name), src


def test_sources_are_structural_values():
    a = LocalSource("m").module_entry("_parameters", "w")
    assert a == ModuleEntrySource(LocalSource("m"), "_parameters", "w") and hash(a) == hash(
        ModuleEntrySource(LocalSource("m"), "_parameters", "w"))
    assert a != LocalSource("m").attr("w")  # same name, read differently
    assert a.chain() == [a, ModuleTableSource(LocalSource("m"), "_parameters"), LocalSource("m")]
    assert a.root() == LocalSource("m")
    assert isinstance(LocalSource("x").item(0), ItemSource) and isinstance(LocalSource("x").attr("a"), AttrSource)


def test_render_with_substitutes_bases():
    src = LocalSource("m").attr("a").item("k")
    assert src.render_with(lambda s: "___b0" if s == LocalSource("m").attr("a") else s.code()) == "___b0['k']"


def test_global_source_of_another_module_embeds_its_dict():
    table = ObjectTable()
    mine, other = {}, {}
    assert global_source(table, mine, mine, "z") == GlobalSource("z")
    src = global_source(table, other, mine, "z")
    assert src.code() == f"{table.name_of(other)}['z']" and src.name() == "G['z']"


def test_guard_records_keep_pytorch_words():
    gs = GuardSet(ObjectTable())
    y = LocalSource("y")
    gs.tensor(y, torch.zeros(2, requires_grad=True))
    gs.const(LocalSource("n"), 3)
    gs.alias(LocalSource("x"), y)
    gs.distinct([LocalSource("a"), LocalSource("b"), LocalSource("c")])
    gs.grad_mode(True)
    gs.tensor(y, torch.zeros(2))  # de-duplicated: the first guard on a source stays
    kinds = [g.kind for g in gs.guards]
    assert kinds == [GuardKind.TENSOR_MATCH, GuardKind.CONSTANT_MATCH, GuardKind.OBJECT_ALIASING,
                     GuardKind.DUPLICATE_INPUTS, GuardKind.GRAD_MODE]
    t = gs.guards[0]
    assert isinstance(t, Guard) and t.source == y
    assert "tensor 'L['y']' requires_grad mismatch. expected requires_grad=1" in t.reasons
    assert gs.guards[2].reasons == ["L['x'] is L['y']"]
    assert gs.guards[3].code() == "len({id(a), id(b), id(c)}) == 3"
    assert gs.guards[3].reasons == ["L['a'] is not L['b']", "L['a'] is not L['c']", "L['b'] is not L['c']"]
    assert gs.names[:2] == ["TENSOR_MATCH: L['y']", "CONSTANT_MATCH: L['n'] == 3"]
    assert gs.names[4] == "GRAD_MODE: True"
    why = gs.why_lines()
    assert why[3] == "if not (y.requires_grad is True): " \
                     "return \"tensor 'L['y']' requires_grad mismatch. expected requires_grad=1\""


def test_why_function_reports_first_failing_check():
    gs = GuardSet(ObjectTable())
    gs.length(LocalSource("xs"), [1, 2])
    gs.const(LocalSource("xs").item(0), 1)
    body = "\n".join("    " + line for line in gs.why_lines())
    ns = dict(gs.objects.values)
    exec(f"def why(xs):\n{body}\n    return None\n", ns)
    assert ns["why"]([1, 2]) is None
    assert ns["why"]([1, 2, 3]) == "len(L['xs']) != 2"
    assert ns["why"]([5, 2]) == "L['xs'][0] == 1"


def test_compiled_entries_carry_guard_records():
    k = 2.0

    def f(x, ref, env_key):
        return x * k + ref().sum() * float(os.environ.get(env_key, "1"))

    t = torch.ones(3)
    out = kiln.explain(f)(torch.randn(2), weakref.ref(t), "KILN_TEST_UNSET_VAR")
    assert out.graph_count == 1
    assert all(isinstance(g, Guard) for g in out.out_guards)
    srcs = {g.source.name() for g in out.out_guards if g.source is not None}
    assert {"L['x']", "L['k']", "L['ref']()", "G['os'].environ.get('KILN_TEST_UNSET_VAR', '1')"} <= srcs, srcs
    assert "Out Guards:" in str(out) and "TENSOR_MATCH: L['x']" in str(out)


def test_export_rebuilds_reads_by_walking_sources():
    class Holder:
        pass

    h = Holder()
    h.scale = torch.tensor(3.0)

    def f(xs, obj):
        return xs[0] * obj.scale + xs[1]

    xs = [torch.randn(2), torch.randn(2)]
    gm, guards = kiln.capture.export(f)(xs, h)
    torch.testing.assert_close(gm(xs, h), f(xs, h))
    ops = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert getattr in ops  # obj.scale read from the argument, not baked in as a constant
    assert guards and all(isinstance(g, Guard) for g in guards)

    m = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU())
    gm, _ = kiln.capture.export(m)(torch.randn(2, 3))
    targets = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert targets == {"0.weight", "0.bias"}, targets
    x = torch.randn(2, 3)
    torch.testing.assert_close(gm(x), m(x))


def test_explain_stays_a_function_after_export():
    import importlib
    import subprocess
    import sys

    # a fresh interpreter: the lazy names of kiln.capture resolve in this order there
    code = ("import torch, kiln\n"
            "kiln.capture.export(lambda x: x + 1)(torch.ones(2))\n"
            "assert callable(kiln.explain) and kiln.explain(lambda x: x * 2)(torch.ones(2)).graph_count == 1\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=importlib.import_module("kiln").__path__[0] + "/..")
