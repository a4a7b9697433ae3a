"""The backend-neutral slot table shared by every terrace backend.

A terrace module creates its submodules inside ``forward``. The first pass
records one *slot* per ``make`` call: its ordinal, canonical name, class,
a fingerprint of the constructor arguments and the call site. Every later
pass replays the slots in order and checks each ``make`` against its record,
so a branch or loop that would silently reuse the wrong submodule raises
:class:`~terrace.SlotMismatchError` instead.

Passes are kept per thread on a stack, so two threads can run one built
module at once, and a forward that calls its own module again (a tree-shaped
model) opens a nested pass without disturbing the outer one. Backends call
:meth:`SlotTable.enter`, :meth:`SlotTable.start`, :meth:`SlotTable.next` and
:meth:`SlotTable.exit`; nothing here imports torch or jax.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Hashable

from terrace._errors import SlotMismatchError, SlotNameError

__all__ = [
    "CallSite",
    "SlotPass",
    "SlotRecord",
    "SlotTable",
    "call_site_of",
    "check_slot_name",
    "class_name",
    "fingerprint",
]

_PLAIN_TYPES = frozenset({int, float, str, bool, type(None)})


@dataclass(frozen=True)
class CallSite:
    """Where a ``make`` call sits in the source: file, line, column and function.

    ``column`` distinguishes two calls on one line (``a if c else b``); it is
    None where Python does not record columns (before 3.11).
    """

    filename: str
    lineno: int
    function: str
    column: int | None = None

    def __str__(self) -> str:
        column = f":{self.column + 1}" if self.column is not None else ""
        return f"{self.filename}:{self.lineno}{column} in {self.function}"


@dataclass(eq=False)
class SlotRecord:
    """The record the first pass keeps for one slot.

    Attributes:
        ordinal: position of the slot in the pass, from 0.
        name: canonical name (``LazyLinear_0``) or the explicit name.
        cls: the class (or factory) passed to ``make``.
        fingerprint: summary of the constructor arguments, see :func:`fingerprint`.
        call_site: where the ``make`` call sits, or None where unknown.
        explicit_name: whether ``name`` was given by the caller.
        value: the backend object made for the slot (a torch submodule).
    """

    ordinal: int
    name: str
    cls: Any
    fingerprint: Hashable
    call_site: CallSite | None
    explicit_name: bool
    value: Any = None
    # The constructor arguments as given, kept only when they are plain values,
    # so that replays compare them without recomputing the fingerprint.
    raw_args: tuple | None = None
    raw_kwargs: dict | None = None
    # The code object and bytecode offset of the call site; comparing these is
    # cheaper than computing a line number. Not pickled (code objects are not).
    code: Any = None
    offset: int = -1
    # (cls, code, offset, args, kwargs, name) when every part is known, so
    # that a matching replay costs one tuple comparison.
    key: tuple | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["code"] = None
        state["offset"] = -1
        state["key"] = None
        return state

    def _update_key(self) -> None:
        if self.raw_args is not None and self.code is not None:
            explicit = self.name if self.explicit_name else None
            self.key = (self.cls, self.code, self.offset, self.raw_args, self.raw_kwargs, explicit)

    def matches(self, args: tuple, kwargs: dict, name: str | None, frame: Any) -> bool:
        """Return whether a replayed ``make`` has this slot's arguments, name and call site."""
        if frame is not None and not (frame.f_code is self.code and frame.f_lasti == self.offset):
            if not self._same_call_site(frame):
                return False
        if (name is not None or self.explicit_name) and name != self.name:
            return False
        if self.raw_args is not None:
            try:
                if args == self.raw_args and kwargs == self.raw_kwargs:
                    return True
            except RuntimeError:
                pass  # an array argument compared with a recorded number
        return fingerprint(args, kwargs) == self.fingerprint

    def _same_call_site(self, frame: Any) -> bool:
        site = self.call_site
        if site is None:
            return True
        if self.code is not None:
            # The same code object at another offset is another make call,
            # even on the same line.
            return frame.f_code is self.code and frame.f_lasti == self.offset
        if frame.f_lineno != site.lineno or frame.f_code.co_filename != site.filename:
            return False
        self.code = frame.f_code
        self.offset = frame.f_lasti
        self._update_key()
        return True

    def describe(self) -> str:
        """Return the record as ``make(Cls, args)`` with its call site."""
        return _describe(self.cls, self.fingerprint, self.call_site)


def _all_plain(args: tuple) -> bool:
    for value in args:
        if type(value) not in _PLAIN_TYPES:
            return False
    return True


def call_site_of(frame: Any) -> CallSite | None:
    """Return the call site of a Python frame, or None for no frame."""
    if frame is None:
        return None
    code = frame.f_code
    # co_qualname and co_positions exist from Python 3.11.
    function = getattr(code, "co_qualname", code.co_name)
    column = None
    if hasattr(code, "co_positions"):
        positions = list(code.co_positions())
        index = frame.f_lasti // 2
        if 0 <= index < len(positions):
            column = positions[index][2]
    return CallSite(code.co_filename, frame.f_lineno, function, column)


def _describe(cls: Any, fp: Hashable, site: CallSite | None) -> str:
    where = f" at {site}" if site is not None else ""
    return f"make({class_name(cls)}{_format_args(fp)}){where}"


def class_name(cls: Any) -> str:
    """Return the name a slot of this class is counted under (``LazyLinear``).

    A class may set ``terrace_slot_prefix`` to be counted under another name.
    """
    name = getattr(cls, "terrace_slot_prefix", None) or getattr(cls, "__name__", None)
    if name is None:
        name = getattr(getattr(cls, "func", None), "__name__", type(cls).__name__)
    return name


def _fingerprint_value(value: Any) -> Hashable:
    if type(value) in _PLAIN_TYPES:
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_fingerprint_value(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((str(k), _fingerprint_value(v)) for k, v in value.items())))
    if isinstance(value, type) or callable(value):
        return ("callable", getattr(value, "__qualname__", type(value).__qualname__))
    shape = getattr(value, "shape", None)
    dtype = getattr(value, "dtype", None)
    if shape is not None:
        return ("array", tuple(shape), str(dtype))
    return ("object", type(value).__qualname__)


def fingerprint(args: tuple, kwargs: dict) -> Hashable:
    """Return a hashable summary of constructor arguments.

    Plain values (numbers, strings, tuples of them) are kept as they are;
    arrays are reduced to shape and dtype, and other objects to their type,
    so a fingerprint never contains a tensor.
    """
    if _all_plain(args):
        positional: tuple = args
    else:
        positional = tuple(_fingerprint_value(a) for a in args)
    if not kwargs:
        return positional
    keyword = tuple(sorted((k, _fingerprint_value(v)) for k, v in kwargs.items()))
    return (positional, ("kwargs", keyword))


def _format_args(fp: Hashable) -> str:
    if isinstance(fp, tuple) and len(fp) == 2 and isinstance(fp[1], tuple) and fp[1][:1] == ("kwargs",):
        positional, (_, keyword) = fp
        parts = [repr(a) for a in positional] + [f"{k}={v!r}" for k, v in keyword]
    else:
        parts = [repr(a) for a in fp] if isinstance(fp, tuple) else [repr(fp)]
    return "".join(", " + p for p in parts)


_FIX_BRANCH = (
    "Fix: make every submodule before branching (for example "
    "`if_layer = self.make(...)` and `else_layer = self.make(...)`, then pick one), "
    "or set `strict = False` on the module class if the passes are meant to differ."
)


class SlotPass:
    """One pass through a module's ``forward``: a cursor over the slot table."""

    __slots__ = ("table", "index", "started", "strict", "implicit")

    def __init__(self, table: SlotTable, strict: bool, implicit: bool = False) -> None:
        self.table = table
        self.index = 0
        self.started = False
        self.strict = strict
        self.implicit = implicit


class SlotTable:
    """The slots of one module, and the passes running through it.

    Args:
        owner: name of the owning module, used in error messages.
    """

    # Whether make() passes the caller's frame to next(). A stand-in table
    # used while a tracer that cannot run sys._getframe traces the pass sets
    # this to False, and then call sites are not checked.
    records_call_sites: ClassVar[bool] = True

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.records: list[SlotRecord] = []
        self.complete = False
        self._by_name: dict[str, SlotRecord] = {}
        self._counters: dict[str, int] = {}
        self._local = threading.local()
        self._lock = threading.RLock()

    # -- pickling: locks and live passes belong to one process ---------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        del state["_local"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
        self._local = threading.local()

    # -- pass life cycle ------------------------------------------------------

    def enter(self, strict: bool = True) -> SlotPass:
        """Open a pass for the calling thread; :meth:`start` begins it."""
        new_pass = SlotPass(self, strict)
        try:
            self._local.stack.append(new_pass)
        except AttributeError:
            self._local.stack = [new_pass]
        return new_pass

    def start(self, strict: bool = True) -> SlotPass:
        """Begin the pass opened by :meth:`enter` (``start_forward``).

        When ``forward`` was called directly rather than through the module,
        no pass is open. An implicit pass is opened then, and it is checked
        when the next implicit pass starts.
        """
        stack = self._stack()
        if stack and stack[-1].implicit:
            self._finish(stack.pop())
        if not stack or stack[-1].started:
            if stack:
                raise SlotMismatchError(
                    f"{self.owner}: start_forward() was called twice in one pass. "
                    "A forward that runs its own module again must call the module "
                    "(`self(x)`), not `self.forward(x)`, so the inner call gets a pass "
                    "of its own. Fix: call start_forward() once, at the top of forward."
                )
            stack.append(SlotPass(self, strict, implicit=True))
        current = stack[-1]
        current.started = True
        current.strict = strict
        return current

    def exit(self, slot_pass: SlotPass, ok: bool) -> None:
        """Close ``slot_pass``; when the forward succeeded, check it used every slot."""
        stack = self._stack()
        if stack and stack[-1] is slot_pass:
            stack.pop()
        if ok and slot_pass.started and (
            slot_pass.index != len(self.records) or not self.complete
        ):
            self._finish(slot_pass)

    def _stack(self) -> list[SlotPass]:
        try:
            return self._local.stack
        except AttributeError:
            self._local.stack = []
            return self._local.stack

    def current(self) -> SlotPass:
        """Return the started pass of the calling thread, or raise if there is none."""
        stack = self._stack()
        if stack:
            top = stack[-1]
            if top.started:
                return top
        raise SlotMismatchError(
            f"{self.owner}: make() was called before start_forward() in this pass. "
            "Every pass begins with start_forward(), which resets the slot cursor; "
            "without it the pass would reuse slots from wherever the last one stopped. "
            "Fix: call self.start_forward() as the first line of forward."
        )

    def _finish(self, slot_pass: SlotPass) -> None:
        used = slot_pass.index
        if not self.complete:
            with self._lock:
                self.complete = True
            return
        if used < len(self.records) and slot_pass.strict:
            missing = self.records[used]
            raise SlotMismatchError(
                f"{self.owner}: this pass used {used} of {len(self.records)} slots; "
                f"slot {missing.name} (#{missing.ordinal}, {missing.describe()}) and any "
                "after it were skipped. A pass that skips slots usually means a branch or "
                "loop depends on the data, so later slots would line up with the wrong "
                f"make calls. {_FIX_BRANCH}"
            )

    # -- handing out slots ----------------------------------------------------

    def next(
        self,
        cls: Any,
        args: tuple,
        kwargs: dict,
        name: str | None,
        frame: Any,
        create: Callable[[SlotRecord, tuple, dict], Any],
    ) -> SlotRecord:
        """Return the next slot of the calling thread's pass, creating it on the first pass.

        ``frame`` is the Python frame of the ``make`` call (its call site), or
        None where the backend cannot tell. ``create(record, args, kwargs)``
        builds the backend object for a new slot and runs under the table's
        lock, so two threads racing through the first pass both get the same
        object.

        The common case, a replay that matches its record, is also handled
        inline by :func:`terrace._make.make_method` without calling this.
        """
        slot_pass = self.current()
        index = slot_pass.index
        slot_pass.index = index + 1
        if index >= len(self.records):
            with self._lock:
                if index >= len(self.records):
                    return self._create(slot_pass, index, cls, args, kwargs, name, frame, create)
        record = self.records[index]
        if record.cls is not cls or (
            slot_pass.strict and not record.matches(args, kwargs, name, frame)
        ):
            self._raise_mismatch(slot_pass, record, cls, args, kwargs, name, frame)
        return record

    def _create(
        self,
        slot_pass: SlotPass,
        index: int,
        cls: Any,
        args: tuple,
        kwargs: dict,
        name: str | None,
        frame: Any,
        create: Callable[[SlotRecord, tuple, dict], Any],
    ) -> SlotRecord:
        site = call_site_of(frame)
        if self.complete and slot_pass.strict:
            self._raise_extra_slot(index, cls, args, kwargs, site)
        slot_name = self._slot_name(cls, args, kwargs, name, site)
        record = SlotRecord(
            ordinal=index,
            name=slot_name,
            cls=cls,
            fingerprint=fingerprint(args, kwargs),
            call_site=site,
            explicit_name=name is not None,
        )
        if _all_plain(args) and _all_plain(tuple(kwargs.values())):
            record.raw_args = args
            record.raw_kwargs = dict(kwargs)
        if frame is not None:
            record.code = frame.f_code
            record.offset = frame.f_lasti
        record._update_key()
        record.value = create(record, args, kwargs)
        if name is None:
            prefix = class_name(cls)
            self._counters[prefix] = self._counters.get(prefix, 0) + 1
        self.records.append(record)
        self._by_name[slot_name] = record
        return record

    def _slot_name(
        self, cls: Any, args: tuple, kwargs: dict, name: str | None, site: CallSite | None
    ) -> str:
        if name is None:
            prefix = class_name(cls)
            slot_name = f"{prefix}_{self._counters.get(prefix, 0)}"
            if slot_name not in self._by_name:
                return slot_name
            taken = self._by_name[slot_name]
            name = slot_name
        else:
            check_slot_name(self.owner, name)
            taken = self._by_name.get(name)
            if taken is None:
                return name
        raise SlotNameError(
            f"{self.owner}: slot name {name!r} is used twice: first by "
            f"{taken.describe()}, again by {_describe(cls, fingerprint(args, kwargs), site)}. "
            "Fix: give each explicitly named make call a name of its own, and avoid "
            "names of the form Class_N, which automatic naming uses."
        )

    def _raise_mismatch(
        self,
        slot_pass: SlotPass,
        record: SlotRecord,
        cls: Any,
        args: tuple,
        kwargs: dict,
        name: str | None,
        frame: Any,
    ) -> None:
        site = call_site_of(frame)
        requested = _describe(cls, fingerprint(args, kwargs), site)
        if record.cls is not cls:
            problem = f"class {class_name(cls)} instead of {class_name(record.cls)}"
        elif (name is not None or record.explicit_name) and name != record.name:
            problem = f"slot name {name!r} instead of {record.name!r}"
        elif frame is not None and not record._same_call_site(frame):
            problem = "another call site"
        else:
            problem = "other constructor arguments"
        raise SlotMismatchError(
            f"{self.owner}: slot {record.name} (#{record.ordinal}) was created by "
            f"{record.describe()}, but this pass reached it from {requested}, with "
            f"{problem}. Reusing the slot would silently share one submodule between "
            f"two make calls. {_FIX_BRANCH}"
        )

    def _raise_extra_slot(
        self, index: int, cls: Any, args: tuple, kwargs: dict, site: CallSite | None
    ) -> None:
        requested = _describe(cls, fingerprint(args, kwargs), site)
        raise SlotMismatchError(
            f"{self.owner}: this pass asked for slot #{index} from {requested}, but the "
            f"first pass created only {len(self.records)} slots. The number of make calls "
            "depends on the data (a loop or branch), so this pass would need a submodule "
            "that does not exist yet and would not be trained with the others. "
            "Fix: make a fixed number of submodules, for example the most the data can "
            "need, and use as many as each input needs; or set `strict = False` on the "
            "module class to create new slots on later passes."
        )


def check_slot_name(owner: str, name: Any) -> None:
    """Raise :class:`SlotNameError` unless ``name`` is a valid explicit slot name."""
    if not isinstance(name, str) or not name.isidentifier():
        raise SlotNameError(
            f"{owner}: slot name {name!r} is not a valid identifier. Explicit names "
            "become state-dict keys and parameter paths. Fix: use letters, digits and "
            "underscores, not starting with a digit (for example name='encoder')."
        )
