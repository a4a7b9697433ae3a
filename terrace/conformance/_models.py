"""Neutral models that the conformance cases run on every backend.

The guide's examples are written here as :class:`terrace.Model` subclasses:
layers from :mod:`terrace.layers`, functions from :mod:`terrace.ops` and the
array namespace, and array methods (``x.mean()``), which both backends'
arrays have.
"""

from __future__ import annotations

from typing import Any

import terrace
from terrace import layers, ops

# -- the modules guide ----------------------------------------------------------------


class BasicNN(terrace.Model):
    """The guide's first network: one hidden layer of 100 units."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        hidden = ops.relu(self.make(layers.Linear, 100)(x))
        return self.make(layers.Linear, 1)(hidden)


class MyLazyLinear(terrace.Model):
    """The guide's hand-written lazy linear layer, as a model with one named slot."""

    def __init__(self, out_feat: int) -> None:
        self.out_feat = out_feat

    def forward(self, x: Any) -> Any:
        self.start_forward()
        return self.make(layers.Linear, self.out_feat, name="linear")(x)


class BadNetwork1(terrace.Model):
    """The guide's first gotcha: the number of make calls depends on the data."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        for _ in range(int(x.max())):
            x = self.make(layers.Linear, 10)(x)
        return x


class BadNetwork2(terrace.Model):
    """The guide's second gotcha: each branch makes its own layer."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        if x.mean() > 0:
            return self.make(layers.Linear, 10)(x)
        else:
            return self.make(layers.Linear, 10)(x)


class FixedNetwork2(terrace.Model):
    """The guide's fix: make both layers, call both, and choose a result.

    Calling both layers matters on Flax, where a layer gets its weights only
    when ``init`` runs it.
    """

    def forward(self, x: Any) -> Any:
        self.start_forward()
        if_linear = self.make(layers.Linear, 10)
        else_linear = self.make(layers.Linear, 10)
        xp = ops.namespace(x)
        return xp.where(x.mean() > 0, if_linear(x), else_linear(x))


class NoStart(terrace.Model):
    """Forgets start_forward()."""

    def forward(self, x: Any) -> Any:
        return self.make(layers.Linear, 2)(x)


class StartsTwice(terrace.Model):
    """Calls start_forward() twice in one pass."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        self.start_forward()
        return self.make(layers.Linear, 2)(x)


# -- slot names -----------------------------------------------------------------------


class SlotNames(terrace.Model):
    """Automatic names count per class: Linear_0, LayerNorm_0, Linear_1."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        h = self.make(layers.Linear, 6)(x)
        h = self.make(layers.LayerNorm)(h)
        return self.make(layers.Linear, 2)(h)


class Named(terrace.Model):
    """Explicit names, and an automatic name after them."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        h = ops.relu(self.make(layers.Linear, 8, name="encoder")(x))
        h = self.make(layers.Linear, 4)(h)
        return self.make(layers.Linear, 1, name="head")(h)


class DuplicateName(terrace.Model):
    """Uses one explicit name twice."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        h = self.make(layers.Linear, 4, name="proj")(x)
        return self.make(layers.Linear, 2, name="proj")(h)


class ClashesWithAutomatic(terrace.Model):
    """Gives a slot the name that automatic naming already took."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        h = self.make(layers.Linear, 4)(x)
        return self.make(layers.Linear, 2, name="Linear_0")(h)


class BadName(terrace.Model):
    """Gives a slot an explicit name that is not an identifier."""

    def __init__(self, slot_name: str) -> None:
        self.slot_name = slot_name

    def forward(self, x: Any) -> Any:
        self.start_forward()
        return self.make(layers.Linear, 2, name=self.slot_name)(x)


# -- general models -----------------------------------------------------------------


class MLP(terrace.Model):
    """Linear, GELU, layer norm, linear."""

    def __init__(self, hidden: int, outputs: int) -> None:
        self.hidden = hidden
        self.outputs = outputs

    def forward(self, x: Any) -> Any:
        self.start_forward()
        h = ops.gelu(self.make(layers.Linear, self.hidden)(x))
        h = self.make(layers.LayerNorm)(h)
        return self.make(layers.Linear, self.outputs)(h)


class Block(terrace.Model):
    """A residual block, nested inside :class:`Stack`."""

    def __init__(self, width: int) -> None:
        self.width = width

    def forward(self, x: Any) -> Any:
        self.start_forward()
        h = self.make(layers.LayerNorm)(x)
        return x + ops.tanh(self.make(layers.Linear, self.width)(h))


class Stack(terrace.Model):
    """Two nested blocks between linear layers: slot paths Block_0.Linear_0, ..."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        h = self.make(layers.Linear, 8)(x)
        h = self.make(Block, 8)(h)
        h = self.make(Block, 8)(h)
        return self.make(layers.Linear, 2)(h)


class ConvNet(terrace.Model):
    """Convolution, batch norm, SiLU, a strided convolution, spatial mean, linear."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        h = self.make(layers.Conv2d, 4, 3, padding=1)(x)
        h = ops.silu(self.make(layers.BatchNorm2d)(h))
        h = self.make(layers.Conv2d, 6, 3, stride=2)(h)
        xp = ops.namespace(h)
        return self.make(layers.Linear, 3)(xp.mean(h, axis=(2, 3)))


class TokenEncoder(terrace.Model):
    """Embedding, self-attention, layer norm, and a mean over the sequence."""

    def __init__(self, vocab: int, width: int) -> None:
        self.vocab = vocab
        self.width = width

    def forward(self, tokens: Any) -> Any:
        self.start_forward()
        x = self.make(layers.Embedding, self.vocab, self.width)(tokens)
        attended, _ = self.make(layers.MultiheadAttention, 2, batch_first=True)(x, x, x)
        x = self.make(layers.LayerNorm)(x + attended)
        xp = ops.namespace(x)
        return ops.log_softmax(self.make(layers.Linear, 3)(xp.mean(x, axis=1)))


class Regularized(terrace.Model):
    """Linear, batch norm, dropout, linear: a model whose training mode differs from evaluation."""

    def forward(self, x: Any) -> Any:
        self.start_forward()
        h = self.make(layers.Linear, 16)(x)
        h = ops.relu(self.make(layers.BatchNorm1d)(h))
        h = self.make(layers.Dropout, 0.1)(h)
        return self.make(layers.Linear, 1)(h)


class OneLayer(terrace.Model):
    """Makes one layer and calls it on every input.

    Args:
        spec: the neutral layer class.
        args: its positional constructor arguments.
        options: its keyword constructor arguments, as sorted (name, value) pairs.
    """

    def __init__(self, spec: type, args: tuple, options: tuple[tuple[str, Any], ...]) -> None:
        self.spec = spec
        self.args = args
        self.options = options

    def forward(self, *inputs: Any) -> Any:
        self.start_forward()
        return self.make(self.spec, *self.args, **dict(self.options))(*inputs)
