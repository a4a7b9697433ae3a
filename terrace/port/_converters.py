"""Converters between torch and Flax layouts, one per layer kind.

Tensors travel as NumPy arrays. The *torch layout* of a slot is its torch
``state_dict`` entries (``weight``, ``bias``, ``running_mean``, ...); the
*Flax layout* is its subtree in ``params`` and, for batch norm, in
``batch_stats``. Each :class:`Converter` maps one layer kind both ways and
recognises the kind from either side, so a slot is converted by the one
converter whose kind it has and never by position.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from terrace._errors import StateError

__all__ = ["Converter", "converter_for_flax", "converter_for_torch", "converters", "register_converter"]

Arrays = dict[str, np.ndarray]
Tree = dict[str, Any]


@dataclass
class Converter:
    """The mapping of one layer kind between torch and Flax.

    Attributes:
        kind: the kind's name, stored in checkpoint headers (``"linear"``).
        torch_types: names of the torch module classes of this kind
            (``"torch.nn.modules.linear.Linear"``); matched by name so that
            this module needs no torch import.
        to_flax: ``(torch_arrays, slot) -> (params, batch_stats)``.
        to_torch: ``(params, batch_stats, slot) -> torch_arrays``.
        is_flax: whether a slot's ``(params, batch_stats)`` subtrees are of
            this kind, for Flax variables whose torch model is not built.
    """

    kind: str
    torch_types: tuple[str, ...]
    to_flax: Callable[[Arrays, str], tuple[Tree, Tree]]
    to_torch: Callable[[Tree, Tree, str], Arrays]
    is_flax: Callable[[Tree, Tree], bool] = field(default=lambda params, stats: False)


_CONVERTERS: dict[str, Converter] = {}


def register_converter(converter: Converter) -> None:
    """Add ``converter`` to the registry, replacing one of the same kind.

    Example:
        >>> import numpy as np
        >>> from terrace.port import Converter, register_converter
        >>> register_converter(Converter(
        ...     kind="scale",
        ...     torch_types=("mypackage.Scale",),
        ...     to_flax=lambda t, slot: ({"factor": t["factor"]}, {}),
        ...     to_torch=lambda p, s, slot: {"factor": np.asarray(p["factor"])},
        ...     is_flax=lambda p, s: set(p) == {"factor"},
        ... ))
    """
    _CONVERTERS[converter.kind] = converter


def converters() -> dict[str, Converter]:
    """Return the registered converters by kind."""
    return dict(_CONVERTERS)


def converter_for_torch(module: Any) -> Converter | None:
    """Return the converter for a torch module's class, or None for a container."""
    for klass in type(module).__mro__:
        qualified = f"{klass.__module__}.{klass.__qualname__}"
        for converter in _CONVERTERS.values():
            if qualified in converter.torch_types:
                return converter
    return None


def converter_for_flax(params: Tree, stats: Tree) -> Converter | None:
    """Return the converter whose kind a Flax slot has, or None for a container."""
    for converter in _CONVERTERS.values():
        if converter.is_flax(params, stats):
            return converter
    return None


def _leaves(tree: Tree) -> set[str]:
    return {key for key, value in tree.items() if not isinstance(value, dict)}


def _copy(value: Any) -> np.ndarray:
    return np.array(value, copy=True)


# -- linear -------------------------------------------------------------------


def _linear_to_flax(arrays: Arrays, slot: str) -> tuple[Tree, Tree]:
    params = {"kernel": _copy(arrays["weight"].T)}
    if "bias" in arrays:
        params["bias"] = _copy(arrays["bias"])
    return params, {}


def _linear_to_torch(params: Tree, stats: Tree, slot: str) -> Arrays:
    arrays = {"weight": _copy(np.asarray(params["kernel"]).T)}
    if "bias" in params:
        arrays["bias"] = _copy(params["bias"])
    return arrays


def _is_linear(params: Tree, stats: Tree) -> bool:
    kernel = params.get("kernel")
    return not stats and _leaves(params) <= {"kernel", "bias"} and np.ndim(kernel) == 2


# -- convolution ----------------------------------------------------------------


def _conv_to_flax(arrays: Arrays, slot: str) -> tuple[Tree, Tree]:
    weight = arrays["weight"]
    order = tuple(range(2, weight.ndim)) + (1, 0)
    params = {"kernel": _copy(weight.transpose(order))}
    if "bias" in arrays:
        params["bias"] = _copy(arrays["bias"])
    return params, {}


def _conv_to_torch(params: Tree, stats: Tree, slot: str) -> Arrays:
    kernel = np.asarray(params["kernel"])
    spatial = kernel.ndim - 2
    order = (kernel.ndim - 1, kernel.ndim - 2) + tuple(range(spatial))
    arrays = {"weight": _copy(kernel.transpose(order))}
    if "bias" in params:
        arrays["bias"] = _copy(params["bias"])
    return arrays


def _is_conv(params: Tree, stats: Tree) -> bool:
    kernel = params.get("kernel")
    return not stats and _leaves(params) <= {"kernel", "bias"} and np.ndim(kernel) >= 3


# -- layer norm -------------------------------------------------------------------


def _norm_to_flax(arrays: Arrays, slot: str) -> tuple[Tree, Tree]:
    params = {}
    if "weight" in arrays:
        params["scale"] = _copy(arrays["weight"])
    if "bias" in arrays:
        params["bias"] = _copy(arrays["bias"])
    return params, {}


def _norm_to_torch(params: Tree, stats: Tree, slot: str) -> Arrays:
    arrays = {}
    if "scale" in params:
        arrays["weight"] = _copy(params["scale"])
    if "bias" in params:
        arrays["bias"] = _copy(params["bias"])
    return arrays


def _is_layer_norm(params: Tree, stats: Tree) -> bool:
    return not stats and bool(params) and _leaves(params) == set(params) <= {"scale", "bias"}


# -- batch norm -------------------------------------------------------------------

_STATS_TO_FLAX = {"running_mean": "mean", "running_var": "var", "num_batches_tracked": "num_batches_tracked"}


def _batch_norm_to_flax(arrays: Arrays, slot: str) -> tuple[Tree, Tree]:
    params, _ = _norm_to_flax(arrays, slot)
    stats = {flax: _copy(arrays[torch]) for torch, flax in _STATS_TO_FLAX.items() if torch in arrays}
    return params, stats


def _batch_norm_to_torch(params: Tree, stats: Tree, slot: str) -> Arrays:
    arrays = _norm_to_torch(params, stats, slot)
    for torch, flax in _STATS_TO_FLAX.items():
        if flax in stats:
            arrays[torch] = _copy(stats[flax])
    if "num_batches_tracked" in arrays:
        arrays["num_batches_tracked"] = arrays["num_batches_tracked"].astype(np.int64)
    return arrays


def _is_batch_norm(params: Tree, stats: Tree) -> bool:
    return bool(stats) and set(stats) <= set(_STATS_TO_FLAX.values()) and _leaves(params) <= {"scale", "bias"}


# -- embedding --------------------------------------------------------------------


def _embedding_to_flax(arrays: Arrays, slot: str) -> tuple[Tree, Tree]:
    return {"embedding": _copy(arrays["weight"])}, {}


def _embedding_to_torch(params: Tree, stats: Tree, slot: str) -> Arrays:
    return {"weight": _copy(params["embedding"])}


def _is_embedding(params: Tree, stats: Tree) -> bool:
    return not stats and set(params) == {"embedding"} and np.ndim(params["embedding"]) == 2


# -- multi-head attention ------------------------------------------------------------

_PROJECTIONS = ("query", "key", "value")


def _attention_to_flax(arrays: Arrays, slot: str) -> tuple[Tree, Tree]:
    if "in_proj_weight" in arrays:
        weights = np.split(arrays["in_proj_weight"], 3, axis=0)
    else:
        weights = [arrays[f"{p}_proj_weight"] for p in ("q", "k", "v")]
    biases = np.split(arrays["in_proj_bias"], 3) if "in_proj_bias" in arrays else [None] * 3
    params: Tree = {}
    for name, weight, bias in zip(_PROJECTIONS, weights, biases):
        params[name] = {"kernel": _copy(weight.T)}
        if bias is not None:
            params[name]["bias"] = _copy(bias)
    params["out"] = {"kernel": _copy(arrays["out_proj.weight"].T)}
    if "out_proj.bias" in arrays:
        params["out"]["bias"] = _copy(arrays["out_proj.bias"])
    for extra in ("bias_k", "bias_v"):
        if extra in arrays:
            params[extra] = _copy(arrays[extra])
    return params, {}


def _attention_to_torch(params: Tree, stats: Tree, slot: str) -> Arrays:
    kernels = [np.asarray(params[name]["kernel"]) for name in _PROJECTIONS]
    arrays: Arrays = {}
    packed = len({k.shape for k in kernels}) == 1 and kernels[0].shape[0] == kernels[0].shape[1]
    if packed:
        arrays["in_proj_weight"] = _copy(np.concatenate([k.T for k in kernels], axis=0))
    else:
        for short, kernel in zip(("q", "k", "v"), kernels):
            arrays[f"{short}_proj_weight"] = _copy(kernel.T)
    if all("bias" in params[name] for name in _PROJECTIONS):
        arrays["in_proj_bias"] = _copy(np.concatenate([np.asarray(params[n]["bias"]) for n in _PROJECTIONS]))
    for extra in ("bias_k", "bias_v"):
        if extra in params:
            arrays[extra] = _copy(params[extra])
    arrays["out_proj.weight"] = _copy(np.asarray(params["out"]["kernel"]).T)
    if "bias" in params["out"]:
        arrays["out_proj.bias"] = _copy(params["out"]["bias"])
    return arrays


def _is_attention(params: Tree, stats: Tree) -> bool:
    return not stats and {"query", "key", "value", "out"} <= set(params)


def check_shapes(slot: str, kind: str, expected: dict[str, tuple], arrays: Arrays) -> None:
    """Raise :class:`StateError` naming ``slot`` unless ``arrays`` has exactly the expected shapes."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    wrong = [
        f"{key} {tuple(arrays[key].shape)} instead of {tuple(shape)}"
        for key, shape in expected.items()
        if key in arrays and tuple(arrays[key].shape) != tuple(shape)
    ]
    if not (missing or extra or wrong):
        return
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    if wrong:
        problems.append("shape " + "; ".join(wrong))
    raise StateError(
        f"slot {slot} ({kind}): the converted tensors do not fit the target layer: "
        f"{'; '.join(problems)}. Fix: port between models built from the same code and "
        "run on inputs of the same feature sizes."
    )


_TORCH = "torch.nn.modules"
for _converter in (
    Converter("linear", (f"{_TORCH}.linear.Linear",), _linear_to_flax, _linear_to_torch, _is_linear),
    Converter(
        "conv",
        (f"{_TORCH}.conv.Conv1d", f"{_TORCH}.conv.Conv2d", f"{_TORCH}.conv.Conv3d"),
        _conv_to_flax,
        _conv_to_torch,
        _is_conv,
    ),
    Converter("layer_norm", (f"{_TORCH}.normalization.LayerNorm",), _norm_to_flax, _norm_to_torch, _is_layer_norm),
    Converter(
        "batch_norm",
        (f"{_TORCH}.batchnorm.BatchNorm1d", f"{_TORCH}.batchnorm.BatchNorm2d", f"{_TORCH}.batchnorm.BatchNorm3d"),
        _batch_norm_to_flax,
        _batch_norm_to_torch,
        _is_batch_norm,
    ),
    Converter("embedding", (f"{_TORCH}.sparse.Embedding",), _embedding_to_flax, _embedding_to_torch, _is_embedding),
    Converter(
        "attention",
        (f"{_TORCH}.activation.MultiheadAttention",),
        _attention_to_flax,
        _attention_to_torch,
        _is_attention,
    ),
):
    register_converter(_converter)
