"""Backend-neutral layers for :class:`terrace.Model`; see :mod:`terrace._layers`."""

from terrace._layers import (
    BatchNorm1d as BatchNorm1d,
    BatchNorm2d as BatchNorm2d,
    BatchNorm3d as BatchNorm3d,
    Conv1d as Conv1d,
    Conv2d as Conv2d,
    Conv3d as Conv3d,
    Dropout as Dropout,
    Embedding as Embedding,
    LayerNorm as LayerNorm,
    Linear as Linear,
    MultiheadAttention as MultiheadAttention,
    NeutralLayer as NeutralLayer,
)

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Dropout",
    "Embedding",
    "LayerNorm",
    "Linear",
    "MultiheadAttention",
    "NeutralLayer",
]
