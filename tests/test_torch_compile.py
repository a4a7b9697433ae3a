"""torch.compile and torch.export of terrace modules.

The compile tests use dynamo's CompileCounter backend, which counts the
frames dynamo compiles, and the "aot_eager" backend where gradients matter.
Both trace with dynamo as the default inductor backend does, but they
generate no C++ code, which keeps the tests fast.
"""

import dataclasses

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import terrace as ter
import terrace.torch


class Block(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = self.make(ter.LazyLinear, 8)(x)
        return self.make(ter.LazyLayerNorm)(F.gelu(h))


class Net(ter.Module):
    """Lazy layers, a nested terrace module, an explicit name and a bare parameter."""

    def forward(self, x):
        self.start_forward()
        h = self.make(Block)(x)
        scale = self.make_param("scale", (h.shape[-1],), torch.nn.init.ones_)
        h = self.make(ter.LazyLinear, 8, name="mixer")(h * scale)
        return self.make(ter.LazyLinear, 2)(F.relu(h))


class Widths(ter.Module):
    def __init__(self, widths):
        super().__init__()
        self.widths = widths

    def forward(self, x):
        self.start_forward()
        for width in self.widths:
            x = self.make(ter.LazyLinear, width)(x)
        return x


class Switch(ter.Module):
    """Makes the class in self.cls; used to change the class after the first pass."""

    strict = False

    def __init__(self):
        super().__init__()
        self.cls = ter.LazyLinear

    def forward(self, x):
        self.start_forward()
        return self.make(self.cls, 3)(x)


class Steps(ter.Module):
    strict = False

    def __init__(self):
        super().__init__()
        self.steps = 2

    def forward(self, x):
        self.start_forward()
        for _ in range(self.steps):
            x = self.make(ter.LazyLinear, 3)(x)
        return x


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


class TwoBranches(ter.Module):
    def forward(self, x, positive):
        self.start_forward()
        pos = self.make(ter.LazyLinear, 2)
        neg = self.make(ter.LazyLinear, 2)
        return pos(x) if positive else neg(x)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def example(batch=4, features=5):
    return torch.randn(batch, features)


def built(model, *inputs):
    model(*inputs)
    return model


def assert_one_graph(counter):
    assert counter.frame_count == 1
    assert counter.op_count > 0
    assert not counters["graph_break"], dict(counters["graph_break"])


# -- torch.compile of built models ------------------------------------------


def test_compile_fullgraph_matches_eager():
    model = built(Net(), example())
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(5):
        x = example()
        assert torch.allclose(compiled(x), model(x), atol=1e-6)
    assert_one_graph(counter)


def test_compile_reuses_graph_for_same_shapes():
    model = built(Net(), example())
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(10):
        compiled(example())
    assert counter.frame_count == 1
    assert not counters["recompiles"]
    compiled(example(batch=7))
    assert counter.frame_count == 2, "a new batch size compiles once more"


def test_dynamic_shapes_pin_make_sizes():
    class FromInput(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(torch.nn.Linear, x.shape[-1], 3)(x)

    model = built(FromInput(), example())
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend=counter)
    for batch in (2, 3, 6):
        x = example(batch=batch)
        assert torch.allclose(compiled(x), model(x))
    assert counter.frame_count == 1, "the batch size stays symbolic"
    with pytest.raises(torch._dynamo.exc.Unsupported, match="terrace: the traced forward pass"):
        compiled(example(features=6))


def test_compile_training_step_matches_eager():
    torch.manual_seed(0)
    eager = built(Net(), example())
    twin = Net()
    twin(example())
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x, y = example(), torch.randn(4, 2)
    F.mse_loss(eager(x), y).backward()
    F.mse_loss(compiled(x), y).backward()
    for (name, expected), (_, got) in zip(eager.named_parameters(), twin.named_parameters()):
        assert torch.allclose(got.grad, expected.grad, atol=1e-6), name


def test_compile_recursive_tree():
    model = Tree()
    a, b, c = (torch.randn(1, 3) for _ in range(3))
    tree = ((a, b), c)
    model(tree)
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(3):
        assert torch.allclose(compiled(tree), model(tree), atol=1e-6)
    assert_one_graph(counter)


def test_module_compile_method():
    model = built(Net(), example())
    counter = CompileCounter()
    model.compile(fullgraph=True, backend=counter)
    x = example()
    expected = model._call_impl(x)
    for _ in range(3):
        assert torch.allclose(model(x), expected, atol=1e-6)
    assert_one_graph(counter)


def test_compile_function_calling_model():
    model = built(Net(), example())
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def loss(x, y):
        return F.mse_loss(model(x), y)

    x, y = example(), torch.randn(4, 2)
    for _ in range(3):
        assert torch.allclose(loss(x, y), F.mse_loss(model(x), y), atol=1e-6)
    assert_one_graph(counter)


def test_compile_with_object_arguments():
    @dataclasses.dataclass
    class Config:
        width: int = 4

    class Head(torch.nn.Module):
        def __init__(self, config, activation, body, mask):
            super().__init__()
            self.linear = torch.nn.Linear(5, config.width)
            self.activation = activation
            self.body = body
            self.register_buffer("mask", mask.clone())

        def forward(self, x):
            return self.body(self.activation(self.linear(x))) * self.mask

    class WithHead(ter.Module):
        def __init__(self):
            super().__init__()
            self.config = Config()
            self.body = torch.nn.Identity()
            self.mask = torch.ones(4)

        def forward(self, x):
            self.start_forward()
            return self.make(Head, self.config, F.relu, self.body, self.mask, name="head")(x)

    model = built(WithHead(), example())
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for _ in range(3):
        x = example()
        assert torch.allclose(compiled(x), model(x))
    assert_one_graph(counter)
    model.mask = torch.ones(5)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="terrace: the traced forward pass"):
        compiled(example())


def test_graph_break_in_forward_gives_eager_results():
    class Branchy(ter.Module):
        def forward(self, x):
            self.start_forward()
            positive = self.make(ter.LazyLinear, 3)
            negative = self.make(ter.LazyLinear, 3)
            h = torch.tanh(x)
            if h.mean() > 0:
                return positive(h)
            return negative(h)

    model = Branchy()
    x = torch.ones(4, 5)
    model(x)
    model(-x)
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):
        assert torch.allclose(compiled(x), model(x))
        assert torch.allclose(compiled(-x), model(-x))
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(model, fullgraph=True, backend="eager")(x)


def test_eager_passes_still_work_after_compile():
    model = built(Widths([4, 2]), example())
    compiled = torch.compile(model, fullgraph=True, backend=CompileCounter())
    compiled(example())
    assert model(example()).shape == (4, 2)
    assert type(model._terrace_table) is ter.SlotTable
    model.widths = [4, 3]
    with pytest.raises(ter.SlotMismatchError, match="other constructor arguments"):
        model(example())


def test_loose_module_compiles():
    model = built(Steps(), torch.ones(2, 3))
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    assert torch.allclose(compiled(torch.ones(2, 3)), model(torch.ones(2, 3)))
    assert_one_graph(counter)


# -- passes that do not match the slot table ----------------------------------


def test_changed_arguments_fullgraph_names_terrace():
    model = built(Widths([4, 2]), example())
    model.widths = [4, 3]
    with pytest.raises(torch._dynamo.exc.Unsupported, match="terrace: the traced forward pass"):
        torch.compile(model, fullgraph=True, backend="eager")(example())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: setattr(m, "widths", [4, 3]), "LazyLinear_1 .* other constructor arguments"),
        (lambda m: setattr(m, "widths", [4, 2, 2]), "asked for slot #2"),
        (lambda m: setattr(m, "widths", [4]), "used 1 of 2 slots"),
    ],
    ids=["arguments", "more-slots", "fewer-slots"],
)
def test_mismatch_raises_slot_error_without_fullgraph(change, message):
    model = built(Widths([4, 2]), example())
    change(model)
    compiled = torch.compile(model, backend="eager")
    for _ in range(2):
        with pytest.raises(ter.SlotMismatchError, match=message):
            compiled(example())


def test_fixed_model_compiles_after_reset(monkeypatch):
    model = built(Widths([4, 2]), example())
    compiled = torch.compile(model, backend=CompileCounter())
    compiled(example())
    model.widths = [4, 3]
    with pytest.raises(ter.SlotMismatchError):
        compiled(example())
    model.widths = [4, 2]
    assert compiled(example()).shape == (4, 2), "the call after the fix runs"
    torch._dynamo.reset()
    compiled(example())
    eager_passes = []
    enter = ter.SlotTable.enter

    def counting_enter(table, strict=True):
        eager_passes.append(table.owner)
        return enter(table, strict)

    monkeypatch.setattr(ter.SlotTable, "enter", counting_enter)
    x = example()
    assert torch.allclose(compiled(x), model._call_impl(x))
    assert eager_passes == [], "a compiled call ran the eager pass"


def test_changed_class_raises_in_loose_module():
    model = built(Switch(), example())
    model.cls = ter.LazyLayerNorm
    with pytest.raises(ter.SlotMismatchError, match="class LazyLayerNorm instead of LazyLinear"):
        torch.compile(model, backend="eager")(example())
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="terrace: the traced forward pass"):
        torch.compile(model, fullgraph=True, backend="eager")(example())


def test_loose_module_makes_new_slot_eagerly():
    model = built(Steps(), torch.ones(2, 3))
    model.steps = 3
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.ones(2, 3)
    first = compiled(x)
    assert len(model._terrace_table.records) == 3, "the call ran eagerly and made the slot"
    assert counter.frame_count == 0
    assert torch.allclose(first, model(x))
    for _ in range(2):
        assert torch.allclose(compiled(x), model(x))
    assert counter.frame_count == 1, "traced again once the slot existed"


def test_loose_module_new_slot_fullgraph_raises():
    model = built(Steps(), torch.ones(2, 3))
    model.steps = 3
    with pytest.raises(torch._dynamo.exc.Unsupported, match="terrace: the traced forward pass"):
        torch.compile(model, fullgraph=True, backend="eager")(torch.ones(2, 3))
    assert len(model._terrace_table.records) == 2


def test_failed_trace_leaves_other_modules_compilable():
    broken = built(Widths([4, 2]), example())
    broken.widths = [4, 3]
    with pytest.raises(ter.SlotMismatchError):
        torch.compile(broken, backend="eager")(example())
    counters.clear()
    model = built(Widths([4, 2]), example())
    counter = CompileCounter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    x = example()
    assert torch.allclose(compiled(x), model(x))
    assert_one_graph(counter)


def test_compiling_forward_alone_raises():
    model = built(Net(), example())
    compiled_forward = torch.compile(model.forward, backend="eager")
    with pytest.raises(ter.TerraceError, match="compile the module"):
        compiled_forward(example())
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="terrace: dynamo traced the forward"):
        torch.compile(model.forward, fullgraph=True, backend="eager")(example())


# -- never-run models ---------------------------------------------------------


def test_never_run_model_fullgraph_raises():
    model = Net()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="has not finished its first eager forward pass"):
        torch.compile(model, fullgraph=True, backend="eager")(example())
    assert not model.is_built
    assert not model._modules


def test_never_run_model_runs_eagerly_then_compiles():
    model, twin = Net(), Net()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = example()
    torch.manual_seed(0)
    first = compiled(x)
    torch.manual_seed(0)
    assert torch.equal(first, twin(x)), "the first call is the eager first pass"
    assert model.is_built
    assert counter.frame_count == 0
    for _ in range(3):
        x = example()
        assert torch.allclose(compiled(x), twin(x), atol=1e-6)
    assert counter.frame_count == 1
    assert list(model.state_dict()) == list(twin.state_dict())


def test_untaken_branch_runs_eagerly_until_built():
    model = built(TwoBranches(), example(), True)
    assert not model.is_built
    counter = CompileCounter()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="has not finished its first eager forward pass"):
        torch.compile(model, fullgraph=True, backend="eager")(example(), True)
    compiled = torch.compile(model, backend=counter)
    x = example()
    assert torch.allclose(compiled(x, False), model(x, False))
    assert model.is_built
    for positive in (True, False, True):
        assert torch.allclose(compiled(x, positive), model(x, positive), atol=1e-6)
    assert counter.frame_count == 2, "one graph per branch"


def test_lazy_layer_traced_before_first_call():
    layer = ter.LazyLinear(3)
    with pytest.raises(torch._dynamo.exc.Unsupported, match="first call of a terrace lazy layer"):
        torch.compile(layer, fullgraph=True, backend="eager")(example())
    assert isinstance(layer, terrace.torch.LazyLayer)

    wrapper = torch.nn.Sequential(ter.LazyLinear(3), torch.nn.ReLU())
    compiled = torch.compile(wrapper, backend="eager")
    x = example()
    out = compiled(x)
    assert isinstance(wrapper[0], torch.nn.Linear)
    assert torch.allclose(out, wrapper(x))


# -- torch.export ---------------------------------------------------------------

EXPECTED_KEYS = [
    "scale",
    "Block_0.LazyLinear_0.weight",
    "Block_0.LazyLinear_0.bias",
    "Block_0.LazyLayerNorm_0.weight",
    "Block_0.LazyLayerNorm_0.bias",
    "mixer.weight",
    "mixer.bias",
    "LazyLinear_0.weight",
    "LazyLinear_0.bias",
]


# Strict export runs dynamo, which reports the stand-in slot table that a
# traced pass swaps in and out (terrace.torch._compile.call_traced).
@pytest.mark.filterwarnings("ignore:While compiling, we found certain side effects:UserWarning")
@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_lists_made_weights(strict):
    model = built(Net(), example())
    program = torch.export.export(model, (example(),), strict=strict)
    assert sorted(program.graph_signature.parameters) == sorted(EXPECTED_KEYS)
    assert sorted(program.state_dict) == sorted(EXPECTED_KEYS)
    for name, tensor in model.state_dict().items():
        assert torch.equal(program.state_dict[name], tensor), name
    x = example()
    assert torch.allclose(program.module()(x), model(x), atol=1e-6)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_of_never_run_model_raises(strict):
    with pytest.raises(ter.NotBuiltError, match=r"Net: .* before the first forward pass"):
        torch.export.export(Net(), (example(),), strict=strict)
