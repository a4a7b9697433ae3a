"""Finding the convertible slots of a torch model and of Flax variables."""

from __future__ import annotations

from typing import Any

import numpy as np

from terrace._errors import NotBuiltError, StateError
from terrace.port._converters import Converter, converter_for_flax, converter_for_torch

__all__ = ["flax_slots", "insert", "torch_slots"]

Tree = dict[str, Any]


def torch_slots(module: Any) -> dict[str, tuple[Converter, Any]]:
    """Return ``{slot path: (converter, submodule)}`` for every layer of a built torch model.

    Raises ``NotBuiltError`` for a layer that has not run yet, and
    ``StateError`` for state that no converter covers.
    """
    from terrace.torch import LazyLayer, Module

    if isinstance(module, Module) and not module._terrace_table.complete:
        module._require_built("terrace.port")
    slots: dict[str, tuple[Converter, Any]] = {}
    covered: list[str] = []
    for path, submodule in module.named_modules():
        if any(path.startswith(prefix) for prefix in covered):
            continue
        if isinstance(submodule, LazyLayer):
            raise NotBuiltError(
                f"slot {path} ({type(submodule).__name__}) has not run on an input yet, so its "
                "weights do not exist and cannot be ported. Fix: run the model on an example "
                "batch that reaches every slot first."
            )
        converter = converter_for_torch(submodule)
        if converter is not None and submodule.state_dict():
            slots[path] = (converter, submodule)
            covered.append(path + ".")
    _check_covered(module, slots)
    return slots


def _check_covered(module: Any, slots: dict[str, Any]) -> None:
    uncovered = [
        key
        for key in module.state_dict()
        if not any(key.startswith(path + ".") for path in slots)
    ]
    if uncovered:
        raise StateError(
            f"no converter covers these state entries: {', '.join(uncovered)}. Their layers "
            "are of a kind terrace.port does not know. Fix: register a converter for the "
            "layer's class with terrace.port.register_converter(...)."
        )


def torch_arrays(submodule: Any) -> dict[str, np.ndarray]:
    """Return a torch layer's own state as NumPy arrays."""
    return {key: value.detach().cpu().numpy() for key, value in submodule.state_dict().items()}


def flax_slots(params: Tree, stats: Tree, prefix: str = "") -> dict[str, tuple[Converter, Tree, Tree]]:
    """Return ``{slot path: (converter, params, batch_stats)}`` for Flax variables."""
    converter = converter_for_flax(params, stats) if prefix else None
    if converter is not None:
        return {prefix: (converter, params, stats)}
    slots: dict[str, tuple[Converter, Tree, Tree]] = {}
    for key in sorted(set(params) | set(stats)):
        child_params = params.get(key, {})
        child_stats = stats.get(key, {})
        path = f"{prefix}.{key}" if prefix else key
        if not isinstance(child_params, dict) or not isinstance(child_stats, dict):
            raise StateError(
                f"slot {prefix or '(top level)'}: the variable {key!r} belongs to no layer kind "
                "terrace.port knows. Fix: register a converter for that layer with "
                "terrace.port.register_converter(...)."
            )
        slots.update(flax_slots(dict(child_params), dict(child_stats), path))
    return slots


def insert(tree: Tree, path: str, value: Tree) -> None:
    """Place ``value`` at the dotted ``path`` of a nested dict."""
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def compare_slots(source: dict[str, Any], target: dict[str, Any], kinds: dict[str, tuple[str, str]]) -> None:
    """Raise one ``StateError`` listing every slot that differs between source and target."""
    problems = []
    for path in sorted(set(source) - set(target)):
        problems.append(f"{path}: in the source only")
    for path in sorted(set(target) - set(source)):
        problems.append(f"{path}: in the target only")
    for path, (source_kind, target_kind) in sorted(kinds.items()):
        if source_kind != target_kind:
            problems.append(f"{path}: {source_kind} in the source, {target_kind} in the target")
    if problems:
        raise StateError(
            "the slots of the source and the target differ, so nothing was loaded:\n  "
            + "\n  ".join(problems)
            + "\nA layer was added, removed or renamed since the weights were saved; loading "
            "by position would put tensors into the wrong layers. Fix: port between models "
            "built from the same code, or give the moved layers explicit names with make(..., name=...)."
        )
