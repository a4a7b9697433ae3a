"""The conformance suite: one behavioural suite, run on every backend and device.

Run it with ``pytest --pyargs terrace.conformance`` (options
``--terrace-backend`` and ``--terrace-device``), or print a matrix of its
results with ``python -m terrace.conformance``. Each case is written once,
against :class:`terrace.testing.BackendAdapter`, and runs once per
backend-device pair. :data:`CASES` lists the cases and the public layers and
ops each one covers; it is filled as the test modules are imported
(:func:`terrace.conformance._registry.load_cases`).
"""

from terrace.conformance._registry import CASES as CASES, Case as Case, case as case

__all__ = ["CASES", "Case", "case"]
