"""The registry that ties neutral layers and ops to each backend.

A backend registers itself once with :func:`register_backend`: a name, the
module that implements it (imported on first use), how to recognise its
arrays, and its op implementations. A neutral layer gets one implementation
per backend with :func:`register_layer`. Nothing here imports a backend.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from terrace._errors import TerraceError

__all__ = [
    "Backend",
    "backend_of",
    "get_backend",
    "register_backend",
    "register_layer",
    "registered_backends",
    "resolve_layer",
    "resolve_op",
]


@dataclass
class Backend:
    """One backend: its name, implementing module, array test and ops.

    Attributes:
        name: short name used in messages and lookups (``"torch"``, ``"flax"``).
        module: the module that registers the backend's layers and ops when
            imported (``"terrace.torch"``).
        array_modules: top-level package names whose arrays belong to this
            backend (``("torch",)``, ``("jax", "jaxlib")``).
        ops: op name to implementation, filled when ``module`` is imported.
    """

    name: str
    module: str
    array_modules: tuple[str, ...]
    ops: dict[str, Callable[..., Any]] = field(default_factory=dict)
    loaded: bool = False

    def load(self) -> Backend:
        """Import the backend's module once, so its layers and ops are registered."""
        if not self.loaded:
            importlib.import_module(self.module)
            self.loaded = True
        return self


_BACKENDS: dict[str, Backend] = {}
_LAYERS: dict[type, dict[str, Callable[..., Any]]] = {}


def register_backend(name: str, module: str, array_modules: tuple[str, ...]) -> Backend:
    """Register a backend, or return the one already registered under ``name``.

    Args:
        name: the backend's name.
        module: module to import before the backend is used; importing it
            must register its ops (``get_backend(name).ops[...] = fn``) and
            layers (:func:`register_layer`).
        array_modules: top-level packages whose array types mark an input as
            this backend's.
    """
    backend = _BACKENDS.get(name)
    if backend is None:
        backend = _BACKENDS[name] = Backend(name, module, tuple(array_modules))
    return backend


def registered_backends() -> list[str]:
    """Return the names of the registered backends."""
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    """Return the registered backend ``name``, its module imported."""
    try:
        backend = _BACKENDS[name]
    except KeyError:
        raise TerraceError(
            f"unknown backend {name!r}. Registered backends: "
            f"{', '.join(registered_backends())}. Fix: use one of those, or register "
            "yours with terrace.register_backend()."
        ) from None
    return backend.load()


def backend_of(array: Any) -> Backend:
    """Return the backend whose array type ``array`` has."""
    package = type(array).__module__.split(".", 1)[0]
    for backend in _BACKENDS.values():
        if package in backend.array_modules:
            return backend.load()
    raise TypeError(
        f"terrace.ops got a {type(array).__module__}.{type(array).__qualname__}, which "
        f"is not an array of a registered backend ({', '.join(registered_backends())}). "
        "Fix: pass a torch tensor or a JAX array."
    )


def resolve_op(name: str, array: Any) -> Callable[..., Any]:
    """Return the implementation of op ``name`` for the backend of ``array``."""
    backend = backend_of(array)
    try:
        return backend.ops[name]
    except KeyError:
        raise TerraceError(
            f"terrace.ops.{name} has no implementation for the {backend.name} backend. "
            f"Fix: register one with terrace.get_backend({backend.name!r}).ops[{name!r}] = fn."
        ) from None


def register_layer(spec: type, backend: str, factory: Callable[..., Any]) -> None:
    """Register ``factory`` as the implementation of neutral layer ``spec`` on ``backend``.

    ``factory(*args, **kwargs)`` receives the arguments given to
    ``make(spec, *args, **kwargs)`` and returns the backend's module.
    """
    _LAYERS.setdefault(spec, {})[backend] = factory


def resolve_layer(spec: type, backend: str) -> Callable[..., Any]:
    """Return the factory that builds neutral layer ``spec`` on ``backend``."""
    get_backend(backend)
    factories = _LAYERS.get(spec, {})
    try:
        return factories[backend]
    except KeyError:
        raise TerraceError(
            f"neutral layer {spec.__name__} has no implementation for the {backend} "
            f"backend (it has: {', '.join(sorted(factories)) or 'none'}). Fix: register "
            f"one with terrace.register_layer({spec.__name__}, {backend!r}, factory)."
        ) from None


register_backend("torch", "terrace.torch", ("torch",))
register_backend("flax", "terrace.flax", ("jax", "jaxlib"))
