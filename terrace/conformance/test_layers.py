"""Every shipped layer computes what the reference backend computes, on the same random weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from terrace import layers
from terrace.conformance._models import OneLayer
from terrace.conformance._registry import case
from terrace.conformance._support import assert_agrees, normal, randomize_checkpoint, run
from terrace.testing import reference_adapter


@dataclass(frozen=True)
class LayerCase:
    """One configuration of a neutral layer.

    Attributes:
        id: the case id, shown in test ids.
        spec: the neutral layer class.
        args: positional constructor arguments.
        options: keyword constructor arguments.
        inputs: makes the inputs of one call.
        train: whether to compare a training-mode call too (batch norm),
            including the running statistics it updates.
    """

    id: str
    spec: type
    args: tuple = ()
    options: dict[str, Any] = field(default_factory=dict)
    inputs: Callable[[], tuple[np.ndarray, ...]] = lambda: (normal(3, 5),)
    train: bool = False

    def model(self) -> OneLayer:
        return OneLayer(self.spec, self.args, tuple(sorted(self.options.items())))


def _attention_inputs(*shapes: tuple[int, ...]) -> Callable[[], tuple[np.ndarray, ...]]:
    return lambda: tuple(normal(*shape, seed=index) for index, shape in enumerate(shapes))


LAYER_CASES = [
    LayerCase("Linear", layers.Linear, (4,)),
    LayerCase("Linear-no-bias", layers.Linear, (4,), {"bias": False}, lambda: (normal(2, 3, 5),)),
    LayerCase("LayerNorm", layers.LayerNorm, inputs=lambda: (normal(3, 6, scale=3.0, shift=1.0),)),
    LayerCase("LayerNorm-2d", layers.LayerNorm, (), {"normalized_ndim": 2, "eps": 1e-3}, lambda: (normal(3, 4, 5),)),
    LayerCase(
        "MultiheadAttention",
        layers.MultiheadAttention,
        (2,),
        inputs=_attention_inputs((3, 2, 8), (4, 2, 8), (4, 2, 8)),
    ),
    LayerCase(
        "MultiheadAttention-kdim-vdim",
        layers.MultiheadAttention,
        (2,),
        {"batch_first": True},
        _attention_inputs((2, 3, 8), (2, 4, 6), (2, 4, 5)),
    ),
    LayerCase(
        "MultiheadAttention-bias-kv",
        layers.MultiheadAttention,
        (2,),
        {"add_bias_kv": True, "add_zero_attn": True},
        _attention_inputs((3, 2, 8), (4, 2, 8), (4, 2, 8)),
    ),
    LayerCase(
        "Embedding",
        layers.Embedding,
        (10, 4),
        inputs=lambda: (np.random.default_rng(0).integers(0, 10, (2, 3)),),
    ),
    LayerCase("Conv1d", layers.Conv1d, (4, 3), {"stride": 2, "padding": 1}, lambda: (normal(2, 3, 9),)),
    LayerCase(
        "Conv2d",
        layers.Conv2d,
        (4, (3, 2)),
        {"stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)},
        lambda: (normal(2, 2, 7, 6),),
    ),
    LayerCase(
        "Conv2d-groups-reflect",
        layers.Conv2d,
        (4, 3),
        {"groups": 2, "padding": 1, "padding_mode": "reflect", "bias": False},
        lambda: (normal(2, 4, 5, 5),),
    ),
    LayerCase("Conv3d", layers.Conv3d, (2, 3), {"padding": "same"}, lambda: (normal(1, 3, 4, 4, 4),)),
    LayerCase("BatchNorm1d", layers.BatchNorm1d, inputs=lambda: (normal(6, 4, scale=2.0, shift=1.0),), train=True),
    LayerCase(
        "BatchNorm2d",
        layers.BatchNorm2d,
        (),
        {"momentum": 0.3, "eps": 1e-3},
        lambda: (normal(3, 4, 3, 2, scale=2.0),),
        train=True,
    ),
    LayerCase("BatchNorm3d", layers.BatchNorm3d, inputs=lambda: (normal(2, 4, 2, 3, 2, shift=-1.0),), train=True),
    LayerCase("Dropout", layers.Dropout, (0.3,)),
]


def _build_with_weights(adapter, layer_case, path, inputs):
    built = adapter.build(layer_case.model())
    arrays = [adapter.asarray(value) for value in inputs]
    adapter.load(built, path, *arrays)
    return built, arrays


@case(*sorted({f"layers.{layer_case.spec.__name__}" for layer_case in LAYER_CASES}))
@pytest.mark.parametrize("layer_case", LAYER_CASES, ids=[layer_case.id for layer_case in LAYER_CASES])
def test_layer_matches_reference(terrace_adapter, layer_case, tmp_path):
    """The layer agrees with the reference backend in evaluation mode, and in training mode where it has one."""
    adapter = terrace_adapter
    reference = reference_adapter()
    inputs = layer_case.inputs()
    devices = (reference.device, adapter.device)
    source, _ = run(reference, layer_case.model(), *inputs)
    reference.save(source, tmp_path / "source.safetensors")
    random_weights = tmp_path / "random.safetensors"
    randomize_checkpoint(tmp_path / "source.safetensors", random_weights, seed=5)

    reference_built, reference_inputs = _build_with_weights(reference, layer_case, random_weights, inputs)
    adapter_built, adapter_inputs = _build_with_weights(adapter, layer_case, random_weights, inputs)
    expected = reference.to_numpy(reference.call(reference_built, *reference_inputs))
    actual = adapter.to_numpy(adapter.call(adapter_built, *adapter_inputs))
    assert_agrees(actual, expected, devices, "the evaluation-mode outputs")
    if not layer_case.train:
        return

    reference.set_train(reference_built, True)
    adapter.set_train(adapter_built, True)
    expected = reference.to_numpy(reference.call(reference_built, *reference_inputs))
    actual = adapter.to_numpy(adapter.call(adapter_built, *adapter_inputs))
    assert_agrees(actual, expected, devices, "the training-mode outputs")
    expected_state = reference.state(reference_built)
    actual_state = adapter.state(adapter_built)
    assert list(actual_state) == list(expected_state)
    for slot, tensors in expected_state.items():
        for name, tensor in tensors.items():
            assert_agrees(actual_state[slot][name], tensor, devices, f"{slot}.{name} after a training-mode call")


@case("layers.Dropout")
def test_dropout_scales_kept_values(terrace_adapter):
    """Dropout in training mode zeroes about p of the values and scales the rest by 1 / (1 - p)."""
    adapter = terrace_adapter
    ones = np.ones((64, 64), np.float32)
    built, output = run(adapter, OneLayer(layers.Dropout, (0.25,), ()), ones, train=True)

    dropped = float(np.mean(output == 0))
    assert 0.2 < dropped < 0.3, f"{dropped:.3f} of the values were zeroed, expected about 0.25"
    np.testing.assert_allclose(output[output != 0], 1 / 0.75, rtol=1e-6)

    adapter.set_train(built, False)
    evaluation = adapter.to_numpy(adapter.call(built, adapter.asarray(ones)))
    np.testing.assert_array_equal(evaluation, ones)
