"""The examples of the original modules guide, run as they were written."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import terrace as ter


class BasicNN(ter.Module):
    def forward(self, x):
        # we always need to call start_forward at the beginning
        # of the method, so the module knows to reset all the
        # internal counters
        self.start_forward()
        hid = F.relu(self.make(ter.LazyLinear, 100)(x))
        out = self.make(ter.LazyLinear, 1)(hid)
        return out


class MyLazyLinear(ter.Module):
    def __init__(self, out_feat):
        super().__init__()
        self.out_feat = out_feat

    def forward(self, x):
        self.start_forward()
        in_feat = x.size(-1)
        return self.make(nn.Linear, in_feat, self.out_feat)(x)


class BadNetwork1(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = self.make(ter.LazyLinear, 10)
        # the number of times this loop
        # get executed is data-dependant
        for n in range(int(torch.amax(x))):
            h = self.make(ter.LazyLinear, 10)(x)


class BadNetwork2(ter.Module):
    def forward(self, x):
        self.start_forward()
        if x.mean() > 0:
            return self.make(ter.LazyLinear, 10)(x)
        else:
            return self.make(ter.LazyLinear, 10)(x)


class FixedNetwork2(ter.Module):
    def forward(self, x):
        self.start_forward()
        if_linear = self.make(ter.LazyLinear, 10)
        else_linear = self.make(ter.LazyLinear, 10)
        if x.mean() > 0:
            return if_linear(x)
        else:
            return else_linear(x)


def test_basic_nn_prints_output_shape(capsys):
    x = torch.randn(16, 128)
    model = BasicNN()
    out = model(x)
    print(out.shape)
    assert capsys.readouterr().out == "torch.Size([16, 1])\n"


def test_my_lazy_linear_prints_output_shape(capsys):
    x = torch.randn(16, 128)
    linear = MyLazyLinear(16)
    print(linear(x).shape)
    assert capsys.readouterr().out == "torch.Size([16, 16])\n"


def test_basic_nn_reuses_modules_on_later_passes():
    model = BasicNN()
    x = torch.randn(16, 128)
    first = model(x)
    layers = list(model.children())
    second = model(x)
    assert list(model.children()) == layers
    assert torch.equal(first, second)
    assert list(model.state_dict()) == [
        "LazyLinear_0.weight",
        "LazyLinear_0.bias",
        "LazyLinear_1.weight",
        "LazyLinear_1.bias",
    ]
    assert model.LazyLinear_0.weight.shape == (100, 128)


def test_bad_network1_raises_on_longer_loop():
    model = BadNetwork1()
    model(torch.full((2, 3), 1.5))
    with pytest.raises(ter.SlotMismatchError, match=r"asked for slot #2 .* only 2 slots"):
        model(torch.full((2, 3), 3.5))


def test_bad_network1_raises_on_shorter_loop():
    model = BadNetwork1()
    model(torch.full((2, 3), 2.5))
    with pytest.raises(ter.SlotMismatchError, match=r"used 2 of 3 slots; slot LazyLinear_2"):
        model(torch.full((2, 3), 1.5))


def test_bad_network2_raises_naming_both_call_sites():
    model = BadNetwork2()
    model(torch.ones(4, 3))
    with pytest.raises(ter.SlotMismatchError) as info:
        model(-torch.ones(4, 3))
    message = str(info.value)
    assert "slot LazyLinear_0" in message
    assert message.count("test_guide_examples.py:") == 2
    assert "make every submodule before branching" in message


def test_bad_network2_same_branch_is_fine():
    model = BadNetwork2()
    x = torch.ones(4, 3)
    first = model(x)
    assert torch.allclose(model(2 * x), 2 * first - model.LazyLinear_0.bias)
    assert len(list(model.children())) == 1


def test_fixed_network2_uses_separate_weights():
    model = FixedNetwork2()
    model(torch.ones(4, 3))
    model(-torch.ones(4, 3))
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    assert len(weights) == 2
    assert not torch.equal(weights[0], weights[1])


def test_parameters_before_first_pass_raise():
    model = BasicNN()
    with pytest.raises(ter.NotBuiltError, match="run one forward pass on an example batch"):
        model.parameters()
