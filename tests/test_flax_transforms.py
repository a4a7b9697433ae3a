"""terrace.flax modules under jax.jit, jax.grad, jax.vmap, nn.remat and nn.scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import terrace
import terrace.flax as tflax

KEY = jax.random.key(0)
WIDTH = 4


# Input shapes seen by Counted.forward, one entry per run (per trace under jit).
TRACES: list[tuple[int, ...]] = []


class Counted(tflax.Module):
    """Two layers; each run of forward appends the input shape to TRACES."""

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        TRACES.append(x.shape)
        hidden = nn.relu(self.make(tflax.LazyLinear, 8)(x))
        return self.make(tflax.LazyLinear, 2)(hidden)


class Block(tflax.Module):
    """A residual layer written as a scan body: (carry, input) -> (carry, output)."""

    def forward(self, carry: jax.Array, _: None) -> tuple[jax.Array, None]:
        self.start_forward()
        return carry + jnp.tanh(self.make(tflax.LazyLinear, WIDTH)(carry)), None


ScanBlock = nn.scan(
    Block,
    variable_axes={"params": 0},
    split_rngs={"params": True},
    length=3,
)
RematBlock = nn.remat(Block)


class Scanned(tflax.Module):
    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        x = self.make(tflax.LazyLinear, WIDTH)(x)
        x, _ = self.make(ScanBlock)(x, None)
        return x


class Rematted(tflax.Module):
    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        x, _ = self.make(RematBlock)(x, None)
        x, _ = self.make(RematBlock)(x, None)
        return x


def inputs(batch: int = 2, features: int = 3) -> jax.Array:
    return jnp.linspace(-1.0, 1.0, batch * features).reshape(batch, features)


def linear(params: dict, x: jax.Array) -> jax.Array:
    return x @ params["kernel"] + params["bias"]


# -- jax transforms ----------------------------------------------------------------


def test_jit_traces_once_per_shape() -> None:
    model = Counted()
    variables = model.init(KEY, inputs())
    apply = jax.jit(model.apply)
    TRACES.clear()

    outputs = [apply(variables, inputs()) for _ in range(3)]
    assert TRACES == [(2, 3)]

    apply(variables, inputs(batch=5))
    assert TRACES == [(2, 3), (5, 3)]
    assert np.allclose(outputs[0], model.apply(variables, inputs()))


def test_grad_of_apply() -> None:
    model = Counted()
    variables = model.init(KEY, inputs())

    def loss(params: dict) -> jax.Array:
        return jnp.sum(model.apply({"params": params}, inputs()) ** 2)

    grads = jax.grad(loss)(variables["params"])

    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(variables["params"])
    assert float(jnp.abs(grads["LazyLinear_1"]["kernel"]).sum()) > 0


def test_vmap_of_apply_matches_loop() -> None:
    model = Counted()
    variables = model.init(KEY, inputs()[0])
    batch = inputs(batch=5)

    mapped = jax.vmap(model.apply, in_axes=(None, 0))(variables, batch)

    looped = jnp.stack([model.apply(variables, row) for row in batch])
    assert np.allclose(mapped, looped, atol=1e-6)


# -- linen transforms ----------------------------------------------------------------


def test_scan_stacks_layer_parameters() -> None:
    variables = Scanned().init(KEY, inputs())

    stacked = variables["params"]["ScanBlock_0"]["LazyLinear_0"]
    assert stacked["kernel"].shape == (3, WIDTH, WIDTH)
    assert stacked["bias"].shape == (3, WIDTH)


def test_scan_matches_unrolled_layers() -> None:
    model = Scanned()
    variables = model.init(KEY, inputs())
    params = variables["params"]

    output = model.apply(variables, inputs())

    expected = linear(params["LazyLinear_0"], inputs())
    stacked = params["ScanBlock_0"]["LazyLinear_0"]
    for layer in range(3):
        layer_params = jax.tree_util.tree_map(lambda p: p[layer], stacked)
        expected = expected + jnp.tanh(linear(layer_params, expected))
    assert np.allclose(output, expected, atol=1e-5)


def test_scan_under_jit_and_grad() -> None:
    model = Scanned()
    variables = model.init(KEY, inputs())

    grads = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, inputs()))))(variables)

    assert grads["params"]["ScanBlock_0"]["LazyLinear_0"]["kernel"].shape == (3, WIDTH, WIDTH)


def test_remat_matches_plain_block() -> None:
    class Plain(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            x, _ = self.make(Block, name="CheckpointBlock_0")(x, None)
            x, _ = self.make(Block, name="CheckpointBlock_1")(x, None)
            return x

    x = inputs(features=WIDTH)
    variables = Rematted().init(KEY, x)

    output = Rematted().apply(variables, x)
    grads = jax.grad(lambda v: jnp.sum(Rematted().apply(v, x)))(variables)

    assert sorted(variables["params"]) == ["CheckpointBlock_0", "CheckpointBlock_1"]
    assert np.allclose(output, Plain().apply(variables, x), atol=1e-6)
    assert float(jnp.abs(grads["params"]["CheckpointBlock_1"]["LazyLinear_0"]["kernel"]).sum()) > 0


def test_scan_body_keeps_its_record() -> None:
    class ShapeBranch(tflax.Module):
        def forward(self, carry: jax.Array, _: None) -> tuple[jax.Array, None]:
            self.start_forward()
            if carry.shape[0] > 2:
                return self.make(tflax.LazyLinear, WIDTH)(carry), None
            return self.make(tflax.LazyLinear, WIDTH)(carry), None

    scan = nn.scan(ShapeBranch, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)

    class Outer(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            return self.make(scan)(x, None)[0]

    model = Outer()
    variables = model.init(KEY, inputs(batch=2, features=WIDTH))

    with pytest.raises(terrace.SlotMismatchError, match=r"Outer\.ScanShapeBranch_0: slot LazyLinear_0"):
        model.apply(variables, inputs(batch=3, features=WIDTH))


# -- strictness at trace time -----------------------------------------------------------


class Branching(tflax.Module):
    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        if x.mean() > 0:
            return self.make(tflax.LazyLinear, 2)(x)
        else:
            return self.make(tflax.LazyLinear, 2)(x)


class DataLoop(tflax.Module):
    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        for _ in range(int(jnp.max(x))):
            x = self.make(tflax.LazyLinear, x.shape[-1])(x)
        return x


@pytest.mark.parametrize("model_class", [Branching, DataLoop], ids=["branch", "loop"])
def test_data_dependent_forward_raises_under_jit(model_class: type) -> None:
    model = model_class()
    variables = model.init(KEY, jnp.ones((2, 3)))

    with pytest.raises(tflax.TracedControlFlowError, match=f"{model_class.__name__}: forward"):
        jax.jit(model.apply)(variables, jnp.ones((2, 3)))


def test_data_dependent_init_raises_under_eval_shape() -> None:
    with pytest.raises(terrace.TerraceError, match="choose between their results with jnp.where"):
        jax.eval_shape(Branching().init, KEY, jnp.ones((2, 3)))


def test_shape_branch_mismatch_raises_at_trace_time() -> None:
    class ShapeBranch(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            if x.shape[0] > 2:
                return self.make(tflax.LazyLinear, 2)(x)
            return self.make(tflax.LazyLinear, 2)(x)

    model = ShapeBranch()
    variables = model.init(KEY, jnp.ones((2, 3)))

    with pytest.raises(terrace.SlotMismatchError, match="another call site"):
        jax.jit(model.apply)(variables, jnp.ones((4, 3)))


def test_forgotten_start_forward_raises_under_jit() -> None:
    class NoStart(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            return self.make(tflax.LazyLinear, 2)(x)

    with pytest.raises(terrace.SlotMismatchError, match="before start_forward"):
        jax.jit(NoStart().init)(KEY, jnp.ones((2, 3)))


def test_feature_size_change_raises_under_jit() -> None:
    model = Counted()
    variables = model.init(KEY, inputs())

    with pytest.raises(terrace.StateError, match=r"slot Counted\.LazyLinear_0: in_features is 5"):
        jax.jit(model.apply)(variables, inputs(features=5))
