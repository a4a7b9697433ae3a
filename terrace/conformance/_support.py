"""Helpers shared by the conformance cases."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

import terrace
from terrace.testing import BackendAdapter, BuiltModel, CheckResult, max_difference, tolerance

__all__ = [
    "assert_agrees",
    "normal",
    "randomize_checkpoint",
    "require_passed",
    "run",
    "slot_paths",
]


def normal(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """Return float32 samples of a normal distribution, the same on every run."""
    samples = np.random.default_rng(seed).standard_normal(shape) * scale + shift
    return samples.astype(np.float32)


def run(
    adapter: BackendAdapter, model: terrace.Model, *inputs: np.ndarray, train: bool = False
) -> tuple[BuiltModel, Any]:
    """Build ``model`` on ``adapter``, run it once on ``inputs``, and return it with the NumPy output."""
    built = adapter.build(model, train=train)
    output = adapter.call(built, *(adapter.asarray(value) for value in inputs))
    return built, adapter.to_numpy(output)


def slot_paths(adapter: BackendAdapter, built: BuiltModel) -> list[str]:
    """Return the sorted slot paths that hold weights, read from a portable checkpoint."""
    return sorted(adapter.state(built))


def require_passed(result: CheckResult) -> None:
    """Skip on a skipped check, and fail with the check's message on a failed one."""
    if result.status == "skipped":
        pytest.skip(result.message)
    assert result.status == "passed", str(result)


def assert_agrees(actual: Any, expected: Any, devices: tuple[str, ...], compared: str) -> None:
    """Assert that two NumPy outputs agree within the tolerance of ``devices``.

    ``compared`` names the two outputs in the failure message, as in "the outputs of flax-cpu and torch-cpu".
    """
    tol = tolerance(*devices)
    difference, close = max_difference(actual, expected, tol)
    assert close, f"{compared} differ by {difference:.3g} (largest absolute difference, tolerance {tol:g})"


def randomize_checkpoint(source: str | os.PathLike[str], target: str | os.PathLike[str], seed: int) -> None:
    """Copy a portable checkpoint with every float tensor replaced by random values.

    Freshly made layers start from values that hide mistakes (zero biases,
    unit scales, batch statistics of zeros and ones). Running variances get
    values in [0.5, 1.5], so that they stay positive; other floats are
    standard normal. Integer tensors (``num_batches_tracked``) are kept.
    """
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(os.fspath(source), framework="np") as handle:
        metadata = handle.metadata()
    rng = np.random.default_rng(seed)
    tensors = load_file(os.fspath(source))
    for key, value in tensors.items():
        if value.dtype.kind != "f":
            continue
        if key.endswith("running_var"):
            fresh = rng.uniform(0.5, 1.5, value.shape)
        else:
            fresh = rng.standard_normal(value.shape)
        tensors[key] = fresh.astype(value.dtype)
    save_file(tensors, os.fspath(target), metadata=metadata)
