"""The backend adapter interface, and the registry of adapters.

A :class:`BackendAdapter` runs a neutral :class:`terrace.Model` on one
backend and one device behind a single interface, so that a conformance case
or :func:`terrace.testing.check_model` is written once for every backend.
Adapters are registered by name; the built-in ones (``torch`` and ``flax``)
are registered as import paths, so that nothing here imports torch or jax.
"""

from __future__ import annotations

import abc
import importlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

import terrace
from terrace._errors import TerraceError
from terrace._registry import registered_backends

__all__ = [
    "DEVICES",
    "AdapterChoice",
    "BackendAdapter",
    "BuiltModel",
    "adapter_class",
    "check_names",
    "read_checkpoint",
    "reference_adapter",
    "register_adapter",
    "registered_adapters",
    "select_adapters",
]

# Devices that the built-in adapters know. A registered adapter may declare others.
DEVICES = ("cpu", "cuda", "tpu")

# A loss written with the array API: ``loss(output, target) -> scalar array``.
Loss = Callable[[Any, Any], Any]


@dataclass
class BuiltModel:
    """A neutral model built by one adapter, with the state the adapter keeps for it.

    Attributes:
        model: the neutral model that was built.
        module: the backend module (a ``torch.nn.Module`` or a linen module).
        train: whether the module runs in training mode.
        variables: the Flax variables once they exist. Unused on torch,
            whose module keeps its own weights.
        cache: per-model objects an adapter keeps between calls (compiled
            functions, a random-key counter).
    """

    model: terrace.Model
    module: Any
    train: bool
    variables: Any = None
    cache: dict[str, Any] = field(default_factory=dict)


class BackendAdapter(abc.ABC):
    """Runs neutral models on one backend and one device.

    A subclass sets :attr:`name`, :attr:`devices`, and implements the abstract
    methods. Inputs and outputs cross the interface as NumPy arrays
    (:meth:`asarray`, :meth:`to_numpy`); weights cross it as portable
    checkpoints written by :func:`terrace.save`.

    Args:
        device: one of :attr:`devices`.

    Attributes:
        name: the adapter's name, the first part of case ids (``torch`` in
            ``test_slot_names[torch-cpu]``).
        backend: the terrace backend the adapter runs (``terrace.get_backend``);
            the name when not set.
        devices: the devices the adapter can run on.
        known_gaps: case name to the reason the case is expected to fail on
            this backend; a key ``"case[device]"`` limits the gap to one
            device. The conformance plugin marks these cases as strict
            ``xfail``, so a gap that gets fixed is reported until its entry is
            removed.
    """

    name: ClassVar[str]
    backend: ClassVar[str | None] = None
    devices: ClassVar[tuple[str, ...]] = ("cpu",)
    known_gaps: ClassVar[Mapping[str, str]] = {}

    def __init__(self, device: str) -> None:
        if device not in self.devices:
            raise ValueError(
                f"the {self.name} adapter runs on {', '.join(self.devices)}, not {device!r}."
            )
        self.device = device

    @property
    def id(self) -> str:
        """The backend-device pair as used in case ids (``flax-cpu``)."""
        return f"{self.name}-{self.device}"

    @property
    def backend_name(self) -> str:
        """The terrace backend this adapter runs."""
        return self.backend or self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device!r})"

    # -- availability -------------------------------------------------------

    @classmethod
    def device_unavailable_reason(cls, device: str) -> str | None:
        """Return why ``device`` cannot be used now, or None when it can.

        This default accepts the CPU only; an adapter that declares other
        devices overrides it to look for them.
        """
        return None if device == "cpu" else f"the {cls.name} adapter cannot see a {device} device"

    @classmethod
    def unsupported_device_reason(cls, device: str) -> str:
        """Return why the adapter never runs on ``device`` (one not in :attr:`devices`)."""
        return f"the {cls.name} adapter runs on {', '.join(cls.devices)} only, not on {device}"

    def known_gap(self, case: str) -> str | None:
        """Return the reason ``case`` is a known gap on this backend and device, or None."""
        return self.known_gaps.get(f"{case}[{self.device}]") or self.known_gaps.get(case)

    # -- models ---------------------------------------------------------------

    @abc.abstractmethod
    def build(self, model: terrace.Model, *, train: bool = False, seed: int = 0) -> BuiltModel:
        """Build ``model`` for this backend, on this device, without running it.

        Args:
            model: the neutral model.
            train: training mode (True) or evaluation mode (False).
            seed: seeds the weights made on the first call and the random
                numbers (dropout) of every call.
        """

    @abc.abstractmethod
    def call(self, built: BuiltModel, *inputs: Any) -> Any:
        """Run one pass on backend arrays and return the backend output.

        The first call makes the weights (torch: the first pass; Flax:
        ``init``), unless weights were loaded, and every call in training
        mode updates running statistics (batch norm), the first included.
        """

    @abc.abstractmethod
    def set_train(self, built: BuiltModel, train: bool) -> None:
        """Switch ``built`` to training (True) or evaluation (False) mode."""

    @abc.abstractmethod
    def compiled_call(self, built: BuiltModel, *inputs: Any) -> Any:
        """Run one pass compiled (``torch.compile``, ``jax.jit``) and return the output."""

    @abc.abstractmethod
    def slot_outputs(self, built: BuiltModel, *inputs: Any) -> dict[str, list[Any]]:
        """Run one pass and return each slot's outputs as NumPy, by dotted slot path.

        On torch the dict is ordered by the end of each slot's first call, so
        a slot inside a nested model comes before the model. Flax orders it
        by path. A slot called twice has two entries in its list. ``built``
        must have run before.
        """

    @abc.abstractmethod
    def train_steps(
        self,
        built: BuiltModel,
        loss: Loss,
        inputs: Sequence[Any],
        target: Any,
        *,
        steps: int,
        learning_rate: float,
    ) -> list[float]:
        """Take ``steps`` plain SGD steps on ``loss(output, target)`` and return the losses.

        The loss before each step is returned. Every step uses the same
        random numbers (dropout masks), so the loss depends on the weights
        alone and a small enough step always lowers it. ``built`` must have
        run before.
        """

    # -- placement and data ---------------------------------------------------

    @abc.abstractmethod
    def asarray(self, value: Any, dtype: str | None = None) -> Any:
        """Return ``value`` (a NumPy array) as a backend array on this device.

        Args:
            value: the data; integer arrays stay integer.
            dtype: a dtype name (``"float32"``, ``"bfloat16"``) to cast to, or
                None to keep the NumPy dtype where the backend has it.
        """

    @abc.abstractmethod
    def to_numpy(self, value: Any) -> Any:
        """Return ``value`` with every backend array replaced by a NumPy array.

        Tuples, lists and dicts are converted item by item; None stays None.
        """

    @abc.abstractmethod
    def float_dtypes(self) -> tuple[str, ...]:
        """Return the floating dtypes that :meth:`place` supports on this device."""

    @abc.abstractmethod
    def place(self, built: BuiltModel, dtype: str) -> None:
        """Set the dtype of the weights that ``built`` makes later; call before the first pass."""

    @abc.abstractmethod
    def parameters(self, built: BuiltModel) -> dict[str, Any]:
        """Return every weight and buffer of ``built`` as backend arrays, by name."""

    @abc.abstractmethod
    def describe(self, array: Any) -> tuple[str, str]:
        """Return the dtype name and the device (``cpu``, ``cuda``, ``tpu``) of a backend array."""

    # -- weights ------------------------------------------------------------

    @abc.abstractmethod
    def save(self, built: BuiltModel, path: str | os.PathLike[str]) -> None:
        """Write the weights of ``built`` to a portable checkpoint with :func:`terrace.save`."""

    @abc.abstractmethod
    def load(self, built: BuiltModel, path: str | os.PathLike[str], *example_inputs: Any) -> None:
        """Load a portable checkpoint into ``built`` with :func:`terrace.load`.

        A model that has not run keeps the weights and uses them from its
        first call (restore on create). ``example_inputs`` let a backend
        check the shapes before the first call.
        """

    def import_weights(
        self, built: BuiltModel, source: BackendAdapter, source_built: BuiltModel, *example_inputs: Any
    ) -> None:
        """Copy the weights of ``source_built`` (run by ``source``) into ``built``.

        This default goes through a checkpoint file. An adapter may override
        it with a direct conversion (``terrace.port.torch_to_flax``) for the
        source backends it supports.
        """
        with tempfile.TemporaryDirectory(prefix="terrace-") as folder:
            path = os.path.join(folder, "weights.safetensors")
            source.save(source_built, path)
            self.load(built, path, *example_inputs)

    def state(self, built: BuiltModel) -> dict[str, dict[str, np.ndarray]]:
        """Return the weights of ``built`` by slot path, in the checkpoint (torch) layout."""
        with tempfile.TemporaryDirectory(prefix="terrace-") as folder:
            path = os.path.join(folder, "weights.safetensors")
            self.save(built, path)
            return read_checkpoint(path)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, dict[str, np.ndarray]]:
    """Return the tensors of a portable checkpoint by slot path, then by tensor name.

    The slot paths are those of the checkpoint's ``terrace`` header, in the
    order the header lists them.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(os.fspath(path), framework="np") as handle:
        metadata = handle.metadata() or {}
    if "terrace" not in metadata:
        raise TerraceError(
            f"{os.fspath(path)} is not a terrace checkpoint: its safetensors metadata has no 'terrace' "
            "header. Fix: write it with terrace.save()."
        )
    slots = json.loads(metadata["terrace"])["slots"]
    tensors = load_file(os.fspath(path))
    return {slot: {key: tensors[f"{slot}.{key}"] for key in info["shapes"]} for slot, info in slots.items()}


# -- registry ------------------------------------------------------------------

_ADAPTERS: dict[str, type[BackendAdapter] | str] = {}


def register_adapter(adapter: type[BackendAdapter] | str, name: str | None = None) -> None:
    """Register a backend adapter, so that the conformance suite and ``check_model`` use it.

    Args:
        adapter: a :class:`BackendAdapter` subclass, registered under its
            ``name``; or its import path as ``"package.module:ClassName"``,
            imported when first used, so that registering costs no backend
            import.
        name: with an import path, the ``name`` of the class it leads to.

    Registering a name again replaces the earlier adapter.
    """
    if isinstance(adapter, str):
        if name is None:
            raise ValueError(
                f"register_adapter({adapter!r}) needs name=, the adapter's name, to register an import path."
            )
        _ADAPTERS[name] = adapter
        return
    if not (isinstance(adapter, type) and issubclass(adapter, BackendAdapter)):
        raise TypeError(f"register_adapter expects a BackendAdapter subclass, got {adapter!r}.")
    if name is not None and name != adapter.name:
        raise ValueError(
            f"register_adapter({adapter.__name__}, name={name!r}): a class is registered under its own "
            f"name attribute, {adapter.name!r}. Fix: leave out name=, or set the class's name."
        )
    _ADAPTERS[adapter.name] = adapter


def registered_adapters() -> list[str]:
    """Return the names of the registered adapters, in registration order."""
    return list(_ADAPTERS)


def adapter_class(name: str) -> type[BackendAdapter]:
    """Return the adapter class registered as ``name``, importing it if needed.

    Raises:
        TerraceError: no adapter has that name.
        ImportError: the adapter's backend is not installed
            (:class:`terrace.BackendNotInstalledError` for torch and flax).
    """
    try:
        entry = _ADAPTERS[name]
    except KeyError:
        raise TerraceError(
            f"no backend adapter is registered as {name!r}. Registered adapters: "
            f"{', '.join(_ADAPTERS) or 'none'}. Fix: use one of those, or register yours with "
            "terrace.testing.register_adapter()."
        ) from None
    if isinstance(entry, str):
        if name in registered_backends():
            # Loading the backend before the adapter module, which imports
            # it, gives the "pip install 'terrace[...]'" message.
            terrace.get_backend(name)
        module_name, _, class_name = entry.partition(":")
        entry = getattr(importlib.import_module(module_name), class_name)
        if entry.name != name:
            raise TerraceError(
                f"the adapter registered as {name!r} ({module_name}:{class_name}) is named {entry.name!r}. "
                "Fix: register the import path with name= equal to the class's name attribute."
            )
        _ADAPTERS[name] = entry
    terrace.get_backend(entry.backend or entry.name)
    return entry


@dataclass(frozen=True)
class AdapterChoice:
    """One backend-device pair chosen for a run: an adapter, or the reason it cannot run.

    Attributes:
        id: ``backend-device``, as in case ids.
        adapter: the adapter, or None when the pair is skipped.
        reason: why the pair is skipped, or None.
    """

    id: str
    adapter: BackendAdapter | None
    reason: str | None = None


def _split(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    names = [item.strip() for item in items if item.strip()]
    return names or None


def check_names(backends: str | Sequence[str] | None = None, devices: str | Sequence[str] | None = None) -> None:
    """Raise ValueError for an adapter name that is not registered or a device that no adapter declares.

    It imports no backend, so it can check command-line options before anything runs.
    """
    unknown_backends = [name for name in _split(backends) or () if name not in _ADAPTERS]
    if unknown_backends:
        raise ValueError(
            f"no backend adapter is registered as {', '.join(map(repr, unknown_backends))}. Registered "
            f"adapters: {', '.join(_ADAPTERS) or 'none'}. Fix: use one of those. A third-party adapter "
            "registers itself with terrace.testing.register_adapter() in a module that pytest loads with -p."
        )
    known_devices = set(DEVICES)
    for entry in _ADAPTERS.values():
        if not isinstance(entry, str):
            known_devices.update(entry.devices)
    unknown_devices = [device for device in _split(devices) or () if device not in known_devices]
    if unknown_devices:
        raise ValueError(
            f"unknown device {', '.join(map(repr, unknown_devices))}. The registered adapters run on "
            f"{', '.join(sorted(known_devices))}."
        )


def select_adapters(
    backends: str | Sequence[str] | None = None, devices: str | Sequence[str] | None = None
) -> list[AdapterChoice]:
    """Return the backend-device pairs to run, each with its adapter or its skip reason.

    Args:
        backends: adapter names, as a list or a comma-separated string; None
            for every registered adapter whose backend is installed.
        devices: device names, likewise; None for every device that each
            chosen adapter can see.

    A backend or device named explicitly but absent is returned with the
    reason, so that a run reports it as skipped. With the defaults, absent
    ones are left out.

    Raises:
        ValueError: an unregistered adapter name or an unknown device (see :func:`check_names`).
    """
    check_names(backends, devices)
    backend_names = _split(backends)
    device_names = _split(devices)
    choices: list[AdapterChoice] = []
    for name in backend_names or registered_adapters():
        try:
            cls = adapter_class(name)
        except (ImportError, TerraceError) as error:
            if backend_names is not None:
                reason = str(error).split("\n")[0]
                choices.extend(AdapterChoice(f"{name}-{device}", None, reason) for device in device_names or ["cpu"])
            continue
        choices.extend(_device_choices(cls, device_names))
    return choices


def _device_choices(cls: type[BackendAdapter], device_names: list[str] | None) -> list[AdapterChoice]:
    choices = []
    for device in device_names or list(cls.devices):
        pair = f"{cls.name}-{device}"
        if device not in cls.devices:
            if device_names is not None:
                choices.append(AdapterChoice(pair, None, cls.unsupported_device_reason(device)))
            continue
        reason = cls.device_unavailable_reason(device)
        if reason is None:
            choices.append(AdapterChoice(pair, cls(device)))
        elif device_names is not None:
            choices.append(AdapterChoice(pair, None, reason))
    return choices


def reference_adapter() -> BackendAdapter:
    """Return the adapter that agreement checks compare with: the first installed backend on the CPU.

    The built-in order is torch, then flax.
    """
    for name in registered_adapters():
        try:
            cls = adapter_class(name)
        except (ImportError, TerraceError):
            continue
        if "cpu" in cls.devices:
            return cls("cpu")
    raise TerraceError(
        "no backend is installed, so there is nothing to run. Fix: pip install 'terrace[torch]' "
        "or 'terrace[flax]'."
    )


register_adapter("terrace.testing._torch:TorchAdapter", name="torch")
register_adapter("terrace.testing._flax:FlaxAdapter", name="flax")
