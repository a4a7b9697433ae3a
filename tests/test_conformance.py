"""The conformance suite, its pytest plugin, its matrix, and terrace.testing.check_model.

The suite runs in subprocesses, as a user runs it: pytest with the plugin
that the ``pytest11`` entry point loads, on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from flax import linen as nn

import terrace
from terrace import layers, ops
from terrace.testing import CHECKS, TOLERANCES, FlaxAdapter, TorchAdapter, check_model, full_precision, tolerance

SUITE = [sys.executable, "-m", "pytest", "--pyargs", "terrace.conformance", "-q", "-p", "no:cacheprovider"]
MATRIX = [sys.executable, "-m", "terrace.conformance"]

# The perturbation of the broken adapter below: large against the CPU tolerance of 1e-5.
SCALE = 1.01

BROKEN_ADAPTER = '''
"""A backend adapter that scales every float output by {scale}, to make agreement fail."""

import numpy as np

from terrace.testing import TorchAdapter, register_adapter


class BrokenAdapter(TorchAdapter):
    name = "broken"
    backend = "torch"
    known_gaps = {known_gaps!r}

    def to_numpy(self, value):
        result = super().to_numpy(value)
        if isinstance(result, np.ndarray) and result.dtype.kind == "f":
            return result * {scale}
        return result


register_adapter(BrokenAdapter)
'''


def write_broken_adapter(folder, known_gaps: dict[str, str]) -> dict[str, str]:
    """Write the broken adapter as a plugin module, and return an environment that can import it."""
    (folder / "broken_adapter.py").write_text(BROKEN_ADAPTER.format(scale=SCALE, known_gaps=known_gaps))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=600, **kwargs)


def matrix_table(output: str) -> dict[str, dict[str, str]]:
    """Parse the matrix printed by python -m terrace.conformance into {case: {column: cell}}."""
    lines = output.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith("case "))
    columns = lines[start].split()[1:]
    table = {}
    for line in lines[start + 1 :]:
        if not line.strip():
            break
        name, rest = line.split(maxsplit=1)
        cells = [cell.strip() for cell in _split_cells(rest, len(columns))]
        table[name] = dict(zip(columns, cells))
    return table


def _split_cells(text: str, count: int) -> list[str]:
    # Cells are "passed", "FAILED", "-", or "skipped [n]" / "xfail [n]" (two words).
    words = text.split()
    cells = []
    while words and len(cells) < count:
        word = words.pop(0)
        if words and words[0].startswith("["):
            word = f"{word} {words.pop(0)}"
        cells.append(word)
    return cells


# -- the suite under pytest ------------------------------------------------------------


def test_suite_passes_on_cpu():
    result = run([*SUITE, "--terrace-device=cpu", "-rA"])

    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    passed = {line.split("::")[-1] for line in result.stdout.splitlines() if line.startswith("PASSED ")}
    for case_id in (
        "test_slot_names[torch-cpu]",
        "test_slot_names[flax-cpu]",
        "test_guide_branch_raises[flax-cpu]",
        "test_layer_matches_reference[flax-cpu-Conv2d]",
        "test_op_matches_numpy[torch-cpu-gelu]",
        "test_every_public_name_has_a_case",
    ):
        assert case_id in passed, case_id


def test_absent_devices_are_skipped_with_reason():
    result = run([*SUITE, "--terrace-backend=torch", "--terrace-device=cuda,tpu", "-rs"])

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "TPU runs on the Flax backend only" in result.stdout
    summary = result.stdout.splitlines()[-1]
    assert "failed" not in summary, summary
    assert "skipped" in summary, summary
    if not torch.cuda.is_available():
        assert "no CUDA device is visible to torch" in result.stdout
        assert "3 passed" in summary, summary  # only the registry tests, which run once


def test_unknown_device_is_usage_error():
    result = run([*SUITE, "--terrace-device=gpu"])

    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert "unknown device 'gpu'" in result.stderr


def test_plugin_imports_no_backend():
    code = (
        "import sys, terrace.conformance.plugin\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'flax')))"
    )

    result = run([sys.executable, "-c", code])

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_plain_run_is_left_alone(tmp_path):
    (tmp_path / "test_plain.py").write_text(
        textwrap.dedent(
            """
            import sys

            def test_nothing_loaded(request):
                assert "terrace_adapter" not in request.fixturenames
                assert "torch" not in sys.modules
                assert "jax" not in sys.modules
            """
        )
    )

    command = [sys.executable, "-m", "pytest", "-q", "-W", "error", "-p", "no:cacheprovider", "test_plain.py"]
    result = run(command, cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


# -- the matrix ------------------------------------------------------------------------


def test_matrix_shows_every_device():
    result = run([*MATRIX, "-k", "test_slot_names or test_every_public_name"])

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    table = matrix_table(result.stdout)
    row = table["test_slot_names"]
    assert list(row) == ["torch-cpu", "torch-cuda", "torch-tpu", "flax-cpu", "flax-cuda", "flax-tpu", "all"]
    assert row["torch-cpu"] == "passed"
    assert row["flax-cpu"] == "passed"
    assert row["torch-tpu"].startswith("skipped [")
    assert row["all"] == "-"
    assert table["test_every_public_name_has_a_case"]["all"] == "passed"
    assert "TPU runs on the Flax backend only" in result.stdout


def test_matrix_exits_nonzero_on_failure(tmp_path):
    environment = write_broken_adapter(tmp_path, known_gaps={})

    result = run(
        [
            *MATRIX,
            "-p",
            "broken_adapter",
            "--terrace-backend=broken",
            "--terrace-device=cpu",
            "-k",
            "test_layer_matches_reference and Linear",
        ],
        env=environment,
    )

    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    table = matrix_table(result.stdout)
    assert table["test_layer_matches_reference[Linear]"]["broken-cpu"] == "FAILED"
    assert "0 passed, 2 failed" in result.stdout


def test_known_gaps_are_strict_xfail(tmp_path):
    known_gaps = {
        "test_layer_matches_reference": "scales its outputs",
        "test_slot_names": "listed although the case passes",
    }
    environment = write_broken_adapter(tmp_path, known_gaps=known_gaps)

    result = run(
        [
            *MATRIX,
            "-p",
            "broken_adapter",
            "--terrace-backend=broken",
            "--terrace-device=cpu",
            "-k",
            "test_layer_matches_reference and Linear or test_slot_names",
        ],
        env=environment,
    )

    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-2000:]
    table = matrix_table(result.stdout)
    assert table["test_layer_matches_reference[Linear]"]["broken-cpu"].startswith("xfail [")
    assert table["test_slot_names"]["broken-cpu"] == "FAILED"  # a gap that no longer fails is reported
    assert "known gap of the broken backend: scales its outputs" in result.stdout


# -- tolerances and precision -------------------------------------------------------------


def test_tolerance_is_loosest_of_devices():
    assert tolerance("cpu") == TOLERANCES["cpu"] == 1e-5
    assert tolerance("cpu", "cuda") == TOLERANCES["cuda"] == 1e-4
    assert tolerance("tpu", "cpu") == TOLERANCES["tpu"] == 1e-3
    assert tolerance("npu") == max(TOLERANCES.values())


def test_full_precision_restores_settings():
    original = (
        torch.get_float32_matmul_precision(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        with full_precision():
            assert torch.backends.cuda.matmul.allow_tf32 is False
            assert torch.backends.cudnn.allow_tf32 is False
            assert torch.get_float32_matmul_precision() == "highest"
            assert jax.config.jax_default_matmul_precision == "highest"

        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.backends.cudnn.allow_tf32 is original[2]
        assert torch.get_float32_matmul_precision() == "high"
        assert jax.config.jax_default_matmul_precision is None
    finally:
        # The legacy API, in this order, leaves torch's settings consistent.
        torch.set_float32_matmul_precision(original[0])
        torch.backends.cuda.matmul.allow_tf32 = original[1]
        torch.backends.cudnn.allow_tf32 = original[2]


# -- check_model -----------------------------------------------------------------------


class MLP(terrace.Model):
    def __init__(self, hidden: int) -> None:
        self.hidden = hidden

    def forward(self, x):
        self.start_forward()
        h = ops.relu(self.make(layers.Linear, self.hidden)(x))
        h = self.make(layers.LayerNorm)(h)
        return self.make(layers.Linear, 2)(h)


class Shift(layers.NeutralLayer):
    """Adds a constant. It is registered below with backends that disagree on it."""

    def __init__(self, amount: float) -> None: ...


class TorchShift(torch.nn.Module):
    def __init__(self, amount: float) -> None:
        super().__init__()
        self.amount = amount

    def forward(self, x):
        return x + self.amount


class FlaxShiftByMore(nn.Module):
    """Shifts by half as much again as torch does, so the backends disagree at this slot."""

    amount: float

    def __call__(self, x):
        return x + 1.5 * self.amount


terrace.register_layer(Shift, "torch", TorchShift)
terrace.register_layer(Shift, "flax", FlaxShiftByMore)


class Shifted(terrace.Model):
    def forward(self, x):
        self.start_forward()
        h = self.make(layers.Linear, 4)(x)
        h = self.make(Shift, 1.0)(h)
        return self.make(layers.Linear, 2)(h)


class ScalesOutputs(TorchAdapter):
    """A broken adapter: every float output it converts is scaled."""

    name = "broken"
    backend = "torch"

    def to_numpy(self, value):
        result = super().to_numpy(value)
        if isinstance(result, np.ndarray) and result.dtype.kind == "f":
            return result * SCALE
        return result


EXAMPLE = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)


def test_check_model_passes_good_model():
    adapters = [TorchAdapter("cpu"), FlaxAdapter("cpu")]

    report = check_model(MLP(8), EXAMPLE, adapters=adapters)

    assert report.ok, str(report)
    assert not report.failures
    assert len(report.passed) == 2 * len(CHECKS) - 1  # agreement skips the reference itself
    assert [(r.check, r.adapter) for r in report.skipped] == [("agreement", "torch-cpu")]
    text = str(report)
    assert text.startswith("check_model(MLP): 9 passed, 0 failed, 1 skipped")
    for name in CHECKS:
        assert name in text


def test_check_model_names_broken_adapter_slot():
    report = check_model(MLP(8), EXAMPLE, adapters=[ScalesOutputs("cpu")], checks=["agreement"])

    assert not report.ok
    (failure,) = report.failures
    assert (failure.backend, failure.device, failure.slot) == ("broken", "cpu", "Linear_0")
    assert failure.difference > failure.tolerance
    message = str(failure)
    assert "broken-cpu" in message
    assert "device cpu" in message
    assert "slot Linear_0 differs from torch-cpu by" in message


def test_check_model_names_disagreeing_slot():
    report = check_model(Shifted(), EXAMPLE, checks=["agreement"])

    assert not report.ok
    (failure,) = [r for r in report.failures if r.adapter == "flax-cpu"]
    assert failure.slot == "Shift_0"
    assert failure.difference == pytest.approx(0.5, abs=1e-5)
    expected = "agreement on flax-cpu (backend flax, device cpu): failed: slot Shift_0 differs from torch-cpu by 0.5"
    assert expected in str(report)


def test_check_model_reports_exception():
    class Unstarted(terrace.Model):
        def forward(self, x):
            return self.make(layers.Linear, 2)(x)

    report = check_model(Unstarted(), EXAMPLE, adapters=[TorchAdapter("cpu")], checks=["forward"])

    (failure,) = report.failures
    assert failure.message.startswith("SlotMismatchError: ")
    assert "before start_forward" in failure.message


def test_check_model_rejects_bad_arguments():
    with pytest.raises(TypeError, match="expects a terrace.Model instance"):
        check_model(torch.nn.Linear(2, 2), EXAMPLE)
    with pytest.raises(ValueError, match="unknown checks 'speed'"):
        check_model(MLP(8), EXAMPLE, checks=["speed"])
