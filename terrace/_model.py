"""``terrace.Model``: a model written once and built for any backend."""

from __future__ import annotations

from typing import Any, ClassVar

from terrace._errors import TerraceError

__all__ = ["Model"]


def _not_built(model: Any, what: str) -> TerraceError:
    name = type(model).__name__
    return TerraceError(
        f"{name}.{what} was called on the neutral model itself. A terrace.Model only "
        "describes the network; a backend runs it. Fix: build it first, with "
        f"terrace.torch.build({name}(...)) or terrace.flax.build({name}(...)), and call "
        "the result."
    )


class Model:
    """Base class of backend-neutral models.

    A subclass takes its configuration in ``__init__`` as plain Python values
    and defines ``forward(self, *inputs)``: ``self.start_forward()`` first,
    then ``self.make(...)`` with layers from :mod:`terrace.layers` or other
    neutral models, and functions from :mod:`terrace.ops`. Defining one
    needs neither torch nor jax; :func:`terrace.torch.build` and
    :func:`terrace.flax.build` turn an instance into a backend module that
    runs the same ``forward``.

    Set ``strict = False`` in the class body to allow passes that make
    different slots, as on the backend modules.

    Example:
        >>> import terrace
        >>> from terrace import layers, ops
        >>> class MLP(terrace.Model):
        ...     def __init__(self, hidden: int, classes: int):
        ...         self.hidden = hidden
        ...         self.classes = classes
        ...     def forward(self, x):
        ...         self.start_forward()
        ...         h = ops.relu(self.make(layers.Linear, self.hidden)(x))
        ...         return self.make(layers.Linear, self.classes)(h)
    """

    strict: ClassVar[bool] = True

    def forward(self, *inputs: Any) -> Any:
        """Compute the model's output; subclasses define it."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(self, *inputs).")

    def start_forward(self) -> None:
        """Begin a pass; only available on a built model."""
        raise _not_built(self, "start_forward()")

    def make(self, cls: Any, *args: Any, **kwargs: Any) -> Any:
        """Create or return a slot; only available on a built model."""
        raise _not_built(self, "make()")

    def __call__(self, *inputs: Any) -> Any:
        raise _not_built(self, "__call__()")

    def config(self) -> dict[str, Any]:
        """Return the configuration given to ``__init__``: the instance's attributes."""
        return dict(vars(self))


def neutral_code(cls: type) -> set[Any]:
    """Return the code objects of the functions a neutral model class defines.

    Backends use it to tell whether a backend function was called from the
    model's own source.
    """
    codes = set()
    for klass in cls.__mro__:
        if klass is Model or not issubclass(klass, Model):
            continue
        for value in vars(klass).values():
            function = getattr(value, "__func__", value)
            code = getattr(function, "__code__", None)
            if code is not None:
                codes.add(code)
    return codes
