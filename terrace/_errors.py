"""Exceptions raised by terrace.

Every error derives from :class:`TerraceError`, so one ``except`` clause
catches any misuse. Each message names the slot involved, what happened and
the fix.
"""

from __future__ import annotations

__all__ = [
    "BackendNotInstalledError",
    "NotBuiltError",
    "SlotMismatchError",
    "SlotNameError",
    "StateError",
    "TerraceError",
]


class TerraceError(Exception):
    """Base class of every error terrace raises on purpose."""


class SlotMismatchError(TerraceError):
    """A pass asked for slots that differ from the ones the first pass made.

    Raised when a replayed ``make`` has another class, other constructor
    arguments or another call site than the slot it lands on, when a pass
    requests more slots than exist, when a pass ends having used fewer, and
    when ``make`` runs before ``start_forward``.
    """


class SlotNameError(TerraceError):
    """An explicit slot name is invalid or already taken in the module."""


class NotBuiltError(TerraceError):
    """The module was used in a way that needs its slots before the first pass."""


class StateError(TerraceError):
    """Saved state does not fit the module: unknown keys or wrong shapes."""


class BackendNotInstalledError(TerraceError, ImportError):
    """A backend package (torch, jax or flax) is not installed."""
