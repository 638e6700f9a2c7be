"""--plot: the loss and its gradient (from torch autograd) as one input value moves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xentlib.cli import CLIError
from xentlib.cli._shared import save_figure
from xentlib.cli.explain.checks import FUNCTION_NAMES, torch_loss
from xentlib.cli.explain.problem import Problem
from xentlib.cli.explain.steps import Explanation


def index_name(problem: Problem, index: tuple[int, ...]) -> str:
    name = "input" if problem.op in ("linear", "bce", "nll_loss") else "logits"
    return f"{name}[{', '.join(str(i) for i in index)}]"


def write_plot(problem: Problem, index: tuple[int, ...], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    base = torch.from_numpy(problem.logits.copy())
    current = float(base[index])
    if problem.op == "bce":
        values = np.linspace(1e-3, 1 - 1e-3, 400)
    else:
        values = np.linspace(current - 8, current + 8, 401)
    losses, grads = [], []
    for value in values:
        x = base.clone()
        x[index] = value
        x.requires_grad_(True)
        loss = torch_loss(problem, x).sum()
        (grad,) = torch.autograd.grad(loss, x)
        losses.append(loss.item())
        grads.append(float(grad[index]))
    where = index_name(problem, index)
    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    top.plot(values, losses, color="tab:blue")
    top.set_ylabel(f"loss ({problem.reduction})")
    top.set_title(f"{FUNCTION_NAMES[problem.op]} as {where} varies")
    bottom.plot(values, grads, color="tab:orange")
    bottom.axhline(0.0, color="gray", linewidth=0.5)
    bottom.set_ylabel(f"d loss / d {where}")
    bottom.set_xlabel(where)
    for axis in (top, bottom):
        axis.axvline(current, color="gray", linestyle="--", linewidth=1)
        axis.grid(alpha=0.3)
    save_figure(figure, path)


def plot_index(problem: Problem, result: Explanation, plot_at: str | None) -> tuple[int, ...]:
    shape = problem.logits.shape
    if plot_at is None:
        first_target = result.target.reshape(-1)[0] if not problem.probability_target else 0
        use_target = problem.op in ("cross_entropy", "nll_loss") and not problem.probability_target
        column = int(first_target) if use_target and not result.ignored[0] else 0
        index = (0, column) if len(shape) >= 2 else (column,)
        return index + (0,) * (len(shape) - len(index))
    try:
        index = tuple(int(part) for part in plot_at.split(","))
    except ValueError:
        raise CLIError(f"--plot-at takes comma-separated integers like 0,2, got {plot_at!r}") from None
    if len(index) != len(shape) or not all(0 <= i < n for i, n in zip(index, shape, strict=True)):
        raise CLIError(f"--plot-at {plot_at} is not an index into the input of shape {shape}")
    return index
