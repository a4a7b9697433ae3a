"""Eager PyTorch time per pass: terrace against a plain ``nn.Module``.

Two networks: an overhead-bound MLP (8 layers, 64 wide, batch 4, one
thread), where Python bookkeeping per pass and per ``make`` shows, and a
transformer block (batch 32, sequence 128, width 256, two threads), where
the arithmetic dominates. Each is timed forward only (under
``torch.no_grad()``) and forward plus backward, as a terrace module, as a
plain module and as a plain module with ``torch.nn.LazyLinear``. All
variants hold the same weights.

    python benchmarks/eager.py [--quick] [--repeats N]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

import _harness as h
import _torch_models as models

# Calls per timing, chosen so that one timing takes roughly 0.1 to 0.3 s.
CALLS = {("MLP", "forward"): 1000, ("MLP", "forward+backward"): 400, ("block", "forward"): 4, ("block", "forward+backward"): 2}
THREADS = {"MLP": 1, "block": 2}
TARGETS = {"MLP": 1.05, "block": 1.01}
# Repeats of a full run; the block's are fewer because each takes about 2 s.
REPEATS = {"MLP": 31, "block": 15}


def forward_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.no_grad():
            model(x)

    return step


def training_step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    params = list(model.parameters())

    def step() -> None:
        model(x).sum().backward()
        for param in params:
            param.grad = None

    return step


def measure(network: str, repeats: int, calls_scale: float = 1.0) -> list[h.Row]:
    torch.set_num_threads(THREADS[network])
    built = models.build(network)
    x = models.example_input(network)
    label = f"eager, {models.DESCRIPTIONS[network]}, {THREADS[network]} thread(s)"
    rows = []
    for kind, make_step in (("forward", forward_step), ("forward+backward", training_step)):
        steps = {name: make_step(model, x) for name, model in built.items()}
        calls = max(1, int(CALLS[network, kind] * calls_scale))
        times = h.interleave(steps, repeats, calls, warmup=max(2, calls // 10))
        plain = times["plain"]
        rows.append(h.Row(label, f"plain {kind}, ms per call", h.scaled(plain, 1e3)))
        terrace = h.Row(label, f"terrace / plain, {kind}", h.ratios(times["terrace"], plain))
        rows.append(h.at_most(terrace, TARGETS[network]))
        rows.append(h.Row(label, f"torch LazyLinear / plain, {kind}", h.ratios(times["torch LazyLinear"], plain)))
    return rows


def run(quick: bool, repeats: int | None = None) -> list[h.Row]:
    scale = 0.2 if quick else 1.0
    networks = ["MLP"] if quick else ["MLP", "block"]
    rows = []
    for network in networks:
        rows += measure(network, repeats or (3 if quick else REPEATS[network]), scale)
    return rows


def main() -> None:
    args = h.parse_args(
        __doc__.splitlines()[0],
        lambda p: p.add_argument("--repeats", type=int, help="interleaved repeats (default 31 for the MLP and 15 for the block, 3 with --quick)"),
    )
    h.report(run(args.quick, args.repeats), args.json_out)


if __name__ == "__main__":
    main()
