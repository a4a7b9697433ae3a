"""terrace.flax models on a mesh of eight simulated CPU devices.

Covers sharded initialisation of lazily shaped parameters, logical axis
names on the lazy layers with Flax's partitioning helpers, ``jax.shard_map``
over ``apply``, and data-parallel and tensor-parallel training steps. Every
sharded result is compared with the same computation on one device.

tests/conftest.py requests eight CPU devices from XLA before JAX starts. The
tests that build a mesh skip when fewer are visible, for example when
XLA_FLAGS held another value before pytest started.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import terrace.flax as tflax

DEVICES = 8
needs_devices = pytest.mark.skipif(
    jax.device_count() < DEVICES,
    reason=(
        f"needs {DEVICES} JAX devices, found {jax.device_count()}; start pytest with "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICES} or without XLA_FLAGS set"
    ),
)

KEY = jax.random.key(0)
FEATURES = 6
HIDDEN = 16
BATCH = 16

# Sharded and single-device float32 results differ only in the order of
# additions: a matmul split over the "model" axis, or a gradient summed over
# the "data" axis, adds partial sums. Measured differences are about 1e-7.
ATOL = 1e-6
RTOL = 1e-6

# Logical axis name -> mesh axis: the hidden ("mlp") dimension is split over
# "model", the batch over "data", and "embed" is replicated.
RULES = (("batch", "data"), ("embed", None), ("mlp", "model"))


class Mlp(tflax.Module):
    """Two lazy layers with no partitioning metadata: plain arrays."""

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        hidden = nn.relu(self.make(tflax.LazyLinear, HIDDEN)(x))
        return self.make(tflax.LazyLinear, FEATURES)(hidden)


class TensorParallelMlp(tflax.Module):
    """Megatron-style MLP: the first kernel split by columns, the second by rows."""

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        up = self.make(
            tflax.LazyLinear, HIDDEN, kernel_axes=("embed", "mlp"), bias_axes=("mlp",)
        )
        down = self.make(
            tflax.LazyLinear, FEATURES, kernel_axes=("mlp", "embed"), bias_axes=("embed",)
        )
        return down(nn.relu(up(x)))


class ConvNet(tflax.Module):
    """A channels-first convolution whose output channels are split over "model".

    It is a LazyConv1d because XLA took one to two seconds longer to compile
    the random init of a 4-D kernel (jax 0.10.2 on a two-core CPU).
    """

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        axes = {"kernel_axes": (None, "embed", "mlp"), "bias_axes": ("mlp",)}
        conv = self.make(tflax.LazyConv1d, HIDDEN, 3, padding=1, **axes)
        return conv(x)


def batch(features: int = FEATURES) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (BATCH, features))


def targets() -> jax.Array:
    return jax.random.normal(jax.random.key(2), (BATCH, FEATURES))


def mesh_2x4() -> Mesh:
    return Mesh(np.array(jax.devices()[:DEVICES]).reshape(2, 4), ("data", "model"))


def mesh_8() -> Mesh:
    return Mesh(np.array(jax.devices()[:DEVICES]), ("data",))


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in flat]


def assert_trees_close(actual: Any, expected: Any) -> None:
    for (path, a), (_, e) in zip(leaves_with_paths(actual), leaves_with_paths(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=ATOL, rtol=RTOL, err_msg=path)


# -- sharded initialisation ------------------------------------------------------------


def test_eval_shape_init_allocates_nothing() -> None:
    abstract = jax.eval_shape(Mlp().init, KEY, batch())

    leaves = leaves_with_paths(abstract)
    assert len(leaves) == 4
    for path, leaf in leaves:
        assert isinstance(leaf, jax.ShapeDtypeStruct), f"{path} is {type(leaf).__name__}"
    params = abstract["params"]
    assert params["LazyLinear_0"]["kernel"].shape == (FEATURES, HIDDEN)
    assert params["LazyLinear_1"]["kernel"].shape == (HIDDEN, FEATURES)


@needs_devices
def test_jit_init_creates_params_in_shards() -> None:
    model = Mlp()
    mesh = mesh_2x4()
    abstract = jax.eval_shape(model.init, KEY, batch())

    def sharding_for(leaf: jax.ShapeDtypeStruct) -> NamedSharding:
        # split each parameter's last dimension over "model" where it divides
        splits = leaf.shape[-1] % mesh.shape["model"] == 0
        spec = P(*([None] * (len(leaf.shape) - 1)), "model") if splits else P()
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map(sharding_for, abstract)
    variables = jax.jit(model.init, out_shardings=shardings)(KEY, batch())

    for (path, leaf), (_, sharding) in zip(
        leaves_with_paths(variables), leaves_with_paths(shardings)
    ):
        assert leaf.sharding == sharding, path
    kernel = variables["params"]["LazyLinear_0"]["kernel"]
    assert kernel.sharding.spec == P(None, "model")
    assert kernel.addressable_shards[0].data.shape == (FEATURES, HIDDEN // 4)
    bias = variables["params"]["LazyLinear_1"]["bias"]
    assert bias.sharding.spec == P()  # FEATURES = 6 does not split over 4 devices
    assert_trees_close(variables, model.init(KEY, batch()))


# -- logical partitioning ----------------------------------------------------------------


def test_layers_without_axes_stay_plain_arrays() -> None:
    variables = Mlp().init(KEY, batch())

    for path, leaf in leaves_with_paths(variables):
        assert isinstance(leaf, jax.Array), f"{path} is {type(leaf).__name__}"


def test_logical_axes_reach_partition_spec() -> None:
    abstract = jax.eval_shape(TensorParallelMlp().init, KEY, batch())

    spec = nn.get_partition_spec(abstract)["params"]

    assert spec["LazyLinear_0"] == {"kernel": P("embed", "mlp"), "bias": P("mlp")}
    assert spec["LazyLinear_1"] == {"kernel": P("mlp", "embed"), "bias": P("embed")}
    boxed = abstract["params"]["LazyLinear_0"]["kernel"]
    assert isinstance(boxed, nn.LogicallyPartitioned)
    assert isinstance(boxed.value, jax.ShapeDtypeStruct)


@needs_devices
def test_tensor_parallel_linear_matches_unsharded() -> None:
    model = TensorParallelMlp()
    mesh = mesh_2x4()
    x = batch()
    abstract = jax.eval_shape(model.init, KEY, x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)

    variables = jax.jit(model.init, out_shardings=shardings)(KEY, x)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        output = jax.jit(model.apply)(variables, x_sharded)

    params = variables["params"]
    assert params["LazyLinear_0"]["kernel"].value.sharding.spec == P(None, "model")
    assert params["LazyLinear_0"]["bias"].value.sharding.spec == P("model")
    assert params["LazyLinear_1"]["kernel"].value.sharding.spec == P("model", None)
    assert params["LazyLinear_1"]["bias"].value.sharding.spec == P(None)
    assert params["LazyLinear_1"]["kernel"].value.addressable_shards[0].data.shape == (4, FEATURES)

    unsharded = model.init(KEY, x)
    assert_trees_close(nn.meta.unbox(variables), nn.meta.unbox(unsharded))
    expected = model.apply(unsharded, x)
    np.testing.assert_allclose(np.asarray(output), np.asarray(expected), atol=ATOL, rtol=RTOL)


@needs_devices
def test_conv_logical_axes_shard_output_channels() -> None:
    model = ConvNet()
    mesh = mesh_2x4()
    x = jax.random.normal(jax.random.key(3), (2, 3, 5))
    abstract = jax.eval_shape(model.init, KEY, x)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)

    variables = jax.jit(model.init, out_shardings=shardings)(KEY, x)
    output = jax.jit(model.apply)(variables, x)

    kernel = variables["params"]["LazyConv1d_0"]["kernel"].value
    assert kernel.sharding.spec == P(None, None, "model")
    assert kernel.addressable_shards[0].data.shape == (3, 3, HIDDEN // 4)
    assert variables["params"]["LazyConv1d_0"]["bias"].value.sharding.spec == P("model")
    # the same values as host arrays, with no sharding and no metadata
    unsharded = jax.device_get(nn.meta.unbox(variables))
    expected = model.apply(unsharded, x)
    np.testing.assert_allclose(np.asarray(output), np.asarray(expected), atol=ATOL, rtol=RTOL)


@needs_devices
def test_make_passes_logical_init_to_linen_dense() -> None:
    class DenseNet(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return self.make(nn.Dense, HIDDEN, kernel_init=init)(x)

    model = DenseNet()
    abstract = jax.eval_shape(model.init, KEY, batch())
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh_2x4(), RULES)

    variables = jax.jit(model.init, out_shardings=shardings)(KEY, batch())
    output = model.apply(variables, batch())  # a second pass checks the make call

    assert variables["params"]["Dense_0"]["kernel"].value.sharding.spec == P(None, "model")
    assert output.shape == (BATCH, HIDDEN)


@needs_devices
def test_tensor_parallel_step_matches_unsharded() -> None:
    model = TensorParallelMlp()
    mesh = mesh_2x4()
    optimizer = optax.adam(1e-2)
    x, y = batch(), targets()
    abstract = jax.eval_shape(model.init, KEY, x)
    param_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, RULES)
    opt_abstract = jax.eval_shape(optimizer.init, abstract["params"])
    opt_shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(opt_abstract), mesh, RULES)
    train_step = make_train_step(model, optimizer)

    params = jax.jit(model.init, out_shardings=param_shardings)(KEY, x)["params"]
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    with jax.set_mesh(mesh), nn.logical_axis_rules(RULES):
        params, opt_state, loss = jax.jit(train_step)(params, opt_state, x, y)

    kernel = params["LazyLinear_1"]["kernel"].value
    assert kernel.sharding.is_equivalent_to(param_shardings["params"]["LazyLinear_1"]["kernel"], 2)
    single = nn.meta.unbox(model.init(KEY, x))["params"]
    single, _, single_loss = jax.jit(train_step)(single, optimizer.init(single), x, y)
    np.testing.assert_allclose(float(loss), float(single_loss), atol=ATOL, rtol=RTOL)
    assert_trees_close(nn.meta.unbox(params), single)


@pytest.mark.parametrize(
    ("layer", "arguments", "message"),
    [
        (tflax.LazyLinear, {"kernel_axes": ("embed",)}, r"kernel_axes must be .* 2 logical"),
        (tflax.LazyLinear, {"kernel_axes": "embed"}, r"kernel_axes must be .* got 'embed'"),
        (tflax.LazyLinear, {"bias_axes": (0,)}, r"bias_axes must be .* got \(0,\)"),
        (tflax.LazyConv2d, {"kernel_axes": (None, "mlp")}, r"kernel_axes must be .* 4 logical"),
    ],
    ids=["linear-length", "linear-string", "linear-bias-type", "conv-length"],
)
def test_invalid_logical_axes_raise(layer: type, arguments: dict, message: str) -> None:
    positional = (4,) if layer is tflax.LazyLinear else (4, 3)

    with pytest.raises(ValueError, match=message):
        layer(*positional, **arguments)


# -- shard_map -----------------------------------------------------------------------------


@needs_devices
def test_shard_map_apply_matches_unsharded() -> None:
    model = Mlp()
    mesh = mesh_8()
    x = batch()
    variables = model.init(KEY, x)

    per_device = jax.shard_map(
        model.apply, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data")
    )
    output = jax.jit(per_device)(variables, x)

    assert output.sharding.spec == P("data")
    assert output.addressable_shards[0].data.shape == (BATCH // DEVICES, FEATURES)
    # XLA may block a matmul differently for 2 rows than for 16, so allow
    # rounding differences.
    expected = model.apply(variables, x)
    np.testing.assert_allclose(np.asarray(output), np.asarray(expected), atol=ATOL, rtol=RTOL)


# -- data-parallel training ------------------------------------------------------------------


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation) -> Any:
    def loss_fn(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


@needs_devices
@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.adam(1e-2)], ids=["sgd", "adam"])
def test_data_parallel_step_matches_single_device(optimizer: optax.GradientTransformation) -> None:
    model = Mlp()
    mesh = mesh_8()
    replicated = NamedSharding(mesh, P())
    sharded_batch = NamedSharding(mesh, P("data"))
    x, y = batch(), targets()
    params = model.init(KEY, x)["params"]

    train_step = make_train_step(model, optimizer)
    single_step = jax.jit(train_step)
    parallel_step = jax.jit(
        train_step,
        in_shardings=(replicated, replicated, sharded_batch, sharded_batch),
        out_shardings=(replicated, replicated, replicated),
    )

    single = (params, optimizer.init(params))
    parallel = jax.device_put(single, replicated)
    for _ in range(3):
        *single, single_loss = single_step(*single, x, y)
        *parallel, parallel_loss = parallel_step(*parallel, x, y)
        np.testing.assert_allclose(float(parallel_loss), float(single_loss), atol=ATOL, rtol=RTOL)

    for path, leaf in leaves_with_paths(parallel[0]):
        assert leaf.sharding.is_fully_replicated, path
        assert len(leaf.sharding.device_set) == DEVICES, path
    assert_trees_close(parallel[0], single[0])
