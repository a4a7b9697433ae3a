"""Model-level checks, shared by the conformance suite and :func:`check_model`.

Each check runs one neutral model on one adapter and returns a
:class:`CheckResult`. A failure of the model becomes a failed result, not an
exception, so that a report lists every failure at once. A difference is
traced to the first slot whose output differs, and the message names it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import terrace
from terrace import ops
from terrace.testing._adapter import BackendAdapter, reference_adapter, select_adapters
from terrace.testing._precision import full_precision, max_difference, tolerance

__all__ = ["CHECKS", "CheckReport", "CheckResult", "check_model"]

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check of one model on one backend and device.

    Attributes:
        check: the check's name (a key of :data:`CHECKS`).
        backend: the adapter's name (``torch``).
        device: the device (``cpu``).
        status: ``"passed"``, ``"failed"`` or ``"skipped"``.
        message: what was found; for a failure, what differs and by how much.
        slot: the dotted path of the first slot whose output differs, or
            None when no slot is to blame (or the check compares no slots).
        difference: the largest absolute difference found, where the check
            compares numbers.
        tolerance: the tolerance the difference was held to.
    """

    check: str
    backend: str
    device: str
    status: str
    message: str
    slot: str | None = None
    difference: float | None = None
    tolerance: float | None = None

    @property
    def adapter(self) -> str:
        """The backend-device pair (``flax-cpu``)."""
        return f"{self.backend}-{self.device}"

    @property
    def ok(self) -> bool:
        """Whether the check did not fail (a skipped check is ok)."""
        return self.status != FAILED

    def __str__(self) -> str:
        where = f"{self.adapter} (backend {self.backend}, device {self.device})"
        return f"{self.check} on {where}: {self.status}: {self.message}"


@dataclass
class CheckReport:
    """Every check of one model, on every backend and device that ran.

    Attributes:
        model: the model's class name.
        results: one result per check and adapter.
    """

    model: str
    results: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no check failed and at least one passed."""
        return all(result.ok for result in self.results) and bool(self.passed)

    @property
    def passed(self) -> list[CheckResult]:
        """The checks that passed."""
        return [result for result in self.results if result.status == PASSED]

    @property
    def failures(self) -> list[CheckResult]:
        """The checks that failed."""
        return [result for result in self.results if result.status == FAILED]

    @property
    def skipped(self) -> list[CheckResult]:
        """The checks that were skipped, each with its reason."""
        return [result for result in self.results if result.status == SKIPPED]

    def __str__(self) -> str:
        adapters = list(dict.fromkeys(result.adapter for result in self.results))
        checks = list(dict.fromkeys(result.check for result in self.results))
        cells = {(result.check, result.adapter): result.status for result in self.results}
        lines = [
            f"check_model({self.model}): {len(self.passed)} passed, {len(self.failures)} failed, "
            f"{len(self.skipped)} skipped"
        ]
        width = max([len("check"), *map(len, checks)])
        column = max([len(PASSED), len(SKIPPED), *map(len, adapters)])
        header = "  " + "check".ljust(width) + "".join(f"  {a:<{column}}" for a in adapters)
        lines.append(header.rstrip())
        for check in checks:
            row = "".join(f"  {cells.get((check, a), '-'):<{column}}" for a in adapters)
            lines.append(("  " + check.ljust(width) + row).rstrip())
        for title, results in (("Failed", self.failures), ("Skipped", self.skipped)):
            if results:
                lines.append(f"{title}:")
                lines.extend(f"  {result}" for result in results)
        return "\n".join(lines)


# -- helpers ------------------------------------------------------------------------


class _CheckSkipped(Exception):
    """Raised inside a check to skip it with a reason."""


def _numpy_inputs(inputs: Sequence[Any]) -> tuple[np.ndarray, ...]:
    return tuple(np.asarray(value) for value in inputs)


def _first_slot_difference(
    expected: dict[str, list[Any]], actual: dict[str, list[Any]], tol: float
) -> tuple[str, float] | None:
    """Return the first slot, in ``expected``'s order, whose outputs differ beyond ``tol``."""
    for path, expected_calls in expected.items():
        if path not in actual:
            continue
        difference, close = max_difference(actual[path], expected_calls, tol)
        if not close:
            return path, difference
    return None


def _result(check: str, adapter: BackendAdapter, status: str, message: str, **details: Any) -> CheckResult:
    return CheckResult(check, adapter.name, adapter.device, status, message, **details)


def _compare(
    check: str,
    adapter: BackendAdapter,
    expected: Any,
    actual: Any,
    tol: float,
    against: str,
    slots: Callable[[], tuple[dict[str, list[Any]], dict[str, list[Any]]]] | None,
) -> CheckResult:
    """Compare two outputs; on a difference, find the slot to blame with ``slots()``."""
    difference, close = max_difference(actual, expected, tol)
    if close:
        message = f"agrees with {against}: largest absolute difference {difference:.3g} (tolerance {tol:g})"
        return _result(check, adapter, PASSED, message, difference=difference, tolerance=tol)

    located = _first_slot_difference(*slots(), tol) if slots is not None else None
    if located is not None:
        slot, slot_difference = located
        message = (
            f"slot {slot} differs from {against} by {slot_difference:.3g} (largest absolute "
            f"difference; tolerance {tol:g}), and the model output differs by {difference:.3g}"
        )
        return _result(check, adapter, FAILED, message, slot=slot, difference=slot_difference, tolerance=tol)

    if slots is None:
        where = "The output is compared as a whole."
    else:
        where = "Every slot agrees, so the difference comes from the model's own code between or after the slots."
    message = (
        f"the output differs from {against} by {difference:.3g} (largest absolute difference; "
        f"tolerance {tol:g}). {where}"
    )
    return _result(check, adapter, FAILED, message, difference=difference, tolerance=tol)


def _guarded(check: str, body: Callable[..., CheckResult]) -> Callable[..., CheckResult]:
    """Wrap a check so that a skip or an exception becomes its result."""

    def run(adapter: BackendAdapter, model: terrace.Model, inputs: Sequence[Any], **options: Any) -> CheckResult:
        try:
            return body(adapter, model, _numpy_inputs(inputs), **options)
        except _CheckSkipped as skip:
            return _result(check, adapter, SKIPPED, str(skip))
        except Exception as error:  # a check reports every failure instead of raising it
            return _result(check, adapter, FAILED, f"{type(error).__name__}: {error}")

    run.__name__ = f"check_{check}"
    run.__doc__ = body.__doc__
    return run


def _checkpoint_path(folder: str) -> str:
    return os.path.join(folder, "weights.safetensors")


# -- the checks ------------------------------------------------------------------------


def _forward(adapter: BackendAdapter, model: terrace.Model, inputs: tuple, **options: Any) -> CheckResult:
    """Build the model in evaluation mode, run it twice, and require the second pass to repeat the first."""
    built = adapter.build(model)
    arrays = [adapter.asarray(value) for value in inputs]
    first = adapter.to_numpy(adapter.call(built, *arrays))
    second = adapter.to_numpy(adapter.call(built, *arrays))
    tol = tolerance(adapter.device)

    def slots() -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        return adapter.slot_outputs(built, *arrays), adapter.slot_outputs(built, *arrays)

    return _compare("forward", adapter, first, second, tol, "the first pass", slots)


def _state(adapter: BackendAdapter, model: terrace.Model, inputs: tuple, **options: Any) -> CheckResult:
    """Save the weights with terrace.save, load them into a new build, and require the same output."""
    source = adapter.build(model)
    arrays = [adapter.asarray(value) for value in inputs]
    expected = adapter.to_numpy(adapter.call(source, *arrays))
    restored = adapter.build(model, seed=1)
    with tempfile.TemporaryDirectory(prefix="terrace-") as folder:
        adapter.save(source, _checkpoint_path(folder))
        adapter.load(restored, _checkpoint_path(folder), *arrays)
    actual = adapter.to_numpy(adapter.call(restored, *arrays))
    tol = tolerance(adapter.device)

    def slots() -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        return adapter.slot_outputs(source, *arrays), adapter.slot_outputs(restored, *arrays)

    return _compare("state", adapter, expected, actual, tol, "the saved model", slots)


def _agreement(
    adapter: BackendAdapter, model: terrace.Model, inputs: tuple, *, reference: BackendAdapter | None = None
) -> CheckResult:
    """Run the model on the reference adapter, port its weights through a checkpoint, and compare."""
    reference = reference or reference_adapter()
    if reference.id == adapter.id:
        raise _CheckSkipped(f"{adapter.id} is the reference that the other backends and devices are compared with")
    with full_precision():
        source = reference.build(model)
        source_arrays = [reference.asarray(value) for value in inputs]
        expected = reference.to_numpy(reference.call(source, *source_arrays))
        target = adapter.build(model)
        arrays = [adapter.asarray(value) for value in inputs]
        with tempfile.TemporaryDirectory(prefix="terrace-") as folder:
            reference.save(source, _checkpoint_path(folder))
            adapter.load(target, _checkpoint_path(folder), *arrays)
        actual = adapter.to_numpy(adapter.call(target, *arrays))
        tol = tolerance(reference.device, adapter.device)

        def slots() -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
            with full_precision():
                return reference.slot_outputs(source, *source_arrays), adapter.slot_outputs(target, *arrays)

        return _compare("agreement", adapter, expected, actual, tol, reference.id, slots)


def _float_leaf_indices(output: Any) -> list[int]:
    leaves = list(_flatten(output))
    return [i for i, leaf in enumerate(leaves) if isinstance(leaf, np.ndarray) and leaf.dtype.kind == "f"]


def _flatten(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _flatten(item)
    elif isinstance(value, dict):
        for key in sorted(value):
            yield from _flatten(value[key])
    else:
        yield value


def _training(adapter: BackendAdapter, model: terrace.Model, inputs: tuple, **options: Any) -> CheckResult:
    """Take SGD steps on the mean square of the outputs, in training mode, and require the loss to fall.

    The loss is measured before each of three steps, so the last value comes after two updates.
    """
    built = adapter.build(model, train=True)
    arrays = [adapter.asarray(value) for value in inputs]
    output = adapter.to_numpy(adapter.call(built, *arrays))
    indices = _float_leaf_indices(output)
    if not indices:
        raise _CheckSkipped("the model has no floating-point output to take a loss of")
    if not adapter.state(built):
        raise _CheckSkipped("the model has no weights to train")

    def loss(result: Any, target: Any) -> Any:
        leaves = list(_flatten(result))
        total = None
        for index in indices:
            leaf = leaves[index]
            xp = ops.namespace(leaf)
            term = xp.mean(leaf * leaf)
            total = term if total is None else total + term
        return total

    losses = adapter.train_steps(built, loss, arrays, None, steps=3, learning_rate=0.01)
    shown = ", ".join(f"{value:.6g}" for value in losses)
    if not losses[-1] < losses[0]:
        message = f"SGD steps (learning rate 0.01) on the mean square of the outputs did not lower it: {shown}"
        return _result("training", adapter, FAILED, message)
    message = f"the loss fell from {losses[0]:.6g} to {losses[-1]:.6g} in {len(losses) - 1} SGD steps"
    return _result("training", adapter, PASSED, message)


def _compiled(adapter: BackendAdapter, model: terrace.Model, inputs: tuple, **options: Any) -> CheckResult:
    """Run the model eagerly, then compiled (torch.compile, jax.jit), and compare the outputs."""
    with full_precision():
        built = adapter.build(model)
        arrays = [adapter.asarray(value) for value in inputs]
        eager = adapter.to_numpy(adapter.call(built, *arrays))
        compiled = adapter.to_numpy(adapter.compiled_call(built, *arrays))
    return _compare("compiled", adapter, eager, compiled, tolerance(adapter.device), "the eager pass", None)


# Check name -> check(adapter, model, inputs, reference=None) -> CheckResult.
CHECKS: dict[str, Callable[..., CheckResult]] = {
    "forward": _guarded("forward", _forward),
    "state": _guarded("state", _state),
    "agreement": _guarded("agreement", _agreement),
    "training": _guarded("training", _training),
    "compiled": _guarded("compiled", _compiled),
}


def check_model(
    model: terrace.Model,
    *example_inputs: Any,
    adapters: Sequence[BackendAdapter] | None = None,
    checks: Sequence[str] | None = None,
    reference: BackendAdapter | None = None,
) -> CheckReport:
    """Run a neutral model through the conformance checks on every backend and device.

    Args:
        model: the :class:`terrace.Model` to check.
        *example_inputs: the inputs of one pass, as NumPy arrays (or
            anything ``np.asarray`` accepts); integer arrays stay integer.
        adapters: the backend adapters to run on; by default every
            installed backend on every device it can see.
        checks: names from :data:`CHECKS` to run, all by default.
            ``forward``: two passes agree. ``state``: a save and load round
            trip keeps the output. ``agreement``: the output on weights
            ported from the reference backend is the same. ``training``:
            SGD lowers a loss. ``compiled``: ``torch.compile`` or
            ``jax.jit`` agrees with eager.
        reference: the adapter that ``agreement`` compares with; the first
            installed backend on the CPU (torch, else flax) by default.

    Returns:
        A :class:`CheckReport`; ``report.ok`` is False when a check failed,
        and ``print(report)`` shows a table and every failure with its
        backend, device, slot and difference.

    Example:
        >>> import numpy as np, terrace
        >>> from terrace import layers, ops
        >>> from terrace.testing import check_model
        >>> class Tiny(terrace.Model):
        ...     def forward(self, x):
        ...         self.start_forward()
        ...         return self.make(layers.Linear, 2)(ops.tanh(x))
        >>> report = check_model(Tiny(), np.ones((3, 4), np.float32), checks=["forward"])
        >>> report.ok
        True
    """
    if not isinstance(model, terrace.Model):
        raise TypeError(
            f"check_model expects a terrace.Model instance, got {type(model).__name__}. "
            "Fix: write the model as a subclass of terrace.Model."
        )
    names = list(CHECKS) if checks is None else list(checks)
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {', '.join(map(repr, unknown))}. The checks are {', '.join(CHECKS)}.")
    if adapters is None:
        adapters = [choice.adapter for choice in select_adapters() if choice.adapter is not None]
    report = CheckReport(type(model).__name__)
    for adapter in adapters:
        for name in names:
            report.results.append(CHECKS[name](adapter, model, example_inputs, reference=reference))
    return report
