"""terrace.flax lazy layers against their torch namesakes on identical weights.

Each case builds the torch layer, copies its weights with the helpers in
``flax_weights``, and requires the flax output to be within 1e-5 (float32,
max abs difference). Each case also checks that ``init`` makes variables of
the layout the helpers assume.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from torch import nn as tnn

import terrace
import terrace.flax as tflax
from flax_weights import (
    attention_variables,
    batch_norm_variables,
    conv_variables,
    layer_norm_variables,
    linear_variables,
    to_jax,
    to_numpy,
)

TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def full_precision() -> Iterator[None]:
    """Run JAX matmuls and convolutions in full float32, as torch does on CPU."""
    torch.manual_seed(0)
    with jax.default_matmul_precision("highest"):
        yield


def max_difference(flax_value: Any, torch_value: Any) -> float:
    return float(np.max(np.abs(to_numpy(flax_value) - to_numpy(torch_value))))


def shapes(variables: Any) -> Any:
    return jax.tree_util.tree_map(jnp.shape, jax.tree_util.tree_map(jnp.asarray, variables))


def check_layout(layer: nn.Module, ported: dict, *inputs: Any, **kwargs: Any) -> None:
    """Check that init makes the variables, with the shapes, that the weight helpers make."""
    created = jax.eval_shape(lambda: layer.init(jax.random.key(0), *inputs, **kwargs))
    assert jax.tree_util.tree_map(lambda s: s.shape, created) == shapes(ported)


# -- Linear ---------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(bias: bool) -> None:
    torch_layer = tnn.Linear(5, 4, bias=bias)
    x = torch.randn(2, 3, 5)
    variables = linear_variables(torch_layer)
    layer = tflax.LazyLinear(4, bias=bias)

    check_layout(layer, variables, to_jax(x))
    output = layer.apply(variables, to_jax(x))

    assert output.shape == (2, 3, 4)
    assert max_difference(output, torch_layer(x)) <= TOLERANCE


def test_linear_init_uses_torch_bound() -> None:
    variables = tflax.LazyLinear(64).init(jax.random.key(1), jnp.ones((1, 16)))
    bound = 1 / np.sqrt(16)

    assert float(jnp.max(jnp.abs(variables["params"]["kernel"]))) <= bound
    assert float(jnp.max(jnp.abs(variables["params"]["bias"]))) <= bound
    assert float(jnp.max(jnp.abs(variables["params"]["kernel"]))) > 0.8 * bound


# -- LayerNorm ------------------------------------------------------------------


def near_constant_rows() -> torch.Tensor:
    """Rows whose spread is close to eps (around 0) or small next to their mean (around 1)."""
    small = torch.randn(3, 8) * 1e-3
    offset = 1.0 + torch.randn(3, 8) * 0.1
    return torch.cat([small, offset])


def randomize_affine(layer: tnn.Module) -> None:
    with torch.no_grad():
        if getattr(layer, "weight", None) is not None:
            layer.weight.uniform_(0.5, 1.5)
        if getattr(layer, "bias", None) is not None:
            layer.bias.uniform_(-0.5, 0.5)


def test_layer_norm_matches_torch_on_near_constant_rows() -> None:
    torch_layer = tnn.LayerNorm(8)
    randomize_affine(torch_layer)
    x = near_constant_rows()
    variables = layer_norm_variables(torch_layer)
    layer = tflax.LazyLayerNorm()

    check_layout(layer, variables, to_jax(x))
    output = layer.apply(variables, to_jax(x))

    assert max_difference(output, torch_layer(x)) <= TOLERANCE


def test_linen_layer_norm_defaults_differ_on_these_rows() -> None:
    # Proves the input above is a trap: linen's eps=1e-6 and fast variance miss it.
    torch_layer = tnn.LayerNorm(8, elementwise_affine=False)
    x = near_constant_rows()
    linen_layer = nn.LayerNorm(use_bias=False, use_scale=False)

    output = linen_layer.apply({}, to_jax(x))

    assert max_difference(output, torch_layer(x)) > 1e-3


@pytest.mark.parametrize(
    ("options", "flax_options"),
    [
        ({"elementwise_affine": False}, {"elementwise_affine": False}),
        ({"bias": False}, {"bias": False}),
        ({"eps": 1e-3}, {"eps": 1e-3}),
    ],
    ids=["no-affine", "no-bias", "eps"],
)
def test_layer_norm_options_match_torch(options: dict, flax_options: dict) -> None:
    torch_layer = tnn.LayerNorm(8, **options)
    randomize_affine(torch_layer)
    x = near_constant_rows()
    variables = layer_norm_variables(torch_layer)
    layer = tflax.LazyLayerNorm(**flax_options)

    check_layout(layer, variables, to_jax(x))
    output = layer.apply(variables, to_jax(x))

    assert max_difference(output, torch_layer(x)) <= TOLERANCE


def test_layer_norm_two_trailing_dims() -> None:
    torch_layer = tnn.LayerNorm((4, 5))
    randomize_affine(torch_layer)
    x = torch.randn(3, 4, 5)
    variables = layer_norm_variables(torch_layer)
    layer = tflax.LazyLayerNorm(normalized_ndim=2)

    check_layout(layer, variables, to_jax(x))
    output = layer.apply(variables, to_jax(x))

    assert max_difference(output, torch_layer(x)) <= TOLERANCE


def test_layer_norm_rejects_bad_normalized_ndim() -> None:
    with pytest.raises(ValueError, match="normalized_ndim"):
        tflax.LazyLayerNorm(normalized_ndim=0)


# -- MultiheadAttention -----------------------------------------------------------

EMBED, HEADS, TARGET, SOURCE, BATCH = 8, 2, 3, 4, 2

ATTENTION_CASES: dict[str, dict[str, Any]] = {
    "seq-first": {},
    "batch-first": {"batch_first": True},
    "kdim-vdim": {"kdim": 6, "vdim": 3},
    "kdim-vdim-batch-first": {"kdim": 6, "vdim": 3, "batch_first": True},
    "bias-kv": {"add_bias_kv": True},
    "zero-attn": {"add_zero_attn": True},
    "bias-kv-zero-attn-masks": {
        "add_bias_kv": True,
        "add_zero_attn": True,
        "key_padding_mask": "float",
        "attn_mask": "float",
    },
    "no-bias": {"bias": False},
    "padding-mask": {"key_padding_mask": "bool"},
    "float-padding-mask": {"key_padding_mask": "float"},
    "bool-attn-mask": {"attn_mask": "bool"},
    "3d-attn-mask": {"attn_mask": "float3d"},
    "per-head-weights": {"average_attn_weights": False},
    "no-weights": {"need_weights": False},
    "unbatched": {"unbatched": True, "key_padding_mask": "bool", "attn_mask": "bool"},
    "causal-hint": {"attn_mask": "causal", "is_causal": True},
}

LAYER_OPTIONS = ("batch_first", "add_bias_kv", "add_zero_attn", "bias")
CALL_OPTIONS = ("average_attn_weights", "need_weights", "is_causal")


def attention_masks(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Return torch masks for a case; row 0 of each mask keeps one position open."""
    masks = {}
    padding = case.get("key_padding_mask")
    if padding is not None:
        blocked = torch.zeros(BATCH, SOURCE, dtype=torch.bool)
        blocked[0, -1] = True
        blocked[1, 0] = True
        masks["key_padding_mask"] = blocked if padding == "bool" else blocked.float() * -2.5
    kind = case.get("attn_mask")
    if kind == "float":
        masks["attn_mask"] = torch.randn(TARGET, SOURCE)
    elif kind == "bool":
        blocked = torch.zeros(TARGET, SOURCE, dtype=torch.bool)
        blocked[1, 2] = True
        masks["attn_mask"] = blocked
    elif kind == "float3d":
        masks["attn_mask"] = torch.randn(BATCH * HEADS, TARGET, SOURCE)
    elif kind == "causal":
        masks["attn_mask"] = torch.triu(torch.ones(TARGET, SOURCE, dtype=torch.bool), diagonal=1)
    if case.get("unbatched") and "key_padding_mask" in masks:
        masks["key_padding_mask"] = masks["key_padding_mask"][0]
    return masks


def attention_inputs(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    kdim, vdim = case.get("kdim", EMBED), case.get("vdim", EMBED)
    if case.get("unbatched"):
        return torch.randn(TARGET, EMBED), torch.randn(SOURCE, kdim), torch.randn(SOURCE, vdim)
    if case.get("batch_first"):
        return (
            torch.randn(BATCH, TARGET, EMBED),
            torch.randn(BATCH, SOURCE, kdim),
            torch.randn(BATCH, SOURCE, vdim),
        )
    return (
        torch.randn(TARGET, BATCH, EMBED),
        torch.randn(SOURCE, BATCH, kdim),
        torch.randn(SOURCE, BATCH, vdim),
    )


@pytest.mark.parametrize("case_id", list(ATTENTION_CASES))
def test_attention_matches_torch(case_id: str) -> None:
    case = ATTENTION_CASES[case_id]
    layer_options = {k: case[k] for k in LAYER_OPTIONS if k in case}
    call_options = {k: case[k] for k in CALL_OPTIONS if k in case}
    torch_layer = tnn.MultiheadAttention(
        EMBED, HEADS, kdim=case.get("kdim"), vdim=case.get("vdim"), **layer_options
    )
    if case.get("bias", True):
        # torch starts these biases at zero, which would hide a misplaced bias
        with torch.no_grad():
            torch_layer.in_proj_bias.normal_()
            torch_layer.out_proj.bias.normal_()
    inputs = attention_inputs(case)
    masks = attention_masks(case)
    variables = attention_variables(torch_layer)
    layer = tflax.LazyMultiheadAttention(HEADS, **layer_options)
    flax_inputs = [to_jax(t) for t in inputs]
    flax_masks = {k: to_jax(v) for k, v in masks.items()}

    check_layout(layer, variables, *flax_inputs, **flax_masks, **call_options)
    output, weights = layer.apply(variables, *flax_inputs, **flax_masks, **call_options)
    torch_output, torch_weights = torch_layer(*inputs, **masks, **call_options)

    assert output.shape == tuple(torch_output.shape)
    assert max_difference(output, torch_output) <= TOLERANCE
    if torch_weights is None:
        assert weights is None
    else:
        assert weights.shape == tuple(torch_weights.shape)
        assert max_difference(weights, torch_weights) <= TOLERANCE


def test_attention_rejects_indivisible_heads() -> None:
    layer = tflax.LazyMultiheadAttention(3)
    x = jnp.ones((2, 1, 8))

    with pytest.raises(ValueError, match="divisible by num_heads"):
        layer.init(jax.random.key(0), x, x, x)


def test_attention_causal_hint_needs_mask() -> None:
    layer = tflax.LazyMultiheadAttention(2)
    x = jnp.ones((2, 1, 8))

    with pytest.raises(ValueError, match="needs attn_mask"):
        layer.init(jax.random.key(0), x, x, x, is_causal=True)


# -- Convolutions -----------------------------------------------------------------

CONV_CASES: dict[str, tuple[int, dict[str, Any], tuple[int, ...]]] = {
    # id: (spatial dims, torch Conv arguments after in/out channels, input shape)
    "1d-stride-dilation": (1, {"kernel_size": 3, "stride": 2, "padding": 2, "dilation": 2}, (2, 4, 11)),
    "1d-same-even-kernel": (1, {"kernel_size": 4, "padding": "same"}, (2, 4, 9)),
    "1d-valid-groups": (1, {"kernel_size": 3, "padding": "valid", "groups": 2}, (2, 4, 9)),
    "1d-unbatched": (1, {"kernel_size": 3, "padding": 1}, (4, 7)),
    "2d-asymmetric": (2, {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 2)}, (2, 4, 9, 7)),
    "2d-same-dilated": (2, {"kernel_size": (4, 3), "padding": "same", "dilation": (1, 2)}, (1, 4, 8, 9)),
    "2d-reflect": (2, {"kernel_size": 3, "padding": (1, 2), "padding_mode": "reflect"}, (2, 4, 6, 7)),
    "2d-replicate": (2, {"kernel_size": 3, "padding": 1, "padding_mode": "replicate"}, (2, 4, 6, 7)),
    "2d-circular-same": (2, {"kernel_size": 4, "padding": "same", "padding_mode": "circular"}, (2, 4, 6, 7)),
    "2d-no-bias-unbatched": (2, {"kernel_size": 3, "bias": False}, (4, 6, 7)),
    "3d-asymmetric": (3, {"kernel_size": (2, 3, 2), "stride": (1, 2, 1), "padding": (1, 0, 2)}, (1, 4, 4, 5, 6)),
}

TORCH_CONVS = {1: tnn.Conv1d, 2: tnn.Conv2d, 3: tnn.Conv3d}
FLAX_CONVS = {1: tflax.LazyConv1d, 2: tflax.LazyConv2d, 3: tflax.LazyConv3d}


# torch warns that it copies the input to pad an even kernel for 'same'.
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("case_id", list(CONV_CASES))
def test_conv_matches_torch(case_id: str) -> None:
    spatial, options, input_shape = CONV_CASES[case_id]
    torch_layer = TORCH_CONVS[spatial](4, 6, **options)
    x = torch.randn(*input_shape)
    variables = conv_variables(torch_layer)
    layer = FLAX_CONVS[spatial](6, **options)

    check_layout(layer, variables, to_jax(x))
    output = layer.apply(variables, to_jax(x))
    torch_output = torch_layer(x)

    assert output.shape == tuple(torch_output.shape)
    assert max_difference(output, torch_output) <= TOLERANCE


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kernel_size": 3, "stride": 2, "padding": "same"}, "needs stride 1"),
        ({"kernel_size": 3, "padding": "full"}, "padding must be"),
        ({"kernel_size": 3, "padding_mode": "mirror"}, "padding_mode must be"),
        ({"kernel_size": (3, 3, 3)}, "kernel_size must be"),
        ({"kernel_size": 3, "groups": 4}, "groups must be"),
    ],
    ids=["same-strided", "bad-padding", "bad-mode", "kernel-length", "groups"],
)
def test_conv_rejects_torch_invalid_arguments(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tflax.LazyConv2d(6, **options)


# -- BatchNorm --------------------------------------------------------------------

BATCH_NORM_CASES: dict[str, tuple[int, tuple[int, ...], dict[str, Any]]] = {
    # id: (spatial dims, input shape, torch BatchNorm arguments after num_features)
    "1d-flat": (1, (6, 4), {}),
    "1d-sequence": (1, (3, 4, 5), {}),
    "2d": (2, (3, 4, 3, 2), {}),
    "3d": (3, (2, 4, 2, 3, 2), {}),
    "2d-momentum": (2, (3, 4, 3, 2), {"momentum": 0.3, "eps": 1e-3}),
    "2d-cumulative": (2, (3, 4, 3, 2), {"momentum": None}),
    "2d-no-affine": (2, (3, 4, 3, 2), {"affine": False}),
}

TORCH_BATCH_NORMS = {1: tnn.BatchNorm1d, 2: tnn.BatchNorm2d, 3: tnn.BatchNorm3d}
FLAX_BATCH_NORMS = {1: tflax.LazyBatchNorm1d, 2: tflax.LazyBatchNorm2d, 3: tflax.LazyBatchNorm3d}


def seeded_batch_norm(spatial: int, options: dict[str, Any]) -> tnn.Module:
    layer = TORCH_BATCH_NORMS[spatial](4, **options)
    randomize_affine(layer)
    if layer.track_running_stats:
        with torch.no_grad():
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    return layer


@pytest.mark.parametrize("case_id", list(BATCH_NORM_CASES))
def test_batch_norm_training_matches_torch(case_id: str) -> None:
    spatial, input_shape, options = BATCH_NORM_CASES[case_id]
    torch_layer = seeded_batch_norm(spatial, options)
    variables = batch_norm_variables(torch_layer)
    layer = FLAX_BATCH_NORMS[spatial](**options, train=True)
    check_layout(layer, variables, jnp.zeros(input_shape))

    for step in range(2):
        x = torch.randn(*input_shape) * 2 + step
        output, updates = layer.apply(variables, to_jax(x), mutable=["batch_stats"])
        variables = {**variables, **updates}
        torch_output = torch_layer(x)

        assert max_difference(output, torch_output) <= TOLERANCE
        stats = variables["batch_stats"]
        assert max_difference(stats["mean"], torch_layer.running_mean) <= TOLERANCE
        assert max_difference(stats["var"], torch_layer.running_var) <= TOLERANCE
        assert int(stats["num_batches_tracked"]) == int(torch_layer.num_batches_tracked)


@pytest.mark.parametrize("case_id", list(BATCH_NORM_CASES))
def test_batch_norm_evaluation_matches_torch(case_id: str) -> None:
    spatial, input_shape, options = BATCH_NORM_CASES[case_id]
    torch_layer = seeded_batch_norm(spatial, options).eval()
    variables = batch_norm_variables(torch_layer)
    layer = FLAX_BATCH_NORMS[spatial](**options, train=False)
    x = torch.randn(*input_shape)

    output = layer.apply(variables, to_jax(x))

    assert max_difference(output, torch_layer(x)) <= TOLERANCE


@pytest.mark.parametrize("train", [True, False])
def test_batch_norm_without_running_stats(train: bool) -> None:
    torch_layer = seeded_batch_norm(2, {"track_running_stats": False}).train(train)
    variables = batch_norm_variables(torch_layer)
    layer = tflax.LazyBatchNorm2d(track_running_stats=False, train=train)
    x = torch.randn(3, 4, 2, 2)

    check_layout(layer, variables, to_jax(x))
    output = layer.apply(variables, to_jax(x))

    assert "batch_stats" not in variables
    assert max_difference(output, torch_layer(x)) <= TOLERANCE


def test_batch_norm_rejects_wrong_rank() -> None:
    layer = tflax.LazyBatchNorm2d()

    with pytest.raises(ValueError, match="4 dimensions"):
        layer.init(jax.random.key(0), jnp.ones((2, 3, 4)))


def test_batch_norm_training_needs_two_values() -> None:
    layer = tflax.LazyBatchNorm1d(train=True)
    variables = layer.init(jax.random.key(0), jnp.ones((1, 3)))

    with pytest.raises(ValueError, match="more than one value per channel"):
        layer.apply(variables, jnp.ones((1, 3)), mutable=["batch_stats"])


def test_init_keeps_initial_running_stats() -> None:
    layer = tflax.LazyBatchNorm1d()
    variables = layer.init(jax.random.key(0), jnp.arange(12.0).reshape(4, 3))
    stats = variables["batch_stats"]

    assert np.all(np.asarray(stats["mean"]) == 0)
    assert np.all(np.asarray(stats["var"]) == 1)
    assert int(stats["num_batches_tracked"]) == 0


@pytest.mark.parametrize(
    "make_layer",
    [
        lambda: tflax.LazyLinear(3, device="cpu"),
        lambda: tflax.LazyConv1d(3, 2, device="cpu"),
    ],
    ids=["linear", "conv"],
)
def test_device_argument_rejected(make_layer: Any) -> None:
    with pytest.raises(ValueError, match="device"):
        make_layer()


# -- inputs whose sizes differ from init's ------------------------------------------

SIZE_CHANGE_CASES: dict[str, tuple[Any, tuple, tuple, str]] = {
    # id: (layer, init inputs, apply inputs, expected message part)
    "linear": (tflax.LazyLinear(3), ((2, 4),), ((2, 5),), "LazyLinear: in_features is 5 in this input but 4"),
    "layer-norm": (
        tflax.LazyLayerNorm(),
        ((2, 4),),
        ((2, 6),),
        "LazyLayerNorm: the normalized shape is (6,) in this input but (4,)",
    ),
    "conv": (
        tflax.LazyConv2d(3, 2),
        ((1, 4, 5, 5),),
        ((1, 2, 5, 5),),
        "LazyConv2d: in_channels // groups is 2 in this input but 4",
    ),
    "batch-norm": (
        tflax.LazyBatchNorm2d(train=False),
        ((2, 4, 3, 3),),
        ((2, 3, 3, 3),),
        "LazyBatchNorm2d: num_features is 3 in this input but 4",
    ),
    "attention-kdim": (
        tflax.LazyMultiheadAttention(2),
        ((3, 1, 8), (4, 1, 8), (4, 1, 8)),
        ((3, 1, 8), (4, 1, 6), (4, 1, 8)),
        "LazyMultiheadAttention/key: kdim is 6 in this input but 8",
    ),
}


@pytest.mark.parametrize("case_id", list(SIZE_CHANGE_CASES))
def test_size_change_names_layer_and_sizes(case_id: str) -> None:
    layer, init_shapes, apply_shapes, expected = SIZE_CHANGE_CASES[case_id]
    variables = layer.init(jax.random.key(0), *[jnp.ones(s) for s in init_shapes])

    with pytest.raises(terrace.StateError) as caught:
        layer.apply(variables, *[jnp.ones(s) for s in apply_shapes])

    assert expected in str(caught.value)
