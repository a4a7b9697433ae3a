"""Backend-neutral models built for PyTorch."""

import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import terrace
from terrace import layers, ops


class MLP(terrace.Model):
    def __init__(self, hidden, classes):
        self.hidden = hidden
        self.classes = classes

    def forward(self, x):
        self.start_forward()
        h = ops.relu(self.make(layers.Linear, self.hidden)(x))
        return self.make(layers.Linear, self.classes)(h)


class Block(terrace.Model):
    def __init__(self, heads):
        self.heads = heads

    def forward(self, x):
        self.start_forward()
        h = self.make(layers.LayerNorm)(x)
        attended, _ = self.make(layers.MultiheadAttention, self.heads, batch_first=True)(h, h, h)
        x = x + attended
        h = self.make(layers.LayerNorm)(x)
        width = x.shape[-1]
        h = self.make(layers.Linear, width)(ops.gelu(self.make(layers.Linear, 2 * width)(h)))
        return x + h


class Encoder(terrace.Model):
    def __init__(self, vocab, width, depth):
        self.vocab = vocab
        self.width = width
        self.depth = depth

    def forward(self, tokens):
        self.start_forward()
        x = self.make(layers.Embedding, self.vocab, self.width)(tokens)
        for _ in range(self.depth):
            x = self.make(Block, 2)(x)
        xp = ops.namespace(x)
        return xp.mean(x, axis=1)


def test_mlp_builds_torch_module():
    model = terrace.torch.build(MLP(8, 3))
    out = model(torch.randn(4, 5))
    assert isinstance(model, nn.Module)
    assert isinstance(model, terrace.torch.Module)
    assert out.shape == (4, 3)
    assert list(model.state_dict()) == ["Linear_0.weight", "Linear_0.bias", "Linear_1.weight", "Linear_1.bias"]


def test_built_mlp_computes_relu_mlp():
    model = terrace.torch.build(MLP(8, 3))
    x = torch.randn(4, 5)
    out = model(x)
    expected = model.Linear_1(F.relu(model.Linear_0(x)))
    assert torch.equal(out, expected)


def test_nested_models_have_nested_names():
    model = terrace.torch.build(Encoder(vocab=11, width=8, depth=2))
    out = model(torch.randint(0, 11, (3, 5)))
    assert out.shape == (3, 8)
    names = [name for name, _ in model.named_children()]
    assert names == ["Embedding_0", "Block_0", "Block_1"]
    assert "Block_1.MultiheadAttention_0.in_proj_weight" in model.state_dict()


def test_each_build_is_independent():
    config = MLP(8, 3)
    first, second = terrace.torch.build(config), terrace.torch.build(config)
    x = torch.randn(2, 5)
    first(x)
    second(x)
    assert first.Linear_0 is not second.Linear_0
    assert not hasattr(config, "_terrace_table")


def test_built_model_pickles():
    model = terrace.torch.build(MLP(8, 3))
    x = torch.randn(2, 5)
    expected = model(x)
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is type(model)
    assert torch.equal(copy(x), expected)


def test_strict_false_is_kept():
    class Loose(terrace.Model):
        strict = False

        def forward(self, x, depth):
            self.start_forward()
            for _ in range(depth):
                x = self.make(layers.Linear, 4)(x)
            return x

    model = terrace.torch.build(Loose())
    model(torch.randn(1, 4), 1)
    model(torch.randn(1, 4), 3)
    assert len(list(model.children())) == 3


def test_calling_neutral_model_directly_raises():
    with pytest.raises(terrace.TerraceError, match=r"MLP.__call__\(\) .* terrace.torch.build\(MLP\(...\)\)"):
        MLP(8, 3)(torch.randn(2, 5))


def test_torch_function_in_neutral_forward_raises():
    class UsesTorch(terrace.Model):
        def forward(self, x):
            self.start_forward()
            return F.gelu(self.make(layers.Linear, 3)(x))

    with pytest.raises(terrace.TerraceError, match=r"calls torch\.nn\.functional\.gelu at .*Fix: use terrace\.ops\.gelu"):
        terrace.torch.build(UsesTorch())(torch.randn(2, 4))


def test_torch_array_function_in_neutral_forward_raises():
    class Concatenates(terrace.Model):
        def forward(self, x):
            self.start_forward()
            return torch.cat([x, x], dim=-1)

    with pytest.raises(terrace.TerraceError, match=r"calls torch\.cat .*terrace\.ops\.namespace"):
        terrace.torch.build(Concatenates())(torch.randn(2, 4))


def test_tensor_methods_and_operators_are_allowed():
    class Methods(terrace.Model):
        def forward(self, x):
            self.start_forward()
            y = self.make(layers.Linear, 4)(x)
            return (y @ y.T + 1).sum(), y.shape

    total, shape = terrace.torch.build(Methods())(torch.randn(2, 4))
    assert shape == (2, 4)
    assert total.dim() == 0


def test_wrong_layer_arguments_show_signature():
    class Wrong(terrace.Model):
        def forward(self, x):
            self.start_forward()
            return self.make(layers.Linear, 4, bais=False)(x)

    with pytest.raises(TypeError, match=r"make\(Linear, ...\): .*bais.*Linear\(out_features: int, bias: bool = True\)"):
        terrace.torch.build(Wrong())(torch.randn(2, 4))


def test_instantiating_a_layer_spec_raises():
    with pytest.raises(terrace.TerraceError, match=r"pass the class to make, as self.make\(Linear, ...\)"):
        layers.Linear(4)


def test_build_rejects_non_model():
    with pytest.raises(TypeError, match="expects a terrace.Model instance, got Linear"):
        terrace.torch.build(nn.Linear(2, 2))


def test_new_neutral_layer_is_one_registration():
    class Scale(layers.NeutralLayer):
        def __init__(self, factor: float) -> None: ...

    class TorchScale(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    terrace.register_layer(Scale, "torch", TorchScale)

    class UsesScale(terrace.Model):
        def forward(self, x):
            self.start_forward()
            return self.make(Scale, 3.0)(x)

    model = terrace.torch.build(UsesScale())
    assert torch.equal(model(torch.ones(2)), torch.full((2,), 3.0))
    assert [name for name, _ in model.named_children()] == ["Scale_0"]


def test_layer_without_implementation_names_backend():
    class Unported(layers.NeutralLayer):
        def __init__(self) -> None: ...

    class UsesUnported(terrace.Model):
        def forward(self, x):
            self.start_forward()
            return self.make(Unported)(x)

    with pytest.raises(terrace.TerraceError, match=r"Unported has no implementation for the torch backend"):
        terrace.torch.build(UsesUnported())(torch.ones(1))


def test_unknown_backend_lists_known_ones():
    with pytest.raises(terrace.TerraceError, match=r"unknown backend 'mxnet'. Registered backends: flax, torch"):
        terrace.get_backend("mxnet")


@pytest.mark.parametrize(
    ("op", "reference"),
    [
        (lambda x: ops.relu(x), F.relu),
        (lambda x: ops.gelu(x), F.gelu),
        (lambda x: ops.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
        (lambda x: ops.silu(x), F.silu),
        (lambda x: ops.sigmoid(x), torch.sigmoid),
        (lambda x: ops.tanh(x), torch.tanh),
        (lambda x: ops.softmax(x, axis=0), lambda x: torch.softmax(x, dim=0)),
        (lambda x: ops.log_softmax(x), lambda x: torch.log_softmax(x, dim=-1)),
    ],
    ids=["relu", "gelu", "gelu-tanh", "silu", "sigmoid", "tanh", "softmax", "log_softmax"],
)
def test_ops_match_torch(op, reference):
    x = torch.randn(5, 7)
    assert torch.equal(op(x), reference(x))


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'fast'"):
        ops.gelu(torch.ones(1), approximate="fast")


def test_ops_reject_non_arrays():
    with pytest.raises(TypeError, match=r"terrace.ops got a builtins.list"):
        ops.relu([1.0, -1.0])
