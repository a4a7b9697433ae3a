"""Neural-network functions for backend-neutral models.

Each function dispatches on the type of its first argument to the backend
that owns it, and matches torch's numerics on every backend (``gelu`` is the
exact erf form by default, as in torch). For general array functions
(reshape, concatenate, mean, matmul, ...) use the Python array API standard:
``xp = terrace.ops.namespace(x)`` returns the array-api-compat namespace of
``x``, and ``xp.reshape(x, ...)`` works on every backend.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from terrace._registry import resolve_op

__all__ = ["gelu", "log_softmax", "namespace", "relu", "sigmoid", "silu", "softmax", "tanh"]

OP_NAMES = ("relu", "gelu", "silu", "sigmoid", "tanh", "softmax", "log_softmax")


def namespace(*arrays: Any) -> Any:
    """Return the array API namespace of ``arrays`` (through array-api-compat)."""
    return array_api_compat.array_namespace(*arrays)


def relu(x: Any) -> Any:
    """Return ``max(x, 0)`` elementwise."""
    return resolve_op("relu", x)(x)


def gelu(x: Any, approximate: str = "none") -> Any:
    """Return the Gaussian error linear unit of ``x``.

    Args:
        x: input array.
        approximate: ``"none"`` for the exact erf form (torch's default),
            ``"tanh"`` for the tanh approximation.
    """
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}.")
    return resolve_op("gelu", x)(x, approximate)


def silu(x: Any) -> Any:
    """Return ``x * sigmoid(x)`` elementwise."""
    return resolve_op("silu", x)(x)


def sigmoid(x: Any) -> Any:
    """Return the logistic sigmoid of ``x``."""
    return resolve_op("sigmoid", x)(x)


def tanh(x: Any) -> Any:
    """Return the hyperbolic tangent of ``x``."""
    return resolve_op("tanh", x)(x)


def softmax(x: Any, axis: int = -1) -> Any:
    """Return the softmax of ``x`` along ``axis``."""
    return resolve_op("softmax", x)(x, axis)


def log_softmax(x: Any, axis: int = -1) -> Any:
    """Return the log of the softmax of ``x`` along ``axis``."""
    return resolve_op("log_softmax", x)(x, axis)
