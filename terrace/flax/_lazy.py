"""Lazy layers for Flax that compute the same function as their torch namesakes.

A linen layer creates its parameters during ``init`` with shapes read from
the input, so every linen layer is lazy in torch's sense. These layers add
torch's numerics, constructor arguments, defaults and input layouts:
channels first for convolutions and batch norm, and sequence first for
attention unless ``batch_first``. A model written with ``terrace.torch``
layers can so be written the same way with ``terrace.flax`` layers, and
given the same weights it returns the same output.

Parameters use linen's names (``kernel``, ``bias``, ``scale``). Each class
docstring states each variable's layout and the torch tensor it corresponds
to.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

from terrace.flax._init import uniform_fan_in
from terrace.flax._variables import (
    LogicalAxes,
    check_logical_axes,
    default_float,
    input_size,
    lazy_param,
)

__all__ = ["LazyLayer", "LazyLayerNorm", "LazyLinear"]


class LazyLayer(nn.Module):
    """Base class of terrace's Flax lazy layers.

    Subclasses declare torch's constructor arguments as dataclass fields, in
    torch's order, ending with ``device`` and ``dtype``. ``dtype`` is the
    parameter dtype (None for JAX's default float type). ``device`` exists
    so that calls written for ``terrace.torch`` keep working, and must be
    None: JAX places arrays with ``jax.device_put`` or a sharding instead.
    """

    def __post_init__(self) -> None:
        device = vars(self).get("device")
        if device is not None:
            raise ValueError(
                f"{type(self).__name__}: device={device!r} is not supported by the Flax "
                "backend, which creates variables where JAX places them. Fix: leave device "
                "unset and move the variables with jax.device_put or a sharding."
            )
        self._check_config()
        super().__post_init__()

    @nn.nowrap
    def _check_config(self) -> None:
        """Raise ValueError for constructor arguments that torch would reject."""


class LazyLinear(LazyLayer):
    """``torch.nn.Linear`` that reads ``in_features`` from the last input dimension.

    Computes ``y = x @ kernel + bias``, torch's ``x @ weight.T + bias``.

    Attributes:
        out_features: size of each output sample.
        bias: whether to learn an additive bias.
        device: must be None (see :class:`LazyLayer`).
        dtype: parameter dtype; None for JAX's default float type.
        kernel_axes: keyword only; logical axis names of the kernel's two
            dimensions, such as ``("embed", "mlp")``, or None. With names,
            ``init`` returns the kernel boxed in ``nn.LogicallyPartitioned``
            (see ``nn.with_logical_partitioning``), so ``nn.get_partition_spec``
            and ``nn.logical_to_mesh_sharding`` can shard it. None, the
            default, keeps the kernel a plain array.
        bias_axes: keyword only; the logical axis name of the bias, as a
            1-tuple such as ``("mlp",)``, or None. Unused when ``bias`` is False.

    Variables (``params``):
        - ``kernel``: ``(in_features, out_features)``, torch's ``weight`` transposed.
        - ``bias``: ``(out_features,)``, torch's ``bias``.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.
    """

    out_features: int
    bias: bool = True
    device: Any = None
    dtype: Any = None
    kernel_axes: LogicalAxes | None = dataclasses.field(default=None, kw_only=True)
    bias_axes: LogicalAxes | None = dataclasses.field(default=None, kw_only=True)

    @nn.nowrap
    def _check_config(self) -> None:
        check_logical_axes(
            "LazyLinear", "kernel_axes", self.kernel_axes, ("in_features", "out_features")
        )
        check_logical_axes("LazyLinear", "bias_axes", self.bias_axes, ("out_features",))

    @nn.compact
    def __call__(self, input: jax.Array) -> jax.Array:
        in_features = input_size(input, 1, "in_features", self)
        dtype = default_float(self.dtype)
        init = uniform_fan_in(in_features)
        kernel_shape = (in_features, self.out_features)
        kernel = lazy_param(
            self, "kernel", init, kernel_shape, dtype, [("in_features", 0)], self.kernel_axes
        )
        output = jnp.matmul(input, kernel)
        if self.bias:
            bias_shape = (self.out_features,)
            output = output + lazy_param(self, "bias", init, bias_shape, dtype, (), self.bias_axes)
        return output


class LazyLayerNorm(LazyLayer):
    """``torch.nn.LayerNorm`` over the trailing dimensions of its input.

    Computes ``(x - mean) / sqrt(var + eps) * scale + bias`` with the biased
    variance over the last ``normalized_ndim`` dimensions, as torch does. The
    variance is taken of the centred input (two passes), which keeps rows
    with a large mean and a small spread accurate. Linen's ``LayerNorm``
    defaults to ``E[x^2] - E[x]^2`` and ``eps=1e-6`` instead.

    Attributes:
        eps: added to the variance for numerical stability (torch's 1e-5).
        elementwise_affine: whether to learn a per-element scale and shift.
        bias: whether the affine part has a shift.
        normalized_ndim: how many trailing dimensions to normalise over; 1
            normalises over the last dimension, 2 over the last two, and so on.
        device: must be None (see :class:`LazyLayer`).
        dtype: parameter dtype; None for JAX's default float type.

    Variables (``params``, only with ``elementwise_affine``):
        - ``scale``: the normalized shape ``(D_1, ..., D_k)``, torch's ``weight``.
        - ``bias``: the normalized shape, torch's ``bias``.

    Shape:
        - Input: ``(*, D_1, ..., D_k)`` with ``k = normalized_ndim``.
        - Output: same as the input.
    """

    eps: float = 1e-5
    elementwise_affine: bool = True
    bias: bool = True
    normalized_ndim: int = 1
    device: Any = None
    dtype: Any = None

    @nn.nowrap
    def _check_config(self) -> None:
        ndim = self.normalized_ndim
        if not isinstance(ndim, int) or isinstance(ndim, bool) or ndim < 1:
            raise ValueError(
                f"LazyLayerNorm: normalized_ndim must be a positive int, got {ndim!r}."
            )

    @nn.compact
    def __call__(self, input: jax.Array) -> jax.Array:
        ndim = self.normalized_ndim
        input_size(input, ndim, "the normalized shape", self)
        axes = tuple(range(-ndim, 0))
        mean = jnp.mean(input, axis=axes, keepdims=True)
        centered = input - mean
        variance = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
        output = centered * jax.lax.rsqrt(variance + self.eps)
        if not self.elementwise_affine:
            return output
        shape = tuple(int(s) for s in input.shape[-ndim:])
        dtype = default_float(self.dtype)
        sizes = [("the normalized shape", slice(None))]
        output = output * lazy_param(self, "scale", nn.initializers.ones, shape, dtype, sizes)
        if self.bias:
            output = output + lazy_param(self, "bias", nn.initializers.zeros, shape, dtype, sizes)
        return output
