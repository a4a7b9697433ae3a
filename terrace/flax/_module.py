"""``terrace.flax.Module``: a ``flax.linen.Module`` defined entirely in ``forward``."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from sys import _getframe
from typing import Any, ClassVar, TypeVar

import jax
import flax.linen as nn

from terrace._errors import SlotMismatchError, TerraceError
from terrace._slots import SlotRecord, SlotTable, class_name
from terrace.flax._errors import flax_errors_named_by_slot, traced_control_flow_error
from terrace.flax._mode import resolve_training, training_mode

__all__ = ["Module"]

ModuleT = TypeVar("ModuleT", bound="Module")

# Values compared as equal settings when a clone changes a field; anything
# else counts as a change unless it is the same object.
_PLAIN_TYPES = (int, float, str, bool, type(None))

# Fields a clone may change without changing which make() calls forward does.
_STRUCTURE_NEUTRAL = frozenset({"parent", "name", "train", "_terrace_table"})


@dataclass
class _SlotState:
    """Per-slot state that outlives one pass, kept as the record's value.

    Linen builds new submodule objects on every init and apply, so a nested
    terrace module cannot keep its own slot table. The table lives here, in
    the parent's record, and each new child object gets it. Slots that hold
    other linen modules leave it unused.
    """

    table: SlotTable | None = None


def _new_slot_state(owner: str, record: SlotRecord, args: tuple, kwargs: dict) -> _SlotState:
    # SlotTable.next calls this under the parent table's lock, so threads
    # racing through the first pass get one child table per slot. Created
    # later, on first use, each thread could make a table of its own.
    return _SlotState(SlotTable(f"{owner}.{record.name}"))


class Module(nn.Module):
    """A ``flax.linen.Module`` whose submodules are made inside ``forward``.

    Call :meth:`start_forward` at the top of ``forward``, then :meth:`make`
    for each submodule. ``init`` and ``apply`` work as on any linen module;
    they run ``forward`` through ``__call__``. The first pass records one slot
    per ``make`` call, and every later pass (``apply``, a new ``init``, a
    trace under ``jax.jit``) is checked against that record.

    Attributes:
        train: training mode (True) or evaluation mode (False) for the terrace
            layers inside; None takes the mode of the enclosing terrace
            module, and training at the top. Build the evaluation model with
            ``Net(train=False)`` or ``model.clone(train=False)``.

    Set ``strict = False`` in a subclass body to allow passes that make
    different submodules.

    Example:
        >>> import jax, jax.numpy as jnp, terrace.flax as tflax
        >>> class Net(tflax.Module):
        ...     def forward(self, x):
        ...         self.start_forward()
        ...         return self.make(tflax.LazyLinear, 3)(x)
        >>> model = Net()
        >>> variables = model.init(jax.random.key(0), jnp.ones((2, 5)))
        >>> model.apply(variables, jnp.ones((2, 5))).shape
        (2, 3)
    """

    strict: ClassVar[bool] = True

    train: bool | None = dataclasses.field(default=None, kw_only=True)
    # The slot table is a dataclass field so that every copy linen makes of
    # the module (init, apply, bind, and the rebuilt modules inside nn.scan
    # and nn.remat, which copy the fields but not the object) shares it. That
    # is how the first pass's record reaches later passes of the same model.
    _terrace_table: SlotTable | None = dataclasses.field(
        default=None, kw_only=True, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        if self._terrace_table is None:
            object.__setattr__(self, "_terrace_table", SlotTable(type(self).__name__))
        super().__post_init__()

    @nn.nowrap
    def clone(
        self: ModuleT,
        *,
        parent: Any = None,
        _deep_clone: Any = False,
        _reset_names: bool = False,
        **updates: Any,
    ) -> ModuleT:
        """Return a copy of this module, like linen's ``clone``.

        The copy shares the slot table, so init, apply and
        ``clone(train=False)`` check against one record. A copy that changes
        another field (``clone(width=16)``) is another model and gets a new
        table.
        """
        if _changes_structure(self, updates):
            updates["_terrace_table"] = None
        return super().clone(
            parent=parent, _deep_clone=_deep_clone, _reset_names=_reset_names, **updates
        )

    @property
    def training(self) -> bool:
        """Whether this module runs in training mode (see the ``train`` attribute)."""
        return resolve_training(self.train)

    # -- passes ---------------------------------------------------------------

    @nn.compact
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        table = self._slot_table()
        slot_pass = table.enter(self.strict)
        try:
            with training_mode(self.training), flax_errors_named_by_slot():
                result = self.forward(*args, **kwargs)
        except jax.errors.ConcretizationTypeError as error:
            table.exit(slot_pass, ok=False)
            raise traced_control_flow_error(table.owner, error) from error
        except BaseException:
            table.exit(slot_pass, ok=False)
            raise
        table.exit(slot_pass, ok=True)
        return result

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Compute the output; subclasses implement it, starting with :meth:`start_forward`."""
        raise NotImplementedError(
            f"{type(self).__name__}: a terrace.flax.Module subclass must define "
            "forward(self, ...), which calls self.start_forward() first."
        )

    @nn.nowrap
    def start_forward(self) -> None:
        """Begin a pass: the next :meth:`make` returns the first slot."""
        self._slot_table().start(self.strict)

    @nn.nowrap
    def make(self, cls: Any, /, *args: Any, name: str | None = None, **kwargs: Any) -> Any:
        """Create ``cls(*args, **kwargs)`` as the next slot and return it.

        Linen builds submodules anew on every ``init`` and ``apply``, so the
        module object is new on each pass. Its linen name is the slot name,
        which makes the slot name its parameter path, and so each pass uses
        the same variables.

        Args:
            cls: a linen module class (a terrace lazy layer, ``nn.Dense``,
                another ``terrace.flax.Module``), a transformed class such as
                ``nn.scan(Block, ...)``, or a function that accepts ``name=``
                and returns a linen module.
            *args: positional constructor arguments.
            name: explicit, stable slot name; by default the slot is named
                after the class and a per-class counter (``LazyLinear_0``).
            **kwargs: keyword constructor arguments.

        Returns:
            The submodule of this slot, bound to this module.

        Raises:
            SlotMismatchError: the call differs from the slot's record (class,
                arguments, call site), the pass has more slots than the first,
                or :meth:`start_forward` was not called.
        """
        table = self._slot_table()
        _check_same_class_object(table, cls)
        create = functools.partial(_new_slot_state, table.owner)
        record = table.next(cls, args, kwargs, name, _getframe(1), create)
        return self._build_slot(record, args, kwargs)

    # -- slot objects ---------------------------------------------------------

    @nn.nowrap
    def _slot_table(self) -> SlotTable:
        table = self._terrace_table
        assert table is not None, "__post_init__ sets the slot table"
        return table

    @nn.nowrap
    def _build_slot(self, record: SlotRecord, args: tuple, kwargs: dict) -> nn.Module:
        from terrace.flax._neutral import resolve_factory

        module = resolve_factory(record.cls, args, kwargs)(*args, name=record.name, **kwargs)
        if not isinstance(module, nn.Module):
            raise TerraceError(
                f"{self._slot_table().owner}: make() must create a flax.linen.Module, but "
                f"{record.describe()} returned {type(module).__name__}. Fix: pass a linen "
                "module class, or a function that takes name= and returns a linen module."
            )
        if isinstance(module, Module):
            state: _SlotState = record.value
            if state.table is None:
                state.table = SlotTable(f"{self._slot_table().owner}.{record.name}")
            object.__setattr__(module, "_terrace_table", state.table)
        return module


def _check_same_class_object(table: SlotTable, cls: Any) -> None:
    """Raise a clear error when ``cls`` is a new class object named like the recorded one.

    ``nn.scan(Block, ...)`` and ``nn.remat(Block)`` build a new class on each
    call, so writing them inside ``forward`` hands ``make`` another class on
    every pass.
    """
    slot_pass = table.current()
    if slot_pass.index >= len(table.records):
        return
    record = table.records[slot_pass.index]
    if record.cls is cls or class_name(record.cls) != class_name(cls):
        return
    raise SlotMismatchError(
        f"{table.owner}: slot {record.name} (#{record.ordinal}) was made from a class named "
        f"{class_name(cls)}, and this pass passes another class object of that name. A linen "
        "transform called inside forward, such as nn.scan(Block, ...) or nn.remat(Block), "
        "builds a new class on every call. Fix: build the transformed class once, outside "
        "forward (for example `ScanBlock = nn.scan(Block, ...)` at module level), and pass "
        "that to make()."
    )


def _changes_structure(module: nn.Module, updates: dict[str, Any]) -> bool:
    """Return whether a clone with ``updates`` could make other slots than ``module``."""
    for key, value in updates.items():
        if key in _STRUCTURE_NEUTRAL:
            continue
        if not _same_setting(getattr(module, key), value):
            return True
    return False


def _same_setting(old: Any, new: Any) -> bool:
    if old is new:
        return True
    old_leaves, old_tree = jax.tree_util.tree_flatten(old)
    new_leaves, new_tree = jax.tree_util.tree_flatten(new)
    if old_tree != new_tree:
        return False
    return all(_same_leaf(a, b) for a, b in zip(old_leaves, new_leaves))


def _same_leaf(old: Any, new: Any) -> bool:
    if old is new:
        return True
    if isinstance(old, nn.Module) and isinstance(new, nn.Module):
        # linen passes submodule fields re-bound to new scopes; same class, same role
        return type(old) is type(new)
    if isinstance(old, _PLAIN_TYPES) and type(old) is type(new):
        return bool(old == new)
    return False
