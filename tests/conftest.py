"""Test-wide setup that must run before any test module imports JAX.

XLA reads ``XLA_FLAGS`` once, when JAX creates its CPU backend, so the flag
that simulates eight CPU devices is set here, at import time, unless the
caller set ``XLA_FLAGS`` already (``make test`` exports the same value). The
multi-device tests skip when fewer than eight devices are visible.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
