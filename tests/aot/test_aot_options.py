"""AOTOptions: one record of AOT options; unknown options reported; keep_inference_input_mutations
and num_params_buffers implemented; the AOT steps as named passes."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln import exc
from kiln.aot import (
    AOTOptions,
    aot_function,
    aot_module,
    aot_module_simplified,
    default_partition,
    make_boxed_func,
    min_cut_rematerialization_partition,
    nop,
)
from kiln.backends import aot_autograd

aten = torch.ops.aten


class Recorder:
    """A compiler that keeps the graphs it was given."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return make_boxed_func(gm)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ---------------------------------------------------------------------------- unknown options
def test_misspelled_option_is_reported_with_the_valid_ones():
    with pytest.raises(TypeError) as info:
        aot_function(lambda x: x.sin(), fw_compiler=nop, partiton_fn=min_cut_rematerialization_partition)
    msg = str(info.value)
    assert "aot_function" in msg and "'partiton_fn'" in msg and "did you mean 'partition_fn'" in msg
    assert "keep_inference_input_mutations" in msg and "num_params_buffers" in msg


@pytest.mark.parametrize("call", [
    lambda: aot_module(torch.nn.Linear(2, 2), nop, bw_compilr=nop),
    lambda: aot_module_simplified(torch.nn.Linear(2, 2), [torch.randn(1, 2)], nop, cudagraphs=True),
    lambda: aot_autograd(fw_compiler=nop, inference_compilr=nop),
], ids=["aot_module", "aot_module_simplified", "aot_autograd"])
def test_unknown_option_is_an_error_everywhere(call):
    with pytest.raises(TypeError, match="unknown option .*valid options: fw_compiler"):
        call()


def test_missing_fw_compiler_and_bad_values_are_errors():
    with pytest.raises(TypeError, match="fw_compiler"):
        aot_function(lambda x: x)
    with pytest.raises(exc.KilnError, match="num_params_buffers must be an int"):
        aot_function(lambda x: x, nop, num_params_buffers=-1)
    with pytest.raises(exc.KilnError, match=r"dynamic=True\) is not supported") as info:
        aot_function(lambda x: x, nop, dynamic=True)
    assert "test_aot_options.py" in str(info.value)  # where: the user's call


def test_options_record_and_positional_pytorch_order_agree():
    fw1, fw2, bw2 = Recorder(), Recorder(), Recorder()
    x = torch.randn(3, requires_grad=True)

    def f(x):
        return x.sin().cos()

    # PyTorch's positional order: fn, fw_compiler, bw_compiler, partition_fn, decompositions
    out1 = aot_function(f, fw1, None, default_partition, None)(x)
    opts = AOTOptions(fw_compiler=fw2, bw_compiler=bw2, partition_fn=default_partition)
    assert opts.inference_compiler is fw2  # defaults resolved
    out2 = aot_function(f, options=opts)(x)
    torch.testing.assert_close(out1, out2)
    out2.sum().backward()
    assert len(fw2.graphs) == 1 and len(bw2.graphs) == 1
    with pytest.raises(TypeError, match="unknown option 'partiton_fn'"):
        opts.replace(partiton_fn=default_partition)
    # defaults follow a replaced fw_compiler; explicit choices stay
    other = Recorder()
    moved = opts.replace(fw_compiler=other)
    assert moved.inference_compiler is other and moved.bw_compiler is bw2
    assert AOTOptions(fw_compiler=nop).replace(fw_compiler=other).bw_compiler is other


# ---------------------------------------------------------------------------- keep_inference_input_mutations
def _mutates(x, y):
    x.add_(y)
    return (x * 2,)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_inference_input_mutations(keep, monkeypatch):
    monkeypatch.setenv("KILN_CHECK", "1")  # the verifier allows exactly the kept writes
    fw = Recorder()
    x, y = torch.randn(4), torch.randn(4)
    ref_x = x.clone()
    (ref,) = _mutates(ref_x, y)
    compiled = aot_function(_mutates, fw, keep_inference_input_mutations=keep)
    (out,) = compiled(x, y)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x, ref_x)
    gm = fw.graphs[0]
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    outs = gm.graph.output_node().args[0]
    copies = [n for n in gm.graph.nodes if n.target is aten.copy_.default]
    if keep:
        assert len(copies) == 1 and copies[0].args[0] is phs[0]
        assert len(outs) == 1  # the new value of x is written in the graph, not returned
        assert gm.meta["kept_input_mutations"] == {phs[0].name}
    else:
        assert not copies and len(outs) == 2
    # a second call mutates again (the write happens every call)
    compiled(x, y)
    torch.testing.assert_close(x, ref_x + y)


def test_keep_inference_input_mutations_leaves_metadata_mutations_to_the_runtime():
    fw = Recorder()

    def f(x):
        x.t_()
        x.mul_(3)
        return x + 1

    x = torch.randn(2, 3)
    ref_x = x.clone()
    ref = f(ref_x)
    out = aot_function(f, fw, keep_inference_input_mutations=True)(x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x, ref_x)
    assert x.shape == (3, 2)
    assert aten.copy_.default not in _targets(fw.graphs[0])


def test_keep_inference_input_mutations_training_graphs_stay_functional():
    fw = Recorder()

    def f(x, w):
        x.mul_(2)
        return (x * w).sum()

    x, w = torch.randn(3), torch.randn(3, requires_grad=True)
    ref_x = x.clone()
    ref = f(ref_x, w)
    out = aot_function(f, fw, keep_inference_input_mutations=True)(x, w)
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x, ref_x)
    torch.testing.assert_close(w.grad, ref_x)
    assert aten.copy_.default not in _targets(fw.graphs[0])


def test_aot_eager_keeps_inference_input_mutations_in_graph():
    graphs = []

    def fw(gm, example_inputs):
        graphs.append(gm)
        return nop(gm, example_inputs)

    backend = aot_autograd(fw_compiler=fw, keep_inference_input_mutations=True)

    def f(buf, x):
        buf.add_(x)
        return buf.sum()

    kiln.reset()
    buf, x = torch.zeros(3), torch.ones(3)
    out = kiln.compile(f, backend=backend)(buf, x)
    assert out.item() == 3.0 and buf.tolist() == [1.0, 1.0, 1.0]
    assert aten.copy_.default in _targets(graphs[0])


# ---------------------------------------------------------------------------- num_params_buffers
def test_num_params_buffers_marks_static_inputs():
    fw = Recorder()
    w, x = torch.randn(3), torch.randn(3)
    aot_function(lambda w, x: w * x, fw, num_params_buffers=1)(w, x)
    assert fw.graphs[0].meta["static_input_indices"] == [0]
    with pytest.raises(exc.KilnError, match="num_params_buffers=3 but the function takes 2"):
        aot_function(lambda w, x: w * x, nop, num_params_buffers=3)(w, x)


def test_modules_count_their_parameters_and_buffers():
    mod = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    n_state = len(list(mod.parameters())) + len(list(mod.buffers()))
    fw = Recorder()
    aot_module(mod, fw)(torch.randn(4, 3)).sum().backward()
    assert fw.graphs[0].meta["static_input_indices"] == list(range(n_state))
    fw2 = Recorder()
    aot_module_simplified(mod, [torch.randn(4, 3)], fw2)
    assert fw2.graphs[0].meta["static_input_indices"] == list(range(n_state))
    with pytest.raises(exc.KilnError, match="disagrees with the module"):
        aot_module(mod, nop, num_params_buffers=1)


def test_aot_export_joint_simple_marks_params_buffers():
    from kiln.aot import aot_export_joint_simple

    w, x = torch.randn(3, requires_grad=True), torch.randn(3)
    gm = aot_export_joint_simple(lambda w, x: (w * x).sum(), [w, x], trace_joint=False,
                                 num_params_buffers=1)
    assert gm.meta["static_input_indices"] == [0]
    with pytest.raises(exc.KilnError, match="num_params_buffers=5"):
        aot_export_joint_simple(lambda w, x: w * x, [w, x], trace_joint=False, num_params_buffers=5)
