"""Passes traced by TorchDynamo: ``torch.compile`` and ``torch.export(strict=True)``.

TorchDynamo runs a module's Python code symbolically. It cannot run
``sys._getframe``, which the eager ``make`` uses to check call sites, and the
per-thread pass stacks must stay out of the graph, because a compiled graph
runs without them. While dynamo traces a terrace module, :func:`call_traced`
replaces the module's slot table by a :class:`TracedSlots` for that one pass.
``make`` then skips its eager fast path, and :meth:`TracedSlots.next` replays
the slots by a counter that exists only during tracing. It checks each
``make`` against the records of the eager passes: class, explicit name and
constructor arguments, but not the call site. It never creates a slot, so a
module must have finished one eager pass before it is traced.

Every check runs at trace time, in functions that dynamo runs as plain Python
(``torch.compiler.assume_constant_result``), and the graph contains only the
tensor operations of ``forward``. Dynamo guards on the identity of each slot
table, on whether it is complete and on its number of slots, but not on each
record, so later calls with the same shapes reuse the graph at little cost.

Errors found while tracing are raised by functions wrapped in
``torch.compiler.disable``. Raising inside the traced code would make dynamo,
without ``fullgraph=True``, mark the code object of ``Module.__call__`` as
not compilable, and that code object is shared by every terrace module in the
process. A disabled function is a graph break instead: without
``fullgraph=True`` the call runs eagerly (building a never-run module, or
raising the eager pass's error), and with ``fullgraph=True`` dynamo raises
``torch._dynamo.exc.Unsupported`` quoting the function's reason.
"""

from __future__ import annotations

import enum
import types
from typing import Any, Callable, NamedTuple, NoReturn

import torch
from torch import nn

from terrace._errors import SlotMismatchError, TerraceError
from terrace._slots import SlotPass, SlotRecord, SlotTable

__all__ = [
    "TracedSlots",
    "call_traced",
    "dynamo_tracing",
    "report_forward_traced",
    "report_slot_mismatch",
    "run_eagerly",
    "run_lazy_layer_eagerly",
    "needs_eager_pass",
]

# True only in code that dynamo traces, where dynamo folds the call into a
# constant. In eager code it is one call of a function that returns False.
dynamo_tracing: Callable[[], bool] = torch.compiler.is_dynamo_compiling


def _outside_dynamo(reason: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Wrap a function in ``torch.compiler.disable``, which dynamo reports with ``reason``."""

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        try:
            return torch.compiler.disable(function, reason=f"terrace: {reason}")
        except TypeError:  # a torch version whose disable() takes no reason
            return torch.compiler.disable(function)

    return wrap


@_outside_dynamo(
    "dynamo traced a terrace module that has not finished its first eager forward pass, so "
    "the submodules made in forward do not exist yet. Without fullgraph=True this call runs "
    "eagerly and creates them, and later calls are compiled. With fullgraph=True, or for "
    "torch.export, run the model once eagerly first, for example `model(example_batch)`."
)
def run_eagerly(call: Callable[..., Any], module: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``call(module, *args, **kwargs)`` outside the graph, frames below it included.

    Dynamo reaches this function in the traced ``__call__`` of a module that
    has not finished its first pass (the reason above). :func:`call_traced`
    also calls it when dynamo runs a pass eagerly after a graph break inside it.
    """
    return call(module, *args, **kwargs)


@_outside_dynamo(
    "the traced forward pass of a terrace module does not match the slots that its eager "
    "passes recorded: another class, slot name or constructor arguments, or another number "
    "of make calls. Run the same input without torch.compile to get the SlotMismatchError, "
    "which names both make calls."
)
def report_slot_mismatch(error: SlotMismatchError) -> NoReturn:
    """Raise ``error`` outside the graph."""
    raise error


@_outside_dynamo(
    "dynamo traced the forward of a terrace module without the module's __call__, which "
    "opens the pass. Compile the module itself, with torch.compile(model) or model.compile(), "
    "not model.forward."
)
def report_forward_traced(error: TerraceError) -> NoReturn:
    """Raise ``error`` outside the graph."""
    raise error


@_outside_dynamo(
    "dynamo traced the first call of a terrace lazy layer, which creates the layer's "
    "parameters and cannot be part of a graph. Without fullgraph=True this call runs eagerly. "
    "With fullgraph=True, or for torch.export, run the model once eagerly first, for example "
    "`model(example_batch)`."
)
def run_lazy_layer_eagerly(call: Callable[..., Any], layer: Any, args: tuple, kwargs: dict) -> Any:
    """Run ``call(layer, *args, **kwargs)`` outside the graph."""
    return call(layer, *args, **kwargs)


_NON_STRICT_NEW_SLOT = (
    "{owner}: this traced pass asked for slot #{index}, but the eager passes created only "
    "{count} slots. A module with `strict = False` creates new slots only in an eager pass, "
    "because a graph cannot create parameters. Fix: run the module eagerly once on an input "
    "that makes this many slots, then compile it again."
)

# Bound here so that traced code reaches them without the torch module.
_Tensor = torch.Tensor

# Arguments of these types pass to the functions marked assume_constant_result
# (below) as they are, and dynamo converts them to Python values.
_CONSTANT_TYPES = (
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    type(None),
    type,
    types.FunctionType,
    types.BuiltinFunctionType,
    enum.Enum,
    torch.dtype,
    torch.device,
)

# Tensor and object arguments of make() pass to them as a marked tuple:
# (_TENSOR_MARK, shape, dtype) or (_OBJECT_MARK, class, callable). That is
# all that terrace.fingerprint reads of such a value.
_TENSOR_MARK = "__terrace_traced_tensor__"
_OBJECT_MARK = "__terrace_traced_object__"


class TracedSlot(NamedTuple):
    """The slot that :meth:`TracedSlots.next` returns: its name is all ``make`` reads."""

    name: str


class _TensorSpec:
    """Shape and dtype of a tensor argument, in place of the tensor."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape = shape
        self.dtype = dtype


def _object_spec(cls: type, is_callable: bool) -> Any:
    """Return an object that fingerprints like an instance of ``cls``.

    A fingerprint keeps only the class name of an object and whether it is
    callable, so an instance of a class with the same ``__qualname__`` and,
    where needed, a ``__call__`` fingerprints the same.
    """
    namespace = {"__call__": lambda self, *args, **kwargs: None} if is_callable else {}
    return type(cls.__qualname__, (), namespace)()


# The functions marked assume_constant_result run as plain Python at trace
# time. Dynamo takes their results as constants and guards only on the
# identity of the table or module passed in, not on what they read. That is
# safe because a record does not change once made. A strict table gets no
# new records after its first pass, and a graph traced when a
# `strict = False` table had fewer records stays valid for the passes that
# use those slots.


@torch.compiler.assume_constant_result
def _check_make(
    table: SlotTable,
    index: int,
    cls: Any,
    args: tuple,
    kwargs: dict,
    name: str | None,
    strict: bool,
) -> tuple[str, str | None]:
    """Return the name of slot ``index`` and the error of this ``make``, or None if it matches."""
    args = tuple(_from_constant(value) for value in args)
    kwargs = {key: _from_constant(value) for key, value in kwargs.items()}
    records = table.records
    try:
        if index >= len(records):
            if strict:
                table._raise_extra_slot(index, cls, args, kwargs, None)
            raise SlotMismatchError(
                _NON_STRICT_NEW_SLOT.format(owner=table.owner, index=index, count=len(records))
            )
        record = records[index]
        if record.cls is not cls or (strict and not record.matches(args, kwargs, name, None)):
            table._raise_mismatch(None, record, cls, args, kwargs, name, None)
    except SlotMismatchError as error:
        return "", str(error)
    return record.name, None


@torch.compiler.assume_constant_result
def _check_slot_count(table: SlotTable, used: int) -> str | None:
    """Return the error of a strict pass that used only ``used`` slots, or None."""
    slot_pass = SlotPass(table, strict=True)
    slot_pass.index = used
    try:
        table._finish(slot_pass)
    except SlotMismatchError as error:
        return str(error)
    return None


@torch.compiler.assume_constant_result
def _fully_built(module: Any) -> bool:
    return module._unbuilt_slot() is None


def _to_constant(value: Any) -> Any:
    """Return ``value`` as a value that dynamo can pass to a function outside the trace."""
    if isinstance(value, _Tensor):
        return (_TENSOR_MARK, tuple(_to_constant(size) for size in value.shape), value.dtype)
    # Dynamo reports a symbolic number (a SymInt) as an int. Formatting it
    # makes dynamo guard on its value and use a constant, so the graph is
    # used only while the number equals the one checked here. A constant
    # number passes through unchanged.
    if type(value) is bool:
        return f"{value}" == "True"
    if type(value) is int:
        return int(f"{value}")
    if type(value) is float:
        return float(f"{value!r}")
    if type(value) is tuple or type(value) is list:
        return type(value)(_to_constant(item) for item in value)
    if type(value) is dict:
        return {key: _to_constant(item) for key, item in value.items()}
    if isinstance(value, _CONSTANT_TYPES):
        return value
    return (_OBJECT_MARK, type(value), callable(value))


def _from_constant(value: Any) -> Any:
    if type(value) is tuple and len(value) == 3 and value[0] == _TENSOR_MARK:
        return _TensorSpec(_from_constant(value[1]), value[2])
    if type(value) is tuple and len(value) == 3 and value[0] == _OBJECT_MARK:
        return _object_spec(value[1], value[2])
    if type(value) is tuple or type(value) is list:
        return type(value)(_from_constant(item) for item in value)
    if type(value) is dict:
        return {key: _from_constant(item) for key, item in value.items()}
    return value


class TracedSlots:
    """Stand-in for a module's :class:`SlotTable` while dynamo traces one pass.

    It has no ``_local`` pass stack, so ``make`` takes its slow path and calls
    :meth:`next` without a frame.
    """

    records_call_sites = False

    def __init__(self, table: SlotTable, strict: bool) -> None:
        self.table = table
        self.owner = table.owner
        self.complete = table.complete
        self.slot_pass = SlotPass(table, strict)

    def start(self, strict: bool = True) -> SlotPass:
        """Begin the traced pass (``start_forward``)."""
        slot_pass = self.slot_pass
        if slot_pass.started:
            report_slot_mismatch(
                SlotMismatchError(
                    f"{self.owner}: start_forward() was called twice in one pass. A forward "
                    "that runs its own module again must call the module (`self(x)`), not "
                    "`self.forward(x)`. Fix: call start_forward() once, at the top of forward."
                )
            )
        slot_pass.started = True
        slot_pass.strict = strict
        return slot_pass

    def next(
        self,
        cls: Any,
        args: tuple,
        kwargs: dict,
        name: str | None,
        frame: Any,
        create: Callable[[SlotRecord, tuple, dict], Any],
    ) -> TracedSlot:
        """Return the next recorded slot, or report that this ``make`` does not match it."""
        slot_pass = self.slot_pass
        if not slot_pass.started:
            report_slot_mismatch(
                SlotMismatchError(
                    f"{self.owner}: make() was called before start_forward() in this pass. "
                    "Fix: call self.start_forward() as the first line of forward."
                )
            )
        index = slot_pass.index
        slot_pass.index = index + 1
        slot_name, error = _check_make(
            self.table, index, cls, _to_constant(args), _to_constant(kwargs), name, slot_pass.strict
        )
        if error is not None:
            report_slot_mismatch(SlotMismatchError(error))
        return TracedSlot(slot_name)

    def finish(self) -> None:
        """Report a strict pass that used fewer slots than the eager passes made."""
        slot_pass = self.slot_pass
        if slot_pass.started and slot_pass.strict:
            error = _check_slot_count(self.table, slot_pass.index)
            if error is not None:
                report_slot_mismatch(SlotMismatchError(error))


def needs_eager_pass(module: Any) -> bool:
    """Return whether ``module`` or a slot inside it has not finished an eager pass."""
    table = module._terrace_table
    if isinstance(table, TracedSlots):
        # The module calls itself, and the outer pass found it built.
        return False
    if not table.complete:
        return True
    # Dynamo guards on this length. An error inside the traced pass makes
    # dynamo run the whole call eagerly, and the compiled __call__ keeps only
    # the guards read up to here. A module with `strict = False` that made a
    # new slot in that eager call is then traced again.
    len(table.records)
    if _fully_built(module):
        return False
    # Read the slots through dynamo, so that it guards on the classes of the
    # lazy layers and compiles again once they are built.
    return module._unbuilt_slot() is not None


def call_traced(
    module: Any,
    traced_call: Callable[..., Any],
    eager_call: Callable[..., Any],
    args: tuple,
    kwargs: dict,
) -> Any:
    """Run one pass of a built terrace ``module`` while dynamo traces it.

    ``traced_call(module, *args, **kwargs)`` runs the module's hooks and
    ``forward``. ``eager_call`` runs the same pass eagerly, for when dynamo
    runs this function outside the graph.
    """
    if not dynamo_tracing():
        # Dynamo moved a graph break from inside this pass out to this call
        # and runs it eagerly. The eager pass checks and reports everything,
        # and it must not be traced again piece by piece.
        # NOTE: so a graph break anywhere in forward (a branch on a tensor's
        # value, .item(), print) runs the whole pass eagerly, where dynamo
        # would split a plain module's forward into several graphs. Dynamo
        # keeps running the module this way until it recompiles for another
        # reason, because the cached entry has no guard on the break's cause.
        return run_eagerly(eager_call, module, args, kwargs)
    current = module._terrace_table
    # A forward that calls its own module (a tree-shaped model) finds the
    # stand-in of the outer pass here, and the inner pass gets its own.
    table = current.table if isinstance(current, TracedSlots) else current
    traced = TracedSlots(table, module.strict)
    module.__dict__["_terrace_table"] = traced
    try:
        result = traced_call(module, *args, **kwargs)
    finally:
        module.__dict__["_terrace_table"] = current
    traced.finish()
    return result
