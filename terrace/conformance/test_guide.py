"""The examples and gotchas of the modules guide, with the same results and errors on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import terrace
from terrace.conformance._models import (
    BadNetwork1,
    BadNetwork2,
    BasicNN,
    FixedNetwork2,
    MyLazyLinear,
    NoStart,
    StartsTwice,
)
from terrace.conformance._registry import case
from terrace.conformance._support import assert_agrees, normal, run, slot_paths

POSITIVE = np.full((4, 8), 0.5, np.float32)
NEGATIVE = -POSITIVE


@case("layers.Linear", "ops.relu")
def test_guide_basic_nn(terrace_adapter):
    """The guide's first network returns a (16, 1) output from slots Linear_0 and Linear_1."""
    built, output = run(terrace_adapter, BasicNN(), normal(16, 128))

    assert output.shape == (16, 1)
    assert slot_paths(terrace_adapter, built) == ["Linear_0", "Linear_1"]


@case("layers.Linear")
def test_guide_my_lazy_linear(terrace_adapter):
    """The guide's hand-written lazy linear layer reads its input size: (16, 128) to (16, 16)."""
    built, output = run(terrace_adapter, MyLazyLinear(16), normal(16, 128))

    assert output.shape == (16, 16)
    assert slot_paths(terrace_adapter, built) == ["linear"]


@case("layers.Linear")
def test_guide_branch_raises(terrace_adapter):
    """A branch that makes a different layer in each arm raises SlotMismatchError naming the slot."""
    built, _ = run(terrace_adapter, BadNetwork2(), POSITIVE)

    with pytest.raises(terrace.SlotMismatchError) as caught:
        terrace_adapter.call(built, terrace_adapter.asarray(NEGATIVE))

    message = str(caught.value)
    assert "slot Linear_0" in message
    assert "another call site" in message
    assert message.count("_models.py:") == 2, "the message names both make calls"
    assert "make every submodule before branching" in message


@case("layers.Linear")
def test_guide_same_branch_replays(terrace_adapter):
    """The branching network replays without error while the data takes the same arm."""
    built, first = run(terrace_adapter, BadNetwork2(), POSITIVE)
    second = terrace_adapter.to_numpy(terrace_adapter.call(built, terrace_adapter.asarray(POSITIVE)))

    assert_agrees(second, first, (terrace_adapter.device,), "the outputs of the two passes")
    assert slot_paths(terrace_adapter, built) == ["Linear_0"]


@case("layers.Linear", "ops.namespace")
def test_guide_fixed_network(terrace_adapter):
    """The fixed network makes both layers, keeps separate weights, and runs both arms."""
    built, positive = run(terrace_adapter, FixedNetwork2(), POSITIVE)
    negative = terrace_adapter.to_numpy(terrace_adapter.call(built, terrace_adapter.asarray(NEGATIVE)))
    state = terrace_adapter.state(built)

    assert sorted(state) == ["Linear_0", "Linear_1"]
    assert not np.array_equal(state["Linear_0"]["weight"], state["Linear_1"]["weight"])
    first = state["Linear_0"]
    second = state["Linear_1"]
    devices = (terrace_adapter.device,)
    assert_agrees(positive, POSITIVE @ first["weight"].T + first["bias"], devices, "the positive arm and Linear_0")
    assert_agrees(negative, NEGATIVE @ second["weight"].T + second["bias"], devices, "the negative arm and Linear_1")


@case("layers.Linear")
def test_guide_longer_loop_raises(terrace_adapter):
    """A data-dependent loop that needs more slots than the first pass made raises SlotMismatchError."""
    built, _ = run(terrace_adapter, BadNetwork1(), np.full((2, 10), 1.5, np.float32))

    with pytest.raises(terrace.SlotMismatchError, match="first pass created only 1 slots"):
        terrace_adapter.call(built, terrace_adapter.asarray(np.full((2, 10), 3.5, np.float32)))


@case("layers.Linear")
def test_guide_shorter_loop_raises(terrace_adapter):
    """A data-dependent loop that uses fewer slots than the first pass made raises SlotMismatchError."""
    built, _ = run(terrace_adapter, BadNetwork1(), np.full((2, 10), 2.5, np.float32))

    with pytest.raises(terrace.SlotMismatchError, match="used 1 of 2 slots; slot Linear_1"):
        terrace_adapter.call(built, terrace_adapter.asarray(np.full((2, 10), 1.5, np.float32)))


@case("layers.Linear")
def test_guide_missing_start_forward(terrace_adapter):
    """A forward without start_forward() raises SlotMismatchError on its first pass."""
    with pytest.raises(terrace.SlotMismatchError, match=r"make\(\) was called before start_forward\(\)"):
        run(terrace_adapter, NoStart(), normal(2, 3))


@case("layers.Linear")
def test_guide_start_forward_twice(terrace_adapter):
    """Calling start_forward() twice in one pass raises SlotMismatchError."""
    with pytest.raises(terrace.SlotMismatchError, match="called twice in one pass"):
        run(terrace_adapter, StartsTwice(), normal(2, 3))
