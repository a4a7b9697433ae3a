"""Agreement: the same model gives the same output on every backend and device, eager and compiled."""

from __future__ import annotations

import numpy as np
import pytest

from terrace.conformance._models import MLP, ConvNet, Stack, TokenEncoder
from terrace.conformance._registry import case
from terrace.conformance._support import normal, require_passed
from terrace.testing import CHECKS

# Model id -> (model, inputs). Small enough to keep the suite fast on two CPU cores.
MODELS = {
    "mlp": (MLP(16, 3), (normal(4, 5),)),
    "nested": (Stack(), (normal(3, 5),)),
    "conv": (ConvNet(), (normal(2, 3, 8, 8),)),
    "attention": (TokenEncoder(11, 8), (np.random.default_rng(0).integers(0, 11, (2, 5)),)),
}


@case(
    "layers.Linear",
    "layers.LayerNorm",
    "layers.Conv2d",
    "layers.BatchNorm2d",
    "layers.Embedding",
    "layers.MultiheadAttention",
    "ops.gelu",
    "ops.silu",
    "ops.tanh",
    "ops.log_softmax",
    "ops.namespace",
)
@pytest.mark.parametrize("model_id", list(MODELS))
def test_backends_agree(terrace_adapter, model_id):
    """On weights ported from the reference backend, every slot's output agrees within the device tolerance."""
    model, inputs = MODELS[model_id]
    require_passed(CHECKS["agreement"](terrace_adapter, model, inputs))


@case("layers.Linear", "layers.LayerNorm", "layers.Conv2d", "layers.Embedding", "layers.MultiheadAttention")
@pytest.mark.parametrize("model_id", list(MODELS))
def test_forward_repeats(terrace_adapter, model_id):
    """A second pass on the same input repeats the first."""
    model, inputs = MODELS[model_id]
    require_passed(CHECKS["forward"](terrace_adapter, model, inputs))


@case("layers.Linear", "layers.LayerNorm", "ops.gelu")
def test_compiled_matches_eager(terrace_adapter):
    """The compiled model (torch.compile without fullgraph, jax.jit) agrees with the eager one."""
    model, inputs = MODELS["mlp"]
    require_passed(CHECKS["compiled"](terrace_adapter, model, inputs))
