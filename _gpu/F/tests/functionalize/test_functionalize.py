"""kiln.functionalize: traced graphs are functional and compute what eager computes."""
from __future__ import annotations

import pytest
import torch

from kiln import exc
from kiln.functionalize import FunctionalizeMode, describe_outputs, functionalize
from kiln.functionalize.metadata import ALIAS_OF_INPUT, ALIAS_OF_INTERMEDIATE, ALIAS_OF_OUTPUT, IS_INPUT, PLAIN
from kiln.tracing import make_fx

aten = torch.ops.aten


def _mutating_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function"
            and getattr(getattr(n.target, "_schema", None), "is_mutable", False)]


def _check(fn, *args, mode="real"):
    """Trace functionalize(fn), run graph and eager on copies; compare outputs and inputs."""
    gm = make_fx(functionalize(fn), tracing_mode=mode)(*[a.clone() for a in args])
    e_args = [a.clone() for a in args]
    c_args = [a.clone() for a in args]
    e_out, c_out = fn(*e_args), gm(*c_args)
    e_out = e_out if isinstance(e_out, (tuple, list)) else (e_out,)
    c_out = c_out if isinstance(c_out, (tuple, list)) else (c_out,)
    for a, b in zip(e_out, c_out):
        torch.testing.assert_close(a, b)
    for a, b in zip(e_args, c_args):
        torch.testing.assert_close(a, b)
    # only the epilogue writes to inputs: copy_ nodes whose target is a placeholder
    # (or an op with no functional sibling writing to a fresh clone)
    for n in _mutating_nodes(gm):
        written = [a for a, s in zip(n.args, n.target._schema.arguments)
                   if s.alias_info is not None and s.alias_info.is_write]
        ok = n.target is aten.copy_.default and n.args[0].op == "placeholder"
        ok = ok or all(w.target is aten.clone.default for w in written)
        assert ok, n.format_node()
    return gm


def test_add_inplace_becomes_add_and_copy_epilogue():
    def f(x, y):
        x.add_(y)
        return x * 2

    gm = _check(f, torch.randn(4), torch.randn(4))
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets == [aten.add.Tensor, aten.mul.Tensor, aten.copy_.default]


def test_slice_assignment_into_input():
    def f(stack, scores):
        getitem = scores[:, :, :4, :5]
        stack[:, :-1, :, 4:] = getitem
        return (stack.view(1, 8, 4, 9),)

    gm = _check(f, torch.randn(2, 4, 4, 9), torch.randn(2, 3, 8, 9))
    assert any(n.target is aten.slice_scatter.default for n in gm.graph.nodes)


def test_expand_then_inplace_on_slice_updates_input_like_eager():
    def f(x):
        y = x.expand(3, *x.shape)
        y[0, 0].add_(5)
        return y

    _check(f, torch.arange(6))
    _check(f, torch.arange(6), mode="fake")


def test_internal_overlap_raises_like_eager():
    def f(x):
        y = x.expand(3, *x.shape)
        y[0:3, 0].add_(5)
        return y

    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        f(torch.arange(6))
    with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
        make_fx(functionalize(f))(torch.arange(6))


def test_aliases_see_new_values():
    def f(x):
        z = x.view(-1)
        t = x.t()
        x.add_(1)
        z.mul_(2)
        return z + 0, t + 0, x + 0

    _check(f, torch.randn(3, 4))


def test_out_variant_and_resize():
    def f(a, b):
        out = torch.empty(0)
        torch.add(a, b, out=out)
        c = torch.zeros(2)
        torch.mul(a, b, out=c)  # resized from 2 to 4
        return out, c

    gm = _check(f, torch.randn(4), torch.randn(4))
    assert not _mutating_nodes(gm)


def test_inplace_view_ops():
    def f(x):
        y = x.clone()
        y.transpose_(0, 1)
        y.unsqueeze_(0)
        y[0, 1].zero_()
        return y

    _check(f, torch.randn(3, 4))


def test_set_on_leaf_requiring_grad_raises_like_eager():
    def f(x):
        x.set_(torch.ones(2))
        return x

    x = torch.ones(2, requires_grad=True)
    with pytest.raises(RuntimeError, match="is being used in an in-place operation"):
        f(x)
    with pytest.raises(RuntimeError, match="is being used in an in-place operation"):
        make_fx(functionalize(f))(x)


def test_set_on_intermediate_aliases_source():
    def f(x, y):
        a = x.clone()
        b = y * 2
        a.set_(b)
        b.add_(1)
        return a + 0

    _check(f, torch.randn(3), torch.randn(3))


def test_parameter_add_under_no_grad_metadata():
    p = torch.nn.Parameter(torch.randn(4))
    y = torch.randn(4)

    def f(param, y):
        with torch.no_grad():
            param.add_(y)
        return y * 1

    wrapped = functionalize(f, write_back="outputs")
    mode_out, mutated = wrapped(p, y)
    info = wrapped.metadata.inputs[0]
    assert info.mutates_data and info.mutations_under_no_grad and not info.mutates_metadata
    assert not wrapped.metadata.inputs[1].mutated
    assert len(mutated) == 1
    torch.testing.assert_close(mutated[0], p.detach() + y)
    torch.testing.assert_close(p.detach() + 0, p.detach())  # p itself is untouched


def test_mutation_under_grad_is_recorded():
    def f(x):
        x.mul_(2)
        return x

    wrapped = functionalize(f, write_back="outputs")
    wrapped(torch.randn(3))
    assert wrapped.metadata.inputs[0].mutates_data
    assert not wrapped.metadata.inputs[0].mutations_under_no_grad


def test_output_alias_metadata():
    x = torch.randn(3, 4)
    mode = FunctionalizeMode()
    mode.register_input(x, 0)
    with mode:
        a = x.view(-1)
        y = x * 2
        b = y.t()
        c = (x + 1).view(-1)
    infos, bases = describe_outputs(mode, [x, a, y, b, c, y + 0])
    kinds = [i.kind for i in infos]
    assert kinds == [IS_INPUT, ALIAS_OF_INPUT, PLAIN, ALIAS_OF_OUTPUT, ALIAS_OF_INTERMEDIATE, PLAIN]
    assert infos[3].base_index == 2 and len(bases) == 1


def test_no_functional_sibling_clones_and_mutates():
    with torch.library._scoped_library("kilnfz", "FRAGMENT") as lib:
        torch.library.define("kilnfz::inplace_add", "(Tensor input, Tensor(a!) output) -> ()", lib=lib)
        def inplace_add(i, o):
            o.add_(i)

        lib.impl("inplace_add", inplace_add, "CompositeExplicitAutograd")

        def f(x, out):
            torch.ops.kilnfz.inplace_add(x, out)
            return out * 1

        gm = _check(f, torch.randn(3), torch.randn(3))
        assert any(n.target is aten.clone.default for n in gm.graph.nodes)


def test_effect_tokens_thread_effectful_ops():
    from kiln.ops import with_effects

    def f(token, x):
        mode = FunctionalizeMode(tokens=[token])
        mode.register_input(x, 0)
        with mode:
            torch.ops.aten._print("a")
            y = x + 1
            torch.ops.aten._print("b")
        return mode.tokens[0], mode.value_of(y)

    gm = make_fx(f)(torch.empty(0), torch.randn(2))
    hops = [n for n in gm.graph.nodes if n.target is with_effects]
    assert len(hops) == 2
    assert hops[0].args[0].op == "placeholder"
    assert hops[1].args[0].args[0] is hops[0]  # second consumes the first's token


def test_set_with_storage_is_a_kiln_error_with_location():
    def f(x):
        y = x.clone()
        y.set_(x.untyped_storage())
        return y

    with pytest.raises(exc.FunctionalizationError) as info:
        make_fx(functionalize(f))(torch.randn(3))
    assert "set_" in str(info.value) and "test_functionalize.py" in str(info.value)


def test_mutating_a_captured_tensor_is_a_kiln_error():
    captured = torch.zeros(3)

    def f(x):
        captured.add_(x)
        return x + 1

    with pytest.raises(exc.FunctionalizationError, match="neither an input"):
        make_fx(functionalize(f))(torch.randn(3))


def test_decompositions_apply_above_functionalization():
    from torch._decomp import get_decompositions

    table = get_decompositions([aten.addcmul_])

    def f(x, a, b):
        x.addcmul_(a, b)
        return x

    gm = make_fx(functionalize(f, decompositions=table))(torch.randn(3), torch.randn(3), torch.randn(3))
    targets = {n.target for n in gm.graph.nodes}
    assert aten.addcmul_.default not in targets and aten.addcmul.default not in targets
