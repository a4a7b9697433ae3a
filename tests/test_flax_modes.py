"""Training and evaluation modes, batch statistics and dropout randomness on the Flax backend."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import terrace
import terrace.flax as tflax

KEY = jax.random.key(0)
X = jnp.arange(24.0).reshape(6, 4) / 10


class Normed(tflax.Module):
    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        return self.make(tflax.LazyBatchNorm1d)(self.make(tflax.LazyLinear, 3)(x))


class Attending(tflax.Module):
    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        output, _ = self.make(tflax.LazyMultiheadAttention, 2, dropout=0.5)(x, x, x)
        return output


class Outer(tflax.Module):
    """A parent whose child module inherits its mode."""

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        return self.make(Normed)(x)


def sequence() -> jax.Array:
    return jnp.arange(48.0).reshape(3, 2, 8) / 10


# -- batch statistics ------------------------------------------------------------


def test_training_mode_is_the_default() -> None:
    assert Normed().training is True
    assert Normed(train=False).training is False


def test_training_apply_without_mutable_names_slot() -> None:
    model = Normed()
    variables = model.init(KEY, X)

    with pytest.raises(terrace.TerraceError) as caught:
        model.apply(variables, X)

    message = str(caught.value)
    assert "slot Normed.LazyBatchNorm1d_0" in message
    assert "mutable=['batch_stats']" in message
    assert "train=False" in message


def test_training_apply_updates_batch_stats() -> None:
    model = Normed()
    variables = model.init(KEY, X)

    _, updates = model.apply(variables, X, mutable=["batch_stats"])

    before = variables["batch_stats"]["LazyBatchNorm1d_0"]
    after = updates["batch_stats"]["LazyBatchNorm1d_0"]
    assert int(after["num_batches_tracked"]) == 1
    assert not np.allclose(after["mean"], before["mean"])


def test_evaluation_uses_running_stats_without_mutable() -> None:
    model = Normed()
    variables = model.init(KEY, X)
    _, updates = model.apply(variables, X, mutable=["batch_stats"])
    variables = {**variables, **updates}
    evaluation = Normed(train=False)

    output = evaluation.apply(variables, X)

    hidden = X @ variables["params"]["LazyLinear_0"]["kernel"] + variables["params"]["LazyLinear_0"]["bias"]
    stats = variables["batch_stats"]["LazyBatchNorm1d_0"]
    expected = (hidden - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5)
    assert np.allclose(output, expected, atol=1e-5)


def test_clone_for_evaluation_keeps_record() -> None:
    model = Normed()
    variables = model.init(KEY, X)
    evaluation = model.clone(train=False)

    assert evaluation.apply(variables, X).shape == (6, 3)
    assert evaluation._terrace_table is model._terrace_table


def test_child_inherits_parent_mode() -> None:
    model = Outer()
    variables = model.init(KEY, X)

    with pytest.raises(terrace.TerraceError, match=r"slot Outer\.Normed_0\.LazyBatchNorm1d_0"):
        model.apply(variables, X)
    assert Outer(train=False).apply(variables, X).shape == (6, 3)


def test_child_own_mode_wins() -> None:
    class FrozenChild(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            return self.make(Normed, train=False)(x)

    model = FrozenChild()
    variables = model.init(KEY, X)

    assert model.apply(variables, X).shape == (6, 3)


def test_layer_mode_argument_wins() -> None:
    class FrozenNorm(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            return self.make(tflax.LazyBatchNorm1d, train=False)(x)

    model = FrozenNorm()
    variables = model.init(KEY, X)

    assert model.apply(variables, X).shape == X.shape


def test_evaluation_without_batch_stats_names_slot() -> None:
    model = Normed(train=False)
    variables = model.init(KEY, X)

    with pytest.raises(terrace.StateError, match=r"slot Normed\.LazyBatchNorm1d_0.*'batch_stats'"):
        model.apply({"params": variables["params"]}, X)


def test_standalone_layer_trains_by_default() -> None:
    layer = tflax.LazyBatchNorm1d()
    variables = layer.init(KEY, X)

    with pytest.raises(terrace.TerraceError, match="slot LazyBatchNorm1d: this batch norm"):
        layer.apply(variables, X)


# -- dropout ---------------------------------------------------------------------


def test_dropout_without_rng_names_slot() -> None:
    model = Attending()
    variables = Attending(train=False).init(KEY, sequence())

    with pytest.raises(terrace.TerraceError) as caught:
        model.apply(variables, sequence())

    message = str(caught.value)
    assert "slot Attending.LazyMultiheadAttention_0" in message
    assert "rngs={'dropout': key}" in message


def test_init_in_training_mode_needs_dropout_rng() -> None:
    with pytest.raises(terrace.TerraceError, match="no 'dropout' random key"):
        Attending().init(KEY, sequence())

    variables = Attending().init({"params": KEY, "dropout": KEY}, sequence())
    assert "LazyMultiheadAttention_0" in variables["params"]


def test_dropout_follows_the_key() -> None:
    model = Attending()
    variables = Attending(train=False).init(KEY, sequence())
    first, second = jax.random.key(1), jax.random.key(2)

    output_first = model.apply(variables, sequence(), rngs={"dropout": first})
    output_again = model.apply(variables, sequence(), rngs={"dropout": first})
    output_second = model.apply(variables, sequence(), rngs={"dropout": second})

    assert np.array_equal(output_first, output_again)
    assert not np.allclose(output_first, output_second)


def test_evaluation_turns_dropout_off() -> None:
    variables = Attending(train=False).init(KEY, sequence())

    class NoDropout(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            output, _ = self.make(tflax.LazyMultiheadAttention, 2, name="LazyMultiheadAttention_0")(x, x, x)
            return output

    output = Attending(train=False).apply(variables, sequence())
    reference = NoDropout().apply(variables, sequence())

    assert np.allclose(output, reference, atol=1e-6)


# -- plain linen layers ----------------------------------------------------------------


class LinenLayers(tflax.Module):
    """linen's own BatchNorm and Dropout, given the mode at call time."""

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        x = self.make(nn.BatchNorm, momentum=0.9)(x, use_running_average=not self.training)
        return self.make(nn.Dropout, 0.5)(x, deterministic=not self.training)


def test_linen_layers_follow_training_property() -> None:
    variables = LinenLayers(train=False).init(KEY, X)

    output, updates = LinenLayers().apply(
        variables, X, mutable=["batch_stats"], rngs={"dropout": KEY}
    )

    assert "BatchNorm_0" in updates["batch_stats"]
    assert np.any(np.asarray(output) == 0)
    assert np.array_equal(LinenLayers(train=False).apply(variables, X), LinenLayers(train=False).apply(variables, X))


def test_linen_layer_without_mutable_names_slot() -> None:
    variables = LinenLayers(train=False).init(KEY, X)

    with pytest.raises(terrace.TerraceError, match=r"slot LinenLayers\.BatchNorm_0: .*mutable=\['batch_stats'\]"):
        LinenLayers().apply(variables, X, rngs={"dropout": KEY})


def test_linen_layer_without_rng_names_slot() -> None:
    variables = LinenLayers(train=False).init(KEY, X)

    with pytest.raises(terrace.TerraceError, match=r"slot LinenLayers\.Dropout_0: .*rngs=\{'dropout': key\}"):
        LinenLayers().apply(variables, X, mutable=["batch_stats"])
