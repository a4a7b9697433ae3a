"""Training steps: plain SGD lowers a loss on every backend, in training mode."""

from __future__ import annotations

import numpy as np

from terrace import ops
from terrace.conformance._models import MLP, Regularized
from terrace.conformance._registry import case
from terrace.conformance._support import normal, require_passed, run
from terrace.testing import CHECKS

INPUT = normal(32, 4, seed=2)
TARGET = (INPUT @ normal(4, 1, seed=3) + 0.5).astype(np.float32)


def mean_squared_error(output, target):
    xp = ops.namespace(output)
    return xp.mean((output - target) ** 2)


@case("layers.Linear", "layers.LayerNorm", "ops.gelu", "ops.namespace")
def test_training_lowers_loss(terrace_adapter):
    """Twenty SGD steps on a regression problem at least halve the mean squared error."""
    adapter = terrace_adapter
    built, _ = run(adapter, MLP(16, 1), INPUT, train=True)

    losses = adapter.train_steps(
        built, mean_squared_error, [adapter.asarray(INPUT)], adapter.asarray(TARGET), steps=20, learning_rate=0.02
    )

    assert len(losses) == 20
    assert losses[-1] < 0.5 * losses[0], f"losses: {losses}"


@case("layers.Linear", "layers.BatchNorm1d", "layers.Dropout", "ops.relu")
def test_training_updates_batch_statistics(terrace_adapter):
    """Training steps through batch norm and dropout lower the loss and move the running statistics."""
    adapter = terrace_adapter
    built, _ = run(adapter, Regularized(), INPUT, train=True)
    before = adapter.state(built)["BatchNorm1d_0"]

    losses = adapter.train_steps(
        built, mean_squared_error, [adapter.asarray(INPUT)], adapter.asarray(TARGET), steps=10, learning_rate=0.05
    )
    after = adapter.state(built)["BatchNorm1d_0"]

    assert losses[-1] < losses[0], f"losses: {losses}"
    assert not np.allclose(after["running_mean"], before["running_mean"])
    assert int(after["num_batches_tracked"]) == int(before["num_batches_tracked"]) + 10


@case("layers.Linear", "layers.LayerNorm", "ops.gelu")
def test_training_check(terrace_adapter):
    """check_model's training check passes: SGD steps lower the mean square of the output."""
    require_passed(CHECKS["training"](terrace_adapter, MLP(8, 3), (INPUT,)))
