"""Every model of tests/models/zoo.py exports; ``module()`` equals eager (the models run
with their default configs, in eval mode unless the name says train)."""
from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.utils._pytree as pytree

from kiln.export import export

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models"))
import zoo  # noqa: E402

NON_STRICT = ["gpt2", "bert", "llama", "mistral", "vit", "whisper_encoder", "resnet_eval", "resnet_train",
              "lstm_lm", "nanogpt", "nanogpt_generate_step"]
# NOTE: strict export captures the forward with kiln's capture first; the transformers
# models do not yet come through that path whole (see the export issue's note)
STRICT = ["resnet_eval", "resnet_train", "lstm_lm", "nanogpt", "nanogpt_generate_step"]


def _check(name: str, strict: bool):
    model, args, _ = zoo.build(name)
    ep = export(model, tuple(args), strict=strict)
    ref_model, ref_args, _ = zoo.build(name)
    out, ref = ep.module()(*args), ref_model(*ref_args)
    lo, lr = pytree.tree_leaves(out), pytree.tree_leaves(ref)
    assert len(lo) == len(lr)
    for a, b in zip(lo, lr):
        if isinstance(b, torch.Tensor):
            torch.testing.assert_close(a, b)
        else:
            assert a == b
    # module state after the call (BatchNorm's running statistics in train mode)
    ref_state = ref_model.state_dict()
    for k, a in ep.module().state_dict().items():
        torch.testing.assert_close(a, ref_state[k], msg=k)
    return ep


@pytest.mark.parametrize("name", NON_STRICT)
def test_zoo_model_exports_non_strict(name):
    _check(name, strict=False)


@pytest.mark.parametrize("name", STRICT)
def test_zoo_model_exports_strict(name):
    _check(name, strict=True)
