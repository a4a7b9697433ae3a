"""Neutral models shared by the cross-backend tests."""

import terrace
from terrace import layers, ops


class MLP(terrace.Model):
    def __init__(self, hidden: int = 16, classes: int = 3):
        self.hidden = hidden
        self.classes = classes

    def forward(self, x):
        self.start_forward()
        h = ops.relu(self.make(layers.Linear, self.hidden)(x))
        h = ops.silu(self.make(layers.Linear, self.hidden)(h))
        return ops.log_softmax(self.make(layers.Linear, self.classes)(h))


class TransformerBlock(terrace.Model):
    def __init__(self, heads: int = 2, batch_first: bool = True, approximate: str = "none"):
        self.heads = heads
        self.batch_first = batch_first
        self.approximate = approximate

    def forward(self, x):
        self.start_forward()
        h = self.make(layers.LayerNorm)(x)
        attention = self.make(layers.MultiheadAttention, self.heads, batch_first=self.batch_first)
        attended, _ = attention(h, h, h)
        x = x + attended
        h = self.make(layers.LayerNorm)(x)
        width = x.shape[-1]
        h = ops.gelu(self.make(layers.Linear, 4 * width)(h), approximate=self.approximate)
        return x + self.make(layers.Linear, width)(h)


class SmallCNN(terrace.Model):
    def __init__(self, classes: int = 4):
        self.classes = classes

    def forward(self, x):
        self.start_forward()
        x = self.make(layers.Conv2d, 6, 3, stride=2, padding=(1, 0))(x)
        x = ops.relu(self.make(layers.BatchNorm2d)(x))
        x = ops.tanh(self.make(layers.Conv1d, 4, 2)(x[:, :, 0, :]))
        xp = ops.namespace(x)
        x = xp.reshape(x, (x.shape[0], -1))
        return ops.softmax(self.make(layers.Linear, self.classes)(x))


class Tagger(terrace.Model):
    """An embedding, a nested neutral block and a linear head."""

    def __init__(self, vocab: int = 20, width: int = 8):
        self.vocab = vocab
        self.width = width

    def forward(self, tokens):
        self.start_forward()
        x = self.make(layers.Embedding, self.vocab, self.width)(tokens)
        x = self.make(TransformerBlock, 2)(x)
        x = self.make(layers.Dropout, 0.1)(x)
        return ops.sigmoid(self.make(layers.Linear, 1)(x))
