"""Lazy batch normalisation with torch's channels-first layout and running statistics."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import flax.linen as nn

from terrace.flax._errors import slot_path
from terrace.flax._lazy import LazyLayer
from terrace.flax._mode import resolve_training
from terrace.flax._variables import default_float, lazy_param, lazy_variable, require_mutable

__all__ = ["LazyBatchNorm1d", "LazyBatchNorm2d", "LazyBatchNorm3d"]


class _LazyBatchNorm(LazyLayer):
    """Shared implementation of :class:`LazyBatchNorm1d`, ``2d`` and ``3d``."""

    input_dims: ClassVar[tuple[int, ...]]

    eps: float = 1e-5
    momentum: float | None = 0.1
    affine: bool = True
    track_running_stats: bool = True
    device: Any = None
    dtype: Any = None
    train: bool | None = dataclasses.field(default=None, kw_only=True)

    @nn.compact
    def __call__(self, input: jax.Array) -> jax.Array:
        self._check_input(input)
        channels = int(input.shape[1])
        axes = (0, *range(2, input.ndim))
        training = resolve_training(self.train)
        # The running update divides by (count - 1). init skips the update, so
        # it accepts a single example, the usual linen init input.
        if training and input.size // channels <= 1 and not self.is_initializing():
            raise ValueError(
                f"{slot_path(self)}: {type(self).__name__} in training mode needs more than one "
                f"value per channel, as in torch, got input shape {tuple(input.shape)}."
            )
        if training or not self.track_running_stats:
            mean = jnp.mean(input, axis=axes)
            variance = jnp.mean(jnp.square(input - _per_channel(mean, input.ndim)), axis=axes)
            if training and self.track_running_stats:
                self._update_running_stats(mean, variance, input.size // channels)
        else:
            mean, variance = self._running_stats(channels)
        output = (input - _per_channel(mean, input.ndim)) * _per_channel(
            jax.lax.rsqrt(variance + self.eps), input.ndim
        )
        if self.affine:
            dtype = default_float(self.dtype)
            sizes = [("num_features", 0)]
            scale = lazy_param(self, "scale", nn.initializers.ones, (channels,), dtype, sizes)
            bias = lazy_param(self, "bias", nn.initializers.zeros, (channels,), dtype, sizes)
            output = output * _per_channel(scale, input.ndim) + _per_channel(bias, input.ndim)
        return output

    @nn.nowrap
    def _check_input(self, input: jax.Array) -> None:
        if input.ndim not in self.input_dims:
            raise ValueError(
                f"{slot_path(self)}: {type(self).__name__} expects an input with "
                f"{' or '.join(map(str, self.input_dims))} dimensions (channels at "
                f"dimension 1), got shape {tuple(input.shape)}."
            )

    @nn.nowrap
    def _stat_variables(self, channels: int) -> tuple[nn.Variable[Any], nn.Variable[Any], nn.Variable[Any]]:
        dtype = default_float(self.dtype)
        sizes = [("num_features", 0)]
        mean = lazy_variable(
            self, "batch_stats", "mean", lambda: jnp.zeros((channels,), dtype), (channels,), sizes
        )
        var = lazy_variable(
            self, "batch_stats", "var", lambda: jnp.ones((channels,), dtype), (channels,), sizes
        )
        count = lazy_variable(
            self, "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32), (), ()
        )
        return mean, var, count

    @nn.nowrap
    def _running_stats(self, channels: int) -> tuple[jax.Array, jax.Array]:
        mean, var, _ = self._stat_variables(channels)
        return mean.value, var.value

    @nn.nowrap
    def _update_running_stats(self, mean: jax.Array, variance: jax.Array, count: int) -> None:
        running_mean, running_var, batches = self._stat_variables(mean.shape[0])
        if self.is_initializing():
            # init leaves the statistics at their initial values, as linen's
            # BatchNorm does, so the init batch is not counted twice.
            return
        require_mutable(
            self, "batch_stats", "this batch norm is in training mode and updates its running statistics"
        )
        batches.value = batches.value + 1
        if self.momentum is None:
            factor = 1.0 / batches.value.astype(mean.dtype)  # cumulative moving average
        else:
            factor = self.momentum
        # torch updates running_var with the unbiased variance and normalises
        # with the biased one.
        unbiased = variance * (count / (count - 1))
        running_mean.value = (1 - factor) * running_mean.value + factor * mean
        running_var.value = (1 - factor) * running_var.value + factor * unbiased


def _per_channel(values: jax.Array, ndim: int) -> jax.Array:
    """Reshape a per-channel vector to broadcast over a channels-first input."""
    return values.reshape((1, -1) + (1,) * (ndim - 2))


class LazyBatchNorm1d(_LazyBatchNorm):
    """``torch.nn.BatchNorm1d`` that reads ``num_features`` from its input ``(N, C)`` or ``(N, C, L)``.

    Channels are dimension 1, as in torch. In training mode the layer
    normalises with the batch mean and biased variance and updates the
    running statistics with the unbiased variance:
    ``running = (1 - momentum) * running + momentum * batch``, torch's
    meaning of ``momentum`` (torch's 0.1 is linen's ``momentum=0.9``);
    ``momentum=None`` keeps a cumulative average. In evaluation mode it
    normalises with the running statistics. Without ``track_running_stats``
    it always uses the batch statistics.

    The mode is ``train``, or the enclosing terrace module's mode when
    ``train`` is None (see :class:`terrace.flax.Module`). A training-mode
    ``apply`` must pass ``mutable=['batch_stats']``. ``init`` leaves the
    statistics at zeros and ones, as linen's ``BatchNorm`` does.

    Attributes:
        eps: added to the variance for numerical stability.
        momentum: weight of the batch statistics in the running update, or
            None for a cumulative moving average.
        affine: whether to learn a per-channel scale and shift.
        track_running_stats: whether to keep running statistics.
        device: must be None (see :class:`LazyLayer`).
        dtype: parameter dtype; None for JAX's default float type.
        train: training (True) or evaluation (False) mode; None inherits.

    Variables:
        - ``params/scale``: ``(num_features,)``, torch's ``weight``.
        - ``params/bias``: ``(num_features,)``, torch's ``bias``.
        - ``batch_stats/mean``: ``(num_features,)``, torch's ``running_mean``.
        - ``batch_stats/var``: ``(num_features,)``, torch's ``running_var``.
        - ``batch_stats/num_batches_tracked``: int32 scalar, torch's
          ``num_batches_tracked`` (int64 there).
    """

    input_dims = (2, 3)


class LazyBatchNorm2d(_LazyBatchNorm):
    """``torch.nn.BatchNorm2d`` that reads ``num_features`` from its input ``(N, C, H, W)``.

    Arguments, modes and variables are those of :class:`LazyBatchNorm1d`.
    """

    input_dims = (4,)


class LazyBatchNorm3d(_LazyBatchNorm):
    """``torch.nn.BatchNorm3d`` that reads ``num_features`` from its input ``(N, C, D, H, W)``.

    Arguments, modes and variables are those of :class:`LazyBatchNorm1d`.
    """

    input_dims = (5,)
