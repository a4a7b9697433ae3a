"""One neutral model source gives the same outputs on torch and Flax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import terrace
from terrace import ops
from neutral_models import MLP, SmallCNN, Tagger, TransformerBlock

CASES = [
    (MLP, lambda rng: rng.standard_normal((4, 7))),
    (TransformerBlock, lambda rng: rng.standard_normal((2, 5, 8))),
    (lambda: TransformerBlock(batch_first=False), lambda rng: rng.standard_normal((5, 2, 8))),
    (lambda: TransformerBlock(approximate="tanh"), lambda rng: rng.standard_normal((2, 5, 8))),
    (SmallCNN, lambda rng: rng.standard_normal((3, 2, 8, 9))),
    (Tagger, lambda rng: rng.integers(0, 20, (2, 6))),
]
IDS = ["mlp", "transformer", "transformer-seq-first", "transformer-gelu-tanh", "cnn", "tagger"]


def torch_model(factory, x):
    model = terrace.torch.build(factory())
    model(torch.as_tensor(x))
    return model.eval()


def as_input(x):
    return x.astype(np.float32) if x.dtype.kind == "f" else x


@pytest.mark.parametrize(("factory", "make_input"), CASES, ids=IDS)
def test_torch_to_flax_outputs_agree(factory, make_input):
    x = as_input(make_input(np.random.default_rng(0)))
    source = torch_model(factory, x)
    variables = terrace.port.torch_to_flax(source)
    target = terrace.flax.build(factory(), train=False)
    expected = source(torch.as_tensor(x)).detach().numpy()
    with jax.default_matmul_precision("highest"):
        actual = np.asarray(target.apply(variables, jnp.asarray(x)))
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1e-5


@pytest.mark.parametrize(("factory", "make_input"), CASES, ids=IDS)
def test_flax_to_torch_outputs_agree(factory, make_input):
    x = as_input(make_input(np.random.default_rng(1)))
    source = terrace.flax.build(factory(), train=False)
    variables = source.init(jax.random.key(3), jnp.asarray(x))
    with jax.default_matmul_precision("highest"):
        expected = np.asarray(source.apply(variables, jnp.asarray(x)))
    target = terrace.port.flax_to_torch(variables, terrace.torch.build(factory()).eval())
    actual = target(torch.as_tensor(x)).detach().numpy()
    assert np.abs(actual - expected).max() <= 1e-5


@pytest.mark.parametrize(("factory", "make_input"), CASES, ids=IDS)
def test_slot_paths_and_counts_match(factory, make_input):
    x = as_input(make_input(np.random.default_rng(2)))
    torch_side = torch_model(factory, x)
    flax_side = terrace.flax.build(factory(), train=False)
    variables = flax_side.init(jax.random.key(0), jnp.asarray(x))
    torch_slots = {name.rsplit(".", 1)[0] for name, _ in torch_side.named_parameters()}
    flax_paths = {
        ".".join(str(k.key) for k in path[:-1])
        for path, _ in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    }
    torch_count = sum(p.numel() for p in torch_side.parameters())
    flax_count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
    assert {p.split(".")[0] for p in torch_slots} == set(variables["params"])
    assert torch_count == flax_count
    assert len(flax_paths) >= len({p.split(".")[0] for p in torch_slots})


def test_same_slot_names_on_both_backends():
    x = np.random.default_rng(0).integers(0, 20, (2, 6))
    torch_side = torch_model(Tagger, x)
    variables = terrace.flax.build(Tagger()).init(
        {"params": jax.random.key(0), "dropout": jax.random.key(1)}, jnp.asarray(x)
    )
    assert [name for name, _ in torch_side.named_children()] == ["Embedding_0", "TransformerBlock_0", "Dropout_0", "Linear_0"]
    assert sorted(variables["params"]) == ["Embedding_0", "Linear_0", "TransformerBlock_0"]
    assert sorted(variables["params"]["TransformerBlock_0"]) == [
        "LayerNorm_0",
        "LayerNorm_1",
        "Linear_0",
        "Linear_1",
        "MultiheadAttention_0",
    ]


def test_flax_dropout_needs_rng_in_training():
    model = terrace.flax.build(Tagger())
    x = jnp.zeros((2, 6), dtype=jnp.int32)
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    with pytest.raises(terrace.TerraceError, match="Dropout_0"):
        model.apply(variables, x)
    out = model.apply(variables, x, rngs={"dropout": jax.random.key(2)})
    assert out.shape == (2, 6, 1)


def test_flax_build_rejects_reserved_setting_names():
    class Named(terrace.Model):
        def __init__(self):
            self.name = "mine"

        def forward(self, x):
            self.start_forward()
            return x

    with pytest.raises(terrace.TerraceError, match="settings named name"):
        terrace.flax.build(Named())


def test_flax_build_keeps_helper_methods():
    class WithHelper(terrace.Model):
        def __init__(self, width):
            self.width = width

        def forward(self, x):
            self.start_forward()
            return self.project(x)

        def project(self, x):
            from terrace import layers

            return self.make(layers.Linear, self.width)(x)

    model = terrace.flax.build(WithHelper(3))
    variables = model.init(jax.random.key(0), jnp.ones((2, 4)))
    assert model.apply(variables, jnp.ones((2, 4))).shape == (2, 3)
    assert list(variables["params"]) == ["Linear_0"]


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("relu", lambda m, x: m.relu(x)),
        ("gelu", lambda m, x: m.gelu(x)),
        ("gelu-tanh", lambda m, x: m.gelu(x, approximate="tanh")),
        ("silu", lambda m, x: m.silu(x)),
        ("sigmoid", lambda m, x: m.sigmoid(x)),
        ("tanh", lambda m, x: m.tanh(x)),
        ("softmax", lambda m, x: m.softmax(x, axis=0)),
        ("log_softmax", lambda m, x: m.log_softmax(x)),
    ],
)
def test_ops_agree_across_backends(name, call):
    x = np.random.default_rng(4).standard_normal((6, 5)).astype(np.float32) * 3
    on_torch = call(ops, torch.as_tensor(x)).numpy()
    on_jax = np.asarray(call(ops, jnp.asarray(x)))
    assert np.abs(on_torch - on_jax).max() <= 1e-6


def test_namespace_functions_work_on_both():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    for array in (torch.as_tensor(x), jnp.asarray(x)):
        xp = ops.namespace(array)
        joined = xp.concat([array, array], axis=0)
        assert tuple(joined.shape) == (4, 3)
        assert float(xp.mean(joined)) == pytest.approx(2.5)
