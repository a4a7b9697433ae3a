"""The Flax backend: terrace modules as ``flax.linen.Module`` subclasses."""

from terrace._backend import require

require("flax", "flax")

from terrace.flax._attention import LazyMultiheadAttention as LazyMultiheadAttention  # noqa: E402
from terrace.flax._batchnorm import (  # noqa: E402
    LazyBatchNorm1d as LazyBatchNorm1d,
    LazyBatchNorm2d as LazyBatchNorm2d,
    LazyBatchNorm3d as LazyBatchNorm3d,
)
from terrace.flax._conv import (  # noqa: E402
    LazyConv1d as LazyConv1d,
    LazyConv2d as LazyConv2d,
    LazyConv3d as LazyConv3d,
)
from terrace.flax._errors import TracedControlFlowError as TracedControlFlowError  # noqa: E402
from terrace.flax._lazy import (  # noqa: E402
    LazyLayer as LazyLayer,
    LazyLayerNorm as LazyLayerNorm,
    LazyLinear as LazyLinear,
)
from terrace.flax._module import Module as Module  # noqa: E402
from terrace.flax._neutral import build as build  # noqa: E402
from terrace.flax import _ops  # noqa: E402,F401  (registers terrace.ops for JAX)

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
    "TracedControlFlowError",
    "build",
]
