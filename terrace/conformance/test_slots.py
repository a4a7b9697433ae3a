"""Slot naming: automatic and explicit names, nested models, and the name errors."""

from __future__ import annotations

import pytest

import terrace
from terrace.conformance._models import BadName, ClashesWithAutomatic, DuplicateName, Named, SlotNames, Stack
from terrace.conformance._registry import case
from terrace.conformance._support import normal, run, slot_paths


@case("layers.Linear", "layers.LayerNorm")
def test_slot_names(terrace_adapter):
    """Automatic slot names count per class (Linear_0, LayerNorm_0, Linear_1) and are the weight paths."""
    built, output = run(terrace_adapter, SlotNames(), normal(3, 5))

    assert output.shape == (3, 2)
    assert slot_paths(terrace_adapter, built) == ["LayerNorm_0", "Linear_0", "Linear_1"]


@case("layers.Linear")
def test_explicit_names(terrace_adapter):
    """Explicit names are the weight paths, and they do not use up an automatic name."""
    built, output = run(terrace_adapter, Named(), normal(3, 5))

    assert output.shape == (3, 1)
    assert slot_paths(terrace_adapter, built) == ["Linear_0", "encoder", "head"]


@case("layers.Linear", "layers.LayerNorm", "ops.tanh")
def test_nested_modules(terrace_adapter):
    """A neutral model made inside another nests its slot paths under its own slot name."""
    built, output = run(terrace_adapter, Stack(), normal(3, 5))

    assert output.shape == (3, 2)
    assert slot_paths(terrace_adapter, built) == [
        "Block_0.LayerNorm_0",
        "Block_0.Linear_0",
        "Block_1.LayerNorm_0",
        "Block_1.Linear_0",
        "Linear_0",
        "Linear_1",
    ]


@case("layers.Linear")
def test_duplicate_name_raises(terrace_adapter):
    """One explicit name used twice raises SlotNameError naming both make calls."""
    with pytest.raises(terrace.SlotNameError) as caught:
        run(terrace_adapter, DuplicateName(), normal(2, 3))

    message = str(caught.value)
    assert "'proj' is used twice" in message
    assert "make(Linear, 4)" in message
    assert "make(Linear, 2)" in message


@case("layers.Linear")
def test_name_clash_with_automatic_raises(terrace_adapter):
    """An explicit name that automatic naming already took raises SlotNameError."""
    with pytest.raises(terrace.SlotNameError, match="'Linear_0' is used twice"):
        run(terrace_adapter, ClashesWithAutomatic(), normal(2, 3))


@case("layers.Linear")
@pytest.mark.parametrize("bad_name", ["", "1st", "a.b"], ids=["empty", "leading-digit", "dotted"])
def test_invalid_name_raises(terrace_adapter, bad_name):
    """An explicit name that is not an identifier raises SlotNameError."""
    with pytest.raises(terrace.SlotNameError, match="not a valid identifier"):
        run(terrace_adapter, BadName(bad_name), normal(2, 3))
