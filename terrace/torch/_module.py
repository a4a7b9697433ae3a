"""``terrace.torch.Module``: a ``torch.nn.Module`` defined entirely in ``forward``."""

from __future__ import annotations

import contextvars
from sys import _getframe
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import nn

from terrace._errors import NotBuiltError, SlotNameError, StateError, TerraceError
from terrace._make import make_method
from terrace._slots import SlotRecord, SlotTable, check_slot_name
from terrace.torch._lazy import LazyLayer
from terrace.torch._placement import ProbeMixin, follow_probe

__all__ = ["Module"]

ModuleT = TypeVar("ModuleT", bound=nn.Module)

_torch_call = nn.Module.__call__

# Whether the load_state_dict call in progress was strict; torch passes
# strict=True to every module's _load_from_state_dict whatever the caller asked.
_LOAD_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("terrace_load_strict", default=True)


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
        self._terrace_pending: dict[str, tuple[torch.Tensor, bool]] = {}

    # -- passes ---------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        table = self._terrace_table
        slot_pass = table.enter(self.strict)
        try:
            result = _torch_call(self, *args, **kwargs)
        except BaseException:
            table.exit(slot_pass, ok=False)
            raise
        table.exit(slot_pass, ok=True)
        if self._terrace_pending and table.complete:
            self._raise_unused_state()
        return result

    def start_forward(self) -> None:
        """Begin a pass: the next :meth:`make` returns the first slot."""
        self._terrace_table.start(self.strict)

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
        check_slot_name(self._terrace_table.owner, name)
        shape = tuple(int(s) for s in shape)
        options = {"init": init, "requires_grad": requires_grad}
        record = self._terrace_table.next(
            _ParamSlot, (shape,), options, name, _getframe(1), self._create_param
        )
        return self._parameters[record.name]  # type: ignore[return-value]

    # -- slot creation --------------------------------------------------------

    def _terrace_create(self, record: SlotRecord, args: tuple, kwargs: dict) -> nn.Module:
        module = record.cls(*args, **kwargs)
        if not isinstance(module, nn.Module):
            raise TerraceError(
                f"{self._terrace_table.owner}: make() must create a torch.nn.Module, but "
                f"{record.describe()} returned {type(module).__name__}. Fix: pass a module "
                "class, or use make_param() for a bare parameter."
            )
        follow_probe(module, self._terrace_probe)
        if isinstance(module, Module):
            module._terrace_table.owner = f"{self._terrace_table.owner}.{record.name}"
        elif isinstance(module, LazyLayer):
            module._terrace_path = f"{self._terrace_table.owner}.{record.name}"
        self._register_slot(record, module, self.add_module)
        self._restore_module(record.name, module)
        return module

    def _create_param(self, record: SlotRecord, args: tuple, kwargs: dict) -> nn.Parameter:
        (shape,) = args
        probe = self._terrace_probe
        tensor = torch.empty(shape, device=probe.device, dtype=probe.dtype)
        with torch.no_grad():
            kwargs["init"](tensor)
        param = nn.Parameter(tensor, requires_grad=kwargs["requires_grad"])
        self._register_slot(record, param, self.register_parameter)
        self._restore_param(record.name, param)
        return param

    def _register_slot(self, record: SlotRecord, value: Any, register: Callable[[str, Any], None]) -> None:
        try:
            register(record.name, value)
        except KeyError as error:
            raise SlotNameError(
                f"{self._terrace_table.owner}: slot name {record.name!r} is already an "
                f"attribute of the module ({error}). Fix: pass another name= to make()."
            ) from error

    # -- restore on create ----------------------------------------------------

    def _restore_module(self, name: str, module: nn.Module) -> None:
        pending = self._terrace_pending
        if not pending:
            return
        prefix = name + "."
        keys = [k for k in pending if k.startswith(prefix)]
        if not keys:
            return
        strict = all(pending[k][1] for k in keys)
        state = {k[len(prefix) :]: pending.pop(k)[0] for k in keys}
        try:
            module.load_state_dict(state, strict=strict)
        except RuntimeError as error:
            raise StateError(
                f"{self._terrace_table.owner}: the state loaded before the first pass does "
                f"not fit slot {name}: {error}. Fix: load a checkpoint saved from the same "
                "model code, or rename the keys to the current slot names."
            ) from error

    def _restore_param(self, name: str, param: nn.Parameter) -> None:
        entry = self._terrace_pending.pop(name, None)
        if entry is None:
            return
        tensor = entry[0]
        if tuple(tensor.shape) != tuple(param.shape):
            raise StateError(
                f"{self._terrace_table.owner}: the state loaded before the first pass has "
                f"shape {tuple(tensor.shape)} for parameter slot {name}, but this pass made "
                f"it with shape {tuple(param.shape)}. Fix: load a checkpoint saved from a "
                "model that saw inputs of the same sizes."
            )
        with torch.no_grad():
            param.copy_(tensor)

    def _raise_unused_state(self) -> None:
        pending = self._terrace_pending
        strict = any(s for _, s in pending.values())
        keys = sorted(pending)
        self._terrace_pending = {}
        slots = [r.name for r in self._terrace_table.records]
        message = (
            f"{self._terrace_table.owner}: the first pass ended, but {len(keys)} loaded "
            f"state entries match no slot: {', '.join(keys)}. The slots of this model are: "
            f"{', '.join(slots) or 'none'}. The checkpoint was saved from a model with other "
            "slots (a layer added, removed or renamed). Fix: load a matching checkpoint, or "
            "rename its keys to the slot names above."
        )
        if strict:
            raise StateError(message)
        warnings.warn(message + " They were dropped because strict=False.", stacklevel=3)

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
        self._require_built("parameters()")
        return super().named_parameters(prefix, recurse, remove_duplicate)

    def apply(self: ModuleT, fn: Callable[[nn.Module], None]) -> ModuleT:
        Module._require_built(self, "apply()")  # type: ignore[arg-type]
        return super().apply(fn)  # type: ignore[misc]

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._unbuilt_slot() is None:
            super().zero_grad(set_to_none)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        token = _LOAD_STRICT.set(strict)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            _LOAD_STRICT.reset(token)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, (tensor, _) in self._terrace_pending.items():
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
        strict = _LOAD_STRICT.get()
        rest = {}
        for key, tensor in state_dict.items():
            local = key[len(prefix) :] if key.startswith(prefix) else None
            if local is None or local.split(".", 1)[0] in known or local == "_extra_state":
                rest[key] = tensor
            else:
                self._terrace_pending[local] = (tensor, strict)
        return rest
