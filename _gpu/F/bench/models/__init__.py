"""Models used by the benchmark cases.

In: sizes (plain ints). Out: ``nn.Module`` instances with random weights.
Everything here is built in code: no downloads, no pretrained weights.
``resnet`` is a hand-written torchvision-style ResNet (used on CPU, and on GPU
when torchvision is missing); ``blocks`` holds the small synthetic workloads.
"""
from bench.models.blocks import AttentionBlock, MLPStack, PointwiseChain, SoftmaxLayerNorm, AddOne
from bench.models.resnet import ResNet, resnet50

__all__ = ["AddOne", "AttentionBlock", "MLPStack", "PointwiseChain", "SoftmaxLayerNorm", "ResNet", "resnet50"]
