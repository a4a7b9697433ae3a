"""The digits demo (examples/digits.py): a one-epoch run per backend and its option checks."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "digits.py"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The backends' float32 logits differ by rounding only: about 2e-6 at the
# demo's logit size of about 5.
LOGIT_TOLERANCE = 1e-5


def run_demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEMO), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


@pytest.fixture(scope="module")
def one_epoch_runs(tmp_path_factory):
    """Run the demo for one epoch with each first backend, both runs at once to save time.

    Returns ``{first backend: (out folder, completed process)}``.
    """
    runs = {}
    for backend in ("torch", "flax"):
        out = tmp_path_factory.mktemp(f"digits_{backend}")
        args = ["--backend", backend, "--epochs", "1", "--seed", "3", "--out", str(out)]
        process = subprocess.Popen(
            [sys.executable, str(DEMO), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        runs[backend] = (out, args, process)
    results = {}
    try:
        for backend, (out, args, process) in runs.items():
            stdout, stderr = process.communicate(timeout=180)
            results[backend] = (out, subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
    finally:
        for _, _, process in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


@pytest.fixture(params=["torch", "flax"])
def one_epoch(request, one_epoch_runs):
    """Return ``(first backend, out folder, completed process, summary)`` of one run."""
    out, result = one_epoch_runs[request.param]
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "digits.json").read_text(encoding="utf-8"))
    return request.param, out, result, summary


def test_summary_names_backends_and_settings(one_epoch):
    backend, out, _, summary = one_epoch
    other = "flax" if backend == "torch" else "torch"
    assert summary["trained_on"] == backend
    assert summary["ported_to"] == other
    assert summary["epochs"] == 1
    assert summary["seed"] == 3
    assert summary["train_size"] + summary["test_size"] == 1797
    assert summary["test_size"] == 450
    assert summary["wall_time_s"] > 0


def test_summary_accuracies_are_fractions(one_epoch):
    backend, _, _, summary = one_epoch
    stages = {"trained", "ported", "continued", "reloaded_torch", "reloaded_flax"}
    assert set(summary["accuracy"]) == stages
    for stage, value in summary["accuracy"].items():
        assert isinstance(value, float), stage
        assert 0.0 <= value <= 1.0, stage
    assert set(summary["accuracy_per_backend"]) == {"torch", "flax"}
    assert summary["accuracy_per_backend"][backend] == summary["accuracy"]["trained"]


def test_port_keeps_predictions(one_epoch):
    _, _, _, summary = one_epoch
    accuracy = summary["accuracy"]
    # Two logits within rounding of each other could flip one prediction.
    one_image = 1 / summary["test_size"]
    assert abs(accuracy["ported"] - accuracy["trained"]) <= one_image
    assert abs(accuracy["reloaded_torch"] - accuracy["continued"]) <= one_image
    assert abs(accuracy["reloaded_flax"] - accuracy["continued"]) <= one_image


def test_logits_agree_after_port_and_reload(one_epoch):
    _, _, _, summary = one_epoch
    diffs = summary["max_abs_logit_diff"]
    assert diffs["after_port"] <= LOGIT_TOLERANCE
    assert diffs["after_reload"] <= LOGIT_TOLERANCE
    assert diffs["reload_vs_saved"]["torch"] <= LOGIT_TOLERANCE
    assert diffs["reload_vs_saved"]["flax"] <= LOGIT_TOLERANCE


def test_reload_on_saving_backend_is_exact(one_epoch):
    backend, _, _, summary = one_epoch
    saved_on = "flax" if backend == "torch" else "torch"
    assert summary["max_abs_logit_diff"]["reload_vs_saved"][saved_on] == 0.0


def test_outputs_written(one_epoch):
    _, out, result, summary = one_epoch
    paths = summary["paths"]
    assert pathlib.Path(paths["plot"]) == out / "digits.png"
    assert pathlib.Path(paths["summary"]) == out / "digits.json"
    assert pathlib.Path(paths["checkpoint"]) == out / "digits.safetensors"
    assert (out / "digits.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (out / "digits.safetensors").stat().st_size > 0
    assert "max abs difference of the test logits" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
        (["--epochs", "-2"], "argument --epochs: must be a positive integer, got -2"),
        (["--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
        (["--backend", "mxnet"], "argument --backend: invalid choice: 'mxnet'"),
        (["--seed", "-1"], "argument --seed: must be an integer in [0, 2**32), got -1"),
        (["--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
        (["--colour", "red"], "unrecognized arguments: --colour red"),
    ],
    ids=[
        "epochs-zero",
        "epochs-negative",
        "epochs-text",
        "backend-unknown",
        "seed-negative",
        "seed-float",
        "unknown-option",
    ],
)
def test_bad_option_is_usage_error(args, message):
    result = run_demo(*args, timeout=60)
    assert result.returncode == 2
    assert "usage: digits.py" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_out_that_is_a_file_is_usage_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder", encoding="utf-8")
    result = run_demo("--out", str(blocker), timeout=60)
    assert result.returncode == 2
    assert "argument --out:" in result.stderr
    assert "exists and is not a folder" in result.stderr
    assert "Traceback" not in result.stderr
