"""GPT-2, BERT and LLaMA from transformers configs, with random weights (no downloads).

In: a size name (``"small"`` for CPU runs, ``"real"`` for the GPU run). Out: an
``nn.Module`` wrapping the transformers model so ``forward(input_ids)`` returns one
tensor (logits or the last hidden state): every compiler sees the same plain
signature. Raises ``ImportError`` when transformers is missing.
"""
from __future__ import annotations

import torch
from torch import nn

_NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
_NO_DROPOUT_BERT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


class TensorOut(nn.Module):
    """``forward(ids) -> model(input_ids=ids).<field>``: one tensor out, no ModelOutput."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model = model
        self.field = field

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids), self.field)


def gpt2(size: str) -> tuple[nn.Module, int, str]:
    """GPT-2 LM head model; real = GPT-2 small (124M). Returns (module, vocab, description)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if size == "real":
        dims = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    else:
        dims = dict(n_layer=2, n_embd=128, n_head=4, vocab_size=1024, n_positions=256)
    cfg = GPT2Config(**dims, **_NO_DROPOUT, use_cache=False, bos_token_id=0, eos_token_id=0)
    desc = f"GPT-2 L{dims['n_layer']} d{dims['n_embd']} h{dims['n_head']} V{dims['vocab_size']}"
    return TensorOut(GPT2LMHeadModel(cfg), "logits"), dims["vocab_size"], desc


def bert(size: str) -> tuple[nn.Module, int, str]:
    """BERT encoder (no pooler); real = BERT-base (110M). Returns (module, vocab, description)."""
    from transformers import BertConfig, BertModel

    if size == "real":
        dims = dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072, vocab_size=30522)
    else:
        dims = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, intermediate_size=512, vocab_size=1024)
    cfg = BertConfig(**dims, **_NO_DROPOUT_BERT, max_position_embeddings=512)
    desc = f"BERT L{dims['num_hidden_layers']} d{dims['hidden_size']} h{dims['num_attention_heads']} V{dims['vocab_size']}"
    return TensorOut(BertModel(cfg, add_pooling_layer=False), "last_hidden_state"), dims["vocab_size"], desc


def llama(size: str) -> tuple[nn.Module, int, str]:
    """LLaMA-style causal LM (RMSNorm, RoPE, SwiGLU, grouped KV heads). Returns (module, vocab, description)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if size == "real":
        dims = dict(num_hidden_layers=8, hidden_size=1024, num_attention_heads=16, num_key_value_heads=4,
                    intermediate_size=2816, vocab_size=32000)
    else:
        dims = dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=352, vocab_size=1024)
    cfg = LlamaConfig(**dims, max_position_embeddings=1024, use_cache=False, bos_token_id=0, eos_token_id=0)
    desc = (f"LLaMA L{dims['num_hidden_layers']} d{dims['hidden_size']} h{dims['num_attention_heads']}"
            f"/kv{dims['num_key_value_heads']} V{dims['vocab_size']}")
    return TensorOut(LlamaForCausalLM(cfg), "logits"), dims["vocab_size"], desc
