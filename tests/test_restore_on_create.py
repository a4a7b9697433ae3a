"""load_state_dict on a never-run module applies each tensor as its slot is created."""

import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import terrace as ter


class MLP(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = F.relu(self.make(ter.LazyLinear, 8)(x))
        h = self.make(ter.LazyLayerNorm)(h)
        return self.make(ter.LazyLinear, 2)(h)


class Wider(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = F.relu(self.make(ter.LazyLinear, 16)(x))
        h = self.make(ter.LazyLayerNorm)(h)
        return self.make(ter.LazyLinear, 2)(h)


class Inserted(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = F.relu(self.make(ter.LazyLinear, 8)(x))
        h = self.make(ter.LazyLinear, 8)(h)
        h = self.make(ter.LazyLayerNorm)(h)
        return self.make(ter.LazyLinear, 2)(h)


class WithPlainLayer(ter.Module):
    def forward(self, x):
        self.start_forward()
        return self.make(nn.Linear, x.shape[-1], 3)(x)


def saved(model: nn.Module) -> dict:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def trained_mlp():
    model = MLP()
    model(torch.randn(3, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_state_applies_on_first_pass():
    source = trained_mlp()
    target = MLP()
    result = target.load_state_dict(saved(source))
    assert list(result.missing_keys) == []
    assert list(result.unexpected_keys) == []
    x = torch.randn(3, 5)
    assert torch.equal(target(x), source(x))


def test_state_of_never_run_model_is_kept():
    source = trained_mlp()
    middle = MLP()
    middle.load_state_dict(source.state_dict())
    assert list(middle.state_dict()) == list(source.state_dict())
    target = MLP()
    target.load_state_dict(saved(middle))
    x = torch.randn(3, 5)
    assert torch.equal(target(x), source(x))


def test_plain_torch_layer_restores():
    source = WithPlainLayer()
    source(torch.randn(2, 4))
    target = WithPlainLayer()
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(target(x), source(x))


def test_wrong_shape_names_slot():
    target = Wider()
    target.load_state_dict(saved(trained_mlp()))
    with pytest.raises(ter.StateError, match=r"(?s)slot Wider\.LazyLinear_0: .*size mismatch"):
        target(torch.randn(3, 5))


def test_inserted_layer_of_other_shape_names_slot():
    target = Inserted()
    target.load_state_dict(saved(trained_mlp()))
    with pytest.raises(ter.StateError, match=r"(?s)slot Inserted\.LazyLinear_1: .*size mismatch"):
        target(torch.randn(3, 5))


def test_inserted_layer_of_same_shape_is_reported():
    class Deeper(ter.Module):
        def forward(self, x):
            self.start_forward()
            h = self.make(ter.LazyLinear, 8)(x)
            h = self.make(ter.LazyLinear, 8)(h)
            return self.make(ter.LazyLinear, 8)(h)

    class Shallow(ter.Module):
        def forward(self, x):
            self.start_forward()
            h = self.make(ter.LazyLinear, 8)(x)
            return self.make(ter.LazyLinear, 8)(h)

    source = Shallow()
    source(torch.randn(2, 8))
    target = Deeper()
    target.load_state_dict(source.state_dict())
    with pytest.raises(ter.StateError, match=r"(?s)slot Deeper\.LazyLinear_2: .*Missing key"):
        target(torch.randn(2, 8))


def test_unknown_keys_raise_when_first_pass_ends():
    state = saved(trained_mlp())
    state["Extra_0.weight"] = torch.ones(2)
    target = MLP()
    target.load_state_dict(state)
    with pytest.raises(ter.StateError, match=r"1 entries match no slot: Extra_0\.weight"):
        target(torch.randn(3, 5))


def test_unknown_keys_warn_when_not_strict():
    state = saved(trained_mlp())
    state["Extra_0.weight"] = torch.ones(2)
    target = MLP()
    target.load_state_dict(state, strict=False)
    with pytest.warns(UserWarning, match="Loaded with strict=False"):
        target(torch.randn(3, 5))


def test_loading_into_built_model_is_plain_torch():
    source = trained_mlp()
    target = MLP()
    target(torch.randn(3, 5))
    target.load_state_dict(source.state_dict())
    x = torch.randn(3, 5)
    assert torch.equal(target(x), source(x))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        target.load_state_dict({**source.state_dict(), "Extra_0.weight": torch.ones(1)})
