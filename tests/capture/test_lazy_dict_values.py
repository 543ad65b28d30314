"""A dict read from the caller: its keys are guarded when it is loaded, each value is read
(wrapped and guarded) the first time the code uses it, as PyTorch's capture does: values the
code never reads are not guarded, and the first read of a tensor names its graph input."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.testing import CompileCounter, EagerAndRecordGraphs


@pytest.fixture(autouse=True)
def _reset():
    kiln.reset()
    yield
    kiln.reset()


def _placeholders(gm) -> list:
    return [n.name for n in gm.graph.nodes if n.op == "placeholder"]


def test_a_value_the_code_never_reads_is_not_guarded():
    def f(x, cfg):
        return x * cfg["scale"]

    cc = CompileCounter()
    cf = kiln.compile(f, backend=cc)
    for i in range(4):
        cfg = {"scale": 2.0, "name": f"run{i}", "t": torch.ones(i + 1)}
        assert torch.equal(cf(torch.ones(2), cfg), f(torch.ones(2), cfg))
    assert cc.frame_count == 1
    # NOTE: the keys are still guarded: a new key recompiles.
    cf(torch.ones(2), {"scale": 2.0, "name": "x", "t": None, "new": 1})
    assert cc.frame_count == 2


def test_the_first_read_of_a_tensor_names_its_graph_input():
    lin = torch.nn.Linear(3, 3)

    def f(model, params, x):
        w = model.weight
        return (x @ params["weight"]).sum() + w.sum()

    rec = EagerAndRecordGraphs()
    x = torch.randn(2, 3)
    kiln.compile(f, backend=rec)(lin, dict(lin.named_parameters()), x)
    assert _placeholders(rec.graphs[0]) == ["l_model_parameters_weight_", "l_x_"]


def test_functional_call_reads_the_modules_own_tensors_first():
    """As eager functional_call does (``_untie_named_tensors_map``): one dict holding the
    module's own tensors names the inputs through the module's tables; a sequence of dicts is
    merged first (its values read first), and a tensor the dict replaces is no input."""
    model = torch.nn.Linear(3, 3)
    x = torch.randn(4, 3)

    def one(model, params, x):
        return torch.func.functional_call(model, params, (x,))

    def two(model, params, buffers, x):
        return torch.func.functional_call(model, (params, buffers), (x,))

    rec = EagerAndRecordGraphs()
    params = dict(model.named_parameters())
    torch.testing.assert_close(kiln.compile(one, backend=rec)(model, params, x), model(x))
    names = _placeholders(rec.graphs[-1])
    assert "l_model_parameters_weight_" in names and "l_model_parameters_bias_" in names
    assert not any("params" in n for n in names)

    kiln.reset()
    rec = EagerAndRecordGraphs()
    torch.testing.assert_close(kiln.compile(two, backend=rec)(model, params, {}, x), model(x))
    assert any("params" in n for n in _placeholders(rec.graphs[-1]))

    kiln.reset()
    rec = EagerAndRecordGraphs()
    other = {k: torch.randn_like(v) for k, v in params.items()}
    got = kiln.compile(one, backend=rec)(model, other, x)
    torch.testing.assert_close(got, torch.func.functional_call(model, other, (x,)))
    assert not any("model" in n for n in _placeholders(rec.graphs[-1]))


def test_functional_call_inputs_come_in_the_order_they_are_read():
    """functional_call reads the given tensors (swapping them in) before its arguments reach an
    op, so they come first in the graph's signature, as in PyTorch's capture; the order of the
    loads in the caller's code does not decide it."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = torch.nn.Linear(1, 1)
            self.register_buffer("buffer", torch.ones(1))

        def forward(self, x):
            return self.l1(x) + self.buffer

    model = M()
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    x, targets = torch.randn(4, 1), torch.randn(4, 1)

    def loss(model, params, x, targets):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), targets)

    def two(model, params, buffers, x):
        return torch.func.functional_call(model, (params, buffers), x)

    rec = EagerAndRecordGraphs()
    torch.testing.assert_close(kiln.compile(loss, backend=rec)(model, params, x, targets),
                               loss(model, params, x, targets))
    names = _placeholders(rec.graphs[-1])
    assert names[:2] == ["l_model_modules_l1_parameters_weight_", "l_model_modules_l1_parameters_bias_"]
    assert names.index("l_x_") < names.index("l_targets_")
    kiln.reset()
    rec = EagerAndRecordGraphs()
    torch.testing.assert_close(kiln.compile(two, backend=rec)(model, params, buffers, x), model(x))
    assert _placeholders(rec.graphs[-1]) == ["l_params_l1_weight_", "l_params_l1_bias_", "l_buffers_buffer_", "l_x_"]


def test_copies_and_views_read_every_value():
    def f(x, d):
        a = dict(d)
        b = {**d}
        c = d | {"z": 1}
        vals = list(d.values())
        pairs = [v for _, v in d.items()]
        return a["w"] + b["q"] + c["w"] + vals[1] + pairs[0] + x, c["z"], len(a)

    d = {"w": torch.ones(2), "q": torch.full((2,), 3.0)}
    got = kiln.compile(f, backend="eager", fullgraph=True)(torch.ones(2), d)
    ref = f(torch.ones(2), d)
    assert torch.equal(got[0], ref[0]) and got[1:] == ref[1:]


def test_a_mutated_dict_keeps_the_values_it_never_read():
    def f(x, d):
        d["new"] = x + 1
        del d["gone"]
        return x * 2

    d = {"keep": torch.ones(2), "gone": 3, "s": "text"}
    out = kiln.compile(f, backend="eager")(torch.ones(2), d)
    assert torch.equal(out, torch.full((2,), 2.0))
    assert list(d) == ["keep", "s", "new"] and d["s"] == "text" and torch.equal(d["keep"], torch.ones(2))
    assert torch.equal(d["new"], torch.full((2,), 2.0))
