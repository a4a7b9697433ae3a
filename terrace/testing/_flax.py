"""The backend adapter for Flax (linen on JAX)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import terrace
import terrace.flax
import terrace.port
from terrace.testing._adapter import BackendAdapter, BuiltModel, Loss

__all__ = ["FlaxAdapter"]

# JAX's platform name for each device name of the conformance suite.
_PLATFORMS = {"cpu": "cpu", "cuda": "gpu", "tpu": "tpu"}
# The 32-bit type that replaces each 64-bit type while JAX's x64 is off.
_NARROWED = {np.dtype(np.float64): np.float32, np.dtype(np.int64): np.int32, np.dtype(np.uint64): np.uint32}
# The device name of the conformance suite for each JAX platform name.
_DEVICE_NAMES = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "rocm": "cuda", "tpu": "tpu"}


class FlaxAdapter(BackendAdapter):
    """Runs neutral models with :func:`terrace.flax.build` on the CPU, a GPU or a TPU.

    The first call runs ``init`` for the weights and then ``apply`` for the
    output, so that in training mode it updates the batch statistics as
    torch's first pass does (``init`` alone leaves them at their initial
    values). Work runs on the adapter's device through
    ``jax.default_device``. Training uses ``optax.sgd`` under ``jax.jit``.
    """

    name = "flax"
    devices = ("cpu", "cuda", "tpu")
    known_gaps = {}

    @classmethod
    def device_unavailable_reason(cls, device: str) -> str | None:
        try:
            jax.devices(_PLATFORMS[device])
        except RuntimeError as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return f"no {device.upper()} device is visible to JAX ({first_line})"
        return None

    @property
    def jax_device(self) -> Any:
        """The first JAX device of this adapter's platform."""
        return jax.devices(_PLATFORMS[self.device])[0]

    def _next_key(self, built: BuiltModel) -> jax.Array:
        count = built.cache["calls"]
        built.cache["calls"] = count + 1
        return jax.random.fold_in(jax.random.key(built.cache["seed"]), count)

    @staticmethod
    def _mutable(built: BuiltModel, *extra: str) -> list[str] | bool:
        collections = list(extra)
        if built.train and "batch_stats" in built.variables:
            collections.append("batch_stats")
        return collections or False

    @staticmethod
    def _keep_updates(built: BuiltModel, updates: Any) -> None:
        collections = {key: value for key, value in dict(updates).items() if key != "intermediates"}
        built.variables = {**built.variables, **collections}

    # -- models ---------------------------------------------------------------

    def build(self, model: terrace.Model, *, train: bool = False, seed: int = 0) -> BuiltModel:
        built = BuiltModel(model, terrace.flax.build(model, train=train), train)
        built.cache["seed"] = seed
        built.cache["calls"] = 0
        return built

    def _ensure_variables(self, built: BuiltModel, inputs: tuple) -> None:
        if built.variables is None:
            key = jax.random.key(built.cache["seed"])
            params_key, dropout_key = jax.random.split(key)
            built.variables = built.module.init({"params": params_key, "dropout": dropout_key}, *inputs)

    def call(self, built: BuiltModel, *inputs: Any) -> Any:
        with jax.default_device(self.jax_device):
            self._ensure_variables(built, inputs)
            mutable = self._mutable(built)
            result = built.module.apply(
                built.variables, *inputs, rngs={"dropout": self._next_key(built)}, mutable=mutable
            )
        if not mutable:
            return result
        output, updates = result
        self._keep_updates(built, updates)
        return output

    def set_train(self, built: BuiltModel, train: bool) -> None:
        # clone(train=...) keeps the slot record of the first pass.
        built.module = built.module.clone(train=train)
        built.train = train
        built.cache.pop("compiled", None)

    def compiled_call(self, built: BuiltModel, *inputs: Any) -> Any:
        with jax.default_device(self.jax_device):
            self._ensure_variables(built, inputs)
            mutable = self._mutable(built)
            compiled = built.cache.get("compiled")
            if compiled is None:
                module = built.module

                def apply(variables: Any, key: jax.Array, *arrays: Any) -> Any:
                    return module.apply(variables, *arrays, rngs={"dropout": key}, mutable=mutable)

                compiled = built.cache["compiled"] = jax.jit(apply)
            result = compiled(built.variables, jax.random.key(built.cache["seed"]), *inputs)
        if not mutable:
            return result
        output, updates = result
        self._keep_updates(built, updates)
        return output

    def slot_outputs(self, built: BuiltModel, *inputs: Any) -> dict[str, list[Any]]:
        with jax.default_device(self.jax_device):
            _, state = built.module.apply(
                built.variables,
                *inputs,
                rngs={"dropout": jax.random.key(built.cache["seed"])},
                capture_intermediates=True,
                mutable=self._mutable(built, "intermediates"),
            )
        outputs: dict[str, list[Any]] = {}
        _collect_intermediates(state["intermediates"], (), outputs, self.to_numpy)
        return outputs

    def train_steps(
        self,
        built: BuiltModel,
        loss: Loss,
        inputs: Sequence[Any],
        target: Any,
        *,
        steps: int,
        learning_rate: float,
    ) -> list[float]:
        module = built.module
        mutable = self._mutable(built)
        optimizer = optax.sgd(learning_rate)

        def objective(params: Any, others: Any, key: jax.Array) -> tuple[jax.Array, Any]:
            result = module.apply({"params": params, **others}, *inputs, rngs={"dropout": key}, mutable=mutable)
            output, updates = result if mutable else (result, {})
            return loss(output, target), updates

        @jax.jit
        def step(params: Any, others: Any, opt_state: Any, key: jax.Array) -> tuple[Any, Any, Any, jax.Array]:
            (value, updates), grads = jax.value_and_grad(objective, has_aux=True)(params, others, key)
            changes, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, changes), {**others, **updates}, opt_state, value

        params = built.variables["params"]
        others = {key: value for key, value in built.variables.items() if key != "params"}
        key = jax.random.key(built.cache["seed"])
        losses = []
        with jax.default_device(self.jax_device):
            opt_state = optimizer.init(params)
            for _ in range(steps):
                params, others, opt_state, value = step(params, others, opt_state, key)
                losses.append(float(value))
        built.variables = {"params": params, **others}
        return losses

    # -- placement and data ---------------------------------------------------

    def asarray(self, value: Any, dtype: str | None = None) -> Any:
        array = np.asarray(value)
        if not jax.config.jax_enable_x64 and array.dtype in _NARROWED:
            # Without x64, JAX has no 64-bit types, so narrow them here, in
            # plain sight, rather than leave it to device_put.
            array = array.astype(_NARROWED[array.dtype])
        result = jax.device_put(array, self.jax_device)
        return result if dtype is None else result.astype(jnp.dtype(dtype))

    def to_numpy(self, value: Any) -> Any:
        if isinstance(value, jax.Array):
            if value.dtype == jnp.bfloat16:
                value = value.astype(jnp.float32)  # NumPy has no bfloat16
            return np.asarray(value)
        if isinstance(value, (tuple, list)):
            return type(value)(self.to_numpy(item) for item in value)
        if isinstance(value, dict):
            return {key: self.to_numpy(item) for key, item in value.items()}
        return value

    def float_dtypes(self) -> tuple[str, ...]:
        # The neutral layers make their weights in JAX's default float type,
        # which is float64 only while x64 is enabled, for the whole process.
        return ("float32", "float64") if jax.config.jax_enable_x64 else ("float32",)

    def place(self, built: BuiltModel, dtype: str) -> None:
        if dtype not in self.float_dtypes():
            raise ValueError(
                f"the flax adapter cannot make weights in {dtype}, because the neutral layers use JAX's "
                f"default float type ({', '.join(self.float_dtypes())} here). Fix: for float64, enable x64 "
                "with jax.config.update('jax_enable_x64', True) before anything runs."
            )

    def parameters(self, built: BuiltModel) -> dict[str, Any]:
        flat = jax.tree_util.tree_flatten_with_path(built.variables)[0]
        return {"/".join(str(getattr(part, "key", part)) for part in path): leaf for path, leaf in flat}

    def describe(self, array: Any) -> tuple[str, str]:
        platforms = {device.platform for device in array.devices()}
        device = _DEVICE_NAMES.get(platforms.pop(), "unknown") if len(platforms) == 1 else "several"
        return str(array.dtype), device

    # -- weights ----------------------------------------------------------------

    def save(self, built: BuiltModel, path: str | os.PathLike[str]) -> None:
        terrace.port.save(built.variables, path)

    def load(self, built: BuiltModel, path: str | os.PathLike[str], *example_inputs: Any) -> None:
        with jax.default_device(self.jax_device):
            variables = terrace.port.load(path, built.module, *example_inputs)
        built.variables = jax.device_put(variables, self.jax_device)

    def import_weights(
        self, built: BuiltModel, source: BackendAdapter, source_built: BuiltModel, *example_inputs: Any
    ) -> None:
        if source.backend_name == "torch":
            variables = terrace.port.torch_to_flax(source_built.module)
            built.variables = jax.device_put(variables, self.jax_device)
            return
        super().import_weights(built, source, source_built, *example_inputs)


def _collect_intermediates(tree: Any, path: tuple[str, ...], outputs: dict[str, list[Any]], convert: Any) -> None:
    """Flatten linen's ``intermediates`` collection to ``{dotted path: [output per call]}``."""
    for key, value in dict(tree).items():
        if key == "__call__":
            if path:
                outputs[".".join(path)] = [convert(item) for item in value]
        else:
            _collect_intermediates(value, (*path, key), outputs, convert)
