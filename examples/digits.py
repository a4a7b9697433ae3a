"""Train a digit classifier on one backend, port it, and check it on the other.

The model is a backend-neutral ``terrace.Model``: a small convolutional
network written once, in ``forward``, with ``terrace.layers`` and
``terrace.ops``. The data are scikit-learn's bundled handwritten digits
(1,797 images of 8x8 pixels, shipped inside the package).

The run:

1. trains on the chosen backend (PyTorch by default) and reports test accuracy;
2. ports the weights to the other backend with ``terrace.port`` and compares
   the test logits of both, in evaluation mode;
3. continues training for a few steps on the other backend;
4. saves a portable checkpoint with ``terrace.save``, reloads it on both
   backends with ``terrace.load`` and compares their logits again;
5. writes a plot of the loss and accuracy curves and a JSON summary to ``--out``.

Usage::

    python examples/digits.py [--backend {torch,flax}] [--epochs N] [--seed N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import terrace
from terrace import layers, ops

BACKENDS = ("torch", "flax")
DEFAULT_EPOCHS = 12
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
# Steps of continued training on the second backend, at a lower rate.
CONTINUED_STEPS = 20
CONTINUED_LEARNING_RATE = 1e-3
TEST_FRACTION = 0.25
CLASSES = 10
# Label smoothing bounds the logits: at 0.1 the loss is lowest at a logit gap
# of log(0.91 / 0.01), about 4.5. Float32 rounding differences between the
# backends grow with the size of the logits.
LABEL_SMOOTHING = 0.1


class DigitsCNN(terrace.Model):
    """Two convolution blocks and a linear classifier for (N, 1, 8, 8) images."""

    def __init__(self, channels: int = 16, classes: int = CLASSES, dropout: float = 0.2):
        self.channels = channels
        self.classes = classes
        self.dropout = dropout

    def forward(self, images):
        self.start_forward()
        h = self.make(layers.Conv2d, self.channels, 3, padding=1)(images)
        h = ops.relu(self.make(layers.BatchNorm2d)(h))
        # Stride 2 halves the 8x8 map to 4x4.
        h = self.make(layers.Conv2d, 2 * self.channels, 3, stride=2, padding=1)(h)
        h = ops.relu(self.make(layers.BatchNorm2d)(h))
        xp = ops.namespace(h)
        h = xp.reshape(h, (h.shape[0], -1))
        h = self.make(layers.Dropout, self.dropout)(h)
        return self.make(layers.Linear, self.classes)(h)


def cross_entropy(logits, labels, smoothing: float = LABEL_SMOOTHING):
    """Return the mean cross-entropy of integer ``labels`` with label smoothing.

    It uses only ``terrace.ops`` and the array API, so it runs on either
    backend. It equals ``torch.nn.functional.cross_entropy(logits, labels,
    label_smoothing=smoothing)``.
    """
    xp = ops.namespace(logits)
    classes = logits.shape[-1]
    log_probs = ops.log_softmax(logits, axis=-1)
    # NOTE: on torch, xp.arange makes the class indices on the CPU, so CUDA
    # logits would fail here. The demo keeps the torch model on the CPU.
    one_hot = xp.astype(labels[:, None] == xp.arange(classes), log_probs.dtype)
    targets = (1.0 - smoothing) * one_hot + smoothing / classes
    return -xp.mean(xp.sum(log_probs * targets, axis=-1))


# -- command line ------------------------------------------------------------------


def positive_int(text: str) -> int:
    """Parse a positive integer for argparse, or raise ``ArgumentTypeError``."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """Parse a seed for argparse: scikit-learn's ``random_state`` takes 0 to 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 0 or value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a terrace CNN on scikit-learn's digits on one backend, port it to "
        "the other, continue training there, and check a portable checkpoint on both."
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="backend to train on first, before the weights are ported to the other one (default: torch)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=DEFAULT_EPOCHS,
        help=f"training epochs on the first backend (default: {DEFAULT_EPOCHS})",
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the data split, shuffling, initialisation and dropout (default: 0)",
    )
    parser.add_argument(
        "--out",
        type=pathlib.Path,
        default=pathlib.Path("out"),
        help="folder for the plot, the JSON summary and the checkpoint (default: out/)",
    )
    args = parser.parse_args(argv)
    check_out_folder(parser.error, args.out)
    return args


# -- data --------------------------------------------------------------------------


@dataclass
class Digits:
    """The digits split into training and test sets, with float32 (N, 1, 8, 8) images in [0, 1]."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits(seed: int) -> Digits:
    """Load scikit-learn's digits and split off a stratified test set."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    data = sklearn_digits()
    # Pixel values are integers from 0 to 16.
    images = (data.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = data.target.astype(np.int64)
    train_images, test_images, train_labels, test_labels = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    return Digits(train_images, train_labels, test_images, test_labels)


def batches(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """Yield shuffled full batches, dropping the last partial batch of the epoch."""
    order = rng.permutation(len(images))
    for start in range(0, len(order) - BATCH_SIZE + 1, BATCH_SIZE):
        index = order[start : start + BATCH_SIZE]
        yield images[index], labels[index]


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


# -- backends ----------------------------------------------------------------------
#
# Each runner wraps one built model and offers the same steps: make the slots,
# take optimizer steps, compute evaluation-mode logits, receive ported weights,
# and hand over what terrace.port and terrace.save accept.


class TorchRunner:
    """The model built as a ``torch.nn.Module``."""

    name = "torch"

    def __init__(self, seed: int):
        import torch

        self.torch = torch
        # The model is tiny (about 10,000 parameters, batches of 64 images),
        # so extra intra-op threads cost more in synchronisation than they
        # save. On a 2-core machine that other jobs kept busy, a training
        # step took 5 ms with one thread and 200 ms with two.
        torch.set_num_threads(1)
        torch.manual_seed(seed)
        self.module = terrace.torch.build(DigitsCNN())
        self.optimizer = None

    def initialize(self, example: np.ndarray) -> None:
        """Run one pass so that every slot makes its weights."""
        self.logits(example)

    def receive(self, variables: dict[str, Any]) -> None:
        """Load Flax variables, which the model's slots take when they are made."""
        terrace.port.flax_to_torch(variables, self.module)

    def load_checkpoint(self, path: pathlib.Path) -> None:
        """Replace the model with a fresh build that takes its weights from ``path``."""
        self.module = terrace.load(path, terrace.torch.build(DigitsCNN()))
        self.optimizer = None

    def portable(self) -> Any:
        """Return what ``terrace.port.torch_to_flax`` and ``terrace.save`` take: the module."""
        return self.module

    def set_learning_rate(self, learning_rate: float) -> None:
        """Start a new Adam optimizer. The model must have made its slots."""
        self.optimizer = self.torch.optim.Adam(self.module.parameters(), lr=learning_rate)

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> float:
        torch = self.torch
        self.module.train()
        loss = cross_entropy(self.module(torch.from_numpy(images)), torch.from_numpy(labels))
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def logits(self, images: np.ndarray) -> np.ndarray:
        self.module.eval()
        with self.torch.no_grad():
            return self.module(self.torch.from_numpy(images)).numpy()


class FlaxRunner:
    """The model built as a ``flax.linen.Module``, trained with optax.

    NOTE: the logit comparisons were checked with JAX on the CPU only. On a
    GPU, JAX may run float32 convolutions at reduced precision (docs/flax.md).
    """

    name = "flax"

    def __init__(self, seed: int):
        import jax

        self.jax = jax
        self.model = terrace.flax.build(DigitsCNN())
        self.eval_model = self.model.clone(train=False)
        self.key = jax.random.key(seed)
        self.variables: dict[str, Any] | None = None
        self._predict = jax.jit(self.eval_model.apply)
        self._step = None
        self.opt_state = None

    def _next_key(self):
        self.key, key = self.jax.random.split(self.key)
        return key

    def initialize(self, example: np.ndarray) -> None:
        """Create the variables with ``init`` in training mode, which needs a dropout key."""
        rngs = {"params": self._next_key(), "dropout": self._next_key()}
        self.variables = dict(self.model.init(rngs, example))

    def receive(self, module: Any) -> None:
        """Take the weights of a torch model that has made its slots."""
        self.variables = dict(terrace.port.torch_to_flax(module))

    def load_checkpoint(self, path: pathlib.Path) -> None:
        """Replace the variables with those read from ``path``, checked against ``init`` shapes."""
        example = np.zeros((1, 1, 8, 8), np.float32)
        self.variables = dict(terrace.load(path, self.model, example))
        self._step = None

    def portable(self) -> dict[str, Any]:
        """Return what ``terrace.port.flax_to_torch`` and ``terrace.save`` take: the variables."""
        return self.variables

    def set_learning_rate(self, learning_rate: float) -> None:
        """Start a new Adam optimizer and compile the training step for it."""
        import optax

        optimizer = optax.adam(learning_rate)
        self.opt_state = optimizer.init(self.variables["params"])
        model = self.model
        jax = self.jax

        def step(params, batch_stats, opt_state, images, labels, dropout_key):
            def loss_of(params):
                logits, updates = model.apply(
                    {"params": params, "batch_stats": batch_stats},
                    images,
                    mutable=["batch_stats"],
                    rngs={"dropout": dropout_key},
                )
                return cross_entropy(logits, labels), updates["batch_stats"]

            (loss, batch_stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), batch_stats, opt_state, loss

        self._step = jax.jit(step)

    def train_step(self, images: np.ndarray, labels: np.ndarray) -> float:
        params, batch_stats, self.opt_state, loss = self._step(
            self.variables["params"],
            self.variables["batch_stats"],
            self.opt_state,
            images,
            labels,
            self._next_key(),
        )
        self.variables = {"params": params, "batch_stats": batch_stats}
        return float(loss)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self._predict(self.variables, images))


RUNNERS = {"torch": TorchRunner, "flax": FlaxRunner}


# -- the run -------------------------------------------------------------------------


@dataclass
class History:
    """Training loss per optimizer step and test accuracy at step counts, for the plot.

    Steps are counted across both backends: the continued training on the
    second backend goes on from the last step on the first. The second
    backend's accuracies start with the one measured right after the port.
    """

    losses: list[float] = field(default_factory=list)
    accuracy_steps: list[int] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    continued_losses: list[float] = field(default_factory=list)
    continued_accuracy_steps: list[int] = field(default_factory=list)
    continued_accuracies: list[float] = field(default_factory=list)

    @property
    def step(self) -> int:
        return len(self.losses) + len(self.continued_losses)


def train(runner: Any, digits: Digits, epochs: int, rng: np.random.Generator, history: History) -> None:
    """Train ``runner`` for ``epochs`` epochs, measuring test accuracy after each."""
    from tqdm import tqdm

    runner.set_learning_rate(LEARNING_RATE)
    progress = tqdm(range(1, epochs + 1), desc=f"training on {runner.name}", unit="epoch")
    for _ in progress:
        epoch_losses = []
        for x, y in batches(digits.train_images, digits.train_labels, rng):
            epoch_losses.append(runner.train_step(x, y))
        history.losses.extend(epoch_losses)
        test_accuracy = accuracy(runner.logits(digits.test_images), digits.test_labels)
        history.accuracy_steps.append(history.step)
        history.accuracies.append(test_accuracy)
        progress.set_postfix(loss=f"{np.mean(epoch_losses):.4f}", test_acc=f"{test_accuracy:.4f}")


def continue_training(runner: Any, digits: Digits, rng: np.random.Generator, history: History) -> None:
    """Take ``CONTINUED_STEPS`` optimizer steps, measuring test accuracy after each."""
    runner.set_learning_rate(CONTINUED_LEARNING_RATE)
    while len(history.continued_losses) < CONTINUED_STEPS:
        for x, y in batches(digits.train_images, digits.train_labels, rng):
            history.continued_losses.append(runner.train_step(x, y))
            history.continued_accuracy_steps.append(history.step)
            test_accuracy = accuracy(runner.logits(digits.test_images), digits.test_labels)
            history.continued_accuracies.append(test_accuracy)
            if len(history.continued_losses) == CONTINUED_STEPS:
                break


def write_plot(path: pathlib.Path, history: History, first: str, second: str) -> None:
    """Plot training loss and test accuracy against the optimizer step, one colour per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    first_steps = np.arange(1, len(history.losses) + 1)
    continued_steps = np.arange(len(history.losses) + 1, history.step + 1)
    loss_axes.plot(first_steps, history.losses, linewidth=1, label=f"training on {first}")
    loss_axes.plot(continued_steps, history.continued_losses, linewidth=1, label=f"continued on {second}")
    loss_axes.set_xlabel("optimizer step")
    loss_axes.set_ylabel(f"training loss (label smoothing {LABEL_SMOOTHING})")
    loss_axes.legend()

    accuracy_axes.plot(
        history.accuracy_steps,
        history.accuracies,
        marker="o",
        label=f"{first}, after each epoch",
    )
    accuracy_axes.plot(
        history.continued_accuracy_steps,
        history.continued_accuracies,
        marker=".",
        label=f"{second}, after the port and each step",
    )
    accuracy_axes.set_xlabel("optimizer step")
    accuracy_axes.set_ylabel("test accuracy")
    lowest = min(history.accuracies + history.continued_accuracies)
    accuracy_axes.set_ylim(min(0.9, lowest - 0.01), 1.0)
    accuracy_axes.legend(loc="lower right")
    figure.suptitle(f"DigitsCNN on scikit-learn's digits: trained on {first}, ported to {second}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def check_out_folder(parser_error: Any, folder: pathlib.Path) -> None:
    """Create ``folder``, or report through ``parser_error`` why it cannot be used."""
    if folder.exists() and not folder.is_dir():
        parser_error(f"argument --out: {str(folder)!r} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        parser_error(f"argument --out: cannot create folder {str(folder)!r}: {error.strerror or error}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    start_time = time.perf_counter()
    args = parse_args(argv)
    first_name = args.backend
    second_name = next(name for name in BACKENDS if name != first_name)
    plot_path = args.out / "digits.png"
    summary_path = args.out / "digits.json"
    checkpoint_path = args.out / "digits.safetensors"

    digits = load_digits(args.seed)
    rng = np.random.default_rng(args.seed)
    print(
        f"digits: {len(digits.train_labels)} training and {len(digits.test_labels)} test images "
        f"of 8x8 pixels, seed {args.seed}"
    )

    # 1. Train on the first backend.
    first = RUNNERS[first_name](args.seed)
    first.initialize(digits.train_images[:BATCH_SIZE])
    history = History()
    train(first, digits, args.epochs, rng, history)
    first_logits = first.logits(digits.test_images)
    accuracies = {"trained": accuracy(first_logits, digits.test_labels)}
    unit = "epoch" if args.epochs == 1 else "epochs"
    print(f"{first_name} test accuracy after {args.epochs} {unit}: {accuracies['trained']:.4f}")

    # 2. Port the weights and evaluate on the second backend; both in evaluation mode.
    second = RUNNERS[second_name](args.seed)
    second.receive(first.portable())
    second_logits = second.logits(digits.test_images)
    accuracies["ported"] = accuracy(second_logits, digits.test_labels)
    port_diff = max_abs_diff(first_logits, second_logits)
    history.continued_accuracy_steps.append(history.step)
    history.continued_accuracies.append(accuracies["ported"])
    print(f"{second_name} test accuracy after porting: {accuracies['ported']:.4f}")
    print(
        f"max abs difference of the test logits, {first_name} vs {second_name}: {port_diff:.2e} "
        f"(max abs logit {np.max(np.abs(first_logits)):.2f})"
    )

    # 3. Continue training on the second backend.
    continue_training(second, digits, rng, history)
    continued_logits = second.logits(digits.test_images)
    accuracies["continued"] = accuracy(continued_logits, digits.test_labels)
    print(f"{second_name} test accuracy after {CONTINUED_STEPS} more steps: {accuracies['continued']:.4f}")

    # 4. Save a portable checkpoint and reload it into fresh builds on both backends.
    terrace.save(second.portable(), checkpoint_path)
    reloaded = {}
    for name in BACKENDS:
        runner = RUNNERS[name](args.seed)
        runner.load_checkpoint(checkpoint_path)
        reloaded[name] = runner.logits(digits.test_images)
        accuracies[f"reloaded_{name}"] = accuracy(reloaded[name], digits.test_labels)
    reload_diff = max_abs_diff(reloaded["torch"], reloaded["flax"])
    saved_diffs = {name: max_abs_diff(reloaded[name], continued_logits) for name in BACKENDS}
    print(
        f"reloaded {checkpoint_path}: torch test accuracy {accuracies['reloaded_torch']:.4f}, "
        f"flax {accuracies['reloaded_flax']:.4f}"
    )
    print(f"max abs difference of the test logits, reloaded torch vs reloaded flax: {reload_diff:.2e}")
    print(
        f"max abs difference of the test logits, reloaded vs saved {second_name} model: "
        f"torch {saved_diffs['torch']:.2e}, flax {saved_diffs['flax']:.2e}"
    )

    # 5. Plot and summary.
    write_plot(plot_path, history, first_name, second_name)
    wall_time = time.perf_counter() - start_time
    summary = {
        "trained_on": first_name,
        "ported_to": second_name,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": BATCH_SIZE,
        "continued_steps": CONTINUED_STEPS,
        "train_size": int(len(digits.train_labels)),
        "test_size": int(len(digits.test_labels)),
        "accuracy": accuracies,
        "accuracy_per_backend": {
            first_name: accuracies["trained"],
            second_name: accuracies["continued"],
        },
        "max_abs_logit_diff": {
            "after_port": port_diff,
            "after_reload": reload_diff,
            "reload_vs_saved": saved_diffs,
        },
        "max_abs_test_logit": float(np.max(np.abs(first_logits))),
        "wall_time_s": round(wall_time, 2),
        "paths": {
            "plot": str(plot_path),
            "summary": str(summary_path),
            "checkpoint": str(checkpoint_path),
        },
    }
    summary_path.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {plot_path}, {summary_path} and {checkpoint_path}; wall time {wall_time:.1f} s")
    return summary


if __name__ == "__main__":
    main()
