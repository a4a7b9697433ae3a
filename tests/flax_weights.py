"""Copy the weights of torch layers into variables of the matching terrace.flax layers.

One function per layer kind; each follows the layout stated in the flax
layer's docstring. The parity tests use them to run both backends on
identical weights.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

Variables = dict[str, dict[str, Any]]


def to_jax(tensor: torch.Tensor) -> jnp.ndarray:
    """Return a JAX array with the tensor's values (float64 becomes JAX's default float)."""
    return jnp.asarray(tensor.detach().cpu().numpy())


def to_numpy(value: Any) -> np.ndarray:
    """Return a numpy array from a torch tensor or a JAX array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def linear_variables(layer: nn.Linear) -> Variables:
    """Return ``{'params': {'kernel', 'bias'}}`` for a LazyLinear: kernel is weight.T."""
    params = {"kernel": to_jax(layer.weight.T)}
    if layer.bias is not None:
        params["bias"] = to_jax(layer.bias)
    return {"params": params}


def layer_norm_variables(layer: nn.LayerNorm) -> Variables:
    """Return the variables of a LazyLayerNorm: scale is weight, bias is bias."""
    params = {}
    if layer.weight is not None:
        params["scale"] = to_jax(layer.weight)
    if layer.bias is not None:
        params["bias"] = to_jax(layer.bias)
    return {"params": params} if params else {}


def conv_variables(layer: nn.Conv1d | nn.Conv2d | nn.Conv3d) -> Variables:
    """Return the variables of a LazyConvNd: kernel is weight with (out, in) moved last, reversed."""
    spatial = layer.weight.dim() - 2
    order = (*range(2, 2 + spatial), 1, 0)
    params = {"kernel": to_jax(layer.weight.permute(*order))}
    if layer.bias is not None:
        params["bias"] = to_jax(layer.bias)
    return {"params": params}


def batch_norm_variables(layer: nn.modules.batchnorm._BatchNorm) -> Variables:
    """Return the variables of a LazyBatchNormNd: params scale/bias, batch_stats mean/var/count."""
    variables: Variables = {}
    if layer.affine:
        variables["params"] = {"scale": to_jax(layer.weight), "bias": to_jax(layer.bias)}
    if layer.track_running_stats:
        variables["batch_stats"] = {
            "mean": to_jax(layer.running_mean),
            "var": to_jax(layer.running_var),
            "num_batches_tracked": jnp.asarray(int(layer.num_batches_tracked), jnp.int32),
        }
    return variables


def attention_variables(layer: nn.MultiheadAttention) -> Variables:
    """Return the variables of a LazyMultiheadAttention.

    ``in_proj_weight`` (or the separate q/k/v weights when kdim or vdim
    differs from embed_dim) is split into the ``query``, ``key`` and
    ``value`` kernels, each transposed to ``(in, embed_dim)``.
    """
    embed_dim = layer.embed_dim
    if layer.in_proj_weight is not None:
        weights = layer.in_proj_weight.split(embed_dim)
    else:
        weights = (layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight)
    biases = layer.in_proj_bias.split(embed_dim) if layer.in_proj_bias is not None else (None,) * 3
    params: dict[str, Any] = {}
    for name, weight, bias in zip(("query", "key", "value"), weights, biases):
        params[name] = {"kernel": to_jax(weight.T)}
        if bias is not None:
            params[name]["bias"] = to_jax(bias)
    params["out"] = {"kernel": to_jax(layer.out_proj.weight.T)}
    if layer.out_proj.bias is not None:
        params["out"]["bias"] = to_jax(layer.out_proj.bias)
    if layer.bias_k is not None:
        params["bias_k"] = to_jax(layer.bias_k)
        params["bias_v"] = to_jax(layer.bias_v)
    return {"params": params}
