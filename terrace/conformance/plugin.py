"""The pytest plugin of the conformance suite, registered as the ``pytest11`` entry point ``terrace``.

It adds ``--terrace-backend`` and ``--terrace-device``, and runs every test
that takes the ``terrace_adapter`` argument once per chosen backend-device
pair, with ids like ``test_slot_names[flax-cpu]``. A pair that cannot run
here (a backend not installed, a device not visible) is generated as a skip
with the reason. The known gaps of each backend
(:attr:`terrace.testing.BackendAdapter.known_gaps`) become strict ``xfail``
marks. Tests that do not take ``terrace_adapter`` are left as they are, and
importing this module loads neither torch nor jax.
"""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["ADAPTER_ARGUMENT"]

# The test argument that receives a backend adapter.
ADAPTER_ARGUMENT = "terrace_adapter"

_CHOICES = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("terrace", "terrace conformance suite (pytest --pyargs terrace.conformance)")
    group.addoption(
        "--terrace-backend",
        default=None,
        metavar="NAMES",
        help="comma-separated backend adapters to run the conformance cases on, such as torch,flax; "
        "default: every installed backend. A named backend that is not installed is skipped with the reason.",
    )
    group.addoption(
        "--terrace-device",
        default=None,
        metavar="NAMES",
        help="comma-separated devices to run the conformance cases on: cpu, cuda, tpu; default: every "
        "device an installed backend can see. A named device that is absent is skipped with the reason.",
    )


def pytest_configure(config: pytest.Config) -> None:
    backends = config.getoption("--terrace-backend")
    devices = config.getoption("--terrace-device")
    if backends is None and devices is None:
        return  # nothing to check, and nothing imported for runs without the suite
    from terrace.testing import check_names

    try:
        check_names(backends, devices)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def _choices(config: pytest.Config) -> list:
    """Return the backend-device pairs of this run, computed once per session."""
    choices = config.stash.get(_CHOICES, None)
    if choices is None:
        from terrace.testing import select_adapters

        choices = select_adapters(config.getoption("--terrace-backend"), config.getoption("--terrace-device"))
        config.stash[_CHOICES] = choices
    return choices


@pytest.hookimpl(tryfirst=True)
def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # tryfirst puts the backend-device pair first in the id: test_layer[flax-cpu-Conv2d].
    if ADAPTER_ARGUMENT not in metafunc.fixturenames:
        return
    params = []
    for choice in _choices(metafunc.config):
        if choice.adapter is None:
            # The skipped case never receives it; a report reads the pair's id from it.
            params.append(pytest.param(choice, id=choice.id, marks=pytest.mark.skip(reason=choice.reason)))
        else:
            params.append(pytest.param(choice.adapter, id=choice.id))
    if not params:
        reason = "no installed backend adapter matches --terrace-backend and --terrace-device"
        params.append(pytest.param(None, id="none", marks=pytest.mark.skip(reason=reason)))
    metafunc.parametrize(ADAPTER_ARGUMENT, params)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    from terrace.testing import BackendAdapter

    for item in items:
        adapter = _adapter_of(item)
        if not isinstance(adapter, BackendAdapter):
            continue
        reason = adapter.known_gap(getattr(item, "originalname", item.name))
        if reason is not None:
            item.add_marker(
                pytest.mark.xfail(reason=f"known gap of the {adapter.name} backend: {reason}", strict=True)
            )


def _adapter_of(item: pytest.Item) -> Any:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    return callspec.params.get(ADAPTER_ARGUMENT)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    choices = config.stash.get(_CHOICES, None)
    if choices is None:
        return  # the run collected no conformance case
    ran = [choice.id for choice in choices if choice.adapter is not None]
    terminalreporter.write_sep("-", "terrace conformance")
    terminalreporter.write_line(f"ran on: {', '.join(ran) or 'no backend-device pair'}")
    for choice in choices:
        if choice.adapter is None:
            terminalreporter.write_line(f"skipped {choice.id}: {choice.reason}")
    if config.getoption("--terrace-device") is None:
        terminalreporter.write_line(
            "devices that no installed backend can see were left out; pass --terrace-device=cpu,cuda,tpu "
            "to list them as skipped, with the reason"
        )
