"""Lazy multi-head attention with torch's layout, head split, scaling and masks."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from terrace.flax._errors import slot_path
from terrace.flax._init import uniform_fan_in, xavier_normal, xavier_uniform
from terrace.flax._lazy import LazyLayer
from terrace.flax._mode import resolve_training
from terrace.flax._variables import default_float, input_size, lazy_param, require_rng

__all__ = ["LazyMultiheadAttention"]


class _Projection(nn.Module):
    """A dense projection ``x @ kernel + bias`` that names the size it reads in errors."""

    features: int
    use_bias: bool
    size_name: str
    kernel_init: Callable[..., jax.Array]
    param_dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (int(x.shape[-1]), self.features)
        kernel = lazy_param(
            self, "kernel", self.kernel_init, shape, self.param_dtype, [(self.size_name, 0)]
        )
        output = jnp.matmul(x, kernel)
        if self.use_bias:
            bias_shape = (self.features,)
            output = output + lazy_param(
                self, "bias", nn.initializers.zeros, bias_shape, self.param_dtype, ()
            )
        return output


def _additive_mask(mask: jax.Array | None, dtype: Any) -> jax.Array | None:
    """Turn a boolean mask (True = not allowed) into an additive one, as torch does."""
    if mask is None:
        return None
    if mask.dtype == jnp.bool_:
        return jnp.where(mask, -jnp.inf, 0.0).astype(dtype)
    return mask.astype(dtype)


def _pad_last(mask: jax.Array | None) -> jax.Array | None:
    """Append one allowed (zero) position to the last axis of an additive mask."""
    if mask is None:
        return None
    return jnp.pad(mask, [(0, 0)] * (mask.ndim - 1) + [(0, 1)])


def _split_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """(T, N, E) -> (N * num_heads, T, E // num_heads), torch's head order."""
    length, batch, embed = x.shape
    return x.reshape(length, batch * num_heads, embed // num_heads).transpose(1, 0, 2)


class LazyMultiheadAttention(LazyLayer):
    """``torch.nn.MultiheadAttention`` that reads ``embed_dim``, ``kdim`` and ``vdim``.

    The sizes come from the last dimension of the first call's query, key and
    value. The call takes torch's arguments and returns
    ``(attn_output, attn_weights)``: the weights are averaged over heads by
    default, and None with ``need_weights=False``. The computation is
    torch's: project, split the embedding into ``num_heads`` contiguous
    slices, scale the query by ``1 / sqrt(head_dim)``, add the masks, take
    the softmax, apply dropout to the weights in training mode, and project
    the concatenated heads. Boolean masks mark positions that may not be
    attended (True); float masks are added to the scores.

    ``is_causal`` is a hint, as in torch: it requires ``attn_mask``, which
    is the mask applied.

    Attributes:
        num_heads: number of heads; it must divide ``embed_dim``.
        dropout: dropout probability on the attention weights in training mode.
        bias: whether the input and output projections have biases.
        add_bias_kv: whether to append a learned ``bias_k``/``bias_v`` step
            to the key and value sequences.
        add_zero_attn: whether to append a zero step to key and value after
            the head split.
        batch_first: inputs and output are ``(N, L, E)`` instead of ``(L, N, E)``.
        device: must be None (see :class:`LazyLayer`).
        dtype: parameter dtype; None for JAX's default float type.
        train: training (True) or evaluation (False) mode for dropout; None
            inherits the enclosing terrace module's mode. Dropout in training
            mode needs ``rngs={'dropout': key}``.

    Variables (``params``); torch's ``in_proj_weight`` is the rows of
    ``q_proj_weight``, ``k_proj_weight`` and ``v_proj_weight`` stacked:
        - ``query/kernel``: ``(embed_dim, embed_dim)``, ``q_proj_weight.T``.
        - ``key/kernel``: ``(kdim, embed_dim)``, ``k_proj_weight.T``.
        - ``value/kernel``: ``(vdim, embed_dim)``, ``v_proj_weight.T``.
        - ``query/bias``, ``key/bias``, ``value/bias``: ``(embed_dim,)``,
          the three thirds of ``in_proj_bias``.
        - ``out/kernel``: ``(embed_dim, embed_dim)``, ``out_proj.weight.T``.
        - ``out/bias``: ``(embed_dim,)``, ``out_proj.bias``.
        - ``bias_k``, ``bias_v``: ``(1, 1, embed_dim)``, torch's ``bias_k`` and ``bias_v``.

    Shape:
        - query: ``(L, N, E)``, ``(N, L, E)`` with ``batch_first``, or ``(L, E)``.
        - key, value: ``(S, N, E_k)`` and ``(S, N, E_v)`` in the same layout.
        - key_padding_mask: ``(N, S)`` or ``(S,)``.
        - attn_mask: ``(L, S)`` or ``(N * num_heads, L, S)``.
        - Output: ``(L, N, E)`` in the query's layout, and weights
          ``(N, L, S)``, or ``(N, num_heads, L, S)`` unaveraged.
    """

    num_heads: int
    dropout: float = 0.0
    bias: bool = True
    add_bias_kv: bool = False
    add_zero_attn: bool = False
    batch_first: bool = False
    device: Any = None
    dtype: Any = None
    train: bool | None = dataclasses.field(default=None, kw_only=True)

    @nn.nowrap
    def _check_config(self) -> None:
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(
                f"LazyMultiheadAttention: num_heads must be a positive int, got {self.num_heads!r}."
            )
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(
                f"LazyMultiheadAttention: dropout must be in [0, 1], got {self.dropout!r}."
            )

    @nn.compact
    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        key_padding_mask: jax.Array | None = None,
        need_weights: bool = True,
        attn_mask: jax.Array | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[jax.Array, jax.Array | None]:
        batched = self._check_inputs(query, key, value, attn_mask, is_causal)
        if not batched:
            query, key, value = query[:, None], key[:, None], value[:, None]
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask[None]
        elif self.batch_first:
            query, key, value = (jnp.swapaxes(t, 0, 1) for t in (query, key, value))
        output, weights = self._attend(query, key, value, key_padding_mask, attn_mask)
        if not batched:
            output, weights = output[:, 0], weights[0]
        elif self.batch_first:
            output = jnp.swapaxes(output, 0, 1)
        if not need_weights:
            return output, None
        if average_attn_weights:
            weights = jnp.mean(weights, axis=-3)
        return output, weights

    @nn.nowrap
    def _check_inputs(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        attn_mask: jax.Array | None,
        is_causal: bool,
    ) -> bool:
        """Validate the inputs and return whether they have a batch dimension."""
        where = f"{slot_path(self)}: LazyMultiheadAttention"
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ValueError(
                f"{where} expects query, key and value with 3 dimensions (2 when unbatched), "
                f"got shapes {tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}."
            )
        embed_dim = input_size(query, 1, "embed_dim", self)
        if embed_dim % self.num_heads:
            raise ValueError(
                f"{where}: the query's last dimension ({embed_dim}) must be divisible by "
                f"num_heads ({self.num_heads}). Fix: choose num_heads that divides {embed_dim}."
            )
        if is_causal and attn_mask is None:
            raise ValueError(
                f"{where}: is_causal=True is a hint that attn_mask is causal, as in torch, and "
                "needs attn_mask. Fix: pass the causal mask as attn_mask."
            )
        return query.ndim == 3

    @nn.nowrap
    def _attend(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        key_padding_mask: jax.Array | None,
        attn_mask: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array]:
        """Attend in torch's (L, N, E) layout; return the output and (N, H, L, S) weights."""
        length, batch, embed_dim = query.shape
        heads = self.num_heads
        q, k, v = self._project_inputs(query, key, value)
        attn_mask = _additive_mask(attn_mask, q.dtype)
        key_padding_mask = _additive_mask(key_padding_mask, q.dtype)
        if self.add_bias_kv:
            k, v = self._append_bias_kv(k, v)
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        q, k, v = (_split_heads(t, heads) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = jnp.zeros((k.shape[0], 1, k.shape[2]), k.dtype)
            k = jnp.concatenate([k, zeros], axis=1)
            v = jnp.concatenate([v, zeros], axis=1)
            attn_mask, key_padding_mask = _pad_last(attn_mask), _pad_last(key_padding_mask)
        scores = jnp.matmul(q * math.sqrt(1.0 / q.shape[-1]), jnp.swapaxes(k, 1, 2))
        mask = _merge_masks(attn_mask, key_padding_mask, heads)
        if mask is not None:
            scores = scores + mask
        weights = self._dropout(jax.nn.softmax(scores, axis=-1))
        output = jnp.matmul(weights, v).transpose(1, 0, 2).reshape(length, batch, embed_dim)
        output = self._projection("out", embed_dim, "embed_dim", uniform_fan_in(embed_dim))(output)
        return output, weights.reshape(batch, heads, length, -1)

    @nn.nowrap
    def _project_inputs(
        self, query: jax.Array, key: jax.Array, value: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        embed_dim, kdim, vdim = query.shape[-1], key.shape[-1], value.shape[-1]
        if kdim == vdim == embed_dim:
            # torch draws one Xavier matrix of shape (3 * embed_dim, embed_dim)
            inits = [xavier_uniform(embed_dim, 3 * embed_dim)] * 3
        else:
            inits = [xavier_uniform(size, embed_dim) for size in (embed_dim, kdim, vdim)]
        names = [("query", "embed_dim"), ("key", "kdim"), ("value", "vdim")]
        return tuple(  # type: ignore[return-value]
            self._projection(name, embed_dim, size_name, init)(x)
            for (name, size_name), init, x in zip(names, inits, (query, key, value))
        )

    @nn.nowrap
    def _projection(
        self, name: str, features: int, size_name: str, init: Callable[..., jax.Array]
    ) -> _Projection:
        return _Projection(
            features, self.bias, size_name, init, default_float(self.dtype), name=name
        )

    @nn.nowrap
    def _append_bias_kv(self, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        embed_dim = k.shape[-1]
        dtype = default_float(self.dtype)
        init = xavier_normal(embed_dim, embed_dim)
        shape = (1, 1, embed_dim)
        sizes = [("embed_dim", 2)]
        bias_k = lazy_param(self, "bias_k", init, shape, dtype, sizes)
        bias_v = lazy_param(self, "bias_v", init, shape, dtype, sizes)
        batch = k.shape[1]
        k = jnp.concatenate([k, jnp.broadcast_to(bias_k, (1, batch, embed_dim))], axis=0)
        v = jnp.concatenate([v, jnp.broadcast_to(bias_v, (1, batch, embed_dim))], axis=0)
        return k, v

    @nn.nowrap
    def _dropout(self, weights: jax.Array) -> jax.Array:
        # NOTE: the mask comes from JAX's RNG, so it matches torch's only in
        # distribution, never element by element.
        rate = self.dropout
        if rate == 0.0 or not resolve_training(self.train):
            return weights
        if rate == 1.0:
            return jnp.zeros_like(weights)
        require_rng(self, "dropout", f"attention dropout ({rate}) is on in training mode")
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, weights.shape)
        return jnp.where(keep, weights / (1.0 - rate), 0.0)


def _merge_masks(
    attn_mask: jax.Array | None, key_padding_mask: jax.Array | None, heads: int
) -> jax.Array | None:
    """Combine the additive masks into one that broadcasts over (N * H, L, S) scores."""
    if key_padding_mask is not None:
        batch, source = key_padding_mask.shape
        per_head = jnp.broadcast_to(key_padding_mask[:, None, None, :], (batch, heads, 1, source))
        key_padding_mask = per_head.reshape(batch * heads, 1, source)
    if attn_mask is not None and attn_mask.ndim == 2:
        attn_mask = attn_mask[None]
    if attn_mask is None:
        return key_padding_mask
    if key_padding_mask is None:
        return attn_mask
    return attn_mask + key_padding_mask
