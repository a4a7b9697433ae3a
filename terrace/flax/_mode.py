"""Training and evaluation mode for terrace's Flax modules.

A torch module carries ``training`` and switches with ``.train()`` and
``.eval()``. A linen module is an immutable configuration, so terrace reads
the mode from the ``train`` attribute instead. A terrace module or layer whose
``train`` is None takes the mode of the terrace module whose ``forward`` runs
it. At the top, None means training, which is torch's default for a new
module.

The inherited mode lives in a context variable that
:meth:`terrace.flax.Module.__call__` sets for the duration of ``forward``. It
is read while JAX traces, so it reaches layers inside ``jax.jit``,
``nn.scan`` and ``nn.remat`` bodies, and it is a Python constant in the
traced program.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

__all__ = ["resolve_training", "training_mode"]

_INHERITED: ContextVar[bool | None] = ContextVar("terrace_flax_training", default=None)


def resolve_training(own: bool | None) -> bool:
    """Return the mode of a module whose ``train`` attribute is ``own``.

    ``own`` wins when it is a bool; otherwise the enclosing terrace module's
    mode applies, and training when there is none.
    """
    if own is not None:
        return own
    inherited = _INHERITED.get()
    return True if inherited is None else inherited


@contextlib.contextmanager
def training_mode(training: bool) -> Iterator[None]:
    """Make ``training`` the inherited mode inside the ``with`` block."""
    token = _INHERITED.set(training)
    try:
        yield
    finally:
        _INHERITED.reset(token)
