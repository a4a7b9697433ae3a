"""Initializers that draw from the same distributions as torch's layer defaults.

Torch 2.x initialises a Linear or Conv weight with
``kaiming_uniform_(a=sqrt(5))``, which is ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``,
and its bias from the same range. MultiheadAttention uses Xavier uniform for
its input projections, zeros for their biases and Xavier normal for
``bias_k`` and ``bias_v``. Matching the distributions (not the random
numbers) keeps training behaviour close between the backends.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax

__all__ = ["uniform_fan_in", "xavier_normal", "xavier_uniform"]

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def _uniform(bound: float) -> Initializer:
    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def uniform_fan_in(fan_in: int) -> Initializer:
    """Return ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, torch's Linear and Conv default."""
    return _uniform(1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0)


def xavier_uniform(fan_in: int, fan_out: int) -> Initializer:
    """Return ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``."""
    return _uniform(math.sqrt(6.0 / (fan_in + fan_out)))


def xavier_normal(fan_in: int, fan_out: int) -> Initializer:
    """Return a normal initializer with standard deviation ``sqrt(2 / (fan_in + fan_out))``."""
    std = math.sqrt(2.0 / (fan_in + fan_out))

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
        return std * jax.random.normal(key, shape, dtype)

    return init
