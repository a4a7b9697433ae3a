"""Memory: parameter bytes and process memory over many passes.

* Parameter bytes of each terrace model against the plain model (the sum of
  ``numel * element_size`` over ``parameters()``); they must be equal.
* Steady memory over 1,000 training passes (forward, backward, gradients
  dropped) of the MLP: the growth of the resident set size (RSS, from
  psutil) and of the memory Python allocates (tracemalloc), divided by the
  number of passes. RSS grows in whole pages and also moves with the
  allocator, so the tracemalloc figure is the one that shows a leak of a
  few bytes per pass. Both are measured for the plain model too.

    python benchmarks/memory.py [--quick] [--repeats N] [--passes N]
"""

from __future__ import annotations

import gc
import tracemalloc
from collections.abc import Callable
from typing import Any

import psutil
import torch
from torch import nn

import _harness as h
import _torch_models as models

WARMUP_PASSES = 100
# A leak of even the smallest object per pass (``object()`` in a list, 24
# bytes on CPython 3.11) shows up above this bound.
TRACEMALLOC_BOUND = 16.0
RSS_BOUND = 64.0


def training_pass(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = list(model.parameters())

    def step() -> None:
        model(x).sum().backward()
        for param in params:
            param.grad = None

    return step


def growth_per_pass(step: Callable[[], None], passes: int) -> tuple[float, float]:
    """Return (RSS bytes, tracemalloc bytes) gained per pass over ``passes`` passes.

    Both are measured after a warm-up, so caches filled once (the first
    pass's slots, torch's allocator pools) are not counted.
    """
    process = psutil.Process()
    for _ in range(WARMUP_PASSES):
        step()
    gc.collect()
    rss_before = process.memory_info().rss
    for _ in range(passes):
        step()
    gc.collect()
    rss_growth = (process.memory_info().rss - rss_before) / passes

    tracemalloc.start()
    for _ in range(WARMUP_PASSES):
        step()
    gc.collect()
    traced_before = tracemalloc.get_traced_memory()[0]
    for _ in range(passes):
        step()
    gc.collect()
    traced_growth = (tracemalloc.get_traced_memory()[0] - traced_before) / passes
    tracemalloc.stop()
    return rss_growth, traced_growth


def parameter_rows() -> list[h.Row]:
    rows = []
    for network in models.NETWORKS:
        built = models.build(network)
        plain = models.parameter_bytes(built["plain"])
        for name in ("terrace", "torch LazyLinear"):
            ours = models.parameter_bytes(built[name])
            row = h.Row(f"memory, {models.DESCRIPTIONS[network]}", f"parameter bytes, {name} - plain (plain: {plain:,})", [float(ours - plain)], digits=0)
            if name == "terrace":
                row.target, row.met = "= 0", ours == plain
            rows.append(row)
    return rows


def run(quick: bool, repeats: int | None = None, passes: int | None = None) -> list[h.Row]:
    torch.set_num_threads(1)
    repeats = repeats or (1 if quick else 3)
    passes = passes or (100 if quick else 1000)
    rows = parameter_rows()
    x = models.example_input("MLP")
    growth: dict[str, dict[str, list[float]]] = {}
    for repeat in range(repeats):
        # Fresh models each repeat, in alternating order.
        built = models.build("MLP", ["plain", "terrace"])
        names = list(built) if repeat % 2 == 0 else list(reversed(built))
        for name in names:
            rss, traced = growth_per_pass(training_pass(built[name], x), passes)
            growth.setdefault(name, {}).setdefault("rss", []).append(rss)
            growth[name].setdefault("traced", []).append(traced)
    label = f"memory, {models.DESCRIPTIONS['MLP']}, {passes:,} training passes"
    for name in ("plain", "terrace"):
        traced = h.Row(label, f"{name}: Python allocations (tracemalloc), bytes per pass", growth[name]["traced"], digits=1)
        rss = h.Row(label, f"{name}: RSS growth, bytes per pass", growth[name]["rss"], digits=1)
        if name == "terrace":
            h.at_most(traced, TRACEMALLOC_BOUND)
            h.at_most(rss, RSS_BOUND)
        rows += [traced, rss]
    return rows


def main() -> None:
    def options(parser: Any) -> None:
        parser.add_argument("--repeats", type=int, help="measurements per model (default 3, 1 with --quick)")
        parser.add_argument("--passes", type=int, help="training passes per measurement (default 1,000, 100 with --quick)")

    args = h.parse_args(__doc__.splitlines()[0], options)
    h.report(run(args.quick, args.repeats, args.passes), args.json_out)


if __name__ == "__main__":
    main()
