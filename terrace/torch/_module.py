"""``terrace.torch.Module``: a ``torch.nn.Module`` defined entirely in ``forward``."""

from __future__ import annotations

from sys import _getframe
from collections.abc import Iterator, Sequence
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn

from terrace._errors import NotBuiltError, SlotNameError, TerraceError
from terrace._make import make_method
from terrace._slots import SlotRecord, SlotTable, check_slot_name
from terrace.torch._compile import (
    call_traced,
    dynamo_tracing,
    needs_eager_pass,
    report_forward_traced,
    run_eagerly,
)
from terrace.torch._lazy import LazyLayer
from terrace.torch._placement import ProbeMixin, follow_probe
from terrace.torch._restore import LOAD_STRICT, PendingState, loading

__all__ = ["Module"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_torch_call = nn.Module.__call__
_call_impl = nn.Module._call_impl



class _ParamSlot:
    """Marker class recorded for slots made by :meth:`Module.make_param`."""

    terrace_slot_prefix = "param"


class Module(ProbeMixin, nn.Module):
    """A ``torch.nn.Module`` whose submodules are made inside ``forward``.

    Call :meth:`start_forward` at the top of ``forward``, then
    :meth:`make` for each submodule. The first pass creates them; later passes
    get the same instances back, in the same order.

    Set ``strict = False`` in a subclass body to allow passes that make
    different submodules (the original, unchecked behaviour).

    Example:
        >>> import torch, terrace as ter
        >>> class Net(ter.Module):
        ...     def forward(self, x):
        ...         self.start_forward()
        ...         return self.make(ter.LazyLinear, 3)(x)
        >>> Net()(torch.randn(2, 5)).shape
        torch.Size([2, 3])
    """

    strict: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        self._init_probe()
        self._terrace_table = SlotTable(type(self).__name__)
        self._terrace_pending = PendingState()

    # -- passes ---------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if dynamo_tracing():
            # torch.compile or torch.export(strict=True) traces this call.
            if needs_eager_pass(self):
                return run_eagerly(Module.__call__, self, args, kwargs)
            return call_traced(self, _torch_call, Module.__call__, args, kwargs)
        table = self._terrace_table
        slot_pass = table.enter(self.strict)
        try:
            result = _torch_call(self, *args, **kwargs)
        except BaseException:
            table.exit(slot_pass, ok=False)
            raise
        table.exit(slot_pass, ok=True)
        if self._terrace_pending.active and table.complete:
            self._terrace_pending.finish(table.owner, [r.name for r in table.records])
        return result

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile this module's calls in place with ``torch.compile``.

        Works like ``torch.nn.Module.compile`` and passes the arguments on to
        ``torch.compile``. It compiles the traced pass of this module, so
        ``make`` replays the slots as under ``torch.compile(module)``.
        """
        self._compiled_call_impl = torch.compile(self._call_compiled, *args, **kwargs)

    def _call_compiled(self, *args: Any, **kwargs: Any) -> Any:
        # Reached from __call__, which has opened an eager pass, through
        # nn.Module._wrapped_call_impl; dynamo traces from here.
        if dynamo_tracing():
            if needs_eager_pass(self):
                return run_eagerly(_call_impl, self, args, kwargs)
            return call_traced(self, _call_impl, _call_impl, args, kwargs)
        return self._call_impl(*args, **kwargs)

    def start_forward(self) -> None:
        """Begin a pass: the next :meth:`make` returns the first slot."""
        table = self._terrace_table
        if dynamo_tracing() and table.records_call_sites:
            report_forward_traced(
                TerraceError(
                    f"{table.owner}: torch.compile traced forward without the module's "
                    "__call__. Fix: compile the module, with torch.compile(model) or "
                    "model.compile(), not model.forward."
                )
            )
        table.start(self.strict)

    make = make_method("_modules")
    make.__doc__ = """Create ``cls(*args, **kwargs)`` on the first pass; return it on later passes.

        Args:
            cls: an ``nn.Module`` class (or a function returning a module).
            *args: positional constructor arguments.
            name: explicit, stable slot name; by default the slot is named
                after the class and a per-class counter (``LazyLinear_0``).
            **kwargs: keyword constructor arguments.

        Returns:
            The submodule of this slot.

        Raises:
            SlotMismatchError: the call differs from the slot's record (class,
                arguments, call site), the pass has more slots than the first,
                or :meth:`start_forward` was not called.
        """

    def make_param(
        self,
        name: str,
        shape: Sequence[int],
        init: Callable[[torch.Tensor], Any],
        *,
        requires_grad: bool = True,
    ) -> nn.Parameter:
        """Create a bare parameter on the first pass; return it on later passes.

        Args:
            name: the parameter's slot name (its ``state_dict`` key).
            shape: the parameter's shape; it may come from the input, such as
                ``(x.shape[-1],)``.
            init: fills the new tensor in place, like the functions in
                ``torch.nn.init`` (``torch.nn.init.zeros_``).
            requires_grad: whether the parameter is trained.

        Returns:
            The parameter, on the module's device and floating dtype.
        """
        table = self._terrace_table
        check_slot_name(table.owner, name)
        shape = tuple(int(s) for s in shape)
        options = {"init": init, "requires_grad": requires_grad}
        frame = _getframe(1) if table.records_call_sites else None
        record = table.next(_ParamSlot, (shape,), options, name, frame, self._create_param)
        return self._parameters[record.name]  # type: ignore[return-value]

    # -- slot creation --------------------------------------------------------

    def _terrace_create(self, record: SlotRecord, args: tuple, kwargs: dict) -> nn.Module:
        from terrace.torch._neutral import resolve_factory

        module = resolve_factory(record.cls, args, kwargs)(*args, **kwargs)
        if not isinstance(module, nn.Module):
            raise TerraceError(
                f"{self._terrace_table.owner}: make() must create a torch.nn.Module, but "
                f"{record.describe()} returned {type(module).__name__}. Fix: pass a module "
                "class, or use make_param() for a bare parameter."
            )
        follow_probe(module, self._terrace_probe)
        module.train(self.training)
        if isinstance(module, Module):
            module._terrace_table.owner = f"{self._terrace_table.owner}.{record.name}"
        elif isinstance(module, LazyLayer):
            module._terrace_path = f"{self._terrace_table.owner}.{record.name}"
        self._register_slot(record, module, self.add_module)
        if self._terrace_pending:
            self._terrace_pending.take_module(self._terrace_table.owner, record.name, module)
        return module

    def _create_param(self, record: SlotRecord, args: tuple, kwargs: dict) -> nn.Parameter:
        (shape,) = args
        probe = self._terrace_probe
        tensor = torch.empty(shape, device=probe.device, dtype=probe.dtype)
        with torch.no_grad():
            kwargs["init"](tensor)
        param = nn.Parameter(tensor, requires_grad=kwargs["requires_grad"])
        self._register_slot(record, param, self.register_parameter)
        if self._terrace_pending:
            self._terrace_pending.take_param(self._terrace_table.owner, record.name, param)
        return param

    def _register_slot(self, record: SlotRecord, value: Any, register: Callable[[str, Any], None]) -> None:
        name = record.name
        if name in self._modules or name in self._parameters or name in self._buffers or hasattr(self, name):
            raise SlotNameError(
                f"{self._terrace_table.owner}: slot name {name!r} is already an attribute "
                f"of the module ({type(getattr(self, name)).__name__}), so the slot would "
                "replace or hide it. Fix: pass another name= to make(), or rename the attribute."
            )
        register(name, value)

    # -- torch.nn.Module overrides ----------------------------------------------

    @property
    def is_built(self) -> bool:
        """Whether the first pass has run and every slot has its parameters."""
        return self._unbuilt_slot() is None

    def _unbuilt_slot(self) -> str | None:
        if not self._terrace_table.complete:
            return self._terrace_table.owner
        for name, module in self.named_modules():
            if isinstance(module, LazyLayer):
                return f"{self._terrace_table.owner}.{name}"
            if isinstance(module, Module) and not module._terrace_table.complete:
                return module._terrace_table.owner
        return None

    def _require_built(self, what: str) -> None:
        unbuilt = self._unbuilt_slot()
        if unbuilt is None:
            return
        if unbuilt == self._terrace_table.owner:
            happened = "before the first forward pass, so the submodules made in forward do not exist yet"
        else:
            happened = (
                f"while slot {unbuilt} has not run on an input yet, so its parameters do not "
                "exist (a branch the first pass did not take)"
            )
        raise NotBuiltError(
            f"{self._terrace_table.owner}: {what} was called {happened}; it would miss "
            "their parameters, and an optimizer built now would not train them. Fix: run one "
            "forward pass on an example batch first, for example `model(example_batch)`, "
            "reaching every made submodule."
        )

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        self._require_built("parameters()")
        return super().parameters(recurse)

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        self._require_built("named_parameters()")
        return super().named_parameters(prefix, recurse, remove_duplicate)

    def apply(self: ModuleT, fn: Callable[[nn.Module], None]) -> ModuleT:
        Module._require_built(self, "apply()")  # type: ignore[arg-type]
        return super().apply(fn)  # type: ignore[misc]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._unbuilt_slot() is None:
            super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        with loading(strict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, tensor in self._terrace_pending.items():
            destination[prefix + key] = tensor

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        if not self._terrace_table.complete:
            state_dict = self._keep_pending(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _keep_pending(self, state_dict: Any, prefix: str) -> dict[str, Any]:
        """Set aside the entries for slots that do not exist yet; return the rest."""
        known = set(self._modules) | set(self._parameters) | set(self._buffers)
        self._terrace_pending.activate(LOAD_STRICT.get())
        rest = {}
        for key, tensor in state_dict.items():
            local = key[len(prefix) :] if key.startswith(prefix) else None
            if local is None or local.split(".", 1)[0] in known or local == "_extra_state":
                rest[key] = tensor
            else:
                self._terrace_pending.keep(local, tensor)
        return rest
