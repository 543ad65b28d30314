"""kiln.codegen.causal_mask: a constant attention mask that is the causal pattern becomes
``is_causal=True`` before AOT (transformers builds such a mask whenever it sees a
compiler); any other mask is left alone.  Values equal eager's either way."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kiln
from kiln.codegen import causal_mask as cm


def _qkv(L=8, S=None):
    g = torch.Generator().manual_seed(0)
    S = S or L
    return (torch.randn(2, 3, L, 16, generator=g), torch.randn(2, 3, S, 16, generator=g),
            torch.randn(2, 3, S, 16, generator=g))


def _passed(fn, *args, dynamic=False):
    """Run ``fn`` captured, with the pass applied to its graph; (output, sdpa calls' kwargs)."""
    calls = []

    def backend(gm, example_inputs):
        gm = cm.causal_masks_to_is_causal(gm)
        calls.extend(dict(n.kwargs) for n in gm.graph.nodes if n.target in cm._SDPA)
        return gm.forward

    out = kiln.compile(fn, backend=backend, dynamic=dynamic)(*args)
    return out, calls


def _bool_causal(q, k, v):
    L = q.shape[-2]
    pos = torch.arange(L)
    mask = pos[None, :] <= pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(2, 1, L, L))


def _float_causal(q, k, v):
    L = q.shape[-2]
    mask = torch.full((L, L), float("-inf")).triu(1)
    return F.scaled_dot_product_attention(q, k, v, mask)


def _finfo_causal(q, k, v):
    L = q.shape[-2]
    keep = torch.ones(L, L, dtype=torch.bool).tril()
    mask = torch.zeros(L, L).masked_fill(~keep, torch.finfo(torch.float32).min)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fn", [_bool_causal, _float_causal, _finfo_causal])
def test_constant_causal_masks_become_is_causal(fn):
    q, k, v = _qkv()
    before = cm.rewritten
    out, calls = _passed(fn, q, k, v)
    assert cm.rewritten == before + 1
    assert calls and calls[0].get("is_causal") is True and calls[0].get("attn_mask") is None
    torch.testing.assert_close(out, fn(q, k, v))


def _bool_everything(q, k, v):
    """As transformers 5.x builds a padding mask with no padding when it sees a compiler: an
    all-True bool expanded over batch and query positions (last-dim stride 0)."""
    L = q.shape[-2]
    pos = torch.arange(L)
    keep = (pos[None, None, :, None] >= 0).expand(2, -1, L, L)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def _float_zeros(q, k, v):
    L = q.shape[-2]
    return F.scaled_dot_product_attention(q, k, v, torch.zeros(1, 1, L, L), 0.0, False)


@pytest.mark.parametrize("fn", [_bool_everything, _float_zeros])
def test_constant_masks_that_hide_nothing_are_dropped(fn):
    q, k, v = _qkv()
    before = cm.rewritten
    nodes = []

    def backend(gm, example_inputs):
        gm = cm.causal_masks_to_is_causal(gm)
        nodes.extend(n for n in gm.graph.nodes if n.target in cm._SDPA)
        return gm.forward

    out = kiln.compile(fn, backend=backend)(q, k, v)
    assert cm.rewritten == before + 1 and len(nodes) == 1
    mask, causal = cm._mask_arg(nodes[0])
    assert mask is None and not causal
    assert "arange" not in nodes[0].graph.python_code("self").src  # the mask's nodes are gone
    torch.testing.assert_close(out, fn(q, k, v))


def test_hides_nothing_tells_masks_apart():
    assert cm.hides_nothing(torch.ones(3, 3, dtype=torch.bool).expand(2, 3, 3))
    assert cm.hides_nothing(torch.zeros(4, 4))
    assert not cm.hides_nothing(torch.ones(3, 3, dtype=torch.bool).tril())
    assert not cm.hides_nothing(torch.full((2, 2), -1e-30))
    assert not cm.hides_nothing(torch.zeros(2, 2, dtype=torch.int64))


def _window(q, k, v):
    L = q.shape[-2]
    pos = torch.arange(L)
    mask = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 3)   # sliding window
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _strict_lower(q, k, v):
    L = q.shape[-2]
    mask = torch.ones(L, L, dtype=torch.bool).tril(-1)
    mask[0, 0] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _from_input(q, k, v, pad):
    L = q.shape[-2]
    mask = torch.ones(L, L, dtype=torch.bool).tril() & pad[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _random(q, k, v):
    L = q.shape[-2]
    mask = torch.rand(L, L) < 2.0      # always True, but a random draw is not a constant
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("fn", [_window, _strict_lower, _random])
def test_other_masks_are_left_alone(fn):
    q, k, v = _qkv()
    before = cm.rewritten
    out, calls = _passed(fn, q, k, v)
    assert cm.rewritten == before
    assert calls and calls[0].get("is_causal", False) is False and calls[0].get("attn_mask") is not None
    torch.manual_seed(0)
    ref = fn(q, k, v)
    if fn is not _random:
        torch.testing.assert_close(out, ref)


def test_mask_that_depends_on_an_input_is_left_alone():
    q, k, v = _qkv()
    pad = torch.ones(2, 8, dtype=torch.bool)      # all-True padding: causal in value, not a constant
    before = cm.rewritten
    out, calls = _passed(_from_input, q, k, v, pad)
    assert cm.rewritten == before
    torch.testing.assert_close(out, _from_input(q, k, v, pad))


def test_non_square_and_symbolic_sizes_are_left_alone():
    q, k, v = _qkv(L=4, S=8)

    def rect(q, k, v):
        mask = torch.ones(4, 8, dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    before = cm.rewritten
    out, _ = _passed(rect, q, k, v)
    torch.testing.assert_close(out, rect(q, k, v))
    q, k, v = _qkv(L=8)
    out, _ = _passed(_bool_causal, q, k, v, dynamic=True)
    torch.testing.assert_close(out, _bool_causal(q, k, v))
    assert cm.rewritten == before


def test_mask_nodes_are_removed_and_shared_ones_kept():
    q, k, v = _qkv()

    def fn(q, k, v):
        L = q.shape[-2]
        pos = torch.arange(L)
        mask = pos[None, :] <= pos[:, None]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        b = F.scaled_dot_product_attention(a, k, v, attn_mask=mask)
        return b + pos.float()[:, None]       # the arange is used outside the mask as well

    graphs = []

    def backend(gm, example_inputs):
        gm = cm.causal_masks_to_is_causal(gm)
        graphs.append(gm)
        return gm.forward

    out = kiln.compile(fn, backend=backend)(q, k, v)
    torch.testing.assert_close(out, fn(q, k, v))
    code = graphs[0].code
    assert "le" not in [n.name for n in graphs[0].graph.nodes] and "arange" in code
    assert code.count("is_causal = True") == 2


@pytest.mark.parametrize("use_cache", [None, False])
def test_gpt2_under_inductor(use_cache):
    """GPT-2 as transformers builds it (default config) and as it is trained
    (``use_cache=False``, where transformers materializes the causal mask)."""
    transformers = pytest.importorskip("transformers")
    extra = {} if use_cache is None else {"use_cache": use_cache}
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64,
                                  bos_token_id=0, eos_token_id=0, **extra)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 256, (2, 16))
    before = cm.rewritten
    with torch.no_grad():
        ref = model(ids).logits
        out = kiln.compile(model)(ids).logits
    if use_cache is False:
        assert cm.rewritten == before + cfg.n_layer
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
