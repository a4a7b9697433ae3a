"""Timing, result rows and table output shared by the benchmark scripts.

Every script in this folder measures terrace against the same network written
without it, in one process, interleaved. Each repeat times every variant once,
in a rotated order, so that drift in CPU speed (frequency changes, another
process waking up) affects all variants alike. Ratios are taken within a
repeat and summarised as median, min and max over the repeats.

Each script writes a list of :class:`Row` objects. Run alone it prints them as
a table; ``benchmarks/run.py`` runs every script in a subprocess with
``--json-out`` and prints all rows in one table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

TABLE_COLUMNS = ("benchmark", "measurement", "median", "min", "max", "target", "met")


@dataclasses.dataclass
class Row:
    """One line of the results table.

    Attributes:
        benchmark: the benchmark and model, such as ``eager, MLP``.
        measurement: what the figures are, with their unit.
        values: one figure per repeat, or empty for a row with ``text`` only.
        text: shown in place of the figures (``equal``, ``skipped: ...``).
        target: the bound as shown, such as ``<= 1.05``, or empty.
        met: whether the target is met, or None where there is no target.
        digits: decimals shown for the figures.
        detail: more lines printed below the table, such as a short diff.
    """

    benchmark: str
    measurement: str
    values: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    target: str = ""
    met: bool | None = None
    digits: int = 3
    detail: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def cells(self) -> list[str]:
        """Return the row's table cells, in the order of TABLE_COLUMNS."""
        if self.values:
            figures = [f"{v:.{self.digits}f}" for v in (self.median, min(self.values), max(self.values))]
        else:
            figures = [self.text, "", ""]
        met = {True: "yes", False: "NO", None: ""}[self.met]
        return [self.benchmark, self.measurement, *figures, self.target, met]


def at_most(row: Row, bound: float) -> Row:
    """Set the row's target to ``median <= bound`` and record whether it holds."""
    row.target = f"<= {bound:g}"
    row.met = row.median <= bound
    return row


def format_table(rows: Sequence[Row]) -> str:
    """Return the rows as a fixed-width text table with a header line."""
    lines = [list(TABLE_COLUMNS)] + [row.cells() for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_COLUMNS))]
    numeric = {2, 3, 4}
    has_values = [False] + [bool(row.values) for row in rows]
    out = []
    for number, line in enumerate(lines):
        cells = [
            cell.rjust(width) if i in numeric and has_values[number] else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths))
        ]
        out.append("  ".join(cells).rstrip())
        if number == 0:
            out.append("  ".join("-" * width for width in widths))
    for row in rows:
        if row.detail:
            out += ["", f"{row.benchmark}, {row.measurement}:", row.detail]
    return "\n".join(out)


def seconds_per_call(step: Callable[[], Any], calls: int) -> float:
    """Return the mean wall time of ``calls`` calls of ``step``, garbage collector off.

    The collector is paused, as ``timeit`` does, so that a collection started
    by one variant's garbage is not charged to another variant.
    """
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            step()
        return (time.perf_counter() - start) / calls
    finally:
        gc.enable()


def interleave(
    steps: dict[str, Callable[[], Any]], repeats: int, calls: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Time every step once per repeat, rotating their order; return seconds per call.

    Args:
        steps: the variants to time, by name; each call runs one pass.
        repeats: how many times each variant is timed.
        calls: calls per timing.
        warmup: untimed calls of each step before the first repeat.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds_per_call(steps[name], calls))
    return times


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Return the per-repeat ratios of two interleaved series."""
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def scaled(values: Sequence[float], factor: float) -> list[float]:
    return [v * factor for v in values]


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """Parse the options every benchmark script takes, plus any added by ``extra``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="few repeats and sizes: a smoke run, not a measurement")
    parser.add_argument("--json-out", metavar="PATH", help="write the rows to this JSON file instead of printing a table")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


def report(rows: Sequence[Row], json_out: str | None) -> None:
    """Write the rows to ``json_out``, or print them as a table when it is None."""
    if json_out is None:
        print(format_table(rows))
        return
    with open(json_out, "w", encoding="utf-8") as file:
        json.dump([dataclasses.asdict(row) for row in rows], file)


def load_rows(path: str) -> list[Row]:
    with open(path, encoding="utf-8") as file:
        return [Row(**fields) for fields in json.load(file)]
