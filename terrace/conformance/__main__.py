"""``python -m terrace.conformance``: run the suite and print its results as a matrix.

Rows are the cases and columns the backend-device pairs. Each cell is
passed, FAILED, skipped or xfail (a known gap), and the reasons for skips and
known gaps are listed under the matrix. Arguments go to pytest, so
``--terrace-backend``, ``--terrace-device`` and ``-k`` work as in a pytest
run. Without ``--terrace-device`` every known device (cpu, cuda, tpu) is
requested, so the matrix shows the absent ones as skipped, with the reason.
The exit status is pytest's, and non-zero whenever a case failed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import pytest

from terrace.conformance.plugin import ADAPTER_ARGUMENT

# The column of tests that run once, not per backend and device.
ONCE = "all"


@dataclass(eq=False)  # pluggy keeps plugins in sets, so the object must stay hashable
class Matrix:
    """Collects the outcome of every case as pytest reports it, and renders the matrix."""

    rows: list[str] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    places: dict[str, tuple[str, str]] = field(default_factory=dict)

    # -- pytest hooks (this object is passed to pytest.main as a plugin) --------------

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # Called after -k and -m deselected items, so only the cases that run get a row.
        for item in session.items:
            row, column = _place(item)
            self.places[item.nodeid] = (row, column)
            if row not in self.rows:
                self.rows.append(row)
            if column not in self.columns:
                self.columns.append(column)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        place = self.places.get(report.nodeid)
        if place is None:
            return
        if report.failed:
            self.cells[place] = "FAILED"
        elif report.skipped and place not in self.cells:
            kind = "xfail" if hasattr(report, "wasxfail") else "skipped"
            reason = report.wasxfail if kind == "xfail" else _skip_reason(report)
            self.cells[place] = f"{kind} [{self._note(reason)}]"
        elif report.passed and report.when == "call":
            self.cells[place] = "passed"

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            place = (f"collecting {report.nodeid}", ONCE)
            self.rows.append(place[0])
            if ONCE not in self.columns:
                self.columns.append(ONCE)
            self.cells[place] = "FAILED"

    # -- results ------------------------------------------------------------------------

    def _note(self, reason: str) -> int:
        if reason not in self.notes:
            self.notes.append(reason)
        return self.notes.index(reason) + 1

    @property
    def failed(self) -> bool:
        """Whether any case failed."""
        return any(cell == "FAILED" for cell in self.cells.values())

    def render(self) -> str:
        """Return the matrix as text: a header, one line per case, and the numbered reasons."""
        backends = list(dict.fromkeys(column.rpartition("-")[0] for column in self.columns))
        columns = sorted(self.columns, key=lambda column: _column_order(column, backends))
        counts = {"passed": 0, "FAILED": 0, "skipped": 0, "xfail": 0}
        for cell in self.cells.values():
            counts[cell.split(" ")[0]] += 1
        width = max([len("case"), *map(len, self.rows)])
        column_width = max([len("skipped [00]"), *map(len, columns)])
        header = "case".ljust(width) + "".join(f"  {column:<{column_width}}" for column in columns)
        lines = [header.rstrip()]
        for row in self.rows:
            cells = "".join(f"  {self.cells.get((row, column), '-'):<{column_width}}" for column in columns)
            lines.append((row.ljust(width) + cells).rstrip())
        lines.append("")
        lines.append(
            f"{counts['passed']} passed, {counts['FAILED']} failed, {counts['skipped']} skipped, "
            f"{counts['xfail']} known gaps"
        )
        lines.extend(f"[{number}] {reason}" for number, reason in enumerate(self.notes, start=1))
        return "\n".join(lines)


def _place(item: pytest.Item) -> tuple[str, str]:
    """Return the row (the case, with its other parameters) and the column (the backend-device pair)."""
    name = getattr(item, "originalname", item.name)
    callspec = getattr(item, "callspec", None)
    if callspec is None or ADAPTER_ARGUMENT not in callspec.params:
        return item.name, ONCE
    column = _column_id(callspec)
    rest = callspec.id
    if rest == column:
        rest = ""
    elif rest.startswith(column + "-"):
        rest = rest[len(column) + 1 :]
    return (f"{name}[{rest}]" if rest else name), column


def _column_id(callspec: Any) -> str:
    # The parameter is the adapter, or the AdapterChoice of a skipped pair; both have the id.
    value = callspec.params[ADAPTER_ARGUMENT]
    return str(getattr(value, "id", "none"))


def _column_order(column: str, backends: list[str]) -> tuple[int, int, int]:
    """Order columns by backend as first collected, then cpu, cuda, tpu; the run-once column last."""
    if column == ONCE:
        return (1, 0, 0)
    backend, _, device = column.rpartition("-")
    devices = {"cpu": 0, "cuda": 1, "tpu": 2}
    return (0, backends.index(backend), devices.get(device, len(devices)))


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _plugin_installed() -> bool:
    return any(entry.value == "terrace.conformance.plugin" for entry in entry_points(group="pytest11"))


def main(argv: list[str] | None = None) -> int:
    """Run the suite with ``argv`` as extra pytest arguments, print the matrix, and return the exit status."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if not any(argument.startswith("--terrace-device") for argument in arguments):
        arguments.append("--terrace-device=cpu,cuda,tpu")
    if not _plugin_installed():
        # Running from a source tree that was not installed: load the plugin by name.
        arguments = ["-p", "terrace.conformance.plugin", *arguments]
    # pytest rewrites the asserts of every package that provides a pytest
    # plugin, terrace included, and warns that this process imported
    # terrace before pytest could. Only terrace's own asserts are affected.
    already_imported = "ignore:Module already imported so cannot be rewritten:pytest.PytestAssertRewriteWarning"
    matrix = Matrix()
    status = pytest.main(
        ["--pyargs", "terrace.conformance", "-q", "-p", "no:cacheprovider", "-W", already_imported, *arguments],
        plugins=[matrix],
    )
    print()
    print(matrix.render())
    if status == pytest.ExitCode.OK and matrix.failed:
        return 1
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
