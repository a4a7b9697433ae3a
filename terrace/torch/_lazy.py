"""Lazy layers: torch layers whose input sizes are read from the first input.

Each lazy layer stores its constructor arguments. On its first call it builds
the matching torch layer (``nn.Linear`` for :class:`LazyLinear`, and so on)
with the sizes of that input, takes over the built layer's state and class,
and runs it. From then on the object *is* that torch layer: no wrapper level
and no extra cost per call. ``isinstance(layer, torch.nn.Linear)`` is true
after the first call; ``state_dict()`` keys are those of the torch layer.
"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

import torch
from torch import nn

from terrace._errors import StateError
from terrace.torch._compile import dynamo_tracing, run_lazy_layer_eagerly
from terrace.torch._placement import ProbeMixin
from terrace.torch._restore import LOAD_STRICT as _LOAD_STRICT

__all__ = [
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LazyConv1d",
    "LazyConv2d",
    "LazyConv3d",
    "LazyLayer",
    "LazyLayerNorm",
    "LazyLinear",
    "LazyMultiheadAttention",
]

_BUILD_LOCK = threading.RLock()


class LazyLayer(ProbeMixin, nn.Module):
    """Base class of terrace's lazy layers.

    A subclass names the torch class it becomes in ``layer_class``, stores its
    constructor arguments with :meth:`_configure`, and implements
    :meth:`infer_sizes`, which returns the constructor arguments that the
    first input decides.
    """

    layer_class: ClassVar[type[nn.Module]]

    def _configure(self, device: Any, dtype: torch.dtype | None, **config: Any) -> None:
        nn.Module.__init__(self)
        self._init_probe(device, dtype)
        self._terrace_config = config
        self._terrace_pending: dict[str, torch.Tensor] = {}
        self._terrace_restoring = False
        self._terrace_path = type(self).__name__

    def infer_sizes(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Return the constructor arguments read from the first call's inputs."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._terrace_config.items())
        return f"{settings}, sizes inferred on first call"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if dynamo_tracing():
            return run_lazy_layer_eagerly(LazyLayer.forward, self, args, kwargs)
        with _BUILD_LOCK:
            if isinstance(self, LazyLayer):
                self._become(self._build(*args, **kwargs))
        return self.forward(*args, **kwargs)

    def _build(self, *args: Any, **kwargs: Any) -> nn.Module:
        sizes = self.infer_sizes(*args, **kwargs)
        layer = self.layer_class(**sizes, **self._terrace_config, **self._factory_kwargs)
        layer.train(self.training)
        if self._terrace_restoring:
            try:
                layer.load_state_dict(self._terrace_pending, strict=self._terrace_strict)
            except RuntimeError as error:
                raise StateError(
                    f"slot {self._terrace_path}: the state loaded before the first pass "
                    f"does not match the {type(layer).__name__} built from this input "
                    f"({sizes}): {str(error).strip()} Fix: load a checkpoint saved from "
                    "the same model code, run on inputs of the same feature sizes."
                ) from error
        return layer

    def _become(self, layer: nn.Module) -> None:
        hooks = {k: v for k, v in self.__dict__.items() if "hooks" in k}
        state = dict(layer.__dict__)
        state.update(hooks)
        # Replace the attributes in one step, then the class. A thread that
        # reads this layer meanwhile finds the lazy layer's attributes or the
        # built ones, never a half-cleared dict, and its forward still waits
        # on the lock above.
        object.__setattr__(self, "__dict__", state)
        self.__class__ = type(layer)  # type: ignore[assignment]

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        for key, tensor in self._terrace_pending.items():
            destination[prefix + key] = tensor

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        self._terrace_restoring = True
        self._terrace_strict = _LOAD_STRICT.get()
        for key, tensor in state_dict.items():
            if key.startswith(prefix):
                self._terrace_pending[key[len(prefix) :]] = tensor


def _last_dim(tensor: torch.Tensor, from_end: int, what: str, layer: str) -> int:
    if tensor.dim() < from_end:
        raise ValueError(
            f"{layer} needs an input with at least {from_end} dimensions to read "
            f"{what} from, got shape {tuple(tensor.shape)}."
        )
    return int(tensor.shape[-from_end])


class LazyLinear(LazyLayer):
    """``nn.Linear`` that reads ``in_features`` from the last input dimension.

    Args:
        out_features: size of each output sample.
        bias: whether to learn an additive bias.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.
    """

    layer_class = nn.Linear

    def __init__(
        self, out_features: int, bias: bool = True, device: Any = None, dtype: Any = None
    ) -> None:
        self._configure(device, dtype, out_features=out_features, bias=bias)

    def infer_sizes(self, input: torch.Tensor) -> dict[str, Any]:
        return {"in_features": _last_dim(input, 1, "in_features", "LazyLinear")}


class LazyLayerNorm(LazyLayer):
    """``nn.LayerNorm`` over the trailing dimensions of its first input.

    Args:
        eps: added to the variance for numerical stability (torch's 1e-5).
        elementwise_affine: whether to learn a per-element scale and shift.
        bias: whether the affine part has a shift.
        normalized_ndim: how many trailing dimensions to normalise over; 1
            normalises over the last dimension, 2 over the last two, and so on.

    Shape:
        - Input: ``(*, D_1, ..., D_k)`` with ``k = normalized_ndim``.
        - Output: same as the input.
    """

    layer_class = nn.LayerNorm

    def __init__(
        self,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        normalized_ndim: int = 1,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        if not isinstance(normalized_ndim, int) or normalized_ndim < 1:
            raise ValueError(
                f"LazyLayerNorm: normalized_ndim must be a positive int, got {normalized_ndim!r}."
            )
        self._configure(device, dtype, eps=eps, elementwise_affine=elementwise_affine, bias=bias)
        self.normalized_ndim = normalized_ndim

    def infer_sizes(self, input: torch.Tensor) -> dict[str, Any]:
        ndim = self.normalized_ndim
        _last_dim(input, ndim, "the normalized shape", "LazyLayerNorm")
        return {"normalized_shape": tuple(input.shape[-ndim:])}


class LazyMultiheadAttention(LazyLayer):
    """``nn.MultiheadAttention`` that reads ``embed_dim``, ``kdim`` and ``vdim``.

    The sizes come from the last dimension of the first call's query, key and
    value. The other arguments are those of ``nn.MultiheadAttention``.

    Shape:
        - query: ``(L, N, E)``, or ``(N, L, E)`` with ``batch_first=True``.
        - key, value: ``(S, N, E_k)`` and ``(S, N, E_v)`` in the same layout.
        - Output: ``(attn_output, attn_weights)`` as in ``nn.MultiheadAttention``.
    """

    layer_class = nn.MultiheadAttention

    def __init__(
        self,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        batch_first: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        self._configure(
            device,
            dtype,
            num_heads=num_heads,
            dropout=dropout,
            bias=bias,
            add_bias_kv=add_bias_kv,
            add_zero_attn=add_zero_attn,
            batch_first=batch_first,
        )

    def infer_sizes(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> dict[str, Any]:
        name = "LazyMultiheadAttention"
        embed_dim = _last_dim(query, 1, "embed_dim", name)
        num_heads = self._terrace_config["num_heads"]
        if embed_dim % num_heads:
            raise ValueError(
                f"{name}: the query's last dimension ({embed_dim}) must be divisible by "
                f"num_heads ({num_heads}). Fix: choose num_heads that divides {embed_dim}."
            )
        return {
            "embed_dim": embed_dim,
            "kdim": _last_dim(key, 1, "kdim", name),
            "vdim": _last_dim(value, 1, "vdim", name),
        }


class _LazyConv(LazyLayer):
    spatial_dims: ClassVar[int]

    def __init__(
        self,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        self._configure(
            device,
            dtype,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=padding_mode,
        )

    def infer_sizes(self, input: torch.Tensor) -> dict[str, Any]:
        channels_at = self.spatial_dims + 1
        return {
            "in_channels": _last_dim(input, channels_at, "in_channels", type(self).__name__)
        }


class LazyConv1d(_LazyConv):
    """``nn.Conv1d`` that reads ``in_channels`` from its input ``(N, C_in, L)`` or ``(C_in, L)``."""

    layer_class = nn.Conv1d
    spatial_dims = 1


class LazyConv2d(_LazyConv):
    """``nn.Conv2d`` that reads ``in_channels`` from its input ``(N, C_in, H, W)`` or ``(C_in, H, W)``."""

    layer_class = nn.Conv2d
    spatial_dims = 2


class LazyConv3d(_LazyConv):
    """``nn.Conv3d`` that reads ``in_channels`` from its input ``(N, C_in, D, H, W)``."""

    layer_class = nn.Conv3d
    spatial_dims = 3


class _LazyBatchNorm(LazyLayer):
    input_dims: ClassVar[tuple[int, ...]]

    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        self._configure(
            device,
            dtype,
            eps=eps,
            momentum=momentum,
            affine=affine,
            track_running_stats=track_running_stats,
        )

    def infer_sizes(self, input: torch.Tensor) -> dict[str, Any]:
        if input.dim() not in self.input_dims:
            raise ValueError(
                f"{type(self).__name__} expects an input with "
                f"{' or '.join(map(str, self.input_dims))} dimensions (channels at "
                f"dimension 1), got shape {tuple(input.shape)}."
            )
        return {"num_features": int(input.shape[1])}


class LazyBatchNorm1d(_LazyBatchNorm):
    """``nn.BatchNorm1d`` that reads ``num_features`` from its input ``(N, C)`` or ``(N, C, L)``."""

    layer_class = nn.BatchNorm1d
    input_dims = (2, 3)


class LazyBatchNorm2d(_LazyBatchNorm):
    """``nn.BatchNorm2d`` that reads ``num_features`` from its input ``(N, C, H, W)``."""

    layer_class = nn.BatchNorm2d
    input_dims = (4,)


class LazyBatchNorm3d(_LazyBatchNorm):
    """``nn.BatchNorm3d`` that reads ``num_features`` from its input ``(N, C, D, H, W)``."""

    layer_class = nn.BatchNorm3d
    input_dims = (5,)
