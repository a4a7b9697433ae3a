"""Checks that a backend package is installed before a backend module loads it."""

from __future__ import annotations

import importlib.util

from terrace._errors import BackendNotInstalledError

__all__ = ["require"]


def require(package: str, extra: str) -> None:
    """Raise :class:`BackendNotInstalledError` unless ``package`` can be imported.

    Args:
        package: the top-level package to look for (``"torch"``, ``"flax"``).
        extra: the terrace extra that installs it (``"torch"``, ``"flax"``).
    """
    if importlib.util.find_spec(package) is None:
        raise BackendNotInstalledError(
            f"terrace.{extra} needs the {package!r} package, which is not installed. "
            f"Fix: pip install 'terrace[{extra}]' (or 'terrace[all]' for every backend)."
        )
