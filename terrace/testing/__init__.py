"""Testing helpers: backend adapters, tolerances, and :func:`check_model`.

A backend adapter (:class:`BackendAdapter`) runs a neutral
:class:`terrace.Model` on one backend and one device behind one interface;
the conformance suite (``pytest --pyargs terrace.conformance``) and
:func:`check_model` are written against it. ``import terrace.testing``
loads neither torch nor jax; :class:`TorchAdapter` and :class:`FlaxAdapter`
load their backend on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from terrace._registry import get_backend

from terrace.testing._adapter import (
    DEVICES as DEVICES,
    AdapterChoice as AdapterChoice,
    BackendAdapter as BackendAdapter,
    BuiltModel as BuiltModel,
    adapter_class as adapter_class,
    check_names as check_names,
    read_checkpoint as read_checkpoint,
    reference_adapter as reference_adapter,
    register_adapter as register_adapter,
    registered_adapters as registered_adapters,
    select_adapters as select_adapters,
)
from terrace.testing._checks import (
    CHECKS as CHECKS,
    CheckReport as CheckReport,
    CheckResult as CheckResult,
    check_model as check_model,
)
from terrace.testing._precision import (
    TOLERANCES as TOLERANCES,
    full_precision as full_precision,
    max_difference as max_difference,
    tolerance as tolerance,
)

if TYPE_CHECKING:
    from terrace.testing._flax import FlaxAdapter as FlaxAdapter
    from terrace.testing._torch import TorchAdapter as TorchAdapter

__all__ = [
    "CHECKS",
    "DEVICES",
    "TOLERANCES",
    "AdapterChoice",
    "BackendAdapter",
    "BuiltModel",
    "CheckReport",
    "CheckResult",
    "FlaxAdapter",
    "TorchAdapter",
    "adapter_class",
    "check_names",
    "check_model",
    "full_precision",
    "max_difference",
    "read_checkpoint",
    "reference_adapter",
    "register_adapter",
    "registered_adapters",
    "select_adapters",
    "tolerance",
]

# Adapter class -> (its terrace backend, the module that defines it).
_LAZY = {"TorchAdapter": ("torch", "terrace.testing._torch"), "FlaxAdapter": ("flax", "terrace.testing._flax")}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        backend, module = _LAZY[name]
        get_backend(backend)  # raises BackendNotInstalledError naming the extra to install
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'terrace.testing' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
