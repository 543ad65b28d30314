"""Partitioners on joint graphs traced with kiln.make_fx."""
import pytest
import torch

from kiln.aot.partition import default_partition, min_cut_rematerialization_partition
from kiln.tracing import make_fx


def _chain(x):
    a = x.sin()
    b = a.cos()
    c = b * 2
    d = c.exp()
    return d.tanh()


def _mlp(x, w):
    h = torch.relu(x @ w)
    return (h * h).sigmoid()


def _joint_of(f):
    def joint(primals, tangents):
        outs = f(*primals)
        grads = torch.autograd.grad(outs, [p for p in primals if p.requires_grad], tangents[0])
        return [outs, *grads]

    return joint


@pytest.mark.parametrize("fn, shapes", [(_chain, [(1000,)]), (_mlp, [(8, 16), (16, 32)])])
@pytest.mark.parametrize("partition", [default_partition, min_cut_rematerialization_partition])
def test_partitions_give_eager_grads(fn, shapes, partition):
    primals = [torch.randn(*s, requires_grad=True) for s in shapes]
    tangent = torch.randn_like(fn(*primals))
    joint = make_fx(_joint_of(fn), tracing_mode="fake")(primals, [tangent])
    fw, bw = partition(joint, None, num_fwd_outputs=1)
    inputs = [torch.randn(*s) for s in shapes]
    outs = fw(*inputs)
    grads = bw(*outs[1:], tangent)
    ref_in = [i.clone().requires_grad_() for i in inputs]
    ref = fn(*ref_in)
    ref.backward(tangent)
    torch.testing.assert_close(outs[0], ref)
    for g, r in zip(grads, ref_in):
        torch.testing.assert_close(g, r.grad)


def test_min_cut_saves_fewer_tensors_on_pointwise_chain():
    x = torch.randn(1000, requires_grad=True)
    joint = make_fx(_joint_of(_chain), tracing_mode="fake")([x], [torch.randn(1000)])
    fw_d, _ = default_partition(joint, None, num_fwd_outputs=1)
    fw_m, _ = min_cut_rematerialization_partition(joint, None, num_fwd_outputs=1)
    def saved(fw):
        return len(fw.graph.output_node().args[0]) - 1

    assert saved(fw_m) < saved(fw_d)
    assert saved(fw_m) == 1  # only the input: the chain is recomputed


def test_min_cut_never_recomputes_matmul():
    x, w = torch.randn(8, 16, requires_grad=True), torch.randn(16, 32, requires_grad=True)
    joint = make_fx(_joint_of(_mlp), tracing_mode="fake")([x, w], [torch.randn(8, 32)])
    _, bw = min_cut_rematerialization_partition(joint, None, num_fwd_outputs=1)
    # the two gradient matmuls only: the forward matmul is saved, not rerun
    assert sum(n.target is torch.ops.aten.mm.default for n in bw.graph.nodes) == 2
