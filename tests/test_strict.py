"""Strict replay checks: every misuse raises a TerraceError naming the slot."""

import re

import pytest
import torch
import torch.nn as nn

import terrace as ter


class NoStart(ter.Module):
    def forward(self, x):
        return self.make(ter.LazyLinear, 2)(x)


class ForgetsLater(ter.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        if self.calls == 0:
            self.start_forward()
        self.calls += 1
        return self.make(ter.LazyLinear, 2)(x)


class Widths(ter.Module):
    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, x):
        self.start_forward()
        return self.make(ter.LazyLinear, self.width)(x)


class Named(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = self.make(ter.LazyLinear, 4, name="encoder")(x)
        return self.make(ter.LazyLinear, 2, name="head")(h)


class DuplicateName(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = self.make(ter.LazyLinear, 4, name="block")(x)
        return self.make(ter.LazyLinear, 2, name="block")(h)


class ClashesWithAutomatic(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = self.make(ter.LazyLinear, 4)(x)
        return self.make(ter.LazyLinear, 2, name="LazyLinear_0")(h)


class Loose(ter.Module):
    strict = False

    def forward(self, x, steps):
        self.start_forward()
        for _ in range(steps):
            x = self.make(ter.LazyLinear, x.shape[-1])(x)
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


def test_make_without_start_forward():
    with pytest.raises(ter.SlotMismatchError, match=r"NoStart: make\(\) was called before start_forward"):
        NoStart()(torch.ones(1, 3))


def test_later_pass_forgetting_start_forward():
    model = ForgetsLater()
    model(torch.ones(1, 3))
    with pytest.raises(ter.SlotMismatchError, match="before start_forward"):
        model(torch.ones(1, 3))


def test_changed_constructor_arguments():
    model = Widths(4)
    model(torch.ones(1, 3))
    model.width = 5
    with pytest.raises(ter.SlotMismatchError, match="LazyLinear_0 .* other constructor arguments"):
        model(torch.ones(1, 3))


def test_changed_class_raises_even_when_loose():
    class Switch(ter.Module):
        strict = False

        def __init__(self):
            super().__init__()
            self.cls = ter.LazyLinear

        def forward(self, x):
            self.start_forward()
            return self.make(self.cls, 2)(x)

    model = Switch()
    model(torch.ones(1, 3))
    model.cls = ter.LazyLayerNorm
    with pytest.raises(ter.SlotMismatchError, match="class LazyLayerNorm instead of LazyLinear"):
        model(torch.ones(1, 3))


def test_start_forward_twice_in_one_pass():
    class Twice(ter.Module):
        def forward(self, x):
            self.start_forward()
            self.start_forward()
            return x

    with pytest.raises(ter.SlotMismatchError, match="called twice in one pass"):
        Twice()(torch.ones(1))


def test_explicit_names_are_state_keys():
    model = Named()
    model(torch.ones(2, 3))
    assert list(model.state_dict()) == ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]
    assert model(torch.ones(2, 3)).shape == (2, 2)


def test_duplicate_name_names_both_uses():
    with pytest.raises(ter.SlotNameError) as info:
        DuplicateName()(torch.ones(2, 3))
    message = str(info.value)
    assert "'block' is used twice" in message
    assert "make(LazyLinear, 4)" in message
    assert "make(LazyLinear, 2)" in message


def test_explicit_name_clashing_with_automatic_name():
    with pytest.raises(ter.SlotNameError, match="'LazyLinear_0' is used twice"):
        ClashesWithAutomatic()(torch.ones(2, 3))


@pytest.mark.parametrize("bad", ["", "1st", "a.b", 3])
def test_invalid_explicit_name(bad):
    class Bad(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(ter.LazyLinear, 2, name=bad)(x)

    with pytest.raises(ter.SlotNameError, match="not a valid identifier"):
        Bad()(torch.ones(1, 3))


def test_name_clashing_with_attribute():
    class Clash(ter.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(2, 2)

        def forward(self, x):
            self.start_forward()
            return self.make(ter.LazyLinear, 2, name="head")(x)

    with pytest.raises(ter.SlotNameError, match="'head' is already an attribute"):
        Clash()(torch.ones(1, 3))


def test_loose_module_grows_and_shrinks():
    model = Loose()
    x = torch.ones(1, 3)
    model(x, 2)
    model(x, 4)
    assert len(list(model.children())) == 4
    model(x, 1)
    assert len(list(model.children())) == 4


def test_recursive_tree_shares_slots():
    model = Tree()
    a, b, c = (torch.randn(1, 3) for _ in range(3))
    out = model(((a, b), c))
    assert out.shape == (1, 3)
    assert [name for name, _ in model.named_children()] == ["LazyLinear_0", "LazyLinear_1"]
    leaf, merge = model.LazyLinear_0, model.LazyLinear_1
    expected = torch.tanh(
        merge(
            torch.cat(
                [torch.tanh(merge(torch.cat([torch.tanh(leaf(a)), torch.tanh(leaf(b))], -1))), torch.tanh(leaf(c))],
                -1,
            )
        )
    )
    assert torch.allclose(model(((a, b), c)), expected)


def test_nested_terrace_modules_have_dotted_names():
    class Block(ter.Module):
        def forward(self, x):
            self.start_forward()
            h = self.make(ter.LazyLinear, 4)(x)
            return self.make(ter.LazyLayerNorm)(h)

    class Net(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(Block)(self.make(Block)(x))

    model = Net()
    model(torch.ones(2, 3))
    assert list(model.state_dict()) == [
        "Block_0.LazyLinear_0.weight",
        "Block_0.LazyLinear_0.bias",
        "Block_0.LazyLayerNorm_0.weight",
        "Block_0.LazyLayerNorm_0.bias",
        "Block_1.LazyLinear_0.weight",
        "Block_1.LazyLinear_0.bias",
        "Block_1.LazyLayerNorm_0.weight",
        "Block_1.LazyLayerNorm_0.bias",
    ]


def test_nested_error_names_path():
    class Inner(ter.Module):
        def forward(self, x):
            self.start_forward()
            if x.sum() > 0:
                return self.make(ter.LazyLinear, 2)(x)
            return self.make(ter.LazyLinear, 2)(x)

    class Outer(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(Inner)(x)

    model = Outer()
    model(torch.ones(1, 3))
    with pytest.raises(ter.SlotMismatchError, match=r"^Outer\.Inner_0: slot LazyLinear_0"):
        model(-torch.ones(1, 3))


def test_make_of_non_module_raises():
    class Wrong(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(torch.zeros, 3)

    with pytest.raises(ter.TerraceError, match="must create a torch.nn.Module.*make_param"):
        Wrong()(torch.ones(1))


def test_make_param_creates_and_reuses():
    class Scale(ter.Module):
        def forward(self, x):
            self.start_forward()
            scale = self.make_param("scale", (x.shape[-1],), torch.nn.init.ones_)
            return x * scale

    model = Scale().double()
    x = torch.ones(2, 3, dtype=torch.float64)
    assert torch.equal(model(x), x)
    assert model.scale.dtype == torch.float64
    assert list(model.state_dict()) == ["scale"]
    with pytest.raises(ter.SlotMismatchError, match="slot scale .* other constructor arguments"):
        model(torch.ones(2, 4, dtype=torch.float64))


def test_branch_on_one_line_raises():
    class OneLine(ter.Module):
        def forward(self, x):
            self.start_forward()
            layer = self.make(ter.LazyLinear, 4) if x.mean() > 0 else self.make(ter.LazyLinear, 4)
            return layer(x)

    model = OneLine()
    model(torch.ones(2, 3))
    with pytest.raises(ter.SlotMismatchError, match=r"another call site") as info:
        model(-torch.ones(2, 3))
    assert len(set(re.findall(r"test_strict\.py:\d+:(\d+)", str(info.value)))) == 2
