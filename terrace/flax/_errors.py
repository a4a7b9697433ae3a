"""Errors of the Flax backend, and the translation of flax's errors into them.

Flax reports a missing RNG stream, an immutable collection or a parameter of
the wrong shape with the linen scope path of the innermost module. Terrace
catches these errors where a slot's submodule is called and raises a
:class:`~terrace.TerraceError` that names the slot and the fix instead. The
original error stays attached as ``__cause__``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any, Callable

import flax.errors as flax_errors
import flax.linen as nn

from terrace._errors import StateError, TerraceError

__all__ = [
    "TracedControlFlowError",
    "flax_errors_named_by_slot",
    "slot_path",
    "traced_control_flow_error",
]


class TracedControlFlowError(TerraceError):
    """``forward`` branched or looped on the value of a traced array.

    Under ``jax.jit``, ``jax.grad``, ``jax.vmap`` or a linen transform, arrays
    are abstract while ``forward`` runs, so ``if x.mean() > 0`` or
    ``range(int(x.max()))`` cannot be decided. In eager code the same pattern
    would make the slots depend on the data. The JAX error is the ``__cause__``.
    """


def traced_control_flow_error(owner: str, error: Exception) -> TracedControlFlowError:
    """Return the error that replaces JAX's concretization ``error`` in ``owner``'s forward."""
    text = str(error).strip()
    first_line = text.splitlines()[0].rstrip(".") if text else type(error).__name__
    return TracedControlFlowError(
        f"{owner}: forward (or a submodule it called) used the value of a traced array "
        f"in Python control flow, such as an `if`, a loop bound or int(): {first_line}. "
        "While JAX traces (jax.jit, grad, vmap, nn.scan, nn.remat, jax.eval_shape) the "
        "value is not known, and in eager code the same pattern makes the make() calls "
        "depend on the data, so a pass could reuse the wrong slot. Fix: make every "
        "submodule unconditionally and call each one, then choose between their results with "
        "jnp.where; give loops a length that does not depend on array values."
    )


def _terrace_owner(module: Any) -> str | None:
    # A terrace.flax.Module keeps its slot table in its instance dict; reading
    # vars() avoids linen's __getattr__, which would run setup() on other modules.
    table = vars(module).get("_terrace_table")
    return None if table is None else table.owner


def slot_path(module: nn.Module) -> str:
    """Return the dotted terrace name of a linen module, for error messages.

    A slot of a terrace module is named ``Owner.slot`` (``Net.LazyLinear_0``),
    and a module inside a slot adds its linen name (``Net.Block_0.Dense_0``).
    A module with no terrace module above it is named by its linen path under
    the class of the top module (``LazyMultiheadAttention/key``).
    """
    names: list[str] = []
    current: Any = module
    while isinstance(current, nn.Module):
        if current is not module:
            owner = _terrace_owner(current)
            if owner is not None:
                return ".".join([owner, *reversed(names)])
        if current.name is None:
            names.append(type(current).__name__)
            break
        names.append(current.name)
        current = current.parent
    return "/".join(reversed(names))


def _slot_of(module: nn.Module) -> str | None:
    """Return ``Owner.slot`` when ``module`` is a slot of a terrace module, else None."""
    parent = module.parent
    if not isinstance(parent, nn.Module) or module.name is None:
        return None
    owner = _terrace_owner(parent)
    return None if owner is None else f"{owner}.{module.name}"


def _flax_summary(error: Exception) -> str:
    text = str(error).strip()
    # flax appends a documentation link in parentheses; the message before it is enough.
    return text.split(" (https://", 1)[0].rstrip(".")


def _translate(error: flax_errors.FlaxError, slot: str) -> TerraceError | None:
    """Return the terrace error for a flax ``error`` raised inside ``slot``, or None to keep it."""
    summary = _flax_summary(error)
    if isinstance(error, flax_errors.ScopeParamShapeError):
        return StateError(
            f"slot {slot}: the variables do not fit this input ({summary}). The shapes were "
            "fixed by the input passed to init, and this input has other feature sizes. "
            "Fix: feed inputs with the feature sizes used at init, or run init again on an "
            "input of the new sizes."
        )
    if isinstance(
        error,
        (
            flax_errors.ScopeParamNotFoundError,
            flax_errors.ScopeCollectionNotFound,
            flax_errors.ScopeVariableNotFoundError,
        ),
    ):
        return StateError(
            f"slot {slot}: the variables passed to apply have no entry for this slot "
            f"({summary}). Fix: pass the whole dict that init returned for this model "
            "(every collection, not only 'params'), and make sure the input given to init "
            "reaches this slot; a slot that the init pass skipped has no variables."
        )
    if isinstance(error, flax_errors.ModifyScopeVariableError):
        return TerraceError(
            f"slot {slot}: {summary}. The layer updates this collection in training mode. "
            "Fix: pass the collection as mutable and keep the update, as in "
            "`y, updates = model.apply(variables, x, mutable=['batch_stats'])`; or run the "
            "model in evaluation mode, built with `model.clone(train=False)`."
        )
    if isinstance(error, flax_errors.InvalidRngError):
        return TerraceError(
            f"slot {slot}: {summary}. Fix: pass the random key stream, as in "
            "`model.apply(variables, x, rngs={'dropout': key})` or "
            "`model.init({'params': key1, 'dropout': key2}, x)`; or run the model in "
            "evaluation mode, built with `model.clone(train=False)`."
        )
    return None


def _name_flax_errors(
    next_fun: Callable[..., Any], args: tuple, kwargs: dict, context: nn.module.InterceptorContext
) -> Any:
    try:
        return next_fun(*args, **kwargs)
    except flax_errors.FlaxError as error:
        slot = _slot_of(context.module)
        translated = None if slot is None else _translate(error, slot)
        if translated is None:
            raise
        raise translated from error


_INTERCEPTING: ContextVar[bool] = ContextVar("terrace_flax_intercepting", default=False)


@contextlib.contextmanager
def flax_errors_named_by_slot() -> Iterator[None]:
    """Translate flax errors raised inside slots while the ``with`` block runs.

    Only the outermost terrace module installs the linen method interceptor,
    and nested modules use that one.
    """
    if _INTERCEPTING.get():
        yield
        return
    token = _INTERCEPTING.set(True)
    try:
        with nn.intercept_methods(_name_flax_errors):
            yield
    finally:
        _INTERCEPTING.reset(token)
