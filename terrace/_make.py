"""The ``make`` method shared by the backends, with the replay fast path inline.

A replayed ``make`` runs on every forward pass, so its cost is the cost of
terrace at run time. The common case (the slot exists, and the class, call
site, arguments and name equal the record) is one tuple comparison against
:attr:`SlotRecord.key`, done here without further calls; every other case
goes through :meth:`SlotTable.next`, which creates slots and raises the
mismatch errors.
"""

from __future__ import annotations

from sys import _getframe
from typing import Any, Callable

__all__ = ["make_method"]


def make_method(container: str) -> Callable[..., Any]:
    """Return a ``make(self, cls, *args, name=None, **kwargs)`` method.

    The owner must have a ``_terrace_table`` (a :class:`SlotTable`) and a
    ``_terrace_create(record, args, kwargs)`` method that builds and registers
    a new slot's object. ``make`` returns ``getattr(owner, container)[name]``,
    so an object replaced in that mapping after creation is the one returned.

    A backend may put a stand-in for the table in ``_terrace_table`` while a
    tracer runs the pass, as the torch backend does under TorchDynamo. The
    stand-in needs ``next`` and ``records_call_sites = False``, which keeps
    ``make`` from reading the caller's frame. Its ``_local`` must have no
    started pass (or no ``stack``), so that ``make`` skips the fast path,
    which reads the frame only in a started strict pass.
    """

    def make(self: Any, cls: Any, /, *args: Any, name: str | None = None, **kwargs: Any) -> Any:
        table = self._terrace_table
        try:
            slot_pass = table._local.stack[-1]
            index = slot_pass.index
            record = table.records[index]
            if slot_pass.started and (
                record.key == (cls, (frame := _getframe(1)).f_code, frame.f_lasti, args, kwargs, name)
                if slot_pass.strict
                else record.cls is cls
            ):
                slot_pass.index = index + 1
                return getattr(self, container)[record.name]
        except (AttributeError, IndexError, RuntimeError):
            # No pass in this thread, a slot not created yet, or an array
            # argument compared with a recorded number: take the full path.
            pass
        frame = _getframe(1) if table.records_call_sites else None
        record = table.next(cls, args, kwargs, name, frame, self._terrace_create)
        return getattr(self, container)[record.name]

    return make
