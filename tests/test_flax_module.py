"""terrace.flax.Module: slot naming, the slot record across init and apply, and its errors."""

from __future__ import annotations

import doctest
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

import terrace
import terrace.flax as tflax
from terrace.flax import _module

KEY = jax.random.key(0)


class BasicNN(tflax.Module):
    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        hidden = nn.relu(self.make(tflax.LazyLinear, 16)(x))
        return self.make(tflax.LazyLinear, 1)(hidden)


class Branching(tflax.Module):
    """The guide's second bad network: each branch makes its own layer."""

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        if x.mean() > 0:
            return self.make(tflax.LazyLinear, 4)(x)
        else:
            return self.make(tflax.LazyLinear, 4)(x)


class DataLoop(tflax.Module):
    """The guide's first bad network: the number of make calls depends on the data."""

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        for _ in range(int(jnp.max(x))):
            x = self.make(tflax.LazyLinear, x.shape[-1])(x)
        return x


class Block(tflax.Module):
    width: int

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        return nn.relu(self.make(tflax.LazyLinear, self.width)(x))


class Stack(tflax.Module):
    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        x = self.make(Block, 8)(x)
        x = self.make(Block, 8)(x)
        return self.make(nn.Dense, 2)(x)


class Mlp(nn.Module):
    """A plain linen module with submodules of its own."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


class Mixed(tflax.Module):
    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        x = self.make(nn.Dense, 6)(x)
        x = self.make(Mlp)(x)
        x = self.make(tflax.LazyLayerNorm, name="norm")(x)
        return self.make(nn.Dense, 2)(x)


def param_shapes(variables: Any) -> Any:
    return jax.tree_util.tree_map(jnp.shape, variables["params"])


# -- naming -----------------------------------------------------------------------


def test_slot_names_are_parameter_paths() -> None:
    variables = BasicNN().init(KEY, jnp.ones((4, 3)))

    assert param_shapes(variables) == {
        "LazyLinear_0": {"kernel": (3, 16), "bias": (16,)},
        "LazyLinear_1": {"kernel": (16, 1), "bias": (1,)},
    }


def test_plain_linen_and_explicit_names() -> None:
    variables = Mixed().init(KEY, jnp.ones((2, 4)))

    assert sorted(variables["params"]) == ["Dense_0", "Dense_1", "Mlp_0", "norm"]
    assert sorted(variables["params"]["Mlp_0"]) == ["Dense_0", "Dense_1"]


def test_nested_modules_nest_paths() -> None:
    variables = Stack().init(KEY, jnp.ones((2, 4)))

    assert param_shapes(variables) == {
        "Block_0": {"LazyLinear_0": {"kernel": (4, 8), "bias": (8,)}},
        "Block_1": {"LazyLinear_0": {"kernel": (8, 8), "bias": (8,)}},
        "Dense_0": {"kernel": (8, 2), "bias": (2,)},
    }


def test_apply_reproduces_init_output() -> None:
    model = Stack()
    x = jnp.arange(8.0).reshape(2, 4)
    output, variables = model.init_with_output(KEY, x)

    assert jnp.allclose(model.apply(variables, x), output)


def test_made_layer_called_twice_shares_parameters() -> None:
    class Twice(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            layer = self.make(tflax.LazyLinear, 4)
            block = self.make(Block, 4)
            return block(block(layer(layer(x))))

    model = Twice()
    x = jnp.ones((2, 4))
    variables = model.init(KEY, x)

    assert sorted(variables["params"]) == ["Block_0", "LazyLinear_0"]
    assert model.apply(variables, x).shape == (2, 4)


def test_duplicate_explicit_name_rejected() -> None:
    class Clash(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            x = self.make(nn.Dense, 3, name="proj")(x)
            return self.make(nn.Dense, 3, name="proj")(x)

    with pytest.raises(terrace.SlotNameError, match="'proj' is used twice"):
        Clash().init(KEY, jnp.ones((1, 2)))


def test_invalid_explicit_name_rejected() -> None:
    class BadName(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            return self.make(nn.Dense, 3, name="my layer")(x)

    with pytest.raises(terrace.SlotNameError, match="not a valid identifier"):
        BadName().init(KEY, jnp.ones((1, 2)))


def test_make_rejects_non_module() -> None:
    class NotAModule(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            return self.make(lambda name: jnp.tanh)(x)

    with pytest.raises(terrace.TerraceError, match="must create a flax.linen.Module"):
        NotAModule().init(KEY, jnp.ones((1, 2)))


def test_forward_missing_raises() -> None:
    with pytest.raises(NotImplementedError, match="must define"):
        tflax.Module().init(KEY, jnp.ones((1, 2)))


# -- the slot record across init and apply ------------------------------------------


def test_branch_gotcha_raises_in_apply() -> None:
    model = Branching()
    variables = model.init(KEY, jnp.ones((2, 3)))

    assert model.apply(variables, jnp.ones((2, 3))).shape == (2, 4)
    with pytest.raises(terrace.SlotMismatchError, match="another call site"):
        model.apply(variables, -jnp.ones((2, 3)))


def test_branch_gotcha_in_nested_module() -> None:
    class Outer(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            return self.make(Branching)(x)

    model = Outer()
    variables = model.init(KEY, jnp.ones((2, 3)))

    with pytest.raises(terrace.SlotMismatchError, match=r"Outer\.Branching_0: slot LazyLinear_0"):
        model.apply(variables, -jnp.ones((2, 3)))


def test_data_loop_longer_than_init_raises() -> None:
    model = DataLoop()
    variables = model.init(KEY, jnp.full((1, 2), 2.0))

    with pytest.raises(terrace.SlotMismatchError, match="first pass created only 2 slots"):
        model.apply(variables, jnp.full((1, 2), 3.0))


def test_data_loop_shorter_than_init_raises() -> None:
    model = DataLoop()
    variables = model.init(KEY, jnp.full((1, 2), 2.0))

    with pytest.raises(terrace.SlotMismatchError, match="used 1 of 2 slots"):
        model.apply(variables, jnp.full((1, 2), 1.0))


def test_forgotten_start_forward_raises() -> None:
    class NoStart(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            return self.make(tflax.LazyLinear, 2)(x)

    with pytest.raises(terrace.SlotMismatchError, match="before start_forward"):
        NoStart().init(KEY, jnp.ones((1, 2)))


def test_start_forward_twice_raises() -> None:
    class Twice(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            self.start_forward()
            return x

    with pytest.raises(terrace.SlotMismatchError, match="called twice"):
        Twice().init(KEY, jnp.ones((1, 2)))


def test_non_strict_module_allows_other_branch() -> None:
    class Loose(Branching):
        strict = False

    model = Loose()
    variables = model.init(KEY, jnp.ones((2, 3)))

    assert model.apply(variables, -jnp.ones((2, 3))).shape == (2, 4)


def test_record_is_shared_with_clones() -> None:
    model = Branching()
    variables = model.init(KEY, jnp.ones((2, 3)))
    evaluation = model.clone(train=False)

    assert evaluation._terrace_table is model._terrace_table
    with pytest.raises(terrace.SlotMismatchError):
        evaluation.apply(variables, -jnp.ones((2, 3)))


def test_clone_with_other_settings_gets_new_record() -> None:
    model = Block(4)
    model.init(KEY, jnp.ones((1, 3)))
    wider = model.clone(width=8)

    assert wider._terrace_table is not model._terrace_table
    assert param_shapes(wider.init(KEY, jnp.ones((1, 3))))["LazyLinear_0"]["kernel"] == (3, 8)


def test_new_model_object_has_fresh_record() -> None:
    variables = Branching().init(KEY, jnp.ones((2, 3)))

    # Another object of the class has no record yet, so its first pass sets it.
    assert Branching().apply(variables, -jnp.ones((2, 3))).shape == (2, 4)


def test_transform_inside_forward_explained() -> None:
    class InlineRemat(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            return self.make(nn.remat(Block), 3)(x)

    model = InlineRemat()
    variables = model.init(KEY, jnp.ones((1, 2)))

    with pytest.raises(terrace.SlotMismatchError, match="builds a new class on every call"):
        model.apply(variables, jnp.ones((1, 2)))


# -- variables that do not fit --------------------------------------------------------


def test_feature_size_change_names_slot_and_sizes() -> None:
    model = BasicNN()
    variables = model.init(KEY, jnp.ones((4, 3)))

    with pytest.raises(terrace.StateError) as caught:
        model.apply(variables, jnp.ones((4, 5)))

    message = str(caught.value)
    assert "slot BasicNN.LazyLinear_0" in message
    assert "in_features is 5 in this input but 3 in the variables" in message


def test_feature_size_change_in_nested_slot() -> None:
    model = Stack()
    variables = model.init(KEY, jnp.ones((2, 4)))

    with pytest.raises(terrace.StateError, match=r"slot Stack\.Block_0\.LazyLinear_0: in_features is 6"):
        model.apply(variables, jnp.ones((2, 6)))


def test_feature_size_change_in_plain_linen_slot() -> None:
    model = Mixed()
    variables = model.init(KEY, jnp.ones((2, 4)))

    with pytest.raises(terrace.StateError) as caught:
        model.apply(variables, jnp.ones((2, 7)))

    message = str(caught.value)
    assert "slot Mixed.Dense_0" in message
    assert "(4, 6)" in message
    assert "(7, 6)" in message


def test_missing_variables_name_slot() -> None:
    model = BasicNN()

    with pytest.raises(terrace.StateError, match=r"slot BasicNN\.LazyLinear_0: the variables passed"):
        model.apply({"params": {}}, jnp.ones((4, 3)))


def test_missing_variables_in_plain_linen_slot() -> None:
    model = Mixed()

    with pytest.raises(terrace.StateError, match=r"slot Mixed\.Dense_0: the variables passed"):
        model.apply({"params": {}}, jnp.ones((2, 4)))


# -- linen entry points ----------------------------------------------------------------


def test_tabulate_lists_slots() -> None:
    table = Stack().tabulate(KEY, jnp.ones((2, 4)), console_kwargs={"width": 200})

    for name in ("Block_0/LazyLinear_0", "Block_1/LazyLinear_0", "Dense_0"):
        assert name in table


def test_eval_shape_of_init() -> None:
    shapes = jax.eval_shape(BasicNN().init, KEY, jnp.ones((4, 3)))

    assert shapes["params"]["LazyLinear_0"]["kernel"].shape == (3, 16)


def test_lazy_init_takes_shapes_only() -> None:
    model = BasicNN()
    variables = model.lazy_init(KEY, jax.ShapeDtypeStruct((4, 3), jnp.float32))

    assert param_shapes(variables)["LazyLinear_1"]["kernel"] == (16, 1)
    assert model.apply(variables, jnp.ones((4, 3))).shape == (4, 1)


def test_module_docstring_example_runs() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(_module.Module, "Module", globs={}):
        runner.run(test)

    assert runner.failures == 0
    assert runner.tries > 0


# -- package ---------------------------------------------------------------------------


def test_public_names_exported() -> None:
    for name in tflax.__all__:
        assert hasattr(tflax, name), name
    assert issubclass(tflax.TracedControlFlowError, terrace.TerraceError)


def test_flax_backend_does_not_import_torch() -> None:
    code = "import sys, terrace.flax; assert 'torch' not in sys.modules, 'torch was imported'"

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert result.returncode == 0, result.stderr

