"""The backend adapter for PyTorch."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

import terrace
import terrace.port
import terrace.torch
from terrace.testing._adapter import BackendAdapter, BuiltModel, Loss

__all__ = ["TorchAdapter"]


class TorchAdapter(BackendAdapter):
    """Runs neutral models with :func:`terrace.torch.build` on the CPU or a CUDA device.

    The first call is the module's first forward pass, which makes the
    weights on the module's device and dtype. Training uses
    ``torch.optim.SGD``; compiling uses ``torch.compile(module)`` with its
    default settings (no ``fullgraph``).
    """

    name = "torch"
    devices = ("cpu", "cuda")
    known_gaps = {}

    @classmethod
    def device_unavailable_reason(cls, device: str) -> str | None:
        if device == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is visible to torch (torch.cuda.is_available() is False)"
        return None

    @classmethod
    def unsupported_device_reason(cls, device: str) -> str:
        if device == "tpu":
            return "TPU runs on the Flax backend only. The torch adapter runs on cpu and cuda"
        return super().unsupported_device_reason(device)

    @property
    def torch_device(self) -> torch.device:
        """The torch device of this adapter (``cuda`` is the current CUDA device)."""
        return torch.device(self.device)

    @contextmanager
    def _seeded(self, seed: int) -> Iterator[None]:
        """Seed torch's generators inside the block and restore them after it."""
        devices = [torch.cuda.current_device()] if self.device == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    # -- models ---------------------------------------------------------------

    def build(self, model: terrace.Model, *, train: bool = False, seed: int = 0) -> BuiltModel:
        module = terrace.torch.build(model)
        module.train(train)
        module.to(self.torch_device)
        built = BuiltModel(model, module, train)
        built.cache["seed"] = seed
        built.cache["calls"] = 0
        return built

    def call(self, built: BuiltModel, *inputs: Any) -> Any:
        seed = built.cache["seed"] + built.cache["calls"]
        built.cache["calls"] += 1
        with self._seeded(seed), torch.no_grad():
            return built.module(*inputs)

    def set_train(self, built: BuiltModel, train: bool) -> None:
        built.module.train(train)
        built.train = train

    def compiled_call(self, built: BuiltModel, *inputs: Any) -> Any:
        with self._seeded(built.cache["seed"]), torch.no_grad(), warnings.catch_warnings():
            # NOTE: torch.compile in torch 2.13 imports torch.utils.mkldnn, which
            # warns at import that torch.jit.script_method is deprecated. Under
            # warnings-as-errors that warning would fail the first compile.
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.script_method` is deprecated", category=DeprecationWarning
            )
            compiled = built.cache.get("compiled")
            if compiled is None:
                compiled = built.cache["compiled"] = torch.compile(built.module)
            return compiled(*inputs)

    def slot_outputs(self, built: BuiltModel, *inputs: Any) -> dict[str, list[Any]]:
        outputs: dict[str, list[Any]] = {}
        handles = []

        def record(path: str) -> Any:
            def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
                outputs.setdefault(path, []).append(self.to_numpy(output))

            return hook

        for path, submodule in built.module.named_modules():
            if path:
                handles.append(submodule.register_forward_hook(record(path)))
        try:
            with self._seeded(built.cache["seed"]), torch.no_grad():
                built.module(*inputs)
        finally:
            for handle in handles:
                handle.remove()
        return outputs

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
        module = built.module
        optimizer = torch.optim.SGD(module.parameters(), lr=learning_rate)
        losses = []
        for _ in range(steps):
            optimizer.zero_grad()
            with self._seeded(built.cache["seed"]):
                value = loss(module(*inputs), target)
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
        return losses

    # -- placement and data ---------------------------------------------------

    def asarray(self, value: Any, dtype: str | None = None) -> Any:
        tensor = torch.from_numpy(np.array(value, copy=True)).to(self.torch_device)
        return tensor if dtype is None else tensor.to(getattr(torch, dtype))

    def to_numpy(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()  # NumPy has no bfloat16
            return tensor.numpy()
        if isinstance(value, (tuple, list)):
            return type(value)(self.to_numpy(item) for item in value)
        if isinstance(value, dict):
            return {key: self.to_numpy(item) for key, item in value.items()}
        return value

    def float_dtypes(self) -> tuple[str, ...]:
        return ("float32", "float64", "bfloat16")

    def place(self, built: BuiltModel, dtype: str) -> None:
        built.module.to(dtype=getattr(torch, dtype))

    def parameters(self, built: BuiltModel) -> dict[str, Any]:
        arrays = dict(built.module.named_parameters())
        arrays.update(built.module.named_buffers())
        return arrays

    def describe(self, array: Any) -> tuple[str, str]:
        return str(array.dtype).removeprefix("torch."), array.device.type

    # -- weights ----------------------------------------------------------------

    def save(self, built: BuiltModel, path: str | os.PathLike[str]) -> None:
        terrace.port.save(built.module, path)

    def load(self, built: BuiltModel, path: str | os.PathLike[str], *example_inputs: Any) -> None:
        terrace.port.load(path, built.module)

    def import_weights(
        self, built: BuiltModel, source: BackendAdapter, source_built: BuiltModel, *example_inputs: Any
    ) -> None:
        if source.backend_name == "flax":
            terrace.port.flax_to_torch(source_built.variables, built.module)
            return
        super().import_weights(built, source, source_built, *example_inputs)
