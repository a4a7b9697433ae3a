"""Terrace modules used from several threads at once, and from inside their own forward.

Every pass keeps its cursor on a stack of the calling thread, so threads do
not share cursors, and slot creation runs under the slot table's lock. The
tests start the threads at a barrier and shorten the interpreter's thread
switch interval, so that threads interleave inside passes and inside the
first pass. The assertions hold for every interleaving.
"""

import sys
import threading

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

import terrace as ter

THREADS = 8
CALLS = 50


class Block(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = F.relu(self.make(ter.LazyLinear, 6)(x))
        return self.make(ter.LazyLayerNorm)(h)


class Net(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = self.make(Block)(x)
        h = self.make(Block)(h)
        scale = self.make_param("scale", (h.shape[-1],), nn.init.ones_)
        return self.make(ter.LazyLinear, 2)(h * scale)


class Tree(ter.Module):
    """Applies one shared leaf or merge layer at every node of a nested tuple."""

    def forward(self, node):
        self.start_forward()
        leaf = self.make(ter.LazyLinear, 3)
        merge = self.make(ter.LazyLinear, 3)
        if isinstance(node, torch.Tensor):
            return torch.tanh(leaf(node))
        left, right = (self(child) for child in node)
        return torch.tanh(merge(torch.cat([left, right], dim=-1)))


NET_KEYS = [
    "scale",
    "Block_0.LazyLinear_0.weight",
    "Block_0.LazyLinear_0.bias",
    "Block_0.LazyLayerNorm_0.weight",
    "Block_0.LazyLayerNorm_0.bias",
    "Block_1.LazyLinear_0.weight",
    "Block_1.LazyLinear_0.bias",
    "Block_1.LazyLayerNorm_0.weight",
    "Block_1.LazyLayerNorm_0.bias",
    "LazyLinear_0.weight",
    "LazyLinear_0.bias",
]


@pytest.fixture(autouse=True)
def frequent_thread_switches():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def run_threads(count, work):
    """Run ``work(index)`` in ``count`` threads started together; return results and errors."""
    barrier = threading.Barrier(count)
    results = [None] * count
    errors = [None] * count

    def target(index):
        barrier.wait()
        try:
            results[index] = work(index)
        except BaseException as error:  # noqa: BLE001 - every error is checked below
            errors[index] = error

    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a thread did not finish within 60 s"
    return results, errors


def random_tree(depth, generator):
    if depth == 0:
        return torch.randn(1, 3, generator=generator)
    return (random_tree(depth - 1, generator), random_tree(depth - 1, generator))


def test_threads_match_sequential_outputs():
    model = Net()
    model(torch.randn(2, 5))
    generator = torch.Generator().manual_seed(0)
    inputs = [[torch.randn(3, 5, generator=generator) for _ in range(CALLS)] for _ in range(THREADS)]
    with torch.no_grad():
        expected = [[model(x) for x in batch] for batch in inputs]

    def work(index):
        with torch.no_grad():
            outputs = [model(x) for x in inputs[index]]
        return outputs, list(model._terrace_table._local.stack)

    results, errors = run_threads(THREADS, work)
    assert errors == [None] * THREADS
    for index, (outputs, stack_after) in enumerate(results):
        assert stack_after == [], f"thread {index} left a pass open"
        for call, (got, want) in enumerate(zip(outputs, expected[index])):
            assert torch.equal(got, want), f"thread {index}, call {call}"
    assert list(model.state_dict()) == NET_KEYS


def test_recursive_tree_in_threads():
    model = Tree()
    generator = torch.Generator().manual_seed(1)
    model(random_tree(2, generator))
    trees = [[random_tree(1 + call % 3, generator) for call in range(CALLS)] for _ in range(THREADS)]
    with torch.no_grad():
        expected = [[model(tree) for tree in batch] for batch in trees]

    def work(index):
        with torch.no_grad():
            return [model(tree) for tree in trees[index]]

    results, errors = run_threads(THREADS, work)
    assert errors == [None] * THREADS
    for index, outputs in enumerate(results):
        for call, (got, want) in enumerate(zip(outputs, expected[index])):
            assert torch.equal(got, want), f"thread {index}, call {call}"
    assert [name for name, _ in model.named_children()] == ["LazyLinear_0", "LazyLinear_1"]


@pytest.mark.parametrize("trial", range(10))
def test_race_through_first_pass(trial):
    model = Net()
    generator = torch.Generator().manual_seed(trial)
    inputs = [torch.randn(2, 5, generator=generator) for _ in range(4)]

    def work(index):
        with torch.no_grad():
            return model(inputs[index])

    results, errors = run_threads(len(inputs), work)
    # Slot creation runs under the table's lock, so every thread gets the
    # slots; none has to fail with a TerraceError.
    assert errors == [None] * len(inputs)

    table = model._terrace_table
    assert table.complete
    assert [record.name for record in table.records] == [
        "Block_0",
        "Block_1",
        "scale",
        "LazyLinear_0",
    ]
    assert [record.ordinal for record in table.records] == [0, 1, 2, 3]
    assert list(model.state_dict()) == NET_KEYS
    assert model.is_built
    assert sum(p.numel() for p in model.parameters()) == (5 * 6 + 6 + 12) + (6 * 6 + 6 + 12) + 6 + (6 * 2 + 2)
    with torch.no_grad():
        for index, output in enumerate(results):
            assert torch.equal(output, model(inputs[index])), f"thread {index} used other slots"


@pytest.mark.parametrize("trial", range(5))
def test_race_through_first_pass_of_tree(trial):
    model = Tree()
    generator = torch.Generator().manual_seed(trial)
    trees = [random_tree(2, generator) for _ in range(4)]

    def work(index):
        with torch.no_grad():
            return model(trees[index])

    results, errors = run_threads(len(trees), work)
    assert errors == [None] * len(trees)
    assert [record.name for record in model._terrace_table.records] == ["LazyLinear_0", "LazyLinear_1"]
    with torch.no_grad():
        for index, output in enumerate(results):
            assert torch.equal(output, model(trees[index])), f"thread {index}"


@pytest.mark.parametrize("trial", range(10))
def test_lazy_layer_first_call_race(trial):
    layer = ter.LazyLinear(3)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(trial))

    def work(index):
        with torch.no_grad():
            return layer(x)

    results, errors = run_threads(THREADS, work)
    assert errors == [None] * THREADS
    assert type(layer) is nn.Linear
    assert layer.weight.shape == (3, 5)
    with torch.no_grad():
        expected = layer(x)
    for index, output in enumerate(results):
        assert torch.equal(output, expected), f"thread {index} saw another weight"


def test_compiled_model_in_threads():
    torch._dynamo.reset()
    model = Net()
    model(torch.randn(2, 5))
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    generator = torch.Generator().manual_seed(2)
    inputs = [[torch.randn(3, 5, generator=generator) for _ in range(10)] for _ in range(4)]
    with torch.no_grad():
        compiled(inputs[0][0])
        expected = [[model(x) for x in batch] for batch in inputs]

    def work(index):
        with torch.no_grad():
            return [compiled(x) for x in inputs[index]]

    try:
        results, errors = run_threads(len(inputs), work)
    finally:
        torch._dynamo.reset()
    assert errors == [None] * len(inputs)
    for index, outputs in enumerate(results):
        for call, (got, want) in enumerate(zip(outputs, expected[index])):
            assert torch.allclose(got, want, atol=1e-6), f"thread {index}, call {call}"
