"""Moving weights between a torch model and Flax variables."""

from __future__ import annotations

from typing import Any

import numpy as np

from terrace.port._converters import check_shapes
from terrace.port._slots import compare_slots, flax_slots, insert, torch_arrays, torch_slots

__all__ = ["flax_to_torch", "torch_to_flax"]


def torch_to_flax(module: Any) -> dict[str, Any]:
    """Return Flax variables holding a built torch model's weights.

    Args:
        module: a torch model (a terrace module, a built neutral model, or a
            plain ``nn.Module``) that has run at least one forward pass.

    Returns:
        ``{'params': ..., 'batch_stats': ...}`` with the torch model's slot
        names as paths (``batch_stats`` only when a layer has running
        statistics), for the matching ``terrace.flax`` model's ``apply``.
    """
    import jax.numpy as jnp

    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for path, (converter, submodule) in torch_slots(module).items():
        slot_params, slot_stats = converter.to_flax(torch_arrays(submodule), path)
        insert(params, path, slot_params)
        if slot_stats:
            insert(stats, path, slot_stats)
    variables = {"params": params}
    if stats:
        variables["batch_stats"] = stats
    return _map(variables, jnp.asarray)


def flax_to_torch(variables: Any, module: Any) -> Any:
    """Load Flax variables into a torch model and return the model.

    A built model is checked slot by slot (names, kinds, shapes) before any
    tensor is placed. A never-run terrace model keeps the converted state and
    applies each tensor as its slot is created on the first pass.

    Args:
        variables: ``{'params': ..., 'batch_stats': ...}`` from a
            ``terrace.flax`` model.
        module: the torch model to load into.
    """
    import torch

    params = _map(dict(variables.get("params", {})), np.asarray)
    stats = _map(dict(variables.get("batch_stats", {})), np.asarray)
    source = flax_slots(params, stats)
    state: dict[str, Any] = {}
    if _is_built(module):
        target = torch_slots(module)
        kinds = {p: (source[p][0].kind, target[p][0].kind) for p in source.keys() & target.keys()}
        compare_slots(source, target, kinds)
        for path, (converter, slot_params, slot_stats) in source.items():
            arrays = converter.to_torch(slot_params, slot_stats, path)
            expected = {k: tuple(v.shape) for k, v in target[path][1].state_dict().items()}
            check_shapes(path, converter.kind, expected, arrays)
            state.update({f"{path}.{key}": value for key, value in arrays.items()})
    else:
        for path, (converter, slot_params, slot_stats) in source.items():
            arrays = converter.to_torch(slot_params, slot_stats, path)
            state.update({f"{path}.{key}": value for key, value in arrays.items()})
    module.load_state_dict({key: torch.from_numpy(np.array(v, order="C")) for key, v in state.items()})
    return module


def _is_built(module: Any) -> bool:
    return bool(getattr(module, "is_built", True))


def _map(tree: Any, fn: Any) -> Any:
    if isinstance(tree, dict) or hasattr(tree, "items"):
        return {key: _map(value, fn) for key, value in tree.items()}
    return fn(tree)
