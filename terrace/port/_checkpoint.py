"""Portable checkpoints: one safetensors file that either backend can load.

The file contains each slot's tensors in the torch layout under
``<slot path>.<name>`` keys, and a JSON header (the safetensors metadata
entry ``terrace``) giving each slot's kind and tensor shapes. Loading reads
the header first and checks slot names, kinds and shapes against the target
before any tensor is placed. safetensors runs no code on load.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from terrace._errors import StateError
from terrace.port._converters import check_shapes, converters
from terrace.port._slots import compare_slots, flax_slots, insert, torch_arrays, torch_slots

__all__ = ["load", "save"]

_FORMAT = "terrace-checkpoint"
_VERSION = 1


def save(obj: Any, path: str | os.PathLike[str]) -> None:
    """Write the state of a torch model or of Flax variables to ``path``.

    Args:
        obj: a built torch model, or Flax variables ``{'params': ...,
            'batch_stats': ...}``.
        path: the file to write (conventionally ``*.safetensors``).
    """
    from safetensors.numpy import save_file

    slots, source = _slots_of(obj)
    tensors: dict[str, np.ndarray] = {}
    header: dict[str, Any] = {}
    for slot, (kind, arrays) in slots.items():
        header[slot] = {"kind": kind, "shapes": {k: list(v.shape) for k, v in arrays.items()}}
        for key, array in arrays.items():
            tensors[f"{slot}.{key}"] = np.array(array, order="C")
    metadata = {"terrace": json.dumps({"format": _FORMAT, "version": _VERSION, "source": source, "slots": header})}
    save_file(tensors, os.fspath(path), metadata=metadata)


def _slots_of(obj: Any) -> tuple[dict[str, tuple[str, dict[str, np.ndarray]]], str]:
    if isinstance(obj, dict) or (hasattr(obj, "items") and "params" in obj):
        params = _to_numpy(obj.get("params", {}))
        stats = _to_numpy(obj.get("batch_stats", {}))
        found = flax_slots(params, stats)
        slots = {p: (c.kind, c.to_torch(sp, ss, p)) for p, (c, sp, ss) in found.items()}
        return slots, "flax"
    if not bool(getattr(obj, "is_built", True)):
        raise StateError(
            f"{type(obj).__name__} has not run yet, so it has no weights to save. Fix: run it "
            "on an example batch first."
        )
    return {p: (c.kind, torch_arrays(m)) for p, (c, m) in torch_slots(obj).items()}, "torch"


def _to_numpy(tree: Any) -> Any:
    if hasattr(tree, "items"):
        return {key: _to_numpy(value) for key, value in tree.items()}
    return np.asarray(tree)


def read_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the terrace header of a checkpoint, or raise if the file has none."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="np") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise StateError(
            f"{os.fspath(path)} could not be read as a safetensors file ({error}), so it is not "
            "a terrace checkpoint. Fix: write checkpoints with terrace.save(model_or_variables, "
            "path); for a torch.save file, load it with torch.load and model.load_state_dict."
        ) from error
    if "terrace" not in metadata:
        raise StateError(
            f"{os.fspath(path)} is not a terrace checkpoint (its safetensors metadata has no "
            "'terrace' header). Fix: write it with terrace.save(model_or_variables, path)."
        )
    header = json.loads(metadata["terrace"])
    if header.get("format") != _FORMAT or header.get("version") != _VERSION:
        raise StateError(
            f"{os.fspath(path)} has header format {header.get('format')!r} version "
            f"{header.get('version')!r}; this terrace reads {_FORMAT!r} version {_VERSION}."
        )
    return header


def load(path: str | os.PathLike[str], target: Any, *example_inputs: Any) -> Any:
    """Load a checkpoint written by :func:`save` into ``target``.

    Args:
        path: the checkpoint file.
        target: a torch model (built or never run): its state is loaded and
            the model returned. A Flax module: Flax variables are returned;
            with ``example_inputs`` their shapes are checked against
            ``target.init``. Flax variables (or ``jax.eval_shape`` output):
            converted variables of the same structure are returned.
        *example_inputs: inputs for shape-checking a Flax module target.
    """
    from safetensors.numpy import load_file

    _check_target(target)
    header = read_header(path)
    tensors = load_file(os.fspath(path))
    slots = {slot: _slot_tensors(tensors, slot, info) for slot, info in header["slots"].items()}
    if _is_torch_module(target):
        return _load_torch(slots, header, target)
    return _load_flax(slots, header, target, example_inputs)


def _check_target(target: Any) -> None:
    from terrace._model import Model

    if _is_torch_module(target) or hasattr(target, "init") or hasattr(target, "items"):
        return
    if isinstance(target, Model):
        name = type(target).__name__
        raise TypeError(
            f"terrace.load cannot load into the neutral model {name} itself, which only "
            f"describes the network. Fix: build it first, terrace.load(path, "
            f"terrace.torch.build({name}(...))) or terrace.load(path, terrace.flax.build({name}(...)))."
        )
    raise TypeError(
        f"terrace.load expects a torch module, a Flax module or Flax variables as its "
        f"target, got {type(target).__name__}."
    )


def _slot_tensors(tensors: dict[str, np.ndarray], slot: str, info: dict[str, Any]) -> dict[str, np.ndarray]:
    arrays = {key: tensors[f"{slot}.{key}"] for key in info["shapes"]}
    expected = {key: tuple(shape) for key, shape in info["shapes"].items()}
    check_shapes(slot, info["kind"], expected, arrays)
    return arrays


def _is_torch_module(target: Any) -> bool:
    return any(
        f"{k.__module__}.{k.__qualname__}" == "torch.nn.modules.module.Module" for k in type(target).__mro__
    )


def _load_torch(slots: dict[str, dict[str, np.ndarray]], header: dict[str, Any], target: Any) -> Any:
    import torch

    if bool(getattr(target, "is_built", True)):
        found = torch_slots(target)
        kinds = {p: (header["slots"][p]["kind"], found[p][0].kind) for p in slots.keys() & found.keys()}
        compare_slots(slots, found, kinds)
        for slot, arrays in slots.items():
            expected = {k: tuple(v.shape) for k, v in found[slot][1].state_dict().items()}
            check_shapes(slot, header["slots"][slot]["kind"], expected, arrays)
    state = {
        f"{slot}.{key}": torch.from_numpy(np.array(array, order="C"))
        for slot, arrays in slots.items()
        for key, array in arrays.items()
    }
    target.load_state_dict(state)
    return target


def _load_flax(
    slots: dict[str, dict[str, np.ndarray]], header: dict[str, Any], target: Any, example_inputs: tuple
) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    registry = converters()
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    for slot, arrays in slots.items():
        kind = header["slots"][slot]["kind"]
        if kind not in registry:
            raise StateError(
                f"slot {slot}: the checkpoint's layer kind {kind!r} has no converter here. "
                "Fix: register it with terrace.port.register_converter(...) before loading."
            )
        slot_params, slot_stats = registry[kind].to_flax(arrays, slot)
        insert(params, slot, slot_params)
        if slot_stats:
            insert(stats, slot, slot_stats)
    variables: dict[str, Any] = {"params": params}
    if stats:
        variables["batch_stats"] = stats
    template = _flax_template(target, example_inputs)
    if template is not None:
        _check_against(variables, template)
    return jax.tree_util.tree_map(jnp.asarray, variables)


def _flax_template(target: Any, example_inputs: tuple) -> Any:
    import jax

    if hasattr(target, "init") and callable(target.init):
        if not example_inputs:
            return None
        return jax.eval_shape(target.init, jax.random.key(0), *example_inputs)
    return target


def _check_against(variables: dict[str, Any], template: Any) -> None:
    import jax

    def shapes(tree: Any) -> dict[str, tuple]:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in flat}

    expected = {k: v for k, v in shapes(dict(template)).items() if k.startswith(("['params']", "['batch_stats']"))}
    found = shapes(variables)
    problems = [f"{k}: missing in the checkpoint" for k in sorted(expected.keys() - found.keys())]
    problems += [f"{k}: not in the model" for k in sorted(found.keys() - expected.keys())]
    problems += [
        f"{k}: shape {found[k]} in the checkpoint, {expected[k]} in the model"
        for k in sorted(expected.keys() & found.keys())
        if expected[k] != found[k]
    ]
    if problems:
        raise StateError(
            "the checkpoint does not fit the Flax model:\n  " + "\n  ".join(problems)
            + "\nFix: load a checkpoint saved from the same model code, run on inputs of the same sizes."
        )
