"""The numbers `xentlib explain` shows, read from xentlib.reference (float64 NumPy).

The reference computes each loss through its intermediates (`cross_entropy_steps`, `nll_loss_steps`) and
the binary losses element by element; this module only lays them out per row for the report, applies the
reduction that the report spells out, and adds the entropy / KL split of each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xentlib import reference
from xentlib.cli.explain.problem import Problem
from xentlib.reference.bce import softplus


@dataclass
class Explanation:
    """Every intermediate the report shows. Arrays are per row: (N,) or (N, C) after flattening."""

    scores: Any  # (N, C) logits (computed from input @ W.T + b for 'linear'); (N, K) values for binary ops
    target: Any  # (N,) class indices or (N, C) probabilities / binary targets
    row_max: Any = None
    exp_shifted: Any = None  # exp(x - max)
    exp_sum: Any = None
    lse: Any = None
    log_probs: Any = None
    class_weights: Any = None  # q[n, c]: how much -log p[n, c] counts in row n's loss
    picked: Any = None  # log p[n, t_n] for class-index targets
    picked_weight: Any = None  # w[t_n], 0 for ignored rows
    ignored: Any = None
    row_loss: Any = None  # (N,) ('none' output, flattened)
    denominator: float = 1.0
    denominator_text: str = ""
    loss: Any = None  # the reduced value (a float, or the 'none' array in the target's shape)
    output_shape: tuple[int, ...] = ()
    gradient: Any = None  # d loss / d scores, like `scores` ('none': each row's own loss)


def explain(problem: Problem) -> Explanation:
    with np.errstate(all="ignore"):
        result = binary_steps(problem) if problem.op in ("bce", "bce_with_logits") else class_steps(problem)
        result.loss = reduce(result.row_loss.reshape(result.output_shape), result.denominator, problem.reduction)
        if problem.reduction == "mean" and result.denominator != 0:
            result.gradient = result.gradient / result.denominator  # 'mean' divides every row's gradient
    return result


def scores_of(problem: Problem):
    """The logits the loss sees: the given ones, or input @ W.T + b for 'linear'."""
    if problem.op != "linear":
        return problem.logits
    scores = problem.logits @ problem.linear_weight.T
    return scores if problem.bias is None else scores + problem.bias


def class_steps(problem: Problem) -> Explanation:
    """cross_entropy / nll_loss / linear from the reference's steps (see xentlib/reference/cross_entropy.py):

    class indices:  l_n = (1-eps) w[t_n] (-log p[n, t_n]) + (eps/C) sum_c w_c (-log p[n, c]); 0 for ignored rows,
                    'mean' divides by the summed w[t_n] of the rows not ignored;
    probabilities:  q[n, c] = w_c ((1-eps) t[n, c] + eps/C), l_n = sum_c q[n, c] (-log p[n, c]), 'mean' divides by N;
    gradient:       d l_n / d x[n, j] = (sum_c q_c) p_j - q_j (nll_loss, whose input is log p already: -q_j).
    """
    target = problem.target if problem.probability_target else problem.target.astype(np.int64)
    if problem.op == "nll_loss":
        steps = reference.nll_loss_steps(problem.logits, target, problem.weight, problem.ignore_index)
    else:
        steps = reference.cross_entropy_steps(
            scores_of(problem), target, problem.weight, problem.ignore_index, problem.label_smoothing
        )
    result = Explanation(scores=steps.logits, target=None, log_probs=steps.log_p)
    if steps.softmax is not None:
        softmax = steps.softmax
        result.row_max, result.exp_shifted, result.exp_sum, result.lse = (
            softmax.row_max, softmax.exp_shifted, softmax.exp_sum, softmax.lse,
        )  # fmt: skip
    result.class_weights, result.row_loss, result.gradient = steps.q, steps.loss, steps.row_grad
    result.ignored = ~steps.counted
    result.denominator = float(steps.mean_denominator)
    result.output_shape = steps.layout.row_shape
    if steps.indices is None:
        result.target = steps.probs
        result.denominator_text = "number of rows N (probability targets are never divided by the weights)"
        return result
    result.target = target.reshape(-1)
    result.picked, result.picked_weight = steps.target_log_p, steps.indices.w_t
    counted = "weighted count sum_n w[t_n]" if problem.weight is not None else "number of rows"
    result.denominator_text = counted + (" (ignored rows excluded)" if result.ignored.any() else "")
    return result


def binary_steps(problem: Problem) -> Explanation:
    """Each element is its own yes/no question; 'mean' divides by the number of elements. Loss and gradient
    from xentlib.reference.binary_cross_entropy(_with_logits) and their backward, per element:

    bce:             l = -w (y max(log x, -100) + (1-y) max(log(1-x), -100))   (x a probability)
    bce_with_logits: l = w (pw y softplus(-x) + (1-y) softplus(x)),  since -log sigmoid(x) = softplus(-x)
    """
    x, y = problem.logits, problem.target
    ones = np.ones(x.shape)
    if problem.op == "bce":
        log_p = np.maximum(np.log(x), -100.0)  # torch clamps each log at -100, so 0 * log(0) is 0, not NaN
        log_not_p = np.maximum(np.log1p(-x), -100.0)
        loss = reference.binary_cross_entropy(x, y, problem.weight, reduction="none")
        grad = reference.binary_cross_entropy_backward(ones, x, y, problem.weight, reduction="none").input
    else:
        log_p, log_not_p = -softplus(-x), -softplus(x)
        options = {"weight": problem.weight, "reduction": "none", "pos_weight": problem.pos_weight}
        loss = reference.binary_cross_entropy_with_logits(x, y, **options)
        grad = reference.binary_cross_entropy_with_logits_backward(ones, x, y, **options).input
    as_rows = lambda a: np.broadcast_to(a, x.shape).reshape(x.shape[0] if x.ndim > 1 else 1, -1)
    result = Explanation(scores=as_rows(x), target=as_rows(y))
    result.log_probs = np.stack([as_rows(log_p), as_rows(log_not_p)])  # log p(yes), log p(no) per element
    result.row_loss = as_rows(loss).reshape(-1)
    result.gradient = as_rows(grad)
    result.ignored = np.zeros(result.row_loss.shape, dtype=bool)
    result.denominator = float(x.size)
    result.denominator_text = "number of elements"
    result.output_shape = x.shape
    return result


def reduce(per_element, denominator: float, reduction: str):
    if reduction == "none":
        return per_element
    total = float(np.sum(per_element))
    if reduction == "sum":
        return total
    return total / denominator if denominator != 0 else float("nan")  # torch: 0/0 -> NaN (all rows ignored)


def information(problem: Problem, result: Explanation):
    """Per row (unweighted): entropy H(t), cross-entropy H(t, p) and KL(t || p) = H(t, p) - H(t).

    t is the target distribution (one-hot, smoothed, or the given probabilities renormalized), p the
    prediction.
    Binary ops treat each element as a Bernoulli(y) target against Bernoulli(p) and add them up per row.
    Returns (rows, entropy, cross_entropy, kl) or None when the inputs are not distributions.
    """
    xlogy = lambda a, b: np.where(a > 0, a * b, 0.0)  # 0 log 0 = 0, also when b = -inf
    with np.errstate(all="ignore"):
        if problem.op in ("bce", "bce_with_logits"):
            y = result.target
            log_p, log_not_p = result.log_probs
            entropy = -(xlogy(y, np.log(y)) + xlogy(1 - y, np.log1p(-y))).sum(axis=1)
            cross = -(xlogy(y, log_p) + xlogy(1 - y, log_not_p)).sum(axis=1)
            return np.arange(len(y)), entropy, cross, cross - entropy
        if problem.op == "nll_loss" and np.any(np.abs(np.log(np.exp(result.log_probs).sum(axis=1))) > 1e-3):
            return None  # inputs that are not log-probabilities: no distribution to compare
        num_classes = result.log_probs.shape[1]
        eps = problem.label_smoothing
        if problem.probability_target:
            t = (1 - eps) * result.target + eps / num_classes
            totals = t.sum(axis=1, keepdims=True)
            if np.any(t < 0) or np.any(totals <= 0):
                return None
            t = t / totals
        else:
            t = (1 - eps) * np.eye(num_classes)[np.where(result.ignored, 0, result.target)] + eps / num_classes
        rows = np.flatnonzero(~result.ignored)
        t, log_p = t[rows], result.log_probs[rows]
        entropy = -xlogy(t, np.log(t)).sum(axis=1)
        cross = -xlogy(t, log_p).sum(axis=1)
        return rows, entropy, cross, cross - entropy
