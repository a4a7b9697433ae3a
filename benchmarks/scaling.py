"""Cost of the first pass and of a replayed pass as the number of slots grows.

A chain of N tiny layers (N = 10, 100, 1,000, 10,000), so that the number of
``make`` calls dominates, written as a terrace module and as a plain module
holding the same layers in an ``nn.ModuleList``:

* first pass: construct the model and run one forward, which builds the lazy
  layers. The layers are ``nn.Identity`` or ``terrace.LazyLinear(2)`` on a
  (1, 2) input, and the plain model contains the same classes.
* replay: one more forward of the built ``nn.Identity`` chain, with strict
  checks on and off (``strict = False``); the overhead per ``make`` is the
  difference to the plain chain divided by N.

Writes a plot of the time per slot against N when given ``--plot``.

    python benchmarks/scaling.py [--quick] [--repeats N] [--plot docs/benchmarks_scaling.png]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import _harness as h
import terrace as ter

FIRST_PASS_TARGET = 1.2
# Flat means: the time per slot at the largest N is at most this multiple of
# the time per slot at N = 100 (N = 10 is dominated by the cost per pass).
FLAT_TARGET = 1.25
# Slots handled per timing, so that every N takes roughly the same time.
FIRST_PASS_SLOTS = 4000
REPLAY_SLOTS = 100_000


class PlainChain(nn.Module):
    def __init__(self, count: int, layer: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layer() for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class TerraceChain(ter.Module):
    def __init__(self, count: int, layer: type[nn.Module], args: tuple) -> None:
        super().__init__()
        self.count = count
        self.layer = layer
        self.args = args

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.start_forward()
        for _ in range(self.count):
            x = self.make(self.layer, *self.args)(x)
        return x


class LooseTerraceChain(TerraceChain):
    strict = False


def first_pass_steps(count: int, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Return steps that each construct one model and run its first pass."""

    def step(build: Callable[[], nn.Module]) -> Callable[[], Any]:
        return lambda: build()(x)

    return {
        "terrace Identity": step(lambda: TerraceChain(count, nn.Identity, ())),
        "plain Identity": step(lambda: PlainChain(count, nn.Identity)),
        "terrace LazyLinear": step(lambda: TerraceChain(count, ter.LazyLinear, (2,))),
        "plain LazyLinear": step(lambda: PlainChain(count, lambda: ter.LazyLinear(2))),
        "plain nn.Linear": step(lambda: PlainChain(count, lambda: nn.Linear(2, 2))),
    }


def replay_steps(count: int, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """Return steps that each run one more pass of a built nn.Identity chain."""
    models = {
        "terrace strict": TerraceChain(count, nn.Identity, ()),
        "terrace strict=False": LooseTerraceChain(count, nn.Identity, ()),
        "plain": PlainChain(count, nn.Identity),
    }
    for model in models.values():
        model(x)
    return {name: (lambda model=model: model(x)) for name, model in models.items()}


def measure(counts: list[int], repeats: int, slots_scale: float = 1.0) -> dict[str, dict[int, list[float]]]:
    """Return microseconds per slot, by variant and N, one figure per repeat."""
    torch.set_num_threads(1)
    x = torch.randn(1, 2)
    per_slot: dict[str, dict[int, list[float]]] = {}
    with torch.no_grad():
        for count in counts:
            builds = max(1, int(FIRST_PASS_SLOTS * slots_scale) // count)
            times = h.interleave(first_pass_steps(count, x), repeats, builds)
            replay_calls = max(1, int(REPLAY_SLOTS * slots_scale) // count)
            times.update(h.interleave(replay_steps(count, x), repeats, replay_calls, warmup=2))
            for name, values in times.items():
                per_slot.setdefault(name, {})[count] = h.scaled(values, 1e6 / count)
    return per_slot


def table_rows(per_slot: dict[str, dict[int, list[float]]], counts: list[int]) -> list[h.Row]:
    label = "scaling, chain of N tiny layers"
    rows = []
    for count in counts:
        for kind in ("Identity", "LazyLinear"):
            ratio = h.ratios(per_slot[f"terrace {kind}"][count], per_slot[f"plain {kind}"][count])
            rows.append(h.at_most(h.Row(label, f"first pass, terrace / plain, {kind}, N={count:,}", ratio), FIRST_PASS_TARGET))
    largest = counts[-1]
    rows.append(h.Row(
        label,
        f"first pass, terrace LazyLinear / plain nn.Linear, N={largest:,}",
        h.ratios(per_slot["terrace LazyLinear"][largest], per_slot["plain nn.Linear"][largest]),
    ))
    for count in counts:
        plain = per_slot["plain"][count]
        for variant in ("terrace strict", "terrace strict=False"):
            overhead = [1000 * (ours - theirs) for ours, theirs in zip(per_slot[variant][count], plain)]
            name = variant.removeprefix("terrace ")
            rows.append(h.Row(label, f"replay overhead per make, {name}, N={count:,}, ns", overhead, digits=0))
    if 100 in counts and largest > 100:
        # The plain chain also gets slower per slot as N grows, so its growth
        # is shown beside terrace's.
        checks = (
            ("first pass", "terrace LazyLinear", "plain LazyLinear"),
            ("replay", "terrace strict", "plain"),
        )
        for phase, ours, theirs in checks:
            for variant in (ours, theirs):
                growth = h.ratios(per_slot[variant][largest], per_slot[variant][100])
                row = h.Row(label, f"{phase} time per slot, N={largest:,} / N=100, {variant}", growth)
                rows.append(h.at_most(row, FLAT_TARGET) if variant == ours else row)
    return rows


def plot(per_slot: dict[str, dict[int, list[float]]], counts: list[int], path: str) -> None:
    """Write a two-panel PNG: microseconds per slot against N, first pass and replay."""
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (first, replay) = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (
        (first, "First pass (construct + first forward)", ["terrace LazyLinear", "plain LazyLinear", "plain nn.Linear", "terrace Identity", "plain Identity"]),
        (replay, "Replayed pass, nn.Identity chain", ["terrace strict", "terrace strict=False", "plain"]),
    )
    for axes, title, variants in panels:
        for variant in variants:
            series = [per_slot[variant][count] for count in counts]
            medians = [statistics.median(values) for values in series]
            below = [m - min(values) for m, values in zip(medians, series)]
            above = [max(values) - m for m, values in zip(medians, series)]
            axes.errorbar(counts, medians, yerr=[below, above], marker="o", capsize=3, label=variant)
        axes.set_xscale("log")
        axes.set_ylim(bottom=0)
        axes.set_xlabel("slots per pass (N)")
        axes.set_ylabel("microseconds per slot (median, min-max bars)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(quick: bool, repeats: int | None = None, plot_path: str | None = None) -> list[h.Row]:
    counts = [10, 100, 1000] if quick else [10, 100, 1000, 10_000]
    per_slot = measure(counts, repeats or (2 if quick else 7), 0.25 if quick else 1.0)
    if plot_path:
        plot(per_slot, counts, plot_path)
    return table_rows(per_slot, counts)


def main() -> None:
    def options(parser: Any) -> None:
        parser.add_argument("--repeats", type=int, help="interleaved repeats (default 7, 2 with --quick)")
        parser.add_argument("--plot", metavar="PATH", help="write the PNG plot of time per slot to PATH")

    args = h.parse_args(__doc__.splitlines()[0], options)
    h.report(run(args.quick, args.repeats, args.plot), args.json_out)


if __name__ == "__main__":
    main()
