"""Running a backend-neutral :class:`terrace.Model` on PyTorch.

:func:`build` returns a ``torch.nn.Module`` whose ``forward`` is the neutral
model's own ``forward``: the model's class is combined with
:class:`terrace.torch.Module`, so ``self.make`` and ``self.start_forward``
are the torch backend's and ``self.<config>`` reads the model's settings.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from terrace._errors import TerraceError
from terrace._layers import LAZY_LAYER_NAMES, Dropout, Embedding, NeutralLayer
from terrace._model import Model, neutral_code
from terrace._registry import register_layer, resolve_layer
from terrace.ops import OP_NAMES

__all__ = ["build", "resolve_factory"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_DISPATCH_FILES = (os.path.join(_TORCH_DIR, "overrides.py"), os.path.join(_TORCH_DIR, "_jit_internal.py"))
_FUNCTIONAL_FILES = (os.path.join(_TORCH_DIR, "nn", "functional.py"), os.path.join(_TORCH_DIR, "functional.py"))


def build(model: Model) -> nn.Module:
    """Return a ``torch.nn.Module`` that runs ``model``'s ``forward``.

    Args:
        model: an instance of a :class:`terrace.Model` subclass.

    Returns:
        A :class:`terrace.torch.Module` whose slots are made on its first call.
    """
    if not isinstance(model, Model):
        raise TypeError(
            f"terrace.torch.build expects a terrace.Model instance, got {type(model).__name__}. "
            "Fix: a terrace.torch.Module subclass needs no build; instantiate it directly."
        )
    host = _host_class(type(model)).__new__(_host_class(type(model)))
    _init_host(host, vars(model))
    return host


def _init_host(host: Any, config: dict[str, Any]) -> None:
    from terrace.torch._module import Module

    Module.__init__(host)
    for key, value in config.items():
        setattr(host, key, value)


def _rebuild(neutral_cls: type) -> Any:
    host_cls = _host_class(neutral_cls)
    return host_cls.__new__(host_cls)


@functools.cache
def _host_class(neutral_cls: type) -> type:
    from terrace.torch._module import Module

    codes = neutral_code(neutral_cls)

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self._terrace_table.complete:
            return Module.__call__(self, *args, **kwargs)
        with _BackendCallGuard(neutral_cls.__name__, codes):
            return Module.__call__(self, *args, **kwargs)

    def __reduce_ex__(self: Any, protocol: int) -> Any:
        return (_rebuild, (neutral_cls,), self.__dict__)

    namespace = {
        "__module__": neutral_cls.__module__,
        "__qualname__": neutral_cls.__qualname__,
        "__doc__": neutral_cls.__doc__,
        "__call__": __call__,
        "__reduce_ex__": __reduce_ex__,
        "forward": neutral_cls.forward,
        "strict": neutral_cls.strict,
        "terrace_neutral_class": neutral_cls,
    }
    return type(neutral_cls.__name__, (Module, neutral_cls), namespace)


def resolve_factory(cls: Any, args: tuple, kwargs: dict) -> Callable[..., Any]:
    """Return what builds a slot of ``cls`` on torch: a neutral layer's torch
    layer, a neutral model's built module, or ``cls`` itself."""
    if isinstance(cls, type) and issubclass(cls, NeutralLayer):
        cls.check_arguments(args, kwargs)
        return resolve_layer(cls, "torch")
    if isinstance(cls, type) and issubclass(cls, Model):
        return lambda *a, **k: build(cls(*a, **k))
    return cls


class _BackendCallGuard(TorchFunctionMode):
    """Raise when a neutral model's own code calls a torch function directly.

    Active during the first pass only. Tensor methods and operators are
    allowed, because JAX arrays have them too. Module-level torch functions
    called from the model's source are not, because they would fail on other backends.
    """

    def __init__(self, model_name: str, codes: set[Any]) -> None:
        super().__init__()
        self.model_name = model_name
        self.codes = codes

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        qualname = getattr(func, "__qualname__", "")
        is_method = qualname.startswith(("Tensor.", "_TensorBase.", "TensorBase."))
        if not is_method and getattr(func, "__name__", "") not in ("__get__", "__set__"):
            self._check_caller(func)
        return func(*args, **(kwargs or {}))

    def _check_caller(self, func: Any) -> None:
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename in _DISPATCH_FILES:
            frame = frame.f_back
        if frame is not None and frame.f_code.co_filename in _FUNCTIONAL_FILES:
            frame = frame.f_back
        if frame is None or frame.f_code not in self.codes:
            return
        module = getattr(func, "__module__", None) or "torch"
        if module.startswith("torch._C._nn"):
            module = "torch.nn.functional"
        elif module.startswith("torch._C"):
            module = "torch"
        shown = f"{module}.{getattr(func, '__name__', func)}"
        name = getattr(func, "__name__", "")
        if name in OP_NAMES:
            fix = f"use terrace.ops.{name}"
        else:
            fix = "use terrace.ops (relu, gelu, softmax, ...) or the array namespace xp = terrace.ops.namespace(x)"
        raise TerraceError(
            f"{self.model_name}.forward calls {shown} at {frame.f_code.co_filename}:"
            f"{frame.f_lineno}. A terrace.Model runs on every backend, so its forward "
            f"cannot call torch functions directly. Fix: {fix}."
        )


def _register_layers() -> None:
    import terrace.torch as backend

    for spec, name in LAZY_LAYER_NAMES.items():
        register_layer(spec, "torch", getattr(backend, name))
    register_layer(Embedding, "torch", nn.Embedding)
    register_layer(Dropout, "torch", nn.Dropout)


_register_layers()
