"""Checks that a backend package is installed before a backend module loads it."""

from __future__ import annotations

import importlib

from terrace._errors import BackendNotInstalledError

__all__ = ["require"]


def require(package: str, extra: str) -> None:
    """Import ``package``, or raise :class:`BackendNotInstalledError` naming the extra.

    Args:
        package: the top-level package to look for (``"torch"``, ``"flax"``).
        extra: the terrace extra that installs it (``"torch"``, ``"flax"``).
    """
    try:
        importlib.import_module(package)
    except ImportError as error:
        raise BackendNotInstalledError(
            f"terrace.{extra} needs the {package!r} package, which could not be imported "
            f"({error}). Fix: pip install 'terrace[{extra}]' (or 'terrace[all]' for every "
            "backend)."
        ) from error
