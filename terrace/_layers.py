"""Backend-neutral layer specifications.

A neutral layer is a class passed to ``make``: ``self.make(layers.Linear, 64)``.
Each backend resolves it to its own layer through the registry
(:func:`terrace.register_layer`), so one model source runs on every backend.
The constructor arguments are those of the torch layer of the same name,
minus the sizes read from the first input. Inputs are channels-first, as in
torch. Slots of neutral layers are named after the neutral class
(``Linear_0``) on every backend.
"""

import inspect
from typing import Any

from terrace._errors import TerraceError

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "Dropout",
    "Embedding",
    "LayerNorm",
    "Linear",
    "LAZY_LAYER_NAMES",
    "MultiheadAttention",
    "NeutralLayer",
]


class NeutralLayer:
    """Base class of neutral layer specifications.

    A subclass declares its constructor arguments in ``__init__``; ``make``
    checks the arguments it receives against that signature before the
    backend builds the layer. Register the implementations with
    :func:`terrace.register_layer`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "NeutralLayer":
        raise TerraceError(
            f"{cls.__name__} is a neutral layer specification, not a layer. Fix: pass "
            f"the class to make, as self.make({cls.__name__}, ...), inside the forward "
            "of a terrace.Model."
        )

    @classmethod
    def check_arguments(cls, args: tuple, kwargs: dict) -> None:
        """Raise ``TypeError`` naming the layer unless ``args`` fit its signature."""
        signature = inspect.signature(cls.__init__).replace(return_annotation=inspect.Signature.empty)
        try:
            signature.bind(None, *args, **kwargs)
        except TypeError as error:
            shown = str(signature).replace("(self, ", "(", 1)
            raise TypeError(f"make({cls.__name__}, ...): {error}; the signature is {cls.__name__}{shown}") from None


class Linear(NeutralLayer):
    """A linear layer; ``in_features`` is read from the last input dimension."""

    def __init__(self, out_features: int, bias: bool = True) -> None: ...


class LayerNorm(NeutralLayer):
    """Layer normalisation over the last ``normalized_ndim`` dimensions (eps 1e-5)."""

    def __init__(
        self,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        normalized_ndim: int = 1,
    ) -> None: ...


class MultiheadAttention(NeutralLayer):
    """Multi-head attention with torch's layout; embed, key and value sizes are inferred.

    Called as ``attention(query, key, value)``; returns ``(output, weights)``
    like ``torch.nn.MultiheadAttention``.
    """

    def __init__(
        self,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        batch_first: bool = False,
    ) -> None: ...


class Embedding(NeutralLayer):
    """A lookup table of ``num_embeddings`` vectors of size ``embedding_dim``."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None: ...


class _Conv(NeutralLayer):
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
    ) -> None: ...


class Conv1d(_Conv):
    """1-d convolution on ``(N, C_in, L)``; ``in_channels`` is inferred."""


class Conv2d(_Conv):
    """2-d convolution on ``(N, C_in, H, W)``; ``in_channels`` is inferred."""


class Conv3d(_Conv):
    """3-d convolution on ``(N, C_in, D, H, W)``; ``in_channels`` is inferred."""


class _BatchNorm(NeutralLayer):
    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ) -> None: ...


class BatchNorm1d(_BatchNorm):
    """Batch normalisation over ``(N, C)`` or ``(N, C, L)``; momentum as in torch."""


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over ``(N, C, H, W)``; momentum as in torch."""


class BatchNorm3d(_BatchNorm):
    """Batch normalisation over ``(N, C, D, H, W)``; momentum as in torch."""


class Dropout(NeutralLayer):
    """Zeroes each element with probability ``p`` in training mode."""

    def __init__(self, p: float = 0.5) -> None: ...


# The lazy layer each neutral layer becomes on a backend, by class name. Both
# backends name their lazy layers the same way (terrace.torch.LazyLinear,
# terrace.flax.LazyLinear), so one table serves every backend that does.
LAZY_LAYER_NAMES: dict[type, str] = {
    Linear: "LazyLinear",
    LayerNorm: "LazyLayerNorm",
    MultiheadAttention: "LazyMultiheadAttention",
    Conv1d: "LazyConv1d",
    Conv2d: "LazyConv2d",
    Conv3d: "LazyConv3d",
    BatchNorm1d: "LazyBatchNorm1d",
    BatchNorm2d: "LazyBatchNorm2d",
    BatchNorm3d: "LazyBatchNorm3d",
}
