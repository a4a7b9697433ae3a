"""DistributedDataParallel and FSDP2 (fully_shard) of terrace modules, two processes on CPU.

Each test starts two processes with torch.multiprocessing and the gloo
backend on 127.0.0.1, joined through a TCPStore on a port the system picks. Every rank builds its model with one forward pass,
wraps it, trains a few SGD steps on data of its own, and saves its final
parameters. The parameters must be the same on both ranks and equal those of
one process that trains on both ranks' data, since DDP and FSDP average the
gradients of equal-sized batches.
"""

import datetime
import faulthandler
import gc
import os
import pathlib
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import terrace as ter

WORLD_SIZE = 2
STEPS = 3
BATCH = 8
SPAWN_TIMEOUT_S = 120
GROUP_TIMEOUT = datetime.timedelta(seconds=60)


class Block(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = F.relu(self.make(ter.LazyLinear, 16)(x))
        return self.make(ter.LazyLayerNorm)(h)


class Net(ter.Module):
    def forward(self, x):
        self.start_forward()
        h = self.make(Block)(x)
        h = self.make(Block)(h)
        scale = self.make_param("scale", (h.shape[-1],), torch.nn.init.ones_)
        return self.make(ter.LazyLinear, 2, name="head")(h * scale)


def build_model():
    """Return a Net built by one pass; the weights depend only on the seed."""
    torch.manual_seed(0)
    model = Net()
    model(torch.zeros(1, 5))
    return model


def rank_batches(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    return [
        (torch.randn(BATCH, 5, generator=generator), torch.randn(BATCH, 2, generator=generator))
        for _ in range(STEPS)
    ]


def train(model, parameters, batches):
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    for x, y in batches:
        optimizer.zero_grad()
        F.mse_loss(model(x), y).backward()
        optimizer.step()


def full_state(model):
    """Return the model's state with every sharded tensor gathered, on every rank."""
    from torch.distributed.tensor import DTensor

    state = {}
    for key, value in model.state_dict().items():
        state[key] = value.full_tensor() if isinstance(value, DTensor) else value
    return {key: value.detach().clone() for key, value in state.items()}


def join_group(rank, out_dir):
    """Join the two ranks through a TCPStore on 127.0.0.1.

    Rank 0 binds the store to port 0, so the system picks a free port with no
    window in which another process could take it, and writes the port to a
    file that rank 1 waits for.
    """
    port_file = out_dir / "store_port"
    if rank == 0:
        store = dist.TCPStore(
            "127.0.0.1", 0, WORLD_SIZE, is_master=True, timeout=GROUP_TIMEOUT, wait_for_workers=False
        )
        port_file.with_suffix(".tmp").write_text(str(store.port))
        port_file.with_suffix(".tmp").rename(port_file)
    else:
        deadline = time.monotonic() + GROUP_TIMEOUT.total_seconds()
        while not port_file.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"rank 0 did not write {port_file} in time")
            time.sleep(0.05)
        port = int(port_file.read_text())
        store = dist.TCPStore("127.0.0.1", port, WORLD_SIZE, is_master=False, timeout=GROUP_TIMEOUT)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=GROUP_TIMEOUT)


def train_ddp(rank):
    """Train a DDP-wrapped Net on this rank's batches; return its full state."""
    from torch.nn.parallel import DistributedDataParallel

    try:
        DistributedDataParallel(Net())
    except ter.NotBuiltError:
        pass
    else:
        raise AssertionError("DDP of a never-run model did not raise NotBuiltError")
    model = build_model()
    wrapped = DistributedDataParallel(model)
    train(wrapped, wrapped.parameters(), rank_batches(rank))
    return full_state(model)


def train_fsdp(rank):
    """Train a Net sharded with fully_shard on this rank's batches; return its full state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    mesh = init_device_mesh("cpu", (WORLD_SIZE,))
    try:
        fully_shard(Net(), mesh=mesh)
    except ter.NotBuiltError:
        pass
    else:
        raise AssertionError("fully_shard of a never-run model did not raise NotBuiltError")
    model = build_model()
    for block in (model.Block_0, model.Block_1):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if not all(isinstance(p, DTensor) for p in model.parameters()):
        raise AssertionError("fully_shard left a parameter unsharded")
    train(model, model.parameters(), rank_batches(rank))
    return full_state(model)


def worker(rank, mode, out_dir):
    # Keep gloo's own connections on the loopback interface as well.
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    # A rank that hangs prints its stack to stderr, which pytest shows.
    faulthandler.dump_traceback_later(SPAWN_TIMEOUT_S - 10, exit=True)
    out_dir = pathlib.Path(out_dir)
    join_group(rank, out_dir)
    try:
        state = train_ddp(rank) if mode == "ddp" else train_fsdp(rank)
        torch.save(state, out_dir / f"rank{rank}.pt")
        # Free the wrappers while the group exists and let both ranks finish
        # before either destroys it. Without these two steps a DDP rank now
        # and then hung at exit (torch 2.13, gloo).
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_ranks(mode, out_dir):
    """Run ``worker`` on two ranks; raise if one fails or they take too long."""
    context = mp.start_processes(
        worker,
        args=(mode, str(out_dir)),
        nprocs=WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{mode}: the ranks did not finish within {SPAWN_TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


def reference_state():
    """Train one process on both ranks' batches, each step on their union."""
    model = build_model()
    per_rank = [rank_batches(rank) for rank in range(WORLD_SIZE)]
    batches = [
        (torch.cat([steps[i][0] for steps in per_rank]), torch.cat([steps[i][1] for steps in per_rank]))
        for i in range(STEPS)
    ]
    train(model, model.parameters(), batches)
    return model.state_dict(), build_model().state_dict()


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_end_with_reference_parameters(mode, tmp_path):
    ranks = run_two_ranks(mode, tmp_path)
    expected, initial = reference_state()
    assert list(ranks[0]) == list(expected)
    for key in expected:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{mode}: ranks differ in {key}"
        assert torch.allclose(ranks[0][key], expected[key], atol=1e-6), f"{mode}: {key} differs from one process"
    changed = [key for key in expected if not torch.equal(ranks[0][key], initial[key])]
    assert changed == list(expected), f"{mode}: training left some parameters unchanged"
