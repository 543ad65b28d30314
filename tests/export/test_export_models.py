"""Every model of tests/models/zoo.py exports; ``module()`` equals eager (the models run
with their default configs, in eval mode unless the name says train)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.utils._pytree as pytree

import kiln
from kiln.export import export, load, save

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
import zoo  # noqa: E402

MODELS = ["gpt2", "bert", "llama", "mistral", "t5", "vit", "whisper_encoder", "resnet_eval", "resnet_train",
          "lstm_lm", "nanogpt", "nanogpt_generate_step"]


# NOTE: the loaded program compiled by kiln's code generator, for these in the default
# suite (a C++ build each); every model under -m slow
COMPILED = ["nanogpt", "resnet_train", "vit"]


def _same(out, ref, exact: bool = False) -> None:
    lo, lr = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    assert len(lo) == len(lr)
    for a, b in zip(lo, lr):
        if isinstance(b, torch.Tensor):
            assert torch.equal(a, b) if exact else torch.testing.assert_close(a, b) is None
        else:
            assert a == b


def _check(name: str, strict: bool):
    model, args, _ = zoo.build(name)
    ep = export(model, tuple(args), strict=strict)
    ref_model, ref_args, _ = zoo.build(name)
    out, ref = ep.module()(*args), ref_model(*ref_args)
    _same(out, ref)
    # module state after the call (BatchNorm's running statistics in train mode)
    ref_state = ref_model.state_dict()
    for k, a in ep.module().state_dict().items():
        torch.testing.assert_close(a, ref_state[k], msg=k)
    return ep


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_exports(name, strict):
    _check(name, strict)


def _fresh(name: str):
    model, args, _ = zoo.build(name)
    return model, tuple(args)


def _round_trip_and_compile(name: str, tmp_path, compiled: bool) -> None:
    model, args = _fresh(name)
    ep = export(model, args, strict=False)
    path = tmp_path / f"{name}.kiln"
    save(ep, path)
    loaded = load(path)
    _, args_a = _fresh(name)
    _, args_b = _fresh(name)
    _same(loaded.module()(*args_a), export(_fresh(name)[0], args, strict=False).module()(*args_b), exact=True)
    if compiled:
        ref_model, ref_args = _fresh(name)
        fast = kiln.export.compile(load(path))
        _, c_args = _fresh(name)
        _same(fast(*c_args), ref_model(*ref_args))


@pytest.mark.parametrize("name", MODELS)
def test_zoo_model_round_trips_through_a_file(name, tmp_path):
    """save/load gives bit-identical outputs; the loaded program compiled equals eager."""
    _round_trip_and_compile(name, tmp_path, compiled=name in COMPILED)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in MODELS if n not in COMPILED])
def test_zoo_model_loaded_and_compiled_equals_eager(name, tmp_path):
    _round_trip_and_compile(name, tmp_path, compiled=True)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non_strict"])
def test_transformers_model_exports_with_keyword_inputs(strict):
    """GPT-2 called as users call it: input ids and an attention mask by keyword (the
    forward takes ``*args, **kwargs`` through transformers' decorators)."""
    model, (ids,), _ = zoo.build("gpt2")
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    ep = export(model, (ids,), {"attention_mask": mask}, strict=strict)
    ref_model, (ref_ids,), _ = zoo.build("gpt2")
    _same(ep.module()(ids, attention_mask=mask), ref_model(ref_ids, attention_mask=mask))
