"""The guide's examples on docs/flax.md have the same parameter paths on both backends.

The page defines each example twice, for torch and for Flax, under the same
class name. Running the page block by block collects both versions; each
pair then runs on the same input, and the torch state-dict keys without
their last part (``LazyLinear_0.weight`` -> ``LazyLinear_0``) must equal the
top-level keys of the Flax ``params``.
"""

from __future__ import annotations

import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import pytest
import torch

import terrace.flax as tflax
import terrace.torch as ttorch

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "flax.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)

POSITIVE = [[0.5] * 8] * 4
NEGATIVE = [[-0.5] * 8] * 4

# Guide example -> (constructor arguments, inputs as nested lists). The torch
# model runs on every input, so that each branch builds its lazy layer; the
# Flax model's init runs on the first input.
EXAMPLES: dict[str, tuple[tuple, list[list]]] = {
    "BasicNN": ((), [POSITIVE]),
    "MyLazyLinear": ((16,), [POSITIVE]),
    "BadNetwork1": ((), [[[1.5] * 10] * 2]),
    "BadNetwork2": ((), [POSITIVE]),
    "FixedNetwork2": ((), [POSITIVE, NEGATIVE]),
}


@pytest.fixture(scope="module")
def page_classes() -> dict[tuple[str, str], type]:
    """Run the page and return its module classes by (name, backend)."""
    namespace: dict[str, Any] = {"__name__": "docs_flax_paths"}
    classes: dict[tuple[str, str], type] = {}
    blocks = BLOCK.findall(PAGE.read_text(encoding="utf-8"))
    for number, block in enumerate(blocks, start=1):
        code = compile(block, f"flax.md block {number}", "exec", dont_inherit=True)
        exec(code, namespace)
        for name, value in namespace.items():
            if isinstance(value, type) and issubclass(value, ttorch.Module):
                classes[(name, "torch")] = value
            elif isinstance(value, type) and issubclass(value, tflax.Module):
                classes[(name, "flax")] = value
    return classes


def torch_paths(model_class: type, args: tuple, inputs: list[list]) -> set[str]:
    model = model_class(*args)
    for data in inputs:
        model(torch.tensor(data))
    return {key.rsplit(".", 1)[0] for key in model.state_dict()}


def flax_paths(model_class: type, args: tuple, inputs: list[list]) -> set[str]:
    variables = model_class(*args).init(jax.random.key(0), jnp.asarray(inputs[0]))
    return set(variables["params"])


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_guide_example_paths_match(example: str, page_classes: dict[tuple[str, str], type]) -> None:
    args, inputs = EXAMPLES[example]
    torch_class = page_classes[(example, "torch")]
    flax_class = page_classes[(example, "flax")]

    expected = torch_paths(torch_class, args, inputs)

    assert expected
    assert flax_paths(flax_class, args, inputs) == expected
