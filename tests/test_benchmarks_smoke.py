"""Smoke test of the benchmark suite: ``benchmarks/run.py --quick`` runs to the end.

Timings are not checked; they depend on the machine and its load. The quick
run takes about 30 s on 2 cores; the subprocess is stopped after 90 s.
"""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 90


def test_quick_run_prints_table():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    header = ["benchmark", "measurement", "median", "min", "max", "target", "met"]
    lines = [line.split() for line in result.stdout.splitlines()]
    assert header in lines, result.stdout
