"""Functions and modules for the differential tests: each case builds (fn, args).

Cases cover input and buffer mutations, returned views, duplicated arguments,
no_grad regions, grad-mode changes, custom autograd Functions, custom ops,
LSTM, conv+bn, out= ops, effects.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CASES: dict = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def leaf(*shape, rg=True):
    return torch.randn(*shape, requires_grad=rg)


def nonleaf(*shape):
    return torch.randn(*shape, requires_grad=True) * 1.0


@case
def pointwise_chain():
    return (lambda x: x.sin().cos().mul(2).exp().tanh()), (leaf(64),)


@case
def mlp():
    def f(x, w, b):
        return torch.relu(x @ w + b).sum(1)
    return f, (leaf(4, 8), leaf(8, 16), leaf(16))


@case
def input_mutation_no_grad():
    def f(x, y):
        x.add_(y)
        return x * 2
    return f, (leaf(5, rg=False), leaf(5))


@case
def input_mutation_nonleaf():
    def f(x):
        x.mul_(3)
        return x.sin()
    return f, (nonleaf(5),)


@case
def slice_assign_into_input():
    def f(x, y):
        x[:, 1:3] = y
        return x.view(-1) * 2
    return f, (leaf(4, 5, rg=False), leaf(4, 2))


@case
def expand_mutation_functionalizes():
    def f(x):
        y = x.expand(3, *x.shape)
        y[0, 0].add_(5)
        return y
    return f, (torch.arange(6),)


@case
def expand_mutation_backwards():
    def f(x, z):
        y = x.expand(3, *x.shape)
        y[1, 1].mul_(5)
        return y * z
    return f, (torch.arange(6, dtype=torch.float), leaf(6))


@case
def views_of_input_returned():
    return (lambda x: (x.view(-1), x.t(), x[1])), (leaf(3, 4),)


@case
def mutated_input_returned():
    def f(x):
        x.add_(1)
        return x
    return f, (leaf(3, rg=False),)


@case
def view_of_intermediate_returned():
    def f(x):
        y = x * 2
        return y.view(-1)[1:]
    return f, (leaf(3, 4),)


@case
def outputs_alias_each_other():
    def f(x):
        y = x.exp()
        return y, y[0], y.t()
    return f, (leaf(3, 3),)


@case
def duplicate_args():
    return (lambda a, b: a * b + a), None  # args built in the test: (t, t)


@case
def duplicate_args_mutated():
    def f(a, b):
        a.trunc_()
        b.trunc_()
        return (a + b,)
    return f, None


@case
def no_grad_region():
    def f(x, w):
        with torch.no_grad():
            s = (x * w).sum()
        return x * w * s
    return f, (leaf(4), leaf(4))


@case
def param_mutated_under_no_grad():
    def f(param, y):
        prev = torch.is_grad_enabled()
        try:
            torch.set_grad_enabled(False)
            param.add_(y)
        finally:
            torch.set_grad_enabled(prev)
        return y * 2
    return f, (torch.nn.Parameter(torch.randn(4)), torch.randn(4))


@case
def grad_mode_changed_inside():
    def f(x):
        y = x * x
        torch.set_grad_enabled(False)
        return y.clone(), y
    return f, (nonleaf(3),)


class _Double(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 + x * 0


@case
def custom_function():
    return (lambda x: _Double.apply(x.sin()).sum(0)), (leaf(3, 4),)


class _PassY(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return x, grad


@case
def custom_function_grad_aliases_input():
    return (lambda x, y: _PassY.apply(x, y)), (leaf(1), leaf(1))


# NOTE: known difference: eager's output requires grad (it depends on the new
# Parameter); kiln's does not, as no input requires grad (PyTorch's AOT autograd
# behaves the same).  Values are compared; requires_grad is not.
REQUIRES_GRAD_DIFFERS = {"parameter_built_inside"}


@case
def parameter_built_inside():
    def f(x):
        z = torch.nn.Parameter(torch.ones(1))
        return x.sin() + z
    return f, (torch.rand(4, 4),)


@case
def lstm():
    torch.manual_seed(0)
    return torch.nn.LSTM(8, 8, num_layers=2, bidirectional=True), (leaf(5, 2, 8),)


class _ConvBN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x)))


@case
def conv_bn_train():
    torch.manual_seed(0)
    return _ConvBN(), (leaf(2, 3, 8, 8),)


@case
def conv_bn_eval():
    torch.manual_seed(0)
    return _ConvBN().eval(), (leaf(2, 3, 8, 8),)


class _Buffered(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.register_buffer("count", torch.zeros(4))

    def forward(self, x):
        self.count.add_(x.detach().sum(0))
        return self.lin(x) + self.count


@case
def module_buffer_mutation():
    torch.manual_seed(0)
    return _Buffered(), (leaf(3, 4),)


@case
def out_variant_into_input():
    def f(a, b, c):
        torch.add(a, b, out=c)
        return c * 2
    return f, (leaf(4, rg=False), leaf(4, rg=False), torch.zeros(4))


@case
def index_put_on_intermediate():
    def f(x, idx):
        y = x.clone()
        y[idx] = 0.0
        y.masked_fill_(y > 1, 1.0)
        return y * x
    return f, (leaf(6), torch.tensor([0, 2]))


@case
def inplace_view_then_mutation():
    def f(x):
        y = x.clone()
        y.transpose_(0, 1)
        y[0].mul_(2)
        return y + 1
    return f, (leaf(3, 4),)


@case
def split_and_mutate_chunk():
    def f(x):
        y = x * 1
        a, b = y.split(2)
        a.add_(1)
        return y, b
    return f, (leaf(4, 3, rg=False),)


@case
def unbind_and_mutate():
    def f(x):
        y = x + 0
        rows = y.unbind(0)
        rows[1].mul_(3)
        return y.sum(0)
    return f, (leaf(3, 2, rg=False),)


@case
def cross_entropy():
    def f(logits, target):
        return F.cross_entropy(logits.log_softmax(-1), target)
    return f, (leaf(5, 7), torch.tensor([1, 0, 3, 6, 2]))


@case
def embedding_bag_like():
    def f(w, idx):
        return F.embedding(idx, w).mean(1)
    return f, (leaf(10, 4), torch.tensor([[1, 2], [3, 9]]))


@case
def sort_and_cumsum():
    def f(x):
        v, i = x.sort(dim=-1)
        return v.cumsum(-1), i
    return f, (leaf(3, 5),)


@case
def scalar_and_list_args():
    def f(x, scale, dims):
        return x.permute(*dims) * scale
    return f, (leaf(2, 3, 4), 3.0, [2, 0, 1])


@case
def pytree_outputs():
    def f(x, y):
        return {"sum": x + y, "parts": [x * 2, (y.exp(),)]}
    return f, (leaf(3), leaf(3))


@case
def effect_print():
    def f(x):
        torch.ops.aten._print("kiln differential")
        return x * 3
    return f, (leaf(2),)


@case
def layer_norm_gelu():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6), torch.nn.GELU()), (leaf(2, 6),)


@case
def resize_intermediate():
    def f(x):
        y = torch.empty(0)
        with torch.no_grad():
            torch.mul(x, 2, out=y)
        return y + x
    return f, (leaf(5),)


@case
def alias_inputs_fresh_tensor():
    def f():
        a = torch.tensor([1])
        a = a[0:1]
        b = a.squeeze()
        a[0] = 0
        a[0] = 2
        return b
    return f, ()


def _scaled_sin_op():
    """A torch.library custom op with a fake kernel and an autograd formula."""
    name = "kiln_cases::scaled_sin"
    try:
        return torch.ops.kiln_cases.scaled_sin.default
    except AttributeError:
        pass

    @torch.library.custom_op(name, mutates_args=())
    def scaled_sin(x: torch.Tensor, scale: float) -> torch.Tensor:
        return x.sin() * scale

    @scaled_sin.register_fake
    def _(x, scale):
        return torch.empty_like(x)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.scale = inputs[1]

    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.cos() * ctx.scale, None

    scaled_sin.register_autograd(backward, setup_context=setup)
    return torch.ops.kiln_cases.scaled_sin.default


@case
def library_custom_op():
    op = _scaled_sin_op()
    return (lambda x: op(x * 2, 3.0).sum(0)), (leaf(3, 4),)


def _bump_op():
    """A custom op that mutates its argument (no functional sibling)."""
    try:
        return torch.ops.kiln_cases.bump.default
    except AttributeError:
        pass

    @torch.library.custom_op("kiln_cases::bump", mutates_args=("out",))
    def bump(x: torch.Tensor, out: torch.Tensor) -> None:
        out.add_(x)

    return torch.ops.kiln_cases.bump.default


@case
def library_custom_op_mutating_input():
    op = _bump_op()

    def f(x, acc):
        op(x, acc)
        return acc * 2
    return f, (leaf(3, rg=False), torch.zeros(3))


@case
def sdpa_attention():
    # NOTE: on CPU this runs _scaled_dot_product_flash_attention_for_cpu, whose
    # table decomposition returns a differently shaped logsumexp: kiln must keep
    # the op (its backward reads that output) rather than decompose it.
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum(1)
    return f, (leaf(2, 4, 5, 8), leaf(2, 4, 5, 8), leaf(2, 4, 5, 8))
