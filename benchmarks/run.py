"""Run every benchmark and print one table of results.

Each benchmark script runs in a subprocess of its own, one after another, so
that one framework's threads, caches and memory do not affect another's
timings. A benchmark that fails leaves the others' rows in the table and
makes the exit status 1; a missed target does not change the exit status.
A full run takes about 10 minutes on a 2-core machine; ``--quick`` is a
smoke run of under a minute whose figures are not measurements.

    python benchmarks/run.py [--quick] [--only eager,scaling] [--plot PATH]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time

import _harness as h

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_PLOT = os.path.join(os.path.dirname(HERE), "docs", "benchmarks_scaling.png")

# Script name and the time limit of a full run, in seconds.
BENCHMARKS = {
    "eager": 300,
    "compiled": 300,
    "flax_backend": 300,
    "scaling": 300,
    "memory": 120,
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_summary() -> str:
    versions = ", ".join(f"{name} {version(name)}" for name in ("torch", "jax", "flax"))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"{cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, {versions}, {now}"


def run_benchmark(name: str, quick: bool, plot: str | None, timeout: float) -> list[h.Row]:
    """Run one benchmark script in a subprocess and return its rows, or a row saying why it failed."""
    with tempfile.TemporaryDirectory() as folder:
        json_path = os.path.join(folder, "rows.json")
        command = [sys.executable, os.path.join(HERE, f"{name}.py"), "--json-out", json_path]
        if quick:
            command.append("--quick")
        if name == "scaling" and plot:
            command += ["--plot", plot]
        start = time.perf_counter()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [h.Row(name, "all measurements", text=f"failed: timed out after {timeout:.0f} s")]
        print(f"  {name} finished in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if result.returncode != 0:
            tail = "\n".join(result.stderr.strip().splitlines()[-15:])
            return [h.Row(name, "all measurements", text=f"failed: exit code {result.returncode}", detail=tail)]
        return h.load_rows(json_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats and sizes: a smoke run, not a measurement")
    parser.add_argument("--only", help=f"comma-separated benchmarks to run, from: {', '.join(BENCHMARKS)}")
    parser.add_argument(
        "--plot",
        help="where the scaling benchmark writes its PNG plot (default: docs/benchmarks_scaling.png "
        "on a full run, no plot with --quick)",
    )
    args = parser.parse_args()

    names = list(BENCHMARKS)
    if args.only:
        names = [name.strip() for name in args.only.split(",")]
        unknown = [name for name in names if name not in BENCHMARKS]
        if unknown:
            parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    plot = args.plot or (None if args.quick else DEFAULT_PLOT)

    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    rows = []
    for name in names:
        timeout = BENCHMARKS[name] / 3 if args.quick else BENCHMARKS[name]
        rows += run_benchmark(name, args.quick, plot, timeout)
    print(f"Machine: {machine_summary()}")
    kind = "quick (smoke run, not a measurement)" if args.quick else "full"
    print(f"Run: {kind}, {time.perf_counter() - start:.0f} s")
    # Other processes on the machine show up as spread between min and max.
    print(f"Load average (1 min) before and after: {load_before:.2f}, {os.getloadavg()[0]:.2f}")
    print()
    print(h.format_table(rows))
    targets = [row for row in rows if row.met is not None]
    missed = [row for row in targets if not row.met]
    print()
    print(f"Targets met: {len(targets) - len(missed)} of {len(targets)}")
    if plot and "scaling" in names:
        print(f"Scaling plot: {plot}")
    failed = [row.benchmark for row in rows if row.text.startswith("failed:")]
    if failed:
        print(f"Benchmarks that failed to run: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
