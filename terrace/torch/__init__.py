"""The PyTorch backend: terrace modules as ``torch.nn.Module`` subclasses."""

from terrace._backend import require

require("torch", "torch")

from terrace.torch._lazy import (  # noqa: E402
    LazyBatchNorm1d as LazyBatchNorm1d,
    LazyBatchNorm2d as LazyBatchNorm2d,
    LazyBatchNorm3d as LazyBatchNorm3d,
    LazyConv1d as LazyConv1d,
    LazyConv2d as LazyConv2d,
    LazyConv3d as LazyConv3d,
    LazyLayer as LazyLayer,
    LazyLayerNorm as LazyLayerNorm,
    LazyLinear as LazyLinear,
    LazyMultiheadAttention as LazyMultiheadAttention,
)
from terrace.torch._module import Module as Module  # noqa: E402
from terrace.torch._neutral import build as build  # noqa: E402
from terrace.torch import _ops  # noqa: E402,F401  (registers terrace.ops for torch)

__all__ = [
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LazyConv1d",
    "LazyConv2d",
    "LazyConv3d",
    "LazyLayer",
    "LazyLayerNorm",
    "LazyLinear",
    "LazyMultiheadAttention",
    "Module",
    "build",
]
