"""The JAX implementations of :mod:`terrace.ops`, with torch's numerics."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from terrace._registry import register_backend

__all__: list[str] = []

_OPS = {
    "relu": jax.nn.relu,
    # jax.nn.gelu defaults to the tanh approximation; torch's default is exact.
    "gelu": lambda x, approximate: jax.nn.gelu(x, approximate=approximate == "tanh"),
    "silu": jax.nn.silu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "softmax": lambda x, axis: jax.nn.softmax(x, axis=axis),
    "log_softmax": lambda x, axis: jax.nn.log_softmax(x, axis=axis),
}

register_backend("flax", "terrace.flax", ("jax", "jaxlib")).ops.update(_OPS)
