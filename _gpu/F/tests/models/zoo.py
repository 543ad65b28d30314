"""The model zoo: small real-world models with random weights, for capture tests.

In: a model name (see ``BUILDERS``) and a size (``"tiny"`` for the default suite,
``"small"`` for the slow suite) and a device (``"cpu"``, or ``"cuda"`` on the GPU machine). Out: ``(model, example_inputs, kind)``, where
``example_inputs`` is a tuple of positional arguments and ``kind`` says where the
model's code comes from: ``"transformers"`` (the ``transformers`` package),
``"nn"`` (plain ``torch.nn`` code written here) or ``"train"`` (a whole training
step: ``example_inputs`` is ``(model, opt, batch)`` for :func:`train_step`).

Every builder seeds the RNG first, so two calls build bit-identical models and
inputs (the compiled and the eager copy of a model are built separately). Nothing
is downloaded: transformers models come from configs with random weights.
Models are in eval mode unless the name says ``train``; dropout is 0 everywhere,
so train mode is deterministic too.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

SEED = 0
Built = tuple[nn.Module, tuple[Any, ...], str]


def _ids(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq))


def _dims(size: str, tiny: dict[str, Any], small: dict[str, Any]) -> dict[str, Any]:
    if size not in ("tiny", "small"):
        raise ValueError(f"unknown size {size!r}; use 'tiny' or 'small'")
    return dict(tiny if size == "tiny" else small)


# NOTE: "sdpa" is what transformers picks by default; dynamo captures every model here in
# one graph with either "sdpa" or "eager" attention (KILN_MODELS_ATTN=eager picks the latter).
ATTN = os.environ.get("KILN_MODELS_ATTN", "sdpa")


def _hf(model: nn.Module) -> nn.Module:
    return model.eval()


# --------------------------------------------------------------------------- transformers


def gpt2(size: str = "tiny") -> Built:
    """GPT-2 LM head model (Conv1D, learned positions, causal mask, tied lm_head)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    d = _dims(size, dict(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64),
              dict(n_layer=4, n_embd=128, n_head=4, vocab_size=1024, n_positions=256))
    cfg = GPT2Config(**d, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False,
                     bos_token_id=0, eos_token_id=0, attn_implementation=ATTN)
    return _hf(GPT2LMHeadModel(cfg)), (_ids(d["vocab_size"], 2, 16),), "transformers"


def bert(size: str = "tiny") -> Built:
    """BERT masked-LM (token types, padding mask, GELU, tied decoder)."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(SEED)
    d = _dims(size, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         vocab_size=128),
              dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                   vocab_size=1024))
    cfg = BertConfig(**d, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     max_position_embeddings=64, attn_implementation=ATTN)
    ids = _ids(d["vocab_size"], 2, 16)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # one padded row: exercises the extended attention mask
    return _hf(BertForMaskedLM(cfg)), (ids, mask), "transformers"


def _llama_like_dims(size: str) -> dict[str, Any]:
    """Sizes shared by the LLaMA-family configs (grouped KV heads)."""
    return _dims(size, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, vocab_size=128),
                 dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=352, vocab_size=1024))


def llama(size: str = "tiny") -> Built:
    """LLaMA causal LM (RMSNorm, rotary embeddings, SwiGLU, grouped KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    d = _llama_like_dims(size)
    cfg = LlamaConfig(**d, max_position_embeddings=64, use_cache=False, bos_token_id=0, eos_token_id=0,
                      pad_token_id=0, attn_implementation=ATTN)
    return _hf(LlamaForCausalLM(cfg)), (_ids(d["vocab_size"], 2, 16),), "transformers"


def mistral(size: str = "tiny") -> Built:
    """Mistral causal LM (LLaMA-like with sliding-window attention config)."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(SEED)
    d = _llama_like_dims(size)
    cfg = MistralConfig(**d, max_position_embeddings=64, sliding_window=8, use_cache=False, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0, attn_implementation=ATTN)
    return _hf(MistralForCausalLM(cfg)), (_ids(d["vocab_size"], 2, 16),), "transformers"


def t5(size: str = "tiny") -> Built:
    """T5 encoder-decoder (relative position buckets, T5LayerNorm, cross attention)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(SEED)
    d = _dims(size, dict(num_layers=2, num_decoder_layers=2, d_model=32, d_kv=8, num_heads=4, d_ff=64,
                         vocab_size=128),
              dict(num_layers=4, num_decoder_layers=4, d_model=128, d_kv=32, num_heads=4, d_ff=512,
                   vocab_size=1024))
    cfg = T5Config(**d, dropout_rate=0.0, use_cache=False, decoder_start_token_id=0, pad_token_id=0,
                   eos_token_id=1, attn_implementation=ATTN)
    ids = _ids(d["vocab_size"], 2, 12)
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    dec = _ids(d["vocab_size"], 2, 8)
    return _hf(T5ForConditionalGeneration(cfg)), (ids, mask, dec), "transformers"


def vit(size: str = "tiny") -> Built:
    """ViT image classifier (conv patch embedding, CLS token, position embeddings)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(SEED)
    d = _dims(size, dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                         image_size=16, patch_size=8),
              dict(num_hidden_layers=4, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                   image_size=32, patch_size=4))
    cfg = ViTConfig(**d, num_channels=3, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, attn_implementation=ATTN)
    pixels = torch.randn(2, 3, d["image_size"], d["image_size"])
    return _hf(ViTForImageClassification(cfg)), (pixels,), "transformers"


def whisper_encoder(size: str = "tiny") -> Built:
    """Whisper audio encoder (two Conv1d + GELU stem, sinusoidal positions, pre-LN blocks)."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(SEED)
    d = _dims(size, dict(encoder_layers=2, d_model=32, encoder_attention_heads=2, encoder_ffn_dim=64,
                         num_mel_bins=8, max_source_positions=16),
              dict(encoder_layers=4, d_model=128, encoder_attention_heads=4, encoder_ffn_dim=512,
                   num_mel_bins=80, max_source_positions=64))
    cfg = WhisperConfig(**d, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=128,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
                        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, encoder_layerdrop=0.0,
                        attn_implementation=ATTN)
    # NOTE: the encoder insists on exactly 2 * max_source_positions input frames.
    feats = torch.randn(2, d["num_mel_bins"], 2 * d["max_source_positions"])
    return _hf(WhisperEncoder(cfg)), (feats,), "transformers"


# --------------------------------------------------------------------------- plain torch.nn


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv+BN, identity or 1x1-conv shortcut."""

    expansion = 1

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: stem, stages of BasicBlocks, global pool, linear head."""

    def __init__(self, blocks: list[int], width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            stages.append(nn.Sequential(*[BasicBlock(cin if j == 0 else cout, cout, s) for j, s in enumerate(strides)]))
            cin = cout
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _resnet(size: str, train: bool) -> Built:
    torch.manual_seed(SEED)
    d = _dims(size, dict(blocks=[1, 1], width=8, hw=16), dict(blocks=[2, 2, 2], width=16, hw=32))
    model = ResNet(d["blocks"], d["width"]).train(train)
    return model, (torch.randn(2, 3, d["hw"], d["hw"]),), "nn"


def resnet_eval(size: str = "tiny") -> Built:
    """ResNet in eval mode (BatchNorm uses running stats)."""
    return _resnet(size, train=False)


def resnet_train(size: str = "tiny") -> Built:
    """ResNet in train mode (BatchNorm uses batch stats and updates its running-stat buffers)."""
    return _resnet(size, train=True)


class LSTMLanguageModel(nn.Module):
    """Embedding -> multi-layer nn.LSTM -> linear decoder (tied to the embedding)."""

    def __init__(self, vocab: int, dim: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, batch_first=True)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.decoder(out)


def lstm_lm(size: str = "tiny") -> Built:
    """An LSTM language model (nn.LSTM, tied weights), train mode."""
    torch.manual_seed(SEED)
    d = _dims(size, dict(vocab=64, dim=16, layers=2, seq=8), dict(vocab=512, dim=128, layers=2, seq=32))
    # NOTE: train mode (dropout is 0): cuDNN's LSTM backward refuses eval mode on CUDA.
    model = LSTMLanguageModel(d["vocab"], d["dim"], d["layers"]).train()
    return model, (_ids(d["vocab"], 2, d["seq"]),), "nn"


# nanoGPT (Karpathy's model.py, trimmed): config dataclass, CausalSelfAttention on
# F.scaled_dot_product_attention, GELU MLP, pre-LN blocks, weight tying, scaled init.

@dataclass
class GPTConfig:
    block_size: int = 32
    vocab_size: int = 128
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None,
                                           dropout_p=self.dropout if self.training else 0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])  # inference: only the last position
            loss = None
        return logits, loss


def _nanogpt_config(size: str) -> GPTConfig:
    d = _dims(size, dict(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32),
              dict(block_size=128, vocab_size=1024, n_layer=4, n_head=4, n_embd=128))
    return GPTConfig(**d)


def nanogpt(size: str = "tiny") -> Built:
    """nanoGPT forward with targets: (logits, loss)."""
    torch.manual_seed(SEED)
    cfg = _nanogpt_config(size)
    model = GPT(cfg).eval()
    seq = 16 if size == "tiny" else 64
    ids = _ids(cfg.vocab_size, 2, seq + 1)
    return model, (ids[:, :-1].contiguous(), ids[:, 1:].contiguous()), "nn"


def nanogpt_generate_step(size: str = "tiny") -> Built:
    """nanoGPT forward without targets (the inference branch: last position only)."""
    model, (idx, _), kind = nanogpt(size)
    return model, (idx,), kind


# --------------------------------------------------------------------------- training step


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One training step: forward with targets, backward, optimizer step, zero grads."""
    idx, targets = batch
    _, loss = model(idx, targets)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def nanogpt_train_step(size: str = "tiny") -> Built:
    """``train_step`` on nanoGPT (train mode) with AdamW: ``example_inputs`` is ``(model, opt, batch)``."""
    model, (idx, targets), _ = nanogpt(size)
    model.train()
    # NOTE: foreach=False keeps the step a plain per-parameter loop (what most user code
    # reads like). Adam normalises each update to about lr, so rounding differences in
    # near-zero gradients move parameters by a fraction of lr: lr=1e-3 keeps that inside
    # the 1e-4 tolerance while two steps still visibly move every parameter.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    return model, (model, opt, (idx, targets)), "train"


BUILDERS: dict[str, Callable[..., Built]] = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "mistral": mistral,
    "t5": t5,
    "vit": vit,
    "whisper_encoder": whisper_encoder,
    "resnet_eval": resnet_eval,
    "resnet_train": resnet_train,
    "lstm_lm": lstm_lm,
    "nanogpt": nanogpt,
    "nanogpt_generate_step": nanogpt_generate_step,
    "nanogpt_train_step": nanogpt_train_step,
}


def _to(value: Any, device: str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value  # modules are moved in place, optimizers keep the same Parameter objects


def build(name: str, size: str = "tiny", device: str = "cpu") -> Built:
    """Build model ``name`` at ``size`` on ``device``; see the module docstring for what comes back.

    The model is built and seeded on the CPU, then moved, so every device starts from
    the same weights and inputs.
    """
    model, inputs, kind = BUILDERS[name](size)
    if device != "cpu":
        model.to(device)
        inputs = _to(inputs, device)
    return model, inputs, kind
