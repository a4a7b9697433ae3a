"""Terrace: write a model once, in its ``forward``, and run it on PyTorch or JAX.

``import terrace`` loads neither torch nor jax. The PyTorch backend's names
(``terrace.Module``, ``terrace.LazyLinear``, ...) are served from
:mod:`terrace.torch` on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from terrace._errors import (
    BackendNotInstalledError as BackendNotInstalledError,
    NotBuiltError as NotBuiltError,
    SlotMismatchError as SlotMismatchError,
    SlotNameError as SlotNameError,
    StateError as StateError,
    TerraceError as TerraceError,
)
from terrace._model import Model as Model
from terrace._registry import (
    get_backend as get_backend,
    register_backend as register_backend,
    register_layer as register_layer,
)
from terrace._slots import SlotRecord as SlotRecord, SlotTable as SlotTable
from terrace import layers as layers, ops as ops

if TYPE_CHECKING:
    from terrace.torch import (
        LazyBatchNorm1d as LazyBatchNorm1d,
        LazyBatchNorm2d as LazyBatchNorm2d,
        LazyBatchNorm3d as LazyBatchNorm3d,
        LazyConv1d as LazyConv1d,
        LazyConv2d as LazyConv2d,
        LazyConv3d as LazyConv3d,
        LazyLayerNorm as LazyLayerNorm,
        LazyLinear as LazyLinear,
        LazyMultiheadAttention as LazyMultiheadAttention,
        Module as Module,
    )

__version__ = "0.1.0"

_TORCH_NAMES = frozenset(
    {
        "LazyBatchNorm1d",
        "LazyBatchNorm2d",
        "LazyBatchNorm3d",
        "LazyConv1d",
        "LazyConv2d",
        "LazyConv3d",
        "LazyLayerNorm",
        "LazyLinear",
        "LazyMultiheadAttention",
        "Module",
    }
)

__all__ = [
    "BackendNotInstalledError",
    "Model",
    "get_backend",
    "layers",
    "load",
    "ops",
    "register_backend",
    "register_layer",
    "save",
    "NotBuiltError",
    "SlotMismatchError",
    "SlotNameError",
    "SlotRecord",
    "SlotTable",
    "StateError",
    "TerraceError",
    *sorted(_TORCH_NAMES),
]


_SUBMODULES = frozenset({"torch", "flax", "port"})
_PORT_NAMES = frozenset({"save", "load"})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"terrace.{name}")
    if name in _PORT_NAMES:
        return getattr(importlib.import_module("terrace.port"), name)
    if name in _TORCH_NAMES:
        value = getattr(importlib.import_module("terrace.torch"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'terrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _TORCH_NAMES | _SUBMODULES | _PORT_NAMES)
