"""Flax: a ``terrace.flax.Module`` against the same network as a linen module.

The baseline is a hand-written linen ``@nn.compact`` module that calls the
same layer classes inline, so linen gives its submodules the same names
(``LazyLinear_0``, ...) as terrace gives its slots, and the two variable
trees are identical. The optimized HLO of the jitted ``apply`` of both is
compared as text, with names, metadata and source locations removed. Equal
text means that terrace adds nothing to the compiled program. For the MLP, a
second comparison is against the network written with linen's ``nn.Dense``.
The block has no such comparison: terrace's ``LazyMultiheadAttention`` keeps
torch's parameters (one packed input projection), which linen's attention
layer does not have.

Timed, interleaved: the jitted ``apply``, trace plus compile of the jitted
``apply`` (``jax.clear_caches()`` before each), and the un-jitted ``apply``.

    python benchmarks/flax_backend.py [--quick] [--repeats N] [--diff-dir DIR]
"""

from __future__ import annotations

import difflib
import os
import re
import time
from collections.abc import Callable
from typing import Any

import _harness as h

MLP_WIDTH = 64
MLP_DEPTH = 8
MLP_BATCH = 4
BLOCK_WIDTH = 256
BLOCK_HEADS = 8
BLOCK_HIDDEN = 4 * BLOCK_WIDTH
BLOCK_BATCH = 32
BLOCK_SEQUENCE = 128

DESCRIPTIONS = {
    "MLP": f"MLP {MLP_DEPTH}x{MLP_WIDTH}, batch {MLP_BATCH}",
    "block": f"transformer block, {BLOCK_BATCH}x{BLOCK_SEQUENCE}x{BLOCK_WIDTH}",
}
CALLS = {
    ("MLP", "jit"): 2000,
    ("MLP", "eager"): 20,
    ("block", "jit"): 5,
    ("block", "eager"): 3,
}
RUN_TARGET = 1.01
COMPILE_TARGET = 1.10
EAGER_TARGET = 1.10


def define_networks() -> dict[str, dict[str, Any]]:
    """Return, per network, the terrace model, the linen baseline and, for the MLP, the linen-layers model.

    Defined in a function so that importing this file does not need jax.
    """
    import flax.linen as nn

    import terrace.flax as tflax

    class TerraceMLP(tflax.Module):
        def forward(self, x):
            self.start_forward()
            for index in range(MLP_DEPTH):
                x = self.make(tflax.LazyLinear, MLP_WIDTH)(x)
                if index < MLP_DEPTH - 1:
                    x = nn.relu(x)
            return x

    class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for index in range(MLP_DEPTH):
                x = tflax.LazyLinear(MLP_WIDTH)(x)
                if index < MLP_DEPTH - 1:
                    x = nn.relu(x)
            return x

    class LinenLayersMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            for index in range(MLP_DEPTH):
                x = nn.Dense(MLP_WIDTH, name=f"LazyLinear_{index}")(x)
                if index < MLP_DEPTH - 1:
                    x = nn.relu(x)
            return x

    class TerraceBlock(tflax.Module):
        def forward(self, x):
            self.start_forward()
            h = self.make(tflax.LazyLayerNorm)(x)
            attention = self.make(tflax.LazyMultiheadAttention, BLOCK_HEADS, batch_first=True)
            x = x + attention(h, h, h, need_weights=False)[0]
            h = self.make(tflax.LazyLayerNorm)(x)
            h = nn.gelu(self.make(tflax.LazyLinear, BLOCK_HIDDEN)(h))
            return x + self.make(tflax.LazyLinear, BLOCK_WIDTH)(h)

    class LinenBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = tflax.LazyLayerNorm()(x)
            attention = tflax.LazyMultiheadAttention(BLOCK_HEADS, batch_first=True)
            x = x + attention(h, h, h, need_weights=False)[0]
            h = tflax.LazyLayerNorm()(x)
            h = nn.gelu(tflax.LazyLinear(BLOCK_HIDDEN)(h))
            return x + tflax.LazyLinear(BLOCK_WIDTH)(h)

    return {
        "MLP": {"terrace": TerraceMLP, "linen": LinenMLP, "linen layers": LinenLayersMLP},
        "block": {"terrace": TerraceBlock, "linen": LinenBlock},
    }


def example_input(network: str) -> Any:
    import jax

    key = jax.random.key(1)
    if network == "MLP":
        return jax.random.normal(key, (MLP_BATCH, MLP_WIDTH))
    return jax.random.normal(key, (BLOCK_BATCH, BLOCK_SEQUENCE, BLOCK_WIDTH))


def shared_variables(models: dict[str, Any], x: Any) -> dict[str, Any]:
    """Initialise every model and give them all the terrace model's values.

    Raises ValueError if the variable trees differ in structure or shapes.
    """
    import jax

    variables = {name: model.init(jax.random.key(0), x) for name, model in models.items()}
    source = variables["terrace"]
    source_paths = [(path, leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]]
    for name, tree in variables.items():
        paths = [(path, leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]
        if paths != source_paths:
            raise ValueError(f"the variables of {name} differ from terrace's: {paths} and {source_paths}")
        variables[name] = source
    return variables


# -- HLO comparison -----------------------------------------------------------

_METADATA = re.compile(r",? metadata=\{[^{}]*\}")
_IDENTIFIER = re.compile(r"%[\w.\-]+")
_SIGNATURE_NAMES = re.compile(r"(?<=[(,] )[\w.\-]+: |(?<=\()[\w.\-]+: ")
_COMPUTATION = re.compile(r"^(ENTRY )?%[\w.\-]+ \(")


def normalise_hlo(text: str) -> list[str]:
    """Return the computations of an HLO module with names and metadata removed.

    Kept: every instruction's opcode, shape, layout, operands (by position of
    definition), attributes and backend config, and the computation each
    fusion calls. Removed: the module name, instruction and computation
    names (renamed ``%0``, ``%1``, ... in order of appearance), parameter
    names in signatures, ``metadata={...}`` and the source-location tables.
    """
    lines = []
    inside = False
    for line in text.splitlines():
        if _COMPUTATION.match(line):
            inside = True
        if inside and line.strip():
            lines.append(line)
        if line == "}":
            inside = False
    names: dict[str, str] = {}

    def rename(match: re.Match[str]) -> str:
        return names.setdefault(match.group(0), f"%{len(names)}")

    result = []
    for line in lines:
        line = _METADATA.sub("", line)
        if _COMPUTATION.match(line):
            line = _SIGNATURE_NAMES.sub("", line)
        result.append(_IDENTIFIER.sub(rename, line))
    return result


def optimized_hlo(model: Any, variables: Any, x: Any) -> list[str]:
    import jax

    return normalise_hlo(jax.jit(model.apply).lower(variables, x).compile().as_text())


def compare_hlo(label: str, ours: list[str], theirs: list[str], diff_path: str | None) -> h.Row:
    """Return a row saying whether two normalised HLO texts are equal, with a short diff if not."""
    if ours == theirs:
        return h.Row(label, "", text=f"equal ({len(ours)} lines)")
    diff = list(difflib.unified_diff(theirs, ours, "linen", "terrace", n=0, lineterm=""))
    changed = sum(1 for line in diff if line[:1] in "+-" and line[:3] not in ("+++", "---"))
    if diff_path is not None:
        with open(diff_path, "w", encoding="utf-8") as file:
            file.write("\n".join(diff) + "\n")
    short = [line if len(line) <= 160 else line[:157] + "..." for line in diff[2:14]]
    return h.Row(label, "", text=f"not equal ({changed} of {len(ours)} lines differ)", detail="\n".join(short))


# -- timing ---------------------------------------------------------------------


def compile_seconds(model: Any, variables: Any, x: Any) -> float:
    """Return the wall time to trace, lower and compile ``jax.jit(model.apply)`` from empty caches."""
    import jax

    jax.clear_caches()
    start = time.perf_counter()
    jax.jit(model.apply).lower(variables, x).compile()
    return time.perf_counter() - start


def measure(network: str, classes: dict[str, Any], repeats: int, calls_scale: float, diff_dir: str | None) -> list[h.Row]:
    import jax
    import numpy as np

    label = f"flax, {DESCRIPTIONS[network]}"
    x = example_input(network)
    models = {name: cls() for name, cls in classes.items()}
    variables = shared_variables(models, x)
    jitted = {name: jax.jit(model.apply) for name, model in models.items()}
    outputs = {name: np.asarray(jitted[name](variables[name], x)) for name in models}
    for name, output in outputs.items():
        np.testing.assert_allclose(output, outputs["linen"], rtol=1e-4, atol=1e-4, err_msg=f"{name} {network} output differs from linen")

    rows = []
    hlo = {name: optimized_hlo(model, variables[name], x) for name, model in models.items()}
    for name in [n for n in models if n != "terrace"]:
        diff_path = None if diff_dir is None else os.path.join(diff_dir, f"hlo_{network}_{name.replace(' ', '_')}.diff")
        row = compare_hlo(label, hlo["terrace"], hlo[name], diff_path)
        row.measurement = f"optimized HLO, terrace vs {name}"
        if name == "linen":
            row.target = "equal"
            row.met = row.text.startswith("equal")
        rows.append(row)
    if "linen layers" not in models:
        reason = "not compared: no linen layer has torch's attention parameters"
        rows.append(h.Row(label, "optimized HLO, terrace vs linen layers", text=reason))

    def jit_step(name: str) -> Callable[[], None]:
        return lambda: jitted[name](variables[name], x).block_until_ready()

    def eager_step(name: str) -> Callable[[], None]:
        model = models[name]
        return lambda: jax.block_until_ready(model.apply(variables[name], x))

    pair = ["terrace", "linen"]
    calls = max(1, int(CALLS[network, "jit"] * calls_scale))
    jit_times = h.interleave({name: jit_step(name) for name in pair}, repeats, calls, warmup=max(3, calls // 10))
    compile_times: dict[str, list[float]] = {name: [] for name in pair}
    compile_seconds(models["linen"], variables["linen"], x)  # untimed: first-use setup
    for repeat in range(max(1, repeats // 3)):
        for name in pair[repeat % 2:] + pair[:repeat % 2]:
            compile_times[name].append(compile_seconds(models[name], variables[name], x))
    # The trace caches were cleared above; rebuild the op-by-op caches untimed.
    eager_calls = max(1, int(CALLS[network, "eager"] * calls_scale))
    eager_times = h.interleave({name: eager_step(name) for name in pair}, repeats, eager_calls, warmup=2)

    rows += [
        h.Row(label, "linen jitted apply, ms per call", h.scaled(jit_times["linen"], 1e3)),
        h.at_most(h.Row(label, "terrace / linen, jitted apply", h.ratios(jit_times["terrace"], jit_times["linen"])), RUN_TARGET),
        h.Row(label, "linen trace+compile, s", compile_times["linen"]),
        h.at_most(h.Row(label, "terrace / linen, trace+compile", h.ratios(compile_times["terrace"], compile_times["linen"])), COMPILE_TARGET),
        h.Row(label, "linen un-jitted apply, ms per call", h.scaled(eager_times["linen"], 1e3)),
        h.at_most(h.Row(label, "terrace / linen, un-jitted apply", h.ratios(eager_times["terrace"], eager_times["linen"])), EAGER_TARGET),
    ]
    return rows


def run(quick: bool, repeats: int | None = None, diff_dir: str | None = None) -> list[h.Row]:
    try:
        networks = define_networks()
    except (ImportError, AttributeError) as error:
        # AttributeError: terrace/flax/ exists but does not export the names yet.
        reason = f"skipped: terrace.flax is not usable ({type(error).__name__}: {error})"
        return [h.Row("flax", "all measurements", text=reason)]
    repeats = repeats or (3 if quick else 15)
    names = ["MLP"] if quick else ["MLP", "block"]
    rows = []
    for network in names:
        rows += measure(network, networks[network], repeats, 0.1 if quick else 1.0, diff_dir)
    return rows


def main() -> None:
    def options(parser: Any) -> None:
        parser.add_argument("--repeats", type=int, help="interleaved repeats (default 15, 3 with --quick)")
        parser.add_argument("--diff-dir", help="write the full HLO diffs to this folder")

    args = h.parse_args(__doc__.splitlines()[0], options)
    h.report(run(args.quick, args.repeats, args.diff_dir), args.json_out)


if __name__ == "__main__":
    main()
