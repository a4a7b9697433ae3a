"""Every function of terrace.ops, called from a model's forward, matches a NumPy reference."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import terrace
from terrace import ops
from terrace.conformance._registry import case
from terrace.conformance._support import assert_agrees, normal, run

_erf = np.vectorize(math.erf)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    shifted = np.exp(x - x.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def _namespace_sum(x: Any) -> Any:
    xp = ops.namespace(x)
    return xp.sum(xp.reshape(x, (7, 4)) * 2, axis=0)


# Case id -> (the public op it covers, the function run in forward, the NumPy
# reference computed in float64).
OP_CASES: dict[str, tuple[str, Callable[[Any], Any], Callable[[np.ndarray], np.ndarray]]] = {
    "relu": ("relu", ops.relu, lambda x: np.maximum(x, 0)),
    "gelu": ("gelu", ops.gelu, lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
    "gelu-tanh": (
        "gelu",
        lambda x: ops.gelu(x, approximate="tanh"),
        lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))),
    ),
    "silu": ("silu", ops.silu, lambda x: x * _sigmoid(x)),
    "sigmoid": ("sigmoid", ops.sigmoid, _sigmoid),
    "tanh": ("tanh", ops.tanh, np.tanh),
    "softmax": ("softmax", ops.softmax, lambda x: _softmax(x, -1)),
    "softmax-axis-0": ("softmax", lambda x: ops.softmax(x, axis=0), lambda x: _softmax(x, 0)),
    "log_softmax": ("log_softmax", ops.log_softmax, lambda x: np.log(_softmax(x, -1))),
    "namespace": ("namespace", _namespace_sum, lambda x: (x.reshape(7, 4) * 2).sum(axis=0)),
}


class OpModel(terrace.Model):
    """Applies one entry of OP_CASES in forward; it makes no slots."""

    def __init__(self, op_id: str) -> None:
        self.op_id = op_id

    def forward(self, x: Any) -> Any:
        self.start_forward()
        return OP_CASES[self.op_id][1](x)


@case(*sorted({f"ops.{op}" for op, _, _ in OP_CASES.values()}))
@pytest.mark.parametrize("op_id", list(OP_CASES))
def test_op_matches_numpy(terrace_adapter, op_id):
    """The op gives the NumPy reference within the device tolerance."""
    x = normal(4, 7, scale=2.0)
    _, output = run(terrace_adapter, OpModel(op_id), x)

    expected = OP_CASES[op_id][2](x.astype(np.float64))
    assert output.shape == expected.shape
    assert_agrees(output, expected, (terrace_adapter.device,), f"ops.{op_id} and NumPy")
