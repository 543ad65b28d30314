"""transformers models with their default configs (``use_cache`` left at True), and ``generate()``.

With the KV cache on, a model's forward builds a ``DynamicCache`` (``EncoderDecoderCache``
for T5) inside the compiled region, fills it layer by layer and returns it in its output.
kiln must capture that in as many graphs as PyTorch's capture does (one), give eager's
logits, and hand back a cache equal to eager's (same classes, same attributes, same
tensors). ``generate()`` with a compiled ``forward`` must produce eager's tokens with no
more compiles than PyTorch's capture needs for the same run (measured here, with
``torch._dynamo.testing.CompileCounter``).

Configs are small and random (no downloads), built with the library's defaults otherwise.
"""
from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import kiln
from kiln.testing import CompileCounter

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ATOL = 1e-5


def gpt2() -> tuple[torch.nn.Module, tuple]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval(), (torch.randint(1, 128, (2, 7)),)


def llama() -> tuple[torch.nn.Module, tuple]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=128, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval(), (torch.randint(1, 128, (2, 7)),)


def t5() -> tuple[torch.nn.Module, tuple]:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64, vocab_size=128,
                   decoder_start_token_id=0)
    ids = torch.randint(1, 128, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return T5ForConditionalGeneration(cfg).eval(), (ids, mask, torch.randint(1, 128, (2, 5)))


def gemma2() -> tuple[torch.nn.Module, tuple]:
    """Gemma-2 picks its attention function through transformers' registry: ``Mapping.get``
    catches the KeyError its ``__getitem__`` raises for "eager" (an exception inside the region)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, intermediate_size=64, vocab_size=128, max_position_embeddings=64,
                       bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return Gemma2ForCausalLM(cfg).eval(), (torch.randint(1, 128, (2, 7)),)


def assert_same_state(ref: Any, out: Any, path: str = "out") -> None:
    """Same classes all the way down, equal tensors, equal instance attributes."""
    assert type(ref) is type(out), path
    if isinstance(ref, torch.Tensor):
        assert ref.shape == out.shape and torch.allclose(ref, out, atol=ATOL), path
    elif isinstance(ref, (list, tuple)):
        assert len(ref) == len(out), path
        for i, (a, b) in enumerate(zip(ref, out)):
            assert_same_state(a, b, f"{path}[{i}]")
    elif isinstance(ref, dict):
        assert list(ref) == list(out), path
        for k in ref:
            assert_same_state(ref[k], out[k], f"{path}[{k!r}]")
    elif hasattr(ref, "__dict__") and not isinstance(ref, (type, torch.nn.Module)):
        assert list(vars(ref)) == list(vars(out)), (path, list(vars(ref)), list(vars(out)))
        for k in vars(ref):
            assert_same_state(vars(ref)[k], vars(out)[k], f"{path}.{k}")
    else:
        assert ref == out, (path, ref, out)


def dynamo_frames(run: Callable[[Callable], Any], fn: Callable) -> int:
    """How many graphs PyTorch's capture compiles for ``run(torch.compile(fn))``."""
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter as DynamoCounter

    torch._dynamo.reset()
    cnt = DynamoCounter()
    try:
        run(torch.compile(fn, backend=cnt))
    finally:
        torch._dynamo.reset()
    return cnt.frame_count


def _forward_and_decode(model: torch.nn.Module, args: tuple, compiled: Callable, decode: bool = True) -> None:
    ref, out = model(*args), compiled(*args)
    assert type(out) is type(ref)
    assert torch.allclose(ref.logits, out.logits, atol=ATOL)
    assert_same_state(ref.past_key_values, out.past_key_values, "past_key_values")
    if decode and len(args) == 1:  # decoder-only: a decode step that reads and grows the returned cache
        nxt = ref.logits[:, -1:].argmax(-1)
        ref2 = model(nxt, cache=ref.past_key_values)
        out2 = compiled(nxt, cache=out.past_key_values)
        assert torch.allclose(ref2.logits, out2.logits, atol=ATOL)
        assert_same_state(ref2.past_key_values, out2.past_key_values, "past_key_values (decode)")


def _check_default_config(build: Callable, decode: bool = True) -> None:
    model, args = build()
    assert model.config.use_cache  # the library default, not set by the test
    kiln.reset()
    explained = kiln.explain(model)(*args)
    want = dynamo_frames(lambda c: c(*args), model)
    assert explained.graph_count == want == 1, explained.break_reasons
    assert explained.graph_break_count == 0, explained.break_reasons

    kiln.reset()
    cc = CompileCounter()
    compiled = kiln.compile(model, backend=cc)
    _forward_and_decode(model, args, compiled, decode)
    if decode:
        want = dynamo_frames(lambda c: _forward_and_decode(model, args, c), model)
    assert cc.frame_count == want


def test_gpt2_default_config_one_graph_and_cache():
    _check_default_config(gpt2, decode=False)


@pytest.mark.slow
def test_gpt2_default_config_decode_step():
    _check_default_config(gpt2)


@pytest.mark.slow
def test_llama_default_config_one_graph_and_cache():
    _check_default_config(llama)


@pytest.mark.slow
def test_t5_default_config_one_graph_and_cache():
    _check_default_config(t5)


def test_gemma2_default_config_one_graph_and_cache():
    _check_default_config(gemma2, decode=False)


def test_mamba_default_config_one_graph():
    """Mamba under a compiler scans with torch's generic associative scan (vmapped combine,
    batches of size 0, recursion ~30 calls deep) and probes torch's version through functions
    transformers marks as constant: one graph, as PyTorch's capture."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(num_hidden_layers=2, hidden_size=32, state_size=4, vocab_size=128)).eval()
    ids = torch.randint(1, 128, (2, 8))
    kiln.reset()
    explained = kiln.explain(model)(ids)
    assert explained.graph_count == dynamo_frames(lambda c: c(ids), model) == 1, explained.break_reasons
    kiln.reset()
    torch.testing.assert_close(kiln.compile(model, backend="aot_eager")(ids).logits, model(ids).logits,
                               atol=ATOL, rtol=ATOL)


def _generate(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=8, do_sample=False)


@pytest.mark.slow
@pytest.mark.parametrize("build", [gpt2, llama], ids=["gpt2", "llama"])
def test_generate_with_compiled_forward(build):
    model, (ids,) = build()
    want = _generate(model, ids)
    eager_forward = model.forward

    def run_generate(compiled_forward: Callable) -> torch.Tensor:
        model.forward = compiled_forward
        try:
            return _generate(model, ids)
        finally:
            model.forward = eager_forward

    dynamo_count = dynamo_frames(run_generate, eager_forward)
    kiln.reset()
    cc = CompileCounter()
    got = run_generate(kiln.compile(eager_forward, backend=cc))
    assert torch.equal(got, want)
    assert 0 < cc.frame_count <= dynamo_count, (cc.frame_count, dynamo_count)


def test_dynamic_cache_built_and_filled_in_the_region():
    from transformers import DynamicCache, GPT2Config
    from transformers.cache_utils import Cache, DynamicLayer

    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32)

    def f(k, v, config):
        lazy = DynamicCache()
        keys, values = lazy.update(k, v, 0)
        lazy.update(k * 2, v * 2, 1)
        lazy.update(k + 1, v + 1, 0)
        sized = DynamicCache(config=config)
        sized.update(k, v, 1)
        return (lazy, sized, keys + values, lazy.get_seq_length(), len(lazy), isinstance(lazy, Cache),
                isinstance(sized.layers[0], DynamicLayer), sized.layers[0].is_initialized)

    k, v = torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    cc = CompileCounter()
    opt = kiln.compile(f, backend=cc)
    ref, out = f(k, v, cfg), opt(k, v, cfg)
    assert_same_state(ref, out)
    assert cc.frame_count == 1
    out2 = opt(k, v, cfg)
    assert out2[0] is not out[0] and out2[0].layers[0] is not out[0].layers[0]  # new objects on every call
    assert cc.frame_count == 1
