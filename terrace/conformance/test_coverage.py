"""The case registry: every public layer and op has a case, and every case is registered."""

from __future__ import annotations

import importlib
import inspect

from terrace.conformance._registry import case_modules, covered_names, load_cases, required_names
from terrace.conformance.plugin import ADAPTER_ARGUMENT
from terrace.testing import adapter_class, registered_adapters


def test_every_public_name_has_a_case():
    """Each neutral layer, op, and installed lazy layer is covered by at least one registered case."""
    cases = load_cases()

    missing = sorted(required_names() - covered_names(cases))

    assert not missing, (
        f"no conformance case covers {', '.join(missing)}. Fix: add a case in terrace/conformance "
        "that runs them, and list them in its @case(...)."
    )


def test_every_case_is_registered():
    """Every test function that takes terrace_adapter is registered with @case."""
    cases = load_cases()
    unregistered = []
    for name in case_modules():
        module = importlib.import_module(name)
        for function_name, function in inspect.getmembers(module, inspect.isfunction):
            takes_adapter = ADAPTER_ARGUMENT in inspect.signature(function).parameters
            if function_name.startswith("test_") and takes_adapter and function_name not in cases:
                unregistered.append(f"{name}.{function_name}")

    assert not unregistered, f"decorate these cases with @case(...): {', '.join(unregistered)}"


def test_known_gaps_name_cases():
    """Every known gap of an installed adapter names a registered case."""
    cases = load_cases()
    stale = []
    for name in registered_adapters():
        try:
            cls = adapter_class(name)
        except ImportError:
            continue
        for key in cls.known_gaps:
            if key.split("[", 1)[0] not in cases:
                stale.append(f"{name}: {key}")

    assert not stale, f"these known gaps name no conformance case: {', '.join(stale)}"
