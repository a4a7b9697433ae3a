"""Restore on create: state loaded into a module before its slots exist.

``load_state_dict`` on a never-run terrace module cannot copy tensors into
submodules that ``forward`` has not made yet. The entries are kept in a
:class:`PendingState`, and each is applied when its slot is created. The end
of the first pass reports, slot by slot, entries that matched no slot and
slots that received no entry. Nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from terrace._errors import StateError

__all__ = ["LOAD_STRICT", "PendingState", "loading"]

# Whether the load_state_dict call in progress is strict. Torch passes
# strict=True to every module's _load_from_state_dict whatever the caller asked.
LOAD_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("terrace_load_strict", default=True)


@contextlib.contextmanager
def loading(strict: bool) -> Iterator[None]:
    """Make ``strict`` visible to the modules that a ``load_state_dict`` call reaches."""
    token = LOAD_STRICT.set(strict)
    try:
        yield
    finally:
        LOAD_STRICT.reset(token)


class PendingState:
    """State entries waiting for their slots, keyed relative to the module."""

    def __init__(self) -> None:
        self.entries: dict[str, torch.Tensor] = {}
        self.strict = True
        self.active = False
        self.missing: list[str] = []

    def __bool__(self) -> bool:
        return self.active

    def activate(self, strict: bool) -> None:
        """Start restoring: from now on every created slot is loaded from the entries."""
        self.strict = self.strict and strict if self.active else strict
        self.active = True

    def keep(self, key: str, tensor: torch.Tensor) -> None:
        """Hold ``tensor`` for the slot that ``key`` belongs to."""
        self.entries[key] = tensor

    def take_module(self, owner: str, name: str, module: nn.Module) -> None:
        """Load the entries under ``name.`` into ``module``, a newly created slot.

        A slot with no entries is loaded from an empty state, so torch reports
        its parameters as missing (or, for a terrace module or lazy layer,
        reports them when they are created).
        """
        prefix = name + "."
        keys = [k for k in self.entries if k.startswith(prefix)]
        state = {k[len(prefix) :]: self.entries.pop(k) for k in keys}
        try:
            with loading(self.strict):
                module.load_state_dict(state, strict=self.strict)
        except RuntimeError as error:
            raise StateError(
                f"{owner}: the state loaded before the first pass does not fit slot "
                f"{name}: {error} Fix: load a checkpoint saved from the same model code, "
                "or rename its keys to the current slot names."
            ) from error

    def take_param(self, owner: str, name: str, param: nn.Parameter) -> None:
        """Copy the entry ``name`` into ``param``, a newly created parameter slot."""
        tensor = self.entries.pop(name, None)
        if tensor is None:
            self.missing.append(name)
            return
        if tuple(tensor.shape) != tuple(param.shape):
            raise StateError(
                f"{owner}: the state loaded before the first pass has shape "
                f"{tuple(tensor.shape)} for parameter slot {name}, but this pass made it "
                f"with shape {tuple(param.shape)}. Fix: load a checkpoint saved from a "
                "model that saw inputs of the same sizes."
            )
        with torch.no_grad():
            param.copy_(tensor)

    def finish(self, owner: str, slots: list[str]) -> None:
        """Report entries left over and slots that got none, once the first pass ended."""
        unused = sorted(self.entries)
        missing = list(self.missing)
        strict = self.strict
        self.__init__()  # type: ignore[misc]
        if not unused and not missing:
            return
        problems = []
        if unused:
            problems.append(f"{len(unused)} entries match no slot: {', '.join(unused)}")
        if missing:
            problems.append(f"slots {', '.join(missing)} got no entry")
        message = (
            f"{owner}: the state loaded before the first pass does not match the slots this "
            f"pass made: {'; '.join(problems)}. The slots of this model are: "
            f"{', '.join(slots) or 'none'}. The checkpoint was saved from a model with other "
            "slots (a layer added, removed or renamed), and loading it by position would put "
            "tensors into the wrong layers. Fix: load a checkpoint of the same model code, or "
            "rename its keys to the slot names above."
        )
        if strict:
            raise StateError(message)
        warnings.warn(message + " Loaded with strict=False, so the mismatch was ignored.", stacklevel=3)

    def items(self) -> Any:
        """Return the held entries as (key, tensor) pairs."""
        return self.entries.items()
