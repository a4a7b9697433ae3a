"""Each lazy layer becomes the torch layer built from its first input."""

import pytest
import torch
import torch.nn as nn

import terrace as ter

CASES = [
    (lambda: ter.LazyLinear(4), (3, 5), nn.Linear, {"in_features": 5, "out_features": 4}),
    (lambda: ter.LazyLinear(4, bias=False), (2, 7, 5), nn.Linear, {"in_features": 5}),
    (lambda: ter.LazyLayerNorm(), (3, 6), nn.LayerNorm, {"normalized_shape": (6,)}),
    (lambda: ter.LazyLayerNorm(normalized_ndim=2), (3, 4, 6), nn.LayerNorm, {"normalized_shape": (4, 6)}),
    (lambda: ter.LazyConv1d(4, 3), (2, 5, 9), nn.Conv1d, {"in_channels": 5}),
    (lambda: ter.LazyConv1d(4, 3), (5, 9), nn.Conv1d, {"in_channels": 5}),
    (lambda: ter.LazyConv2d(4, 3, stride=2, padding=(1, 0)), (2, 3, 8, 8), nn.Conv2d, {"in_channels": 3}),
    (lambda: ter.LazyConv3d(2, 2), (1, 3, 4, 4, 4), nn.Conv3d, {"in_channels": 3}),
    (lambda: ter.LazyBatchNorm1d(), (4, 6), nn.BatchNorm1d, {"num_features": 6}),
    (lambda: ter.LazyBatchNorm1d(), (4, 6, 5), nn.BatchNorm1d, {"num_features": 6}),
    (lambda: ter.LazyBatchNorm2d(momentum=0.3), (4, 3, 5, 5), nn.BatchNorm2d, {"num_features": 3, "momentum": 0.3}),
    (lambda: ter.LazyBatchNorm3d(), (2, 3, 2, 2, 2), nn.BatchNorm3d, {"num_features": 3}),
]


@pytest.mark.parametrize(("factory", "shape", "torch_class", "expected"), CASES)
def test_layer_becomes_torch_class(factory, shape, torch_class, expected):
    layer = factory()
    out = layer(torch.randn(shape))
    assert type(layer) is torch_class
    for attribute, value in expected.items():
        assert getattr(layer, attribute) == value
    assert torch.equal(layer(torch.zeros(shape)), layer(torch.zeros(shape)))
    assert out.dim() == len(shape)


def test_same_seed_gives_same_weights_as_plain_layer():
    torch.manual_seed(3)
    lazy = ter.LazyLinear(4)
    lazy(torch.zeros(1, 5))
    torch.manual_seed(3)
    plain = nn.Linear(5, 4)
    assert torch.equal(lazy.weight, plain.weight)
    assert torch.equal(lazy.bias, plain.bias)


def test_layer_norm_eps_is_torch_default():
    layer = ter.LazyLayerNorm()
    layer(torch.randn(2, 3))
    assert layer.eps == 1e-5


def test_multihead_attention_infers_sizes():
    layer = ter.LazyMultiheadAttention(2, batch_first=True)
    q, k, v = torch.randn(3, 4, 8), torch.randn(3, 6, 5), torch.randn(3, 6, 7)
    out, weights = layer(q, k, v)
    assert type(layer) is nn.MultiheadAttention
    assert (layer.embed_dim, layer.kdim, layer.vdim) == (8, 5, 7)
    assert out.shape == (3, 4, 8)
    assert weights.shape == (3, 4, 6)


def test_multihead_attention_rejects_indivisible_heads():
    layer = ter.LazyMultiheadAttention(3)
    x = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match=r"last dimension \(8\) must be divisible by num_heads \(3\)"):
        layer(x, x, x)


def test_layer_norm_rejects_bad_ndim():
    with pytest.raises(ValueError, match="normalized_ndim must be a positive int, got 0"):
        ter.LazyLayerNorm(normalized_ndim=0)


def test_batch_norm_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"expects an input with 4 dimensions .* got shape \(2, 3\)"):
        ter.LazyBatchNorm2d()(torch.randn(2, 3))


def test_eval_mode_before_build_is_kept():
    layer = ter.LazyBatchNorm1d().eval()
    out = layer(torch.randn(4, 3) * 5 + 2)
    assert not layer.training
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert out.shape == (4, 3)


def test_hooks_registered_before_build_survive():
    layer = ter.LazyLinear(2)
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    layer(torch.randn(3, 4))
    layer(torch.randn(5, 4))
    assert seen == [torch.Size([3, 2]), torch.Size([5, 2])]


def test_factory_arguments_place_parameters():
    layer = ter.LazyLinear(2, dtype=torch.float64, device="meta")
    layer(torch.randn(3, 4, dtype=torch.float64, device="meta"))
    assert layer.weight.dtype == torch.float64
    assert layer.weight.device.type == "meta"


def test_repr_before_build_shows_settings():
    assert "out_features=4" in repr(ter.LazyLinear(4))
