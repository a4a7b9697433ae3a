"""Eager forward time of an 8-layer, 64-wide MLP: terrace against plain torch.

The network is overhead-bound (batch 4, one thread), so the ratio shows what
terrace adds per pass and per ``make``. Both models run in the same process,
interleaved, and the script prints the median ratio over the repeats.

    python benchmarks/eager_mlp.py [--repeats 15] [--calls 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import terrace as ter

WIDTH = 64
DEPTH = 8


class PlainMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(DEPTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < DEPTH - 1:
                x = F.relu(x)
        return x


class TerraceMLP(ter.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.start_forward()
        for index in range(DEPTH):
            x = self.make(ter.LazyLinear, WIDTH)(x)
            if index < DEPTH - 1:
                x = F.relu(x)
        return x


class LooseMLP(TerraceMLP):
    strict = False


def seconds_per_call(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    with torch.no_grad():
        for _ in range(calls // 10):
            model(x)
        start = time.perf_counter()
        for _ in range(calls):
            model(x)
        return (time.perf_counter() - start) / calls


def measure(repeats: int, calls: int) -> dict[str, list[float]]:
    """Return, per variant, the time-per-call ratios against the plain model."""
    torch.set_num_threads(1)
    x = torch.randn(4, WIDTH)
    models = {"terrace": TerraceMLP(), "terrace strict=False": LooseMLP()}
    for model in models.values():
        model(x)
    plain = PlainMLP()
    ratios: dict[str, list[float]] = {name: [] for name in models}
    ratios["plain (us per call)"] = []
    for _ in range(repeats):
        base = seconds_per_call(plain, x, calls)
        ratios["plain (us per call)"].append(base * 1e6)
        for name, model in models.items():
            ratios[name].append(seconds_per_call(model, x, calls) / base)
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="number of interleaved repeats")
    parser.add_argument("--calls", type=int, default=2000, help="forward calls per timing")
    args = parser.parse_args()
    results = measure(args.repeats, args.calls)
    print(f"{'variant':<24}{'median':>10}{'min':>10}{'max':>10}")
    for name, values in results.items():
        print(f"{name:<24}{statistics.median(values):>10.3f}{min(values):>10.3f}{max(values):>10.3f}")


if __name__ == "__main__":
    main()
