"""The torch implementations of :mod:`terrace.ops`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from terrace._registry import register_backend

__all__: list[str] = []

_OPS = {
    "relu": torch.relu,
    "gelu": lambda x, approximate: F.gelu(x, approximate=approximate),
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "softmax": lambda x, axis: torch.softmax(x, dim=axis),
    "log_softmax": lambda x, axis: torch.log_softmax(x, dim=axis),
}

register_backend("torch", "terrace.torch", ("torch",)).ops.update(_OPS)
