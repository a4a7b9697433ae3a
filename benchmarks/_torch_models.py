"""The PyTorch networks the benchmarks compare, each written three ways.

* ``Terrace*``: a ``terrace.Module`` that makes its layers in ``forward``.
* ``Plain*``: an ``nn.Module`` that creates the same layers in ``__init__``.
* ``TorchLazy*``: the plain module with ``torch.nn.LazyLinear`` for its
  linear layers.

All three register their parameters in the same order, so :func:`build`
can copy the plain model's weights into the others and check that the
outputs agree before anything is timed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import terrace as ter

MLP_WIDTH = 64
MLP_DEPTH = 8
MLP_BATCH = 4

BLOCK_WIDTH = 256
BLOCK_HEADS = 8
BLOCK_HIDDEN = 4 * BLOCK_WIDTH
BLOCK_BATCH = 32
BLOCK_SEQUENCE = 128


class PlainMLP(nn.Module):
    def __init__(self, linear: type[nn.Module] | None = None) -> None:
        super().__init__()
        if linear is None:
            layers = [nn.Linear(MLP_WIDTH, MLP_WIDTH) for _ in range(MLP_DEPTH)]
        else:
            layers = [linear(MLP_WIDTH) for _ in range(MLP_DEPTH)]
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < MLP_DEPTH - 1:
                x = F.relu(x)
        return x


class TorchLazyMLP(PlainMLP):
    def __init__(self) -> None:
        super().__init__(nn.LazyLinear)


class TerraceMLP(ter.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.start_forward()
        for index in range(MLP_DEPTH):
            x = self.make(ter.LazyLinear, MLP_WIDTH)(x)
            if index < MLP_DEPTH - 1:
                x = F.relu(x)
        return x


class LooseTerraceMLP(TerraceMLP):
    strict = False


class PlainBlock(nn.Module):
    """A pre-norm transformer block: attention and a GELU MLP, each with a residual."""

    def __init__(self, lazy_linear: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(BLOCK_WIDTH)
        self.attention = nn.MultiheadAttention(BLOCK_WIDTH, BLOCK_HEADS, batch_first=True)
        self.norm2 = nn.LayerNorm(BLOCK_WIDTH)
        if lazy_linear:
            self.fc1: nn.Module = nn.LazyLinear(BLOCK_HIDDEN)
            self.fc2: nn.Module = nn.LazyLinear(BLOCK_WIDTH)
        else:
            self.fc1 = nn.Linear(BLOCK_WIDTH, BLOCK_HIDDEN)
            self.fc2 = nn.Linear(BLOCK_HIDDEN, BLOCK_WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        h = self.norm2(x)
        h = F.gelu(self.fc1(h))
        return x + self.fc2(h)


class TorchLazyBlock(PlainBlock):
    def __init__(self) -> None:
        super().__init__(lazy_linear=True)


class TerraceBlock(ter.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.start_forward()
        h = self.make(ter.LazyLayerNorm)(x)
        attention = self.make(ter.LazyMultiheadAttention, BLOCK_HEADS, batch_first=True)
        x = x + attention(h, h, h, need_weights=False)[0]
        h = self.make(ter.LazyLayerNorm)(x)
        h = F.gelu(self.make(ter.LazyLinear, BLOCK_HIDDEN)(h))
        return x + self.make(ter.LazyLinear, BLOCK_WIDTH)(h)


NETWORKS = {
    "MLP": {
        "plain": PlainMLP,
        "terrace": TerraceMLP,
        "torch LazyLinear": TorchLazyMLP,
    },
    "block": {
        "plain": PlainBlock,
        "terrace": TerraceBlock,
        "torch LazyLinear": TorchLazyBlock,
    },
}

DESCRIPTIONS = {
    "MLP": f"MLP {MLP_DEPTH}x{MLP_WIDTH}, batch {MLP_BATCH}",
    "block": f"transformer block, {BLOCK_BATCH}x{BLOCK_SEQUENCE}x{BLOCK_WIDTH}",
}


def example_input(network: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if network == "MLP":
        return torch.randn(MLP_BATCH, MLP_WIDTH, generator=generator)
    return torch.randn(BLOCK_BATCH, BLOCK_SEQUENCE, BLOCK_WIDTH, generator=generator)


def copy_parameters(source: nn.Module, target: nn.Module) -> None:
    """Copy parameters in registration order; raise if the two models differ in shape."""
    pairs = list(zip(source.parameters(), target.parameters(), strict=True))
    with torch.no_grad():
        for ours, theirs in pairs:
            if ours.shape != theirs.shape:
                raise ValueError(f"parameter shapes differ: {tuple(ours.shape)} and {tuple(theirs.shape)}")
            theirs.copy_(ours)


def build(network: str, variants: list[str] | None = None) -> dict[str, nn.Module]:
    """Return the built variants of a network, all with the plain model's weights.

    Each model runs one pass on the example input, which creates terrace's
    and torch's lazy layers. Then the weights are copied, and the outputs are
    checked to be equal.
    """
    classes = NETWORKS[network]
    names = variants or list(classes)
    x = example_input(network)
    plain = classes["plain"]()
    models = {}
    for name in names:
        model = plain if name == "plain" else classes[name]()
        model(x)
        copy_parameters(plain, model)
        models[name] = model
    with torch.no_grad():
        expected = plain(x)
        for name, model in models.items():
            torch.testing.assert_close(model(x), expected, msg=f"{name} {network} output differs from plain")
    return models


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
