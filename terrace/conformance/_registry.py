"""The registry of conformance cases and the public names each one covers.

Every case function in the suite is decorated with :func:`case`, which
records it in :data:`CASES` with the public layers and ops it exercises.
``test_coverage.py`` fails when a public layer or op has no case, when a
case function is not registered, or when a known gap names no case.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = ["CASES", "Case", "case", "case_modules", "covered_names", "load_cases", "required_names"]

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Case:
    """One conformance case.

    Attributes:
        name: the test function's name (``test_slot_names``).
        module: the module that defines it.
        covers: the public names it exercises, as ``layers.Linear``,
            ``ops.relu``, ``torch.LazyLinear`` or ``flax.LazyLinear``.
        summary: the first line of its docstring.
    """

    name: str
    module: str
    covers: tuple[str, ...]
    summary: str


CASES: dict[str, Case] = {}


def case(*covers: str) -> Callable[[F], F]:
    """Register the decorated test function as a conformance case that covers ``covers``."""

    def register(function: F) -> F:
        doc = inspect.getdoc(function) or ""
        summary = doc.splitlines()[0] if doc else ""
        if not summary:
            raise ValueError(f"conformance case {function.__name__} needs a docstring saying what it checks.")
        known = CASES.get(function.__name__)
        if known is not None and known.module != function.__module__:
            raise ValueError(
                f"conformance case {function.__name__} is defined in both {known.module} and "
                f"{function.__module__}; case names must be unique across the suite."
            )
        CASES[function.__name__] = Case(function.__name__, function.__module__, tuple(covers), summary)
        return function

    return register


def case_modules() -> list[str]:
    """Return the names of the suite's test modules (``terrace.conformance.test_*``)."""
    package = importlib.import_module("terrace.conformance")
    return [
        f"terrace.conformance.{info.name}"
        for info in pkgutil.iter_modules(package.__path__)
        if info.name.startswith("test_")
    ]


def load_cases() -> dict[str, Case]:
    """Import every test module of the suite and return the registry."""
    for name in case_modules():
        importlib.import_module(name)
    return dict(CASES)


def required_names() -> set[str]:
    """Return the public names that need a case: neutral layers, ops, and each installed backend's lazy layers."""
    import terrace.layers
    import terrace.ops

    base = terrace.layers.NeutralLayer
    names = {
        f"layers.{name}"
        for name in terrace.layers.__all__
        if _is_subclass(getattr(terrace.layers, name), base) and getattr(terrace.layers, name) is not base
    }
    names |= {f"ops.{name}" for name in terrace.ops.__all__}
    for backend, lazy_layers in _installed_lazy_layers().items():
        names |= {f"{backend}.{cls.__name__}" for cls in lazy_layers}
    return names


def covered_names(cases: dict[str, Case]) -> set[str]:
    """Return the public names that ``cases`` cover.

    A case that covers a neutral layer (``layers.Conv2d``) also covers the
    lazy layer that each installed backend builds for it, because the case
    runs that layer.
    """
    from terrace._registry import resolve_layer

    covered = {name for found in cases.values() for name in found.covers}
    installed = _installed_lazy_layers()
    for name in list(covered):
        if not name.startswith("layers."):
            continue
        spec = getattr(importlib.import_module("terrace.layers"), name.removeprefix("layers."), None)
        if spec is None:
            continue
        for backend, lazy_layers in installed.items():
            factory = resolve_layer(spec, backend)
            if factory in lazy_layers:
                covered.add(f"{backend}.{factory.__name__}")
    return covered


def _is_subclass(value: Any, base: type) -> bool:
    return isinstance(value, type) and issubclass(value, base)


def _installed_lazy_layers() -> dict[str, list[type]]:
    """Return each installed backend's public lazy layers (subclasses of its ``LazyLayer``, without it)."""
    found: dict[str, list[type]] = {}
    for backend in ("torch", "flax"):
        try:
            module = importlib.import_module(f"terrace.{backend}")
        except ImportError:
            continue
        base = module.LazyLayer
        found[backend] = [
            value
            for value in (getattr(module, name) for name in module.__all__)
            if _is_subclass(value, base) and value is not base
        ]
    return found
