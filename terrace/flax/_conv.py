"""Lazy convolutions with torch's channels-first layout, padding and defaults."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import flax.linen as nn

from terrace.flax._init import uniform_fan_in
from terrace.flax._lazy import LazyLayer
from terrace.flax._variables import LogicalAxes, check_logical_axes, default_float, lazy_param

__all__ = ["LazyConv1d", "LazyConv2d", "LazyConv3d"]

# torch padding_mode -> jnp.pad mode; "zeros" pads inside the convolution.
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}

# lax.conv_general_dilated layouts: input and output channels first as in
# torch, kernel spatial-first as in linen (HWIO).
_DIMENSION_NUMBERS = {
    1: ("NCH", "HIO", "NCH"),
    2: ("NCHW", "HWIO", "NCHW"),
    3: ("NCDHW", "DHWIO", "NCDHW"),
}


def _int_tuple(value: Any, count: int, argument: str, layer: str) -> tuple[int, ...]:
    values = (value,) * count if isinstance(value, int) else tuple(value)
    if len(values) != count or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{layer}: {argument} must be an int or {count} ints, got {value!r}.")
    return values


class _LazyConv(LazyLayer):
    """Shared implementation of :class:`LazyConv1d`, :class:`LazyConv2d` and :class:`LazyConv3d`."""

    spatial_dims: ClassVar[int]

    out_channels: int
    kernel_size: int | tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] | str = 0
    dilation: int | tuple[int, ...] = 1
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"
    device: Any = None
    dtype: Any = None
    kernel_axes: LogicalAxes | None = dataclasses.field(default=None, kw_only=True)
    bias_axes: LogicalAxes | None = dataclasses.field(default=None, kw_only=True)

    @nn.nowrap
    def _check_config(self) -> None:
        layer = type(self).__name__
        n = self.spatial_dims
        spatial = tuple(f"kernel_size[{i}]" for i in range(n))
        kernel_dims = (*spatial, "in_channels // groups", "out_channels")
        check_logical_axes(layer, "kernel_axes", self.kernel_axes, kernel_dims)
        check_logical_axes(layer, "bias_axes", self.bias_axes, ("out_channels",))
        for argument in ("kernel_size", "stride", "dilation"):
            value = getattr(self, argument)
            if min(_int_tuple(value, n, argument, layer)) < 1:
                raise ValueError(f"{layer}: {argument} must be positive, got {value!r}.")
        if isinstance(self.padding, str):
            if self.padding not in ("same", "valid"):
                raise ValueError(
                    f"{layer}: padding must be 'same', 'valid', an int or {n} ints, "
                    f"got {self.padding!r}."
                )
            if self.padding == "same" and set(_int_tuple(self.stride, n, "stride", layer)) != {1}:
                raise ValueError(
                    f"{layer}: padding='same' needs stride 1, as in torch, got "
                    f"stride={self.stride!r}. Fix: give the padding as ints."
                )
        elif min(_int_tuple(self.padding, n, "padding", layer)) < 0:
            raise ValueError(f"{layer}: padding must not be negative, got {self.padding!r}.")
        if self.padding_mode not in _PAD_MODES:
            raise ValueError(
                f"{layer}: padding_mode must be one of {', '.join(map(repr, _PAD_MODES))}, "
                f"got {self.padding_mode!r}."
            )
        if not isinstance(self.groups, int) or self.groups < 1 or self.out_channels % self.groups:
            raise ValueError(
                f"{layer}: groups must be a positive int that divides out_channels "
                f"({self.out_channels}), got {self.groups!r}."
            )

    @nn.nowrap
    def _padding_pairs(self) -> list[tuple[int, int]]:
        """Return (before, after) padding per spatial dimension, as torch pads."""
        layer = type(self).__name__
        n = self.spatial_dims
        if self.padding == "valid":
            return [(0, 0)] * n
        if self.padding == "same":
            # torch puts the odd element of the total padding at the end
            kernel = _int_tuple(self.kernel_size, n, "kernel_size", layer)
            dilation = _int_tuple(self.dilation, n, "dilation", layer)
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return [(t // 2, t - t // 2) for t in totals]
        return [(p, p) for p in _int_tuple(self.padding, n, "padding", layer)]

    @nn.compact
    def __call__(self, input: jax.Array) -> jax.Array:
        layer = type(self).__name__
        n = self.spatial_dims
        if input.ndim not in (n + 1, n + 2):
            raise ValueError(
                f"{layer} expects an input (N, C_in, {n} spatial dims) or (C_in, {n} spatial "
                f"dims), got shape {tuple(input.shape)}."
            )

        x = input if input.ndim == n + 2 else input[None]
        in_channels = int(x.shape[1])
        if in_channels % self.groups:
            raise ValueError(
                f"{layer}: the input has {in_channels} channels, which groups="
                f"{self.groups} does not divide."
            )

        kernel = self._kernel(in_channels)
        pads = self._padding_pairs()
        if self.padding_mode != "zeros":
            x = jnp.pad(x, [(0, 0), (0, 0), *pads], mode=_PAD_MODES[self.padding_mode])
            pads = [(0, 0)] * n

        dtype = jnp.promote_types(x.dtype, kernel.dtype)
        output = jax.lax.conv_general_dilated(
            x.astype(dtype),
            kernel.astype(dtype),
            window_strides=_int_tuple(self.stride, n, "stride", layer),
            padding=pads,
            rhs_dilation=_int_tuple(self.dilation, n, "dilation", layer),
            dimension_numbers=_DIMENSION_NUMBERS[n],
            feature_group_count=self.groups,
        )

        if self.bias:
            fan_in = kernel.size // self.out_channels
            bias = lazy_param(
                self,
                "bias",
                uniform_fan_in(fan_in),
                (self.out_channels,),
                kernel.dtype,
                (),
                self.bias_axes,
            )
            output = output + bias.reshape((1, -1) + (1,) * n)
        return output if input.ndim == n + 2 else output[0]

    @nn.nowrap
    def _kernel(self, in_channels: int) -> jax.Array:
        kernel_size = _int_tuple(self.kernel_size, self.spatial_dims, "kernel_size", type(self).__name__)
        per_group = in_channels // self.groups
        shape = (*kernel_size, per_group, self.out_channels)
        init = uniform_fan_in(per_group * math.prod(kernel_size))
        sizes = [("in_channels // groups", self.spatial_dims)]
        dtype = default_float(self.dtype)
        return lazy_param(self, "kernel", init, shape, dtype, sizes, self.kernel_axes)


class LazyConv1d(_LazyConv):
    """``torch.nn.Conv1d`` that reads ``in_channels`` from its input ``(N, C_in, L)`` or ``(C_in, L)``.

    Input and output are channels first, as in torch. ``padding`` is an
    int or a 1-tuple that pads both sides, ``'valid'`` for none, or
    ``'same'``. ``'same'`` needs stride 1 and pads ``dilation *
    (kernel_size - 1)`` in total, with the odd element at the end as torch
    does. ``padding_mode`` ``'reflect'``, ``'replicate'`` or ``'circular'``
    pads the input first, like torch. The other arguments are those of
    ``torch.nn.Conv1d``. ``device`` must be None, and ``dtype`` is the
    parameter dtype (see :class:`LazyLayer`). The keyword-only
    ``kernel_axes`` (3 names, one per kernel dimension) and
    ``bias_axes`` (1 name) give the variables logical axis names, as on
    :class:`LazyLinear`.

    Variables (``params``):
        - ``kernel``: ``(k_L, in_channels // groups, out_channels)``, linen's
          layout; ``kernel = weight.permute(2, 1, 0)`` for torch's ``weight``.
        - ``bias``: ``(out_channels,)``, torch's ``bias``.
    """

    spatial_dims = 1


class LazyConv2d(_LazyConv):
    """``torch.nn.Conv2d`` that reads ``in_channels`` from its input ``(N, C_in, H, W)`` or ``(C_in, H, W)``.

    Input and output are channels first, as in torch. ``padding`` is an
    int or a pair that pads both sides of H and of W, ``'valid'`` for none,
    or ``'same'``. ``'same'`` needs stride 1 and pads ``dilation *
    (kernel_size - 1)`` in total per dimension, with the odd element at the
    end as torch does. ``padding_mode`` ``'reflect'``, ``'replicate'`` or
    ``'circular'`` pads the input first, like torch. The other arguments are
    those of ``torch.nn.Conv2d``. ``device`` must be None, and ``dtype`` is
    the parameter dtype (see :class:`LazyLayer`). The keyword-only
    ``kernel_axes`` (4 names, one per kernel dimension) and
    ``bias_axes`` (1 name) give the variables logical axis names, as on
    :class:`LazyLinear`.

    Variables (``params``):
        - ``kernel``: ``(k_H, k_W, in_channels // groups, out_channels)``,
          linen's layout; ``kernel = weight.permute(2, 3, 1, 0)`` for torch's
          ``weight``.
        - ``bias``: ``(out_channels,)``, torch's ``bias``.
    """

    spatial_dims = 2


class LazyConv3d(_LazyConv):
    """``torch.nn.Conv3d`` that reads ``in_channels`` from its input ``(N, C_in, D, H, W)`` or ``(C_in, D, H, W)``.

    Input and output are channels first, as in torch. ``padding`` is an
    int or a triple that pads both sides of each dimension, ``'valid'`` for
    none, or ``'same'``. ``'same'`` needs stride 1 and pads ``dilation *
    (kernel_size - 1)`` in total per dimension, with the odd element at the
    end as torch does. ``padding_mode`` ``'reflect'``, ``'replicate'`` or
    ``'circular'`` pads the input first, like torch. The other arguments are
    those of ``torch.nn.Conv3d``. ``device`` must be None, and ``dtype`` is
    the parameter dtype (see :class:`LazyLayer`). The keyword-only
    ``kernel_axes`` (5 names, one per kernel dimension) and
    ``bias_axes`` (1 name) give the variables logical axis names, as on
    :class:`LazyLinear`.

    Variables (``params``):
        - ``kernel``: ``(k_D, k_H, k_W, in_channels // groups, out_channels)``,
          linen's layout; ``kernel = weight.permute(2, 3, 4, 1, 0)`` for
          torch's ``weight``.
        - ``bias``: ``(out_channels,)``, torch's ``bias``.
    """

    spatial_dims = 3
