"""Fixtures for every conformance case; pytest loads this file only when it collects the suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from terrace.testing import full_precision


@pytest.fixture(autouse=True)
def _full_precision_matmuls() -> Iterator[None]:
    """Turn TF32 and other reduced-precision float32 matmuls off for each case, and restore them after it.

    Every case compares numbers against a tolerance of :data:`terrace.testing.TOLERANCES`,
    which assumes full float32 precision.
    """
    with full_precision():
        yield
