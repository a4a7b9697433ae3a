"""terrace.flax modules used from several Python threads at once.

The parameters of a linen module live outside it, so the only shared state is
the slot tables in the model object: the records written by the first pass
and the per-thread pass stacks. Concurrent applies must not disturb each
other's passes, and a race through the first init must leave one consistent
slot table.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import terrace
import terrace.flax as tflax

KEY = jax.random.key(0)
THREADS = 8
CALLS_PER_THREAD = 50

class Block(tflax.Module):
    """A nested terrace module, so each pass also runs a child slot table."""

    width: int

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        return nn.relu(self.make(tflax.LazyLinear, self.width)(x))


class Net(tflax.Module):
    """Kept small: Flax checks every parameter's shape on each eager apply,
    so one apply of this model takes a few milliseconds on CPU."""

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        x = self.make(Block, 8)(x)
        return self.make(tflax.LazyLinear, 2)(x)


class DeepNet(tflax.Module):
    """More slots, nested twice: more points where two first passes can interleave."""

    def forward(self, x: jax.Array) -> jax.Array:
        self.start_forward()
        x = self.make(Block, 8)(x)
        x = self.make(Block, 8)(x)
        x = self.make(tflax.LazyLayerNorm)(x)
        return self.make(tflax.LazyLinear, 2)(x)


NET_SLOTS = ["Block_0", "LazyLinear_0"]
DEEP_SLOTS = ["Block_0", "Block_1", "LazyLayerNorm_0", "LazyLinear_0"]
BLOCK_SLOTS = ["LazyLinear_0"]


def example_input(index: int) -> jax.Array:
    return jnp.sin(jnp.arange(12.0).reshape(3, 4) + index)


def run_in_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` in ``count`` threads started together; return each result or exception."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def body(index: int) -> None:
        barrier.wait()
        try:
            results[index] = target(index)
        except Exception as error:  # noqa: BLE001 - the test inspects every outcome
            results[index] = error

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish in 60 s"
    return results


def slot_names(table: Any) -> list[str]:
    return [record.name for record in table.records]


def test_concurrent_applies_match_sequential() -> None:
    model = Net()
    variables = model.init(KEY, example_input(0))
    inputs = [example_input(i) for i in range(CALLS_PER_THREAD)]
    expected = [np.asarray(model.apply(variables, x)) for x in inputs]

    def apply_all(thread: int) -> list[np.ndarray]:
        # Each thread walks the inputs from another start, so passes interleave
        # at different points of forward.
        order = [(thread * 7 + i) % CALLS_PER_THREAD for i in range(CALLS_PER_THREAD)]
        outputs: list[np.ndarray] = [np.empty(0)] * CALLS_PER_THREAD
        for i in order:
            outputs[i] = np.asarray(model.apply(variables, inputs[i]))
        return outputs

    results = run_in_threads(THREADS, apply_all)

    for thread, outputs in enumerate(results):
        assert not isinstance(outputs, Exception), f"thread {thread} raised {outputs!r}"
        for i, (output, reference) in enumerate(zip(outputs, expected)):
            assert np.array_equal(output, reference), f"thread {thread}, call {i}"
    assert slot_names(model._terrace_table) == NET_SLOTS
    assert slot_names(model._terrace_table.records[0].value.table) == BLOCK_SLOTS


def test_racing_first_init_leaves_one_slot_table() -> None:
    x = example_input(0)
    outcomes = {"both succeeded": 0, "one raised": 0}
    # Switching threads every microsecond makes the two first passes
    # interleave inside forward, not one after the other.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(10):
            race_first_init(x, outcomes)
    finally:
        sys.setswitchinterval(switch_interval)
    assert sum(outcomes.values()) == 10


def race_first_init(x: jax.Array, outcomes: dict[str, int]) -> None:
    model = DeepNet()

    results = run_in_threads(2, lambda _: model.init(KEY, x))

    errors = [r for r in results if isinstance(r, Exception)]
    for error in errors:
        assert isinstance(error, terrace.TerraceError), f"unexpected {error!r}"
    assert len(errors) < 2, f"both inits raised: {errors!r}"
    succeeded = [r for r in results if not isinstance(r, Exception)]
    if len(succeeded) == 2:
        outcomes["both succeeded"] += 1
        first, second = succeeded
        same = jax.tree_util.tree_map(np.array_equal, first, second)
        assert jax.tree_util.tree_all(same), "the two inits returned different variables"
    else:
        outcomes["one raised"] += 1

    table = model._terrace_table
    assert table.complete
    assert slot_names(table) == DEEP_SLOTS
    for name in ("Block_0", "Block_1"):
        child = table._by_name[name].value.table
        assert child is not None, f"{name} has no slot table"
        assert child.complete, f"{name}'s slot table is not complete"
        assert slot_names(child) == BLOCK_SLOTS
    # The recorded tables must serve later passes of the same model.
    output = model.apply(succeeded[0], example_input(1))
    assert output.shape == (3, 2)
