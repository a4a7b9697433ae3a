"""Weights through portable checkpoints and direct conversion: round trips, restore on create, mismatches."""

from __future__ import annotations

import numpy as np
import pytest

import terrace
from terrace.conformance._models import MLP, Regularized
from terrace.conformance._registry import case
from terrace.conformance._support import assert_agrees, normal, require_passed, run
from terrace.testing import CHECKS, select_adapters

INPUT = normal(4, 5, seed=1)


@case("layers.Linear", "layers.LayerNorm", "ops.gelu")
def test_state_round_trip(terrace_adapter):
    """Weights saved with terrace.save and loaded into a new build give the same output."""
    require_passed(CHECKS["state"](terrace_adapter, MLP(8, 3), (INPUT,)))


@case("layers.Linear", "layers.BatchNorm1d", "layers.Dropout")
def test_restore_on_create(terrace_adapter, tmp_path):
    """A checkpoint loaded before the first pass is used by it, tensor for tensor, batch statistics included."""
    path = tmp_path / "source.safetensors"
    source, _ = run(terrace_adapter, Regularized(), INPUT, train=True)
    terrace_adapter.set_train(source, False)
    expected = terrace_adapter.to_numpy(terrace_adapter.call(source, terrace_adapter.asarray(INPUT)))
    terrace_adapter.save(source, path)

    target = terrace_adapter.build(Regularized(), seed=7)
    terrace_adapter.load(target, path, terrace_adapter.asarray(INPUT))
    actual = terrace_adapter.to_numpy(terrace_adapter.call(target, terrace_adapter.asarray(INPUT)))

    source_state = terrace_adapter.state(source)
    target_state = terrace_adapter.state(target)
    assert list(target_state) == list(source_state)
    for slot, tensors in source_state.items():
        for name, tensor in tensors.items():
            np.testing.assert_array_equal(target_state[slot][name], tensor, err_msg=f"{slot}.{name}")
    assert_agrees(actual, expected, (terrace_adapter.device,), "the outputs of the saved and the restored model")


@case("layers.Linear", "layers.LayerNorm")
def test_checkpoint_mismatch_names_slot(terrace_adapter, tmp_path):
    """A checkpoint of a model with other layer sizes raises StateError naming the slot."""
    path = tmp_path / "narrow.safetensors"
    narrow, _ = run(terrace_adapter, MLP(8, 3), INPUT)
    terrace_adapter.save(narrow, path)
    wide = terrace_adapter.build(MLP(16, 3))

    with pytest.raises(terrace.StateError, match="Linear_0"):
        terrace_adapter.load(wide, path, terrace_adapter.asarray(INPUT))
        terrace_adapter.call(wide, terrace_adapter.asarray(INPUT))


def _other_backends(adapter):
    """Return a CPU adapter of every other installed backend."""
    choices = select_adapters(devices="cpu")
    return [c.adapter for c in choices if c.adapter is not None and c.adapter.backend_name != adapter.backend_name]


@case("layers.Linear", "layers.BatchNorm1d", "layers.Dropout")
def test_direct_port_agrees(terrace_adapter):
    """Weights converted directly from another backend (terrace.port.torch_to_flax, flax_to_torch) give its output."""
    sources = _other_backends(terrace_adapter)
    if not sources:
        pytest.skip("needs a second installed backend to port weights from")
    for source in sources:
        source_built, _ = run(source, Regularized(), INPUT, train=True)
        source.set_train(source_built, False)
        expected = source.to_numpy(source.call(source_built, source.asarray(INPUT)))

        target = terrace_adapter.build(Regularized())
        terrace_adapter.import_weights(target, source, source_built, terrace_adapter.asarray(INPUT))
        actual = terrace_adapter.to_numpy(terrace_adapter.call(target, terrace_adapter.asarray(INPUT)))

        devices = (source.device, terrace_adapter.device)
        assert_agrees(actual, expected, devices, f"the outputs of {terrace_adapter.id} and {source.id}")
