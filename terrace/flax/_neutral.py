"""Running a backend-neutral :class:`terrace.Model` on Flax.

:func:`build` returns a linen module whose ``forward`` is the neutral model's
own ``forward``. The module's class combines :class:`terrace.flax.Module`
with the model's class and has one dataclass field per setting the model's
``__init__`` stored, so ``self.<setting>`` reads it inside ``forward`` and
linen can clone the module as it does any other.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from terrace._errors import TerraceError
from terrace._layers import LAZY_LAYER_NAMES, Dropout, Embedding, NeutralLayer
from terrace._model import Model
from terrace._registry import register_layer, resolve_layer
from terrace.flax._mode import resolve_training

__all__ = ["build", "resolve_factory"]

# Names that linen modules use for themselves; a setting with one of these
# names would replace linen's own attribute.
_RESERVED = frozenset({"name", "parent", "scope", "train", "variables"})


def build(model: Model, *, name: str | None = None, train: bool | None = None) -> nn.Module:
    """Return a ``flax.linen.Module`` that runs ``model``'s ``forward``.

    Args:
        model: an instance of a :class:`terrace.Model` subclass.
        name: the linen name, when the module is made inside another one.
        train: training (True) or evaluation (False) mode; None inherits the
            enclosing terrace module's mode (training at the top), as the
            ``train`` attribute of :class:`terrace.flax.Module` does.

    Returns:
        A :class:`terrace.flax.Module`; use it with ``init`` and ``apply``.
    """
    if not isinstance(model, Model):
        raise TypeError(
            f"terrace.flax.build expects a terrace.Model instance, got {type(model).__name__}. "
            "Fix: a terrace.flax.Module subclass needs no build; instantiate it directly."
        )
    settings = dict(vars(model))
    clashes = sorted(_RESERVED & settings.keys())
    if clashes:
        raise TerraceError(
            f"{type(model).__name__} stores settings named {', '.join(clashes)}, which linen "
            "modules use for themselves. Fix: rename those attributes in the model's __init__."
        )
    host_class = _host_class(type(model), tuple(sorted(settings)))
    return host_class(**settings, name=name, train=train)


@functools.cache
def _host_class(neutral_cls: type, setting_names: tuple[str, ...]) -> type:
    from terrace.flax._module import Module

    namespace: dict[str, Any] = _helper_methods(neutral_cls)
    namespace.update({
        "__module__": neutral_cls.__module__,
        "__qualname__": neutral_cls.__qualname__,
        "__doc__": neutral_cls.__doc__,
        "__annotations__": {key: Any for key in setting_names},
        "forward": neutral_cls.forward,
        "strict": neutral_cls.strict,
        "terrace_neutral_class": neutral_cls,
    })
    for key in setting_names:
        namespace[key] = dataclasses.field(kw_only=True)
    return type(neutral_cls.__name__, (Module,), namespace)


def _helper_methods(neutral_cls: type) -> dict[str, Any]:
    """Return the methods the model's classes define, other than dunder methods.

    They are copied into the linen class rather than inherited, because
    linen rewrites inherited methods of non-linen base classes.
    """
    methods: dict[str, Any] = {}
    for klass in reversed(neutral_cls.__mro__):
        if klass is object or klass is Model or not issubclass(klass, Model):
            continue
        for key, value in vars(klass).items():
            if callable(value) and not key.startswith("__"):
                methods[key] = value
    return methods


def resolve_factory(cls: Any, args: tuple, kwargs: dict) -> Callable[..., Any]:
    """Return what builds a slot of ``cls`` on Flax: a neutral layer's linen
    layer, a neutral model's built module, or ``cls`` itself."""
    if isinstance(cls, type) and issubclass(cls, NeutralLayer):
        cls.check_arguments(args, kwargs)
        return resolve_layer(cls, "flax")
    if isinstance(cls, type) and issubclass(cls, Model):
        return lambda *a, name=None, **k: build(cls(*a, **k), name=name)
    return cls


class FlaxEmbedding(nn.Module):
    """``torch.nn.Embedding`` for Flax: a table ``embedding`` of shape
    ``(num_embeddings, embedding_dim)``, torch's ``weight``, initialised from
    a standard normal as in torch."""

    num_embeddings: int
    embedding_dim: int

    @nn.compact
    def __call__(self, indices: jax.Array) -> jax.Array:
        table = self.param(
            "embedding",
            nn.initializers.normal(stddev=1.0),
            (self.num_embeddings, self.embedding_dim),
        )
        return jnp.take(table, indices, axis=0)


class FlaxDropout(nn.Module):
    """``torch.nn.Dropout`` for Flax: active in training mode, and drawing its
    randomness from the ``'dropout'`` RNG stream (``rngs={'dropout': key}``)."""

    p: float = 0.5
    train: bool | None = dataclasses.field(default=None, kw_only=True)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        deterministic = not resolve_training(self.train)
        return nn.Dropout(rate=self.p, deterministic=deterministic)(x)


def _register_layers() -> None:
    import terrace.flax as backend

    for spec, name in LAZY_LAYER_NAMES.items():
        register_layer(spec, "flax", getattr(backend, name))
    register_layer(Embedding, "flax", FlaxEmbedding)
    register_layer(Dropout, "flax", FlaxDropout)


_register_layers()
