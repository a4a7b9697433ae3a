"""terrace.port: exact round trips, slot-by-slot checks and portable checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn as nn

import terrace
import terrace as ter
from neutral_models import MLP, SmallCNN, TransformerBlock


class Layers(ter.Module):
    """Every torch layer kind in the port registry, reached through make."""

    def forward(self, x, tokens):
        self.start_forward()
        h = self.make(ter.LazyLinear, 6)(x)
        h = self.make(ter.LazyLayerNorm)(h)
        h = h + self.make(nn.Embedding, 10, 6)(tokens)
        h = self.make(nn.Linear, 6, 6, bias=False)(h)
        h, _ = self.make(ter.LazyMultiheadAttention, 2, batch_first=True)(h, h, h)
        h, _ = self.make(nn.MultiheadAttention, 6, 3, kdim=4, vdim=5, batch_first=True, add_bias_kv=True)(
            h, h[..., :4], h[..., :5]
        )
        image = h.reshape(h.shape[0], 1, h.shape[1], h.shape[2])
        image = self.make(ter.LazyConv2d, 3, (2, 3), stride=(2, 1), padding=(1, 2))(image)
        image = self.make(ter.LazyBatchNorm2d, momentum=None)(image)
        line = self.make(ter.LazyConv1d, 2, 3, groups=1)(image.flatten(2))
        line = self.make(nn.Conv3d, 2, 1, 1)(line.unsqueeze(-1).unsqueeze(-1)).flatten(1)
        return self.make(nn.LayerNorm, line.shape[-1], elementwise_affine=False)(line)


def built_layers():
    torch.manual_seed(0)
    model = Layers()
    x, tokens = torch.randn(2, 5, 7), torch.randint(0, 10, (2, 5))
    model(x, tokens)
    model(x, tokens)
    return model.eval(), (x, tokens)


def test_round_trip_reproduces_every_tensor():
    source, _ = built_layers()
    variables = terrace.port.torch_to_flax(source)
    target = Layers()
    target(*built_layers()[1])
    terrace.port.flax_to_torch(variables, target)
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key


def test_round_trip_into_never_run_model():
    source, inputs = built_layers()
    variables = terrace.port.torch_to_flax(source)
    target = terrace.port.flax_to_torch(variables, Layers().eval())
    target(*inputs)
    for key, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], tensor), key


def test_flax_layout_per_kind():
    source, _ = built_layers()
    params = terrace.port.torch_to_flax(source)["params"]
    stats = terrace.port.torch_to_flax(source)["batch_stats"]
    assert params["LazyLinear_0"]["kernel"].shape == (7, 6)
    assert set(params["LazyLayerNorm_0"]) == {"scale", "bias"}
    assert params["Embedding_0"]["embedding"].shape == (10, 6)
    assert set(params["Linear_0"]) == {"kernel"}
    assert set(params["LazyMultiheadAttention_0"]) == {"query", "key", "value", "out"}
    assert params["MultiheadAttention_0"]["key"]["kernel"].shape == (4, 6)
    assert params["MultiheadAttention_0"]["bias_k"].shape == (1, 1, 6)
    assert params["LazyConv2d_0"]["kernel"].shape == (2, 3, 1, 3)
    assert set(stats["LazyBatchNorm2d_0"]) == {"mean", "var", "num_batches_tracked"}
    assert int(stats["LazyBatchNorm2d_0"]["num_batches_tracked"]) == 2
    assert params["Conv3d_0"]["kernel"].shape == (1, 1, 1, 2, 1)
    assert "LayerNorm_0" not in params


@pytest.mark.parametrize(
    ("factory", "shape"),
    [(MLP, (3, 5)), (TransformerBlock, (2, 4, 8)), (SmallCNN, (2, 3, 8, 8))],
    ids=["mlp", "transformer", "cnn"],
)
def test_neutral_round_trip_is_exact(factory, shape):
    x = torch.randn(shape)
    source = terrace.torch.build(factory())
    source(x)
    source(x)
    variables = terrace.port.torch_to_flax(source)
    back = terrace.port.flax_to_torch(variables, terrace.torch.build(factory()).eval())
    back(x)
    for key, tensor in source.state_dict().items():
        assert torch.equal(back.state_dict()[key], tensor), key


def test_never_run_source_raises():
    with pytest.raises(ter.NotBuiltError, match="before the first forward pass"):
        terrace.port.torch_to_flax(terrace.torch.build(MLP()))


def test_unbuilt_branch_names_slot():
    class Branches(ter.Module):
        def forward(self, x):
            self.start_forward()
            first, second = self.make(ter.LazyLinear, 2), self.make(ter.LazyLinear, 2)
            return first(x)

    model = Branches()
    model(torch.ones(1, 3))
    with pytest.raises(ter.NotBuiltError, match=r"slot LazyLinear_1 \(LazyLinear\) has not run"):
        terrace.port.torch_to_flax(model)


def test_unknown_layer_kind_is_reported():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.gain

    class UsesCustom(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(Custom)(x)

    model = UsesCustom()
    model(torch.ones(3))
    with pytest.raises(ter.StateError, match=r"no converter covers these state entries: Custom_0.gain"):
        terrace.port.torch_to_flax(model)


def test_custom_converter_is_one_call():
    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.full((3,), 2.0))

        def forward(self, x):
            return x * self.gain

    class UsesGain(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(Gain)(x)

    terrace.port.register_converter(
        terrace.port.Converter(
            kind="gain",
            torch_types=(f"{Gain.__module__}.{Gain.__qualname__}",),
            to_flax=lambda arrays, slot: ({"gain": arrays["gain"]}, {}),
            to_torch=lambda params, stats, slot: {"gain": np.asarray(params["gain"])},
            is_flax=lambda params, stats: set(params) == {"gain"},
        )
    )
    model = UsesGain()
    model(torch.ones(3))
    variables = terrace.port.torch_to_flax(model)
    assert np.asarray(variables["params"]["Gain_0"]["gain"]).tolist() == [2.0, 2.0, 2.0]
    target = terrace.port.flax_to_torch(variables, UsesGain())
    assert torch.equal(target(torch.ones(3)), torch.full((3,), 2.0))


def test_inserted_layer_is_reported_slot_by_slot():
    class Shallow(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(ter.LazyLinear, 4)(self.make(ter.LazyLinear, 4)(x))

    class Deeper(ter.Module):
        def forward(self, x):
            self.start_forward()
            h = self.make(ter.LazyLinear, 4)(x)
            h = self.make(ter.LazyLayerNorm)(h)
            h = self.make(ter.LazyLinear, 4)(h)
            return self.make(ter.LazyLinear, 4)(h)

    source, target = Shallow(), Deeper()
    source(torch.ones(1, 4))
    target(torch.ones(1, 4))
    with pytest.raises(ter.StateError) as info:
        terrace.port.flax_to_torch(terrace.port.torch_to_flax(source), target)
    message = str(info.value)
    assert "LazyLayerNorm_0: in the target only" in message
    assert "LazyLinear_2: in the target only" in message
    assert "nothing was loaded" in message


def test_shape_mismatch_names_slot():
    source = terrace.torch.build(MLP(hidden=16))
    target = terrace.torch.build(MLP(hidden=8))
    source(torch.ones(2, 5))
    target(torch.ones(2, 5))
    with pytest.raises(ter.StateError, match=r"slot Linear_0 \(linear\): .*weight \(16, 5\) instead of \(8, 5\)"):
        terrace.port.flax_to_torch(terrace.port.torch_to_flax(source), target)


def test_checkpoint_round_trip_both_ways(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    source = terrace.torch.build(SmallCNN())
    source(torch.as_tensor(x))
    source.eval()
    expected = source(torch.as_tensor(x)).detach().numpy()
    path = tmp_path / "cnn.safetensors"
    terrace.save(source, path)

    flax_model = terrace.flax.build(SmallCNN(), train=False)
    variables = terrace.load(path, flax_model, jnp.asarray(x))
    with jax.default_matmul_precision("highest"):
        assert np.abs(np.asarray(flax_model.apply(variables, jnp.asarray(x))) - expected).max() <= 1e-5

    again = tmp_path / "from_flax.safetensors"
    terrace.save(variables, again)
    restored = terrace.load(again, terrace.torch.build(SmallCNN()).eval())
    assert np.abs(restored(torch.as_tensor(x)).detach().numpy() - expected).max() <= 1e-6


def test_checkpoint_kinds_checked_before_loading(tmp_path):
    class Norms(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(ter.LazyLayerNorm, name="block")(x)

    class Linears(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(ter.LazyLinear, 4, name="block")(x)

    source, target = Norms(), Linears()
    source(torch.ones(2, 4))
    target(torch.ones(2, 4))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    terrace.save(source, tmp_path / "norm.safetensors")
    with pytest.raises(ter.StateError, match="block: layer_norm in the source, linear in the target"):
        terrace.load(tmp_path / "norm.safetensors", target)
    for key, tensor in target.state_dict().items():
        assert torch.equal(tensor, before[key])


def test_checkpoint_shape_checked_for_flax(tmp_path):
    source = terrace.torch.build(MLP(hidden=16))
    source(torch.ones(2, 5))
    terrace.save(source, tmp_path / "mlp.safetensors")
    with pytest.raises(ter.StateError, match=r"\['params'\]\['Linear_0'\]\['kernel'\]: shape \(5, 16\) in the checkpoint, \(5, 8\)"):
        terrace.load(tmp_path / "mlp.safetensors", terrace.flax.build(MLP(hidden=8)), jnp.ones((2, 5)))


def test_plain_safetensors_file_is_rejected(tmp_path):
    from safetensors.numpy import save_file

    save_file({"w": np.ones(2, dtype=np.float32)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ter.StateError, match="not a terrace checkpoint"):
        terrace.load(tmp_path / "plain.safetensors", terrace.torch.build(MLP()))


def test_saving_never_run_model_raises(tmp_path):
    with pytest.raises(ter.StateError, match="has not run yet"):
        terrace.save(terrace.torch.build(MLP()), tmp_path / "x.safetensors")


def test_torch_save_file_is_rejected(tmp_path):
    path = tmp_path / "net.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(ter.StateError, match="could not be read as a safetensors file.*torch.load"):
        terrace.load(path, terrace.torch.build(MLP()))


def test_load_into_neutral_model_asks_to_build(tmp_path):
    source = terrace.torch.build(MLP())
    source(torch.ones(2, 5))
    terrace.save(source, tmp_path / "mlp.safetensors")
    with pytest.raises(TypeError, match=r"neutral model MLP itself.*terrace.torch.build\(MLP\(...\)\)"):
        terrace.load(tmp_path / "mlp.safetensors", MLP())
    with pytest.raises(TypeError, match="expects a torch module, a Flax module or Flax variables"):
        terrace.load(tmp_path / "mlp.safetensors", object())
