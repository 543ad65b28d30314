"""The benchmark cases: what runs, at which size, in which modes.

In: a case name, a mode (``"infer"`` or ``"train"``) and a size profile (``"quick"``
and ``"cpu"`` for CPU runs, ``"gpu"`` for the GPU run). Out: a :class:`Workload`
(model, example inputs, a one-line description of the sizes). A case that cannot
run here raises :class:`CaseSkipped` with the reason, which the report shows.
Every builder seeds the RNG first, so the main process and the cold/warm compile
subprocesses build bit-identical models and inputs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from bench.models import AddOne, AttentionBlock, MLPStack, PointwiseChain, ResNet, SoftmaxLayerNorm, resnet50


class CaseSkipped(Exception):
    """The case cannot run in this environment (missing package, missing device)."""


@dataclass
class Workload:
    """A model, its inputs and a description; ``grad_inputs`` marks inputs that need grads when training."""

    model: nn.Module
    inputs: tuple[Any, ...]
    config: str
    grad_inputs: bool = False


@dataclass(frozen=True)
class Case:
    """A named workload builder and the modes it runs in."""

    name: str
    about: str
    modes: tuple[str, ...]
    build: Callable[[str, str], Workload] = field(repr=False)  # (profile, device) -> Workload


def _pick(profile: str, table: dict[str, Any]) -> Any:
    return table[profile]


def _tiny(profile: str, device: str) -> Workload:
    x = torch.randn(16, device=device)
    return Workload(AddOne(), (x,), "x: (16,)")


def _pointwise(profile: str, device: str) -> Workload:
    shape = _pick(profile, {"quick": (512, 512), "cpu": (1024, 1024), "gpu": (4096, 4096)})
    return Workload(PointwiseChain(), (torch.randn(*shape, device=device),), f"x: {shape}, ~18 pointwise ops", True)


def _softmax_ln(profile: str, device: str) -> Workload:
    shape = _pick(profile, {"quick": (16, 128, 256), "cpu": (32, 256, 512), "gpu": (64, 512, 1024)})
    model = SoftmaxLayerNorm(shape[-1])
    return Workload(model, (torch.randn(*shape, device=device),), f"x: {shape}", True)


def _mlp(profile: str, device: str) -> Workload:
    batch, dim, depth = _pick(profile, {"quick": (128, 256, 4), "cpu": (512, 512, 6), "gpu": (4096, 2048, 8)})
    model = MLPStack(dim, depth)
    return Workload(model, (torch.randn(batch, dim, device=device),), f"batch {batch}, dim {dim}, {depth} x (Linear+LN+GELU)")


def _train_step(profile: str, device: str) -> Workload:
    # NOTE: the row for compiled autograd: run it with --backends kiln:inductor,kiln+ca:inductor
    # (the second captures the step's whole backward, .grad accumulation included, as one graph).
    batch, dim, depth = _pick(profile, {"quick": (64, 128, 3), "cpu": (256, 256, 4), "gpu": (2048, 1024, 6)})
    model = MLPStack(dim, depth)
    return Workload(model, (torch.randn(batch, dim, device=device),),
                    f"batch {batch}, dim {dim}, {depth} x (Linear+LN+GELU), forward+backward")


def _attention(profile: str, device: str) -> Workload:
    b, t, d, h = _pick(profile, {"quick": (2, 64, 128, 4), "cpu": (4, 128, 256, 8), "gpu": (8, 512, 768, 12)})
    model = AttentionBlock(d, h)
    return Workload(model, (torch.randn(b, t, d, device=device),), f"B{b} T{t} D{d} H{h}")


def _hf(builder_name: str, shapes: dict[str, tuple[int, int]]) -> Callable[[str, str], Workload]:
    def build(profile: str, device: str) -> Workload:
        try:
            from bench.models import hf
            builder = getattr(hf, builder_name)
            model, vocab, desc = builder("real" if profile == "gpu" else "small")
        except ImportError as e:
            raise CaseSkipped(f"transformers not installed ({e})") from None
        b, t = shapes[profile]
        ids = torch.randint(0, vocab, (b, t), device=device)
        return Workload(model, (ids,), f"{desc}, batch {b}x{t}")

    return build


def _resnet(profile: str, device: str) -> Workload:
    if profile == "gpu":
        batch, res = 32, 224
        try:
            import torchvision

            model, desc = torchvision.models.resnet50(weights=None), "torchvision ResNet-50"
        except ImportError:
            model, desc = resnet50(), "bench ResNet-50 (torchvision missing)"
    elif profile == "cpu":
        batch, res = 2, 128
        model, desc = resnet50(), "bench ResNet-50"
    else:
        batch, res = 2, 64
        model, desc = ResNet((1, 1, 1, 1), 16), "bench ResNet (1,1,1,1) width 16"
    x = torch.randn(batch, 3, res, res, device=device)
    return Workload(model, (x,), f"{desc}, batch {batch}x3x{res}x{res}")


def _vit(profile: str, device: str) -> Workload:
    try:
        import timm
    except ImportError as e:
        raise CaseSkipped(f"timm not installed or not importable ({e})") from None
    if profile == "gpu":
        batch = 32
        model = timm.create_model("vit_base_patch16_224", pretrained=False)
        desc, res = "timm ViT-B/16", 224
    else:
        from timm.models.vision_transformer import VisionTransformer

        batch, res = 2, 64
        model = VisionTransformer(img_size=res, patch_size=16, embed_dim=128, depth=2, num_heads=4, num_classes=100)
        desc = "timm ViT patch16 d128 L2"
    x = torch.randn(batch, 3, res, res, device=device)
    return Workload(model, (x,), f"{desc}, batch {batch}x3x{res}x{res}")


_IT = ("infer", "train")
CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case("tiny", "x + 1 on 16 floats: per-call overhead", ("infer",), _tiny),
        Case("pointwise", "chain of elementwise ops", _IT, _pointwise),
        Case("softmax_ln", "softmax then layer norm", _IT, _softmax_ln),
        Case("mlp", "Linear+LayerNorm+GELU stack", _IT, _mlp),
        Case("attention", "hand-written attention block", _IT, _attention),
        Case("train_step", "training step with and without compiled autograd (kiln+ca:<backend>)",
             ("train",), _train_step),
        Case("gpt2", "GPT-2 (transformers config)", _IT,
             _hf("gpt2", {"quick": (2, 64), "cpu": (2, 128), "gpu": (8, 512)})),
        Case("bert", "BERT (transformers config)", _IT,
             _hf("bert", {"quick": (2, 64), "cpu": (2, 128), "gpu": (16, 256)})),
        Case("llama", "LLaMA-style (transformers config)", _IT,
             _hf("llama", {"quick": (2, 64), "cpu": (2, 128), "gpu": (4, 512)})),
        Case("resnet50", "ResNet-50 (torchvision on GPU, bench/models on CPU)", _IT, _resnet),
        Case("vit_b16", "ViT-B/16 (timm)", ("infer",), _vit),
    ]
}


def build(case: str, mode: str, profile: str, device: str, seed: int = 0) -> Workload:
    """Build the workload for one case and mode, seeded; puts the model on ``device`` in eval/train mode."""
    torch.manual_seed(seed)
    # NOTE: parameters are created (and randomly initialised) on the device itself: initialising
    # GPT-2's 124M parameters on the CPU takes ~10 s, and every compile subprocess pays it again.
    with torch.device(device):
        wl = CASES[case].build(profile, device)
    wl.model = wl.model.to(device)
    wl.model.train(mode == "train")
    if mode == "train" and wl.grad_inputs:
        wl.inputs = tuple(x.detach().requires_grad_(True) if _is_float_tensor(x) else x for x in wl.inputs)
    return wl


def _is_float_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()
