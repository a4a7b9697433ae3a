"""Tolerances per device, full-precision matmuls, and comparing outputs.

Agreement checks compare float32 results computed by different libraries or
devices. The tolerances below are the allowed difference per device. They
assume full float32 matmuls, so :func:`full_precision` turns the
reduced-precision modes off (TF32 on NVIDIA GPUs, bfloat16 passes on TPUs).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

__all__ = ["TOLERANCES", "full_precision", "max_difference", "tolerance"]

# Allowed difference between two float32 results, as both the absolute and
# the relative tolerance of np.allclose. The CPU value matches terrace's own
# layer tests (tests/test_flax_layers.py), and the suite passes with it.
# NOTE: the cuda and tpu values are estimates that no run on those devices
# has checked yet. They are looser because GPU and TPU kernels sum in other orders.
TOLERANCES: dict[str, float] = {"cpu": 1e-5, "cuda": 1e-4, "tpu": 1e-3}


def tolerance(*devices: str) -> float:
    """Return the tolerance for comparing results from ``devices``: the loosest of theirs.

    An unknown device gets the loosest tolerance in :data:`TOLERANCES`.
    """
    loosest = max(TOLERANCES.values())
    return max(TOLERANCES.get(device, loosest) for device in devices)


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Turn reduced-precision float32 matmuls off inside the block, and restore the settings after it.

    When torch is installed, it calls ``torch.set_float32_matmul_precision("highest")``
    and sets ``torch.backends.cuda.matmul.allow_tf32`` and
    ``torch.backends.cudnn.allow_tf32`` to False. When JAX is installed, it
    enters ``jax.default_matmul_precision("highest")``.
    """
    with contextlib.ExitStack() as stack:
        if importlib.util.find_spec("torch") is not None:
            stack.enter_context(_torch_full_precision())
        if importlib.util.find_spec("jax") is not None:
            import jax

            stack.enter_context(jax.default_matmul_precision("highest"))
        yield


@contextlib.contextmanager
def _torch_full_precision() -> Iterator[None]:
    import torch

    restore = _torch_precision_restorer(torch)
    if _matmul_precision(torch) != "highest":
        torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        restore()


# The settings behind torch's fp32_precision API, as paths under torch.backends.
_FP32_PRECISION_SETTINGS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")


def _matmul_precision(torch: Any) -> str | None:
    """Return ``torch.get_float32_matmul_precision()``, or None where torch raises for mixed settings."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def _torch_precision_restorer(torch: Any) -> Callable[[], None]:
    """Return a function that puts torch's float32 precision settings back as they are now.

    Torch raises when a setting made through its ``fp32_precision``
    attributes is read through the legacy API (``allow_tf32``,
    ``get_float32_matmul_precision``), as seen with torch 2.13. So settings
    that the legacy API can read are restored through it, and the others
    through the ``fp32_precision`` attributes.
    """
    precision = _matmul_precision(torch)
    try:
        matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
        cudnn_tf32 = torch.backends.cudnn.allow_tf32
    except RuntimeError:
        precision = None
    if precision is None:
        settings = [_backend_setting(torch, path) for path in _FP32_PRECISION_SETTINGS]
        saved = [(setting, setting.fp32_precision) for setting in settings if hasattr(setting, "fp32_precision")]

        def restore_fp32_precision() -> None:
            for setting, value in saved:
                setting.fp32_precision = value

        return restore_fp32_precision

    def restore_legacy() -> None:
        if precision != "highest":
            # NOTE: this also sets oneDNN (mkldnn) matmuls to that precision,
            # even where only cuBLAS matmuls had it before.
            torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        torch.backends.cudnn.allow_tf32 = cudnn_tf32

    return restore_legacy


def _backend_setting(torch: Any, path: str) -> Any:
    setting = torch.backends
    for part in path.split("."):
        setting = getattr(setting, part, None)
    return setting


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, dict):
        return [leaf for key in sorted(value) for leaf in _leaves(value[key])]
    return [value]


def max_difference(actual: Any, expected: Any, tol: float) -> tuple[float, bool]:
    """Compare two NumPy outputs (arrays, or tuples, lists and dicts of them).

    Returns:
        The largest absolute difference, and whether every element is within
        ``tol`` by ``np.allclose(actual, expected, rtol=tol, atol=tol)``.
        Outputs of other structures or shapes differ by ``inf``; two Nones
        agree.
    """
    actual_leaves, expected_leaves = _leaves(actual), _leaves(expected)
    if len(actual_leaves) != len(expected_leaves):
        return float("inf"), False
    largest, close = 0.0, True
    for got, want in zip(actual_leaves, expected_leaves):
        if got is None or want is None:
            if got is not want:
                return float("inf"), False
            continue
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            return float("inf"), False
        if got.size == 0:
            continue
        got64, want64 = got.astype(np.float64), want.astype(np.float64)
        largest = max(largest, float(np.max(np.abs(got64 - want64))))
        close = close and bool(np.allclose(got64, want64, rtol=tol, atol=tol, equal_nan=True))
    return largest, close
