"""``torch.compile`` of terrace and plain models: compile time and run time.

Each model is built by one eager pass (terrace's lazy layers need an input),
then compiled with the default inductor backend and run forward under
``torch.no_grad()``. Compile time is the wall time of the first compiled
call, measured with every compile cache disabled and ``torch._dynamo.reset()``
before each compile, so each repeat compiles from scratch. Run time is
measured afterwards on one compiled copy of each model, interleaved.

Each model is compiled with ``fullgraph=True`` when dynamo can trace it in one
graph, and with ``fullgraph=False`` (graph breaks allowed) otherwise. The
table reports which mode ran and how many graphs dynamo produced.

    python benchmarks/compiled.py [--quick] [--repeats N]
"""

from __future__ import annotations

import logging
import time
import warnings

import torch
import torch._dynamo
import torch._dynamo.utils
from torch import nn

import _harness as h
import _torch_models as models

RUN_TARGET = 1.01
COMPILE_TARGET = 1.10
CALLS = {"MLP": 2000, "block": 4}
# Compiles per model in a full run; one compile of the block takes several seconds.
COMPILE_REPEATS = {"MLP": 5, "block": 3}
THREADS = {"MLP": 1, "block": 2}


def quiet_dynamo() -> None:
    """Silence dynamo's graph-break warnings and recompile-limit log lines."""
    torch._logging.set_logs(dynamo=logging.ERROR)
    warnings.filterwarnings("ignore", module=r"torch\._dynamo")
    warnings.filterwarnings("ignore", message=r".*dynamo_pgo force disabled")


def compile_and_run(model: nn.Module, x: torch.Tensor, fullgraph: bool) -> tuple[nn.Module, float]:
    """Compile ``model`` from a clean dynamo state; return it and the first call's wall time."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    start = time.perf_counter()
    compiled = torch.compile(model, fullgraph=fullgraph)
    with torch.no_grad():
        compiled(x)
    return compiled, time.perf_counter() - start


def choose_mode(model: nn.Module, x: torch.Tensor) -> tuple[bool | None, str]:
    """Return whether fullgraph=True compiles the model, and a description of the mode that ran.

    The flag is None when neither mode compiles; the description then names the error.
    """
    try:
        compile_and_run(model, x, fullgraph=True)
        return True, "fullgraph=True"
    except Exception:  # dynamo raises several exception types for untraceable code
        pass
    try:
        compile_and_run(model, x, fullgraph=False)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [""])[0][:60]
        return None, f"compile failed: {type(error).__name__}: {first_line}"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    return False, f"fullgraph=False, {graphs} graphs"


def measure(network: str, repeats: int, run_repeats: int, calls_scale: float) -> list[h.Row]:
    torch.set_num_threads(THREADS[network])
    built = models.build(network, ["plain", "terrace"])
    x = models.example_input(network)
    label = f"compiled, {models.DESCRIPTIONS[network]}, {THREADS[network]} thread(s)"

    modes = {}
    rows = []
    for name, model in built.items():
        fullgraph, description = choose_mode(model, x)
        modes[name] = fullgraph
        rows.append(h.Row(label, f"{name}: mode", text=description))
    if None in modes.values():
        return rows

    compile_times: dict[str, list[float]] = {name: [] for name in built}
    names = list(built)
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            compile_times[name].append(compile_and_run(built[name], x, modes[name])[1])

    # One compiled copy of each model, both alive at once for the run-time timing.
    torch._dynamo.reset()
    compiled = {name: torch.compile(model, fullgraph=modes[name]) for name, model in built.items()}

    def forward(module: nn.Module):
        def step() -> None:
            with torch.no_grad():
                module(x)

        return step

    calls = max(1, int(CALLS[network] * calls_scale))
    times = h.interleave({name: forward(m) for name, m in compiled.items()}, run_repeats, calls, warmup=max(3, calls // 10))
    plain_compile = compile_times["plain"]
    rows += [
        h.Row(label, "plain compile, s", plain_compile, digits=2),
        h.at_most(h.Row(label, "terrace / plain, compile time", h.ratios(compile_times["terrace"], plain_compile)), COMPILE_TARGET),
        h.Row(label, "plain compiled forward, ms per call", h.scaled(times["plain"], 1e3)),
        h.at_most(h.Row(label, "terrace / plain, compiled forward", h.ratios(times["terrace"], times["plain"])), RUN_TARGET),
    ]
    return rows


def run(quick: bool, repeats: int | None = None) -> list[h.Row]:
    quiet_dynamo()
    # A quick run keeps the caches, so that it is short; its compile times
    # are then not from-scratch compiles.
    torch.compiler.config.force_disable_caches = not quick
    run_repeats = 3 if quick else 21
    networks = ["MLP"] if quick else ["MLP", "block"]
    # The first compile in a process also loads and sets up inductor, which
    # took about 10 s on a 2-core Xeon, so one compile runs untimed first.
    warmup = models.PlainMLP()
    compile_and_run(warmup, models.example_input("MLP"), fullgraph=False)
    rows = []
    for network in networks:
        compile_repeats = repeats or (1 if quick else COMPILE_REPEATS[network])
        rows += measure(network, compile_repeats, run_repeats, 0.1 if quick else 1.0)
    return rows


def main() -> None:
    args = h.parse_args(
        __doc__.splitlines()[0],
        lambda p: p.add_argument("--repeats", type=int, help="compiles per model (default 5 for the MLP and 3 for the block, 1 with --quick)"),
    )
    h.report(run(args.quick, args.repeats), args.json_out)


if __name__ == "__main__":
    main()
