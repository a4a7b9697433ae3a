"""Device and dtype tracking for modules whose parameters do not exist yet.

``model.to(device)``, ``.half()`` and ``.double()`` convert the tensors a
module holds. A terrace module has few tensors before its first pass, so it
keeps an empty *probe* tensor that receives every conversion; submodules and
parameters created later take the probe's device and floating dtype.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


class ProbeMixin:
    """Mixin for an ``nn.Module`` that follows ``.to()`` before it has parameters."""

    _terrace_probe: torch.Tensor

    def _init_probe(self, device: Any = None, dtype: torch.dtype | None = None) -> None:
        object.__setattr__(self, "_terrace_probe", torch.empty(0, device=device, dtype=dtype))

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        result = super()._apply(fn, recurse)  # type: ignore[misc]
        object.__setattr__(self, "_terrace_probe", fn(self._terrace_probe))
        return result

    @property
    def _factory_kwargs(self) -> dict[str, Any]:
        probe = self._terrace_probe
        return {"device": probe.device, "dtype": probe.dtype}


def follow_probe(module: torch.nn.Module, probe: torch.Tensor) -> None:
    """Move a newly created ``module`` to the probe's device and floating dtype.

    Does nothing when the probe still has the defaults, so creating a slot on
    an unconverted model costs no extra pass over its tensors.
    """
    if probe.device.type == "cpu" and probe.dtype == torch.get_default_dtype():
        return
    module.to(device=probe.device, dtype=probe.dtype)
