"""Variable access for the lazy layers, with errors that name the slot.

Linen creates a layer's variables during ``init`` with shapes read from the
input, and ``apply`` reuses them. These helpers check the variables before
linen does and raise a :class:`~terrace.TerraceError` that names the slot,
the sizes and the fix. They catch a stored variable whose shape differs from
the one this input needs, a collection missing from ``apply``'s variables, a
collection the layer must update but may not, and a missing RNG stream.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax.core import meta

from terrace._errors import StateError, TerraceError
from terrace.flax._errors import slot_path

__all__ = [
    "LogicalAxes",
    "SizeAxes",
    "check_logical_axes",
    "default_float",
    "input_size",
    "lazy_param",
    "lazy_variable",
    "require_mutable",
    "require_rng",
]

# Pairs of (size name, axes of the variable that hold it), such as
# ("in_features", 0) for a Linear kernel: used to name the size that changed.
SizeAxes = Sequence[tuple[str, int | slice]]

# One logical axis name per dimension of a variable, None for a dimension
# that is not sharded: the names of nn.with_logical_partitioning.
LogicalAxes = Sequence[str | None]


def default_float(dtype: Any) -> Any:
    """Return ``dtype``, or JAX's default float type (float32 unless x64 is on) for None."""
    return jnp.dtype(dtype) if dtype is not None else jnp.result_type(float)


def input_size(x: jax.Array, from_end: int, size_name: str, layer: nn.Module) -> int:
    """Return ``x.shape[-from_end]``, raising ValueError when ``x`` has too few dimensions."""
    if x.ndim < from_end:
        raise ValueError(
            f"{slot_path(layer)}: {type(layer).__name__} needs an input with at least "
            f"{from_end} dimensions to read {size_name} from, got shape {tuple(x.shape)}."
        )
    return int(x.shape[-from_end])


def check_logical_axes(layer: str, argument: str, axes: Any, dims: Sequence[str]) -> None:
    """Raise ValueError unless ``axes`` is None or names one logical axis per entry of ``dims``.

    ``dims`` names the variable's dimensions for the message, such as
    ``("in_features", "out_features")`` for a Linear kernel.
    """
    if axes is None:
        return
    valid = (
        isinstance(axes, (tuple, list))
        and len(axes) == len(dims)
        and all(name is None or isinstance(name, str) for name in axes)
    )
    if not valid:
        raise ValueError(
            f"{layer}: {argument} must be None or a tuple of {len(dims)} logical axis names "
            f"(str, or None for a dimension that is not sharded), one per dimension "
            f"({', '.join(dims)}), got {axes!r}."
        )


def _stored_shape(layer: nn.Module, col: str, name: str) -> tuple[int, ...] | None:
    if not layer.has_variable(col, name):
        return None
    return tuple(jnp.shape(meta.unbox(layer.get_variable(col, name))))


def _format_size(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, tuple) else str(value)


def _describe_sizes(stored: tuple[int, ...], needed: tuple[int, ...], sizes: SizeAxes) -> str:
    if len(stored) == len(needed):
        changed = [
            f"{label} is {_format_size(needed[axes])} in this input but "
            f"{_format_size(stored[axes])} in the variables"
            for label, axes in sizes
            if stored[axes] != needed[axes]
        ]
        if changed:
            return "; ".join(changed)
    return f"this input needs shape {needed}"


def _check_shape(
    layer: nn.Module, col: str, name: str, needed: tuple[int, ...], sizes: SizeAxes
) -> bool:
    """Return whether the variable exists, raising StateError if its shape is not ``needed``."""
    stored = _stored_shape(layer, col, name)
    if stored is None:
        if not layer.is_mutable_collection(col):
            raise StateError(
                f"slot {slot_path(layer)}: the variables passed to apply have no "
                f"{col!r} entry {name!r} for this {type(layer).__name__}. Fix: pass the whole "
                "dict that init returned (every collection, not only 'params'), and make sure "
                "the input given to init reaches this slot; a slot that the init pass skipped "
                "has no variables."
            )
        return False
    if stored != needed:
        raise StateError(
            f"slot {slot_path(layer)}: {_describe_sizes(stored, needed, sizes)} "
            f"({col} {name!r} has shape {stored}, this input needs {needed}). "
            f"{type(layer).__name__} reads its sizes from the input passed to init. Fix: feed "
            "inputs with the sizes used at init, or run init again on an input of the new sizes."
        )
    return True


def lazy_param(
    layer: nn.Module,
    name: str,
    init: Callable[..., jax.Array],
    shape: tuple[int, ...],
    dtype: Any,
    sizes: SizeAxes,
    axes: LogicalAxes | None = None,
) -> jax.Array:
    """Return the layer's parameter ``name``, created by ``init`` with ``shape`` on the first pass.

    With ``axes``, ``init`` stores the parameter boxed in
    ``nn.LogicallyPartitioned`` with those logical axis names, as
    ``nn.with_logical_partitioning`` does. The value returned here is the
    plain array either way.
    """
    _check_shape(layer, "params", name, shape, sizes)
    if axes is not None:
        init = nn.with_logical_partitioning(init, tuple(axes))
    return layer.param(name, init, shape, dtype)


def lazy_variable(
    layer: nn.Module,
    col: str,
    name: str,
    init: Callable[[], jax.Array],
    shape: tuple[int, ...],
    sizes: SizeAxes,
) -> nn.Variable[Any]:
    """Return the layer's variable ``col/name``, created by ``init()`` on the first pass."""
    _check_shape(layer, col, name, shape, sizes)
    return layer.variable(col, name, init)


def require_mutable(layer: nn.Module, col: str, reason: str) -> None:
    """Raise TerraceError unless the collection ``col`` may be updated in this call."""
    if layer.is_mutable_collection(col):
        return
    raise TerraceError(
        f"slot {slot_path(layer)}: {reason}, but the {col!r} collection is not mutable in this "
        f"apply. Fix: pass it as mutable and keep the update, as in "
        f"`y, updates = model.apply(variables, x, mutable=[{col!r}])`; or run the model in "
        "evaluation mode, built with `model.clone(train=False)`."
    )


def require_rng(layer: nn.Module, stream: str, reason: str) -> None:
    """Raise TerraceError unless the RNG stream ``stream`` was passed to init or apply."""
    if layer.has_rng(stream):
        return
    raise TerraceError(
        f"slot {slot_path(layer)}: {reason}, but no {stream!r} random key was passed. Fix: "
        f"pass one, as in `model.apply(variables, x, rngs={{{stream!r}: key}})` or "
        f"`model.init({{'params': key1, {stream!r}: key2}}, x)`; or run the model in "
        "evaluation mode, built with `model.clone(train=False)`."
    )
