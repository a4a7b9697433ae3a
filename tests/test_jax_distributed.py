"""Two JAX processes on loopback run one data-parallel training step of a terrace model.

The test starts this file twice as a script, as process 0 and process 1. Each
process gets two simulated CPU devices, and ``jax.distributed.initialize``
joins them into one four-device mesh, with gloo carrying the collectives
between the processes. Each process feeds its half of the batch with
``jax.make_array_from_process_local_data``. The jitted step must give both
processes the loss and parameters that one process computes alone on the
whole batch.

If joining the processes fails (a jax build without CPU collectives, for
example), the workers print the error and the test skips with its text.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

LOCAL_DEVICES = 2
PROCESSES = 2
BATCH = 8
FEATURES = 4
# Seconds: jax.distributed.initialize gives up after INIT_TIMEOUT, and the
# test kills both workers after DEADLINE, so a hang cannot block the suite.
INIT_TIMEOUT = 20
DEADLINE = 50
# Exit status of a worker that could not join the processes.
UNSUPPORTED = 3
RESULT_PREFIX = "RESULT "
ERROR_PREFIX = "UNSUPPORTED "
# Float32 tolerance between the cross-process step and the one-process step:
# only the order of additions in the gradient's all-reduce differs.
ATOL = 1e-6


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_worker(process_id: int, port: int) -> int:
    """Join the other process, run the step, print a RESULT line; return the exit status."""
    import jax

    address = f"127.0.0.1:{port}"
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        # NOTE: the coordinator binds to loopback here, but gloo opens its
        # own connections on the address that this machine's hostname
        # resolves to (jax 0.10.2 has no setting for it).
        jax.distributed.initialize(
            coordinator_address=address,
            coordinator_bind_address=address,
            num_processes=PROCESSES,
            process_id=process_id,
            initialization_timeout=INIT_TIMEOUT,
            heartbeat_timeout_seconds=INIT_TIMEOUT,
            shutdown_timeout_seconds=INIT_TIMEOUT,
        )
        if jax.device_count() != PROCESSES * LOCAL_DEVICES:
            raise RuntimeError(
                f"expected {PROCESSES * LOCAL_DEVICES} devices in all, got {jax.device_count()}"
            )
    except Exception as error:  # noqa: BLE001 - reported to the test, which skips on it
        print(f"{ERROR_PREFIX}{type(error).__name__}: {error}", flush=True)
        return UNSUPPORTED

    result = data_parallel_step(process_id)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    jax.distributed.shutdown()
    return 0


def data_parallel_step(process_id: int) -> dict[str, Any]:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import terrace.flax as tflax

    class Mlp(tflax.Module):
        def forward(self, x: jax.Array) -> jax.Array:
            self.start_forward()
            hidden = nn.relu(self.make(tflax.LazyLinear, 8)(x))
            return self.make(tflax.LazyLinear, 1)(hidden)

    model = Mlp()
    optimizer = optax.sgd(0.1)

    def train_step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
        def loss_fn(p: Any) -> jax.Array:
            return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    # Both processes build the same whole batch, then keep their own half.
    rng = np.random.default_rng(0)
    x_all = rng.standard_normal((BATCH, FEATURES)).astype(np.float32)
    y_all = rng.standard_normal((BATCH, 1)).astype(np.float32)
    rows = slice(process_id * BATCH // PROCESSES, (process_id + 1) * BATCH // PROCESSES)

    # jax.devices() lists process 0's devices first, so the batch rows of a
    # process sit on its own devices.
    mesh = Mesh(np.array(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, P())
    by_rows = NamedSharding(mesh, P("data"))
    x = jax.make_array_from_process_local_data(by_rows, x_all[rows])
    y = jax.make_array_from_process_local_data(by_rows, y_all[rows])

    # The parameters are created replicated on all four devices of both processes.
    key = jax.random.key(0)
    init = jax.jit(model.init, out_shardings=replicated)
    params = init(key, np.zeros((1, FEATURES), np.float32))["params"]
    opt_state = jax.jit(optimizer.init, out_shardings=replicated)(params)
    step = jax.jit(train_step, out_shardings=(replicated, replicated, replicated))
    params, opt_state, loss = step(params, opt_state, x, y)

    # The same step on this process's first device alone, on the whole batch.
    with jax.default_device(jax.local_devices()[0]):
        local_params = model.init(key, np.zeros((1, FEATURES), np.float32))["params"]
        local_step = jax.jit(train_step)
        local_params, _, local_loss = local_step(
            local_params, optimizer.init(local_params), x_all, y_all
        )

    def local_copy(array: jax.Array) -> np.ndarray:
        return np.asarray(array.addressable_data(0))

    differences = jax.tree_util.tree_map(
        lambda a, b: float(np.max(np.abs(local_copy(a) - np.asarray(b)))), params, local_params
    )
    return {
        "process": process_id,
        "devices": jax.device_count(),
        "rows": x.shape[0],
        "loss": float(local_copy(loss)),
        "local_loss": float(local_loss),
        "max_param_difference": max(jax.tree_util.tree_leaves(differences)),
    }


def start_workers(port: int) -> list[subprocess.Popen[str]]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    env["JAX_PLATFORMS"] = "cpu"
    return [
        subprocess.Popen(
            [sys.executable, __file__, str(process_id), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for process_id in range(PROCESSES)
    ]


def collect(workers: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    """Wait for every worker until DEADLINE; kill all of them if one is still running."""
    finish_by = time.monotonic() + DEADLINE
    outcomes = []
    try:
        for worker in workers:
            output, _ = worker.communicate(timeout=max(1.0, finish_by - time.monotonic()))
            outcomes.append((worker.returncode, output))
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        outputs = [worker.communicate()[0] for worker in workers]
        pytest.fail(f"the workers did not finish in {DEADLINE} s; output:\n" + "\n".join(outputs))
    return outcomes


def lines_with(prefix: str, output: str) -> list[str]:
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


def test_two_processes_run_data_parallel_step() -> None:
    outcomes = collect(start_workers(free_port()))

    # A worker that crashed fails the test even when the other one, left
    # alone, reports that it could not join.
    for process_id, (status, output) in enumerate(outcomes):
        assert status in (0, UNSUPPORTED), f"process {process_id} exited with {status}:\n{output}"
    errors = [line for _, output in outcomes for line in lines_with(ERROR_PREFIX, output)]
    if errors:
        pytest.skip(f"jax.distributed on CPU is not available here: {errors[0]}")
    results = [json.loads(lines_with(RESULT_PREFIX, output)[0]) for _, output in outcomes]

    for process_id, result in enumerate(results):
        assert result["process"] == process_id
        assert result["devices"] == PROCESSES * LOCAL_DEVICES
        assert result["rows"] == BATCH
        assert result["loss"] == pytest.approx(result["local_loss"], abs=ATOL)
        assert result["max_param_difference"] <= ATOL
    assert results[0]["loss"] == results[1]["loss"]


if __name__ == "__main__":
    sys.exit(run_worker(int(sys.argv[1]), int(sys.argv[2])))
