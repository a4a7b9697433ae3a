"""A never-run module either works or raises NotBuiltError; it never fails silently."""

import copy
import io
import pickle
import socket

import pytest
import torch
import torch.nn.functional as F

import terrace as ter


class MLP(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = F.relu(self.make(ter.LazyLinear, 8)(x))
        h = self.make(ter.LazyLayerNorm)(h)
        return self.make(ter.LazyLinear, 2)(h)


class TwoBranches(ter.Module):
    def forward(self, x):
        self.start_forward()
        pos = self.make(ter.LazyLinear, 2)
        neg = self.make(ter.LazyLinear, 2)
        return pos(x) if x.mean() > 0 else neg(x)


def example():
    return torch.randn(4, 5)


@pytest.mark.parametrize(
    "use",
    [
        lambda m: m.parameters(),
        lambda m: m.named_parameters(),
        lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        lambda m: sum(p.numel() for p in m.parameters()),
        lambda m: m.apply(lambda module: None),
        lambda m: m.requires_grad_(False),
        lambda m: torch.export.export(m, (example(),)),
    ],
    ids=["parameters", "named_parameters", "optimizer", "count", "apply", "requires_grad", "export"],
)
def test_use_before_first_pass_raises(use):
    with pytest.raises(ter.NotBuiltError, match=r"MLP: .* before the first forward pass.*model\(example_batch\)"):
        use(MLP())


def test_untaken_branch_is_reported():
    model = TwoBranches()
    model(torch.ones(2, 3))
    assert not model.is_built
    with pytest.raises(ter.NotBuiltError, match=r"slot TwoBranches\.LazyLinear_1 has not run on an input"):
        model.parameters()
    model(-torch.ones(2, 3))
    assert model.is_built
    assert len(list(model.parameters())) == 4


def test_is_built_after_first_pass():
    model = MLP()
    assert not model.is_built
    model(example())
    assert model.is_built
    assert sum(p.numel() for p in model.parameters()) == 5 * 8 + 8 + 16 + 8 * 2 + 2


def test_zero_grad_before_first_pass_is_harmless():
    model = MLP()
    model.zero_grad()
    model(example()).sum().backward()
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_ddp_of_never_run_model_raises():
    import torch.distributed as dist

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        with pytest.raises(ter.NotBuiltError, match="before the first forward pass"):
            torch.nn.parallel.DistributedDataParallel(MLP())
        built = MLP()
        built(example())
        wrapped = torch.nn.parallel.DistributedDataParallel(built)
        assert wrapped(example()).shape == (4, 2)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("convert", "dtype"),
    [
        (lambda m: m.double(), torch.float64),
        (lambda m: m.to(torch.float64), torch.float64),
        (lambda m: m.half(), torch.float16),
        (lambda m: m.to(dtype=torch.bfloat16), torch.bfloat16),
    ],
    ids=["double", "to-float64", "half", "to-bfloat16"],
)
def test_dtype_reaches_late_layers(convert, dtype):
    model = convert(MLP())
    out = model(example().to(dtype))
    assert out.dtype == dtype
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_meta_device_reaches_late_layers():
    model = MLP().to("meta")
    out = model(example().to("meta"))
    assert out.device.type == "meta"
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_conversion_reaches_nested_modules():
    class Outer(ter.Module):
        def forward(self, x):
            self.start_forward()
            return self.make(MLP)(x)

    model = Outer().double()
    assert model(example().double()).dtype == torch.float64
    assert {p.dtype for p in model.parameters()} == {torch.float64}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_reaches_late_layers():
    model = MLP().cuda()
    assert model(example().cuda()).is_cuda
    assert all(p.is_cuda for p in model.parameters())


@pytest.mark.parametrize(
    "clone",
    [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
    ids=["deepcopy", "pickle"],
)
def test_copies_before_and_after_first_pass(clone):
    x = example()
    fresh = clone(MLP())
    assert fresh(x).shape == (4, 2)

    built = MLP()
    expected = built(x)
    copied = clone(built)
    assert torch.equal(copied(x), expected)
    assert copied.LazyLinear_0.weight is not built.LazyLinear_0.weight


def test_eval_mode_before_first_pass_reaches_late_layers():
    class WithDropout(ter.Module):
        def forward(self, x):
            self.start_forward()
            h = self.make(ter.LazyLinear, 8)(x)
            h = self.make(torch.nn.Dropout, 0.5)(h)
            return self.make(ter.LazyBatchNorm1d)(h)

    model = WithDropout().eval()
    x = example()
    first = model(x)
    assert not any(module.training for module in model.modules())
    assert torch.equal(model(x), first)
    assert torch.equal(model.LazyBatchNorm1d_0.running_mean, torch.zeros(8))
