"""cross_entropy, its analytic backward, and the per-row statistics.

One formula covers every option. Per row n (one sample or one spatial position), over C classes:

    y      = softcap * tanh(x / softcap)          (y = x without softcap)
    lse    = log sum_c exp(y_c)                    (computed as m + log sum_c exp(y_c - m), m = max_c y_c)
    log p  = y - lse,   p = softmax(y)
    q      = target weights of the row:
               class index t:   q = (1-eps) w[t] onehot(t) + (eps/C) w
               probabilities t: q = w ((1-eps) t + eps/C)
             (w = class weights, ones when none; eps = label smoothing; q = 0 on ignored rows)
    l      = sum_c q_c (lse - y_c) + z * lse^2 = -sum_c q_c log p_c + z * lse^2

    dl/dy  = (sum_c q_c + 2 z lse) p - q           (from d lse/dy = p and d(lse - y_c)/dy = p - onehot(c))
    dl/dx  = dl/dy * (1 - (y/softcap)^2)            (d/dx of softcap*tanh(x/softcap))

Reductions: 'none' -> l per row; 'sum' -> sum_n l_n (divided by `normalizer` when one is given);
'mean' -> sum_n l_n / D with D = sum_{n counted} w[t_n] for class indices (the weighted count, shared by the
smoothing and z-loss terms) and D = number of rows for probability targets.

Torch's rules kept here: the target kind is decided by shape alone (target.shape == input.shape means
probabilities); eps < 0 or NaN means no smoothing and eps > 1 is an error; without smoothing the target
log-probability is gathered, never taken as a dot product with a one-hot, so a -inf logit on another class
stays harmless. Ignored rows give loss 0 and a gradient of exactly 0 (selected with `where`, so NaN logits
in an ignored row never leak).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from xentlib.reference._common import (
    IndexTargets,
    Layout,
    as_float64,
    check_reduction,
    class_layout,
    class_weights,
    index_targets,
    quiet,
    reduce,
    row_coefficients,
)


class CrossEntropyGrads(NamedTuple):
    """Gradients of a cross-entropy loss. `target` and `weight` exist only for probability targets
    (and `weight` only when class weights were given); otherwise they are None."""

    input: np.ndarray
    target: np.ndarray | None
    weight: np.ndarray | None


class CrossEntropyStats(NamedTuple):
    """Per-row statistics, each of the reduction='none' output shape."""

    lse: np.ndarray  # log sum_c exp(y_c) of the (soft-capped) logits
    loss: np.ndarray  # the per-row value reduction='none' returns
    argmax: np.ndarray  # int64: the predicted class (argmax of the capped logits, first one on ties)
    correct: np.ndarray  # bool: argmax == target (False on ignored rows; target.argmax for probabilities)
    entropy: np.ndarray  # -sum_c p_c log p_c of the predicted distribution (0 log 0 = 0)


def smoothing_amount(label_smoothing) -> float:
    """eps in [0, 1]: negative or NaN values mean no smoothing, values above 1 are an error."""
    eps = float(label_smoothing)
    if eps > 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0. Got: {eps}")
    return eps if eps > 0.0 else 0.0


def soft_cap(x: np.ndarray, softcap) -> tuple[np.ndarray, np.ndarray | None]:
    """(y, dy/dx) with y = softcap * tanh(x / softcap); (x, None) without a cap."""
    if softcap is None:
        return x, None
    s = float(softcap)
    if not s > 0.0:
        raise ValueError(f"softcap must be a positive number, got {softcap}")
    t = np.tanh(x / s)
    return s * t, 1.0 - t * t  # d/dx s tanh(x/s) = 1 - tanh^2(x/s) = 1 - (y/s)^2


@dataclass(frozen=True)
class SoftmaxSteps:
    """log_softmax of each row of an (R, C) matrix, every intermediate kept (the order a learner follows)."""

    row_max: np.ndarray  # (R,) m = max_c y_c
    exp_shifted: np.ndarray  # (R, C) exp(y_c - m): every exponent <= 0, so nothing overflows
    exp_sum: np.ndarray  # (R,) s = sum_c exp(y_c - m)
    lse: np.ndarray  # (R,) lse = m + log s
    log_p: np.ndarray  # (R, C) log p_c = (y_c - m) - log s: no cancellation at 1e4


def softmax_steps(y: np.ndarray) -> SoftmaxSteps:
    """The stable log_softmax of each row, shifting by the row maximum first."""
    with quiet():
        m = y.max(axis=1, keepdims=True)  # m = max_c y_c
        exp_shifted = np.exp(y - m)  # exp(y_c - m)
        exp_sum = exp_shifted.sum(axis=1, keepdims=True)  # s = sum_c exp(y_c - m)
        log_sum = np.log(exp_sum)  # log s
        lse = (m + log_sum)[:, 0]  # lse = m + log s
        log_p = (y - m) - log_sum  # log p_c = (y_c - m) - log s
    return SoftmaxSteps(m[:, 0], exp_shifted, exp_sum[:, 0], lse, log_p)


def log_softmax_rows(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lse, log p) of each row of an (R, C) matrix."""
    steps = softmax_steps(y)
    return steps.lse, steps.log_p


def entropy_rows(log_p: np.ndarray) -> np.ndarray:
    """H = -sum_c p_c log p_c, with 0 log 0 = 0 at -inf log-probabilities (NaN rows stay NaN)."""
    with quiet():
        return -np.where(log_p == -np.inf, 0.0, np.exp(log_p) * log_p).sum(axis=1)


@dataclass(frozen=True)
class CrossEntropySteps:
    """Every intermediate of a cross-entropy (or nll_loss) in the (R, C) row layout: what the forward and the
    backward share, and what `xentlib explain` prints. See the module docstring for the formulas."""

    layout: Layout
    logits: np.ndarray  # (R, C) y: the logits after the soft cap (for nll_loss: the given log-probabilities)
    cap_slope: np.ndarray | None  # (R, C) dy/dx of the soft cap, None without one
    softmax: SoftmaxSteps | None  # row max, exp(y - m), their sum, lse, log p (None for nll_loss)
    log_p: np.ndarray  # (R, C) log p: softmax.log_p, or the input of nll_loss
    counted: np.ndarray  # (R,) bool: rows that are not ignored
    q: np.ndarray  # (R, C) target weights q: how much each -log p_c counts in row n (0 on ignored rows)
    w: np.ndarray  # (C,) class weights
    eps: float  # label smoothing
    indices: IndexTargets | None  # class-index targets (None for probabilities)
    probs: np.ndarray | None  # (R, C) probability targets as given (None for class indices)
    target_log_p: np.ndarray | None  # (R,) log p[n, t_n], gathered (class indices; 0-indexed on ignored rows)
    smoothing_term: np.ndarray  # (R,) (eps/C) sum_c w_c (-log p_c) (class indices; 0 without smoothing)
    loss: np.ndarray  # (R,) l_n, the reduction='none' value (flattened); exactly 0 on ignored rows
    row_grad: np.ndarray  # (R, C) dl_n/dy = (sum_c q_c + 2 z lse) p - q  (nll_loss: -q); 0 on ignored rows
    mean_denominator: np.float64  # D of the 'mean' reduction

    @property
    def lse(self) -> np.ndarray:
        return self.softmax.lse


def index_target_weights(indices: IndexTargets, w: np.ndarray, eps: float, shape: tuple) -> np.ndarray:
    """q = (1-eps) w[t] onehot(t) + (eps/C) w on counted rows, 0 on ignored rows."""
    num_rows, num_classes = shape
    q = np.zeros(shape)
    q[np.arange(num_rows), indices.index] = (1.0 - eps) * indices.w_t  # (1-eps) w[t] onehot(t)
    q += (eps / num_classes) * w  # + (eps/C) w
    q[~indices.counted] = 0.0  # ignored rows carry no target
    return q


def index_target_loss(log_p: np.ndarray, indices: IndexTargets, w: np.ndarray, eps: float):
    """(log p[n, t_n], smoothing term, l_n without z-loss) for class-index targets."""
    num_rows, num_classes = log_p.shape
    with quiet():
        # -log p_{t_n}, gathered: a -inf logit on another class cannot turn this into 0 * inf.
        target_log_p = log_p[np.arange(num_rows), indices.index]
        data = (1.0 - eps) * indices.w_t * -target_log_p  # (1-eps) w[t] (-log p_t)
        smoothing = np.zeros(num_rows)
        if eps > 0.0:
            smoothing = (eps / num_classes) * -(w * log_p).sum(axis=1)  # (eps/C) sum_c w_c (-log p_c)
            data = data + smoothing
    return target_log_p, smoothing, data


def cross_entropy_steps(
    input,
    target,
    weight=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
) -> CrossEntropySteps:
    """Every intermediate of `cross_entropy(...)` for the same arguments (the reduction is applied apart)."""
    x = as_float64(input)
    layout = class_layout(x.shape)
    num_rows, num_classes = layout.num_rows, layout.num_classes
    w = class_weights(weight, num_classes)
    eps = smoothing_amount(label_smoothing)
    y, cap_slope = soft_cap(layout.to_rows(x), softcap)
    softmax = softmax_steps(y)
    log_p = softmax.log_p
    target = np.asarray(target)

    if target.shape == x.shape:  # probability targets: same shape as the input
        if ignore_index >= 0:
            raise ValueError("ignore_index is not supported for probability targets (use a negative value)")
        indices, probs = None, layout.to_rows(as_float64(target))
        q = w * ((1.0 - eps) * probs + eps / num_classes)  # q_c = w_c ((1-eps) t_c + eps/C)
        counted = np.ones(num_rows, dtype=bool)  # no row is ignored
        target_log_p, smoothing = None, np.zeros(num_rows)
        with quiet():
            data = -(q * log_p).sum(axis=1)  # -sum_c q_c log p_c
        denominator = np.float64(num_rows)
    else:
        indices, probs = index_targets(target, layout, w, ignore_index), None
        q = index_target_weights(indices, w, eps, y.shape)
        counted = indices.counted
        target_log_p, smoothing, data = index_target_loss(log_p, indices, w, eps)
        denominator = indices.w_t.sum()  # sum_{n counted} w[t_n]
    with quiet():
        if z_loss:
            data = data + z_loss * softmax.lse**2  # z-loss: z lse^2, not class-weighted
        loss = np.where(counted, data, 0.0)
        scale = q.sum(axis=1)  # sum_c q_c
        if z_loss:
            scale = scale + 2.0 * z_loss * softmax.lse  # + 2 z lse
        row_grad = np.where(counted[:, None], scale[:, None] * np.exp(log_p) - q, 0.0)
    return CrossEntropySteps(
        layout, y, cap_slope, softmax, log_p, counted, q, w, eps, indices, probs,
        target_log_p, smoothing, loss, row_grad, denominator,
    )  # fmt: skip


def _divisor(pb: CrossEntropySteps, reduction: str, normalizer):
    """What the summed row losses are divided by: D for 'mean', the normalizer M or 1 for 'sum'."""
    check_reduction(reduction)
    if normalizer is not None:
        if reduction != "sum":
            raise ValueError(f"normalizer is only valid with reduction='sum', got reduction='{reduction}'")
        return as_float64(normalizer).item()
    return pb.mean_denominator if reduction == "mean" else 1.0


# cross_entropy, cross_entropy_backward and cross_entropy_stats each spell out the same parameters on purpose:
# torch's `F.cross_entropy` signature and xentlib's extensions, so that the tests pass the reference exactly the
# arguments of the function it checks (tests/reference/test_cross_entropy.py).
def cross_entropy(
    input,
    target,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer=None,
):
    """Cross-entropy of logits `input` (class dimension 1, or 0 for 1-D) against class indices or
    probabilities; see the module docstring for every formula."""
    steps = cross_entropy_steps(input, target, weight, ignore_index, label_smoothing, z_loss=z_loss, softcap=softcap)
    divisor = _divisor(steps, reduction, normalizer)
    return reduce(steps.loss, reduction, divisor, steps.layout.row_shape)


def cross_entropy_backward(
    grad_output,
    input,
    target,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer=None,
) -> CrossEntropyGrads:
    """Gradients of `cross_entropy(...)` given dL/d(output) = grad_output (same arguments)."""
    pb = cross_entropy_steps(input, target, weight, ignore_index, label_smoothing, z_loss=z_loss, softcap=softcap)
    divisor = _divisor(pb, reduction, normalizer)
    coef = row_coefficients(grad_output, reduction, divisor, pb.layout.row_shape)  # dL/dl_n
    with quiet():
        d_y = coef[:, None] * pb.row_grad  # dL/dy = c_n ((sum q + 2 z lse) p - q)
        d_y = np.where(pb.counted[:, None], d_y, 0.0)  # ignored rows: exactly 0, even where c_n is inf
        d_x = d_y if pb.cap_slope is None else d_y * pb.cap_slope  # chain rule through the soft cap
        grad_input = pb.layout.from_rows(d_x)
        if pb.probs is None:
            return CrossEntropyGrads(grad_input, None, None)
        # l = -sum_c w_c ((1-eps) t_c + eps/C) log p_c is linear in t and in w:
        grad_target = -(1.0 - pb.eps) * pb.w * pb.log_p * coef[:, None]  # dl/dt_c = -(1-eps) w_c log p_c
        # dl/dw_c = -((1-eps) t_c + eps/C) log p_c, summed over the rows
        smoothed = (1.0 - pb.eps) * pb.probs + pb.eps / pb.layout.num_classes
        grad_weight = None if weight is None else -(coef[:, None] * smoothed * pb.log_p).sum(axis=0)
    return CrossEntropyGrads(grad_input, pb.layout.from_rows(grad_target), grad_weight)


def cross_entropy_stats(
    input,
    target,
    weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer=None,
) -> CrossEntropyStats:
    """Per-row lse, loss, argmax, correct and entropy for the same arguments as `cross_entropy`.

    `reduction` and `normalizer` do not change per-row values; they are accepted so that one set of
    options can be passed to both functions.
    """
    pb = cross_entropy_steps(input, target, weight, ignore_index, label_smoothing, z_loss=z_loss, softcap=softcap)
    layout = pb.layout
    argmax = np.argmax(pb.logits, axis=1).astype(np.int64)  # first maximum of the (capped) logits
    if pb.indices is not None:
        correct = (argmax == pb.indices.index) & pb.counted  # index is 0 on ignored rows, hence the mask
    else:
        correct = argmax == np.argmax(pb.probs, axis=1)
    per_row = (pb.lse, pb.loss, argmax, correct, entropy_rows(pb.log_p))
    return CrossEntropyStats(*(a.reshape(layout.row_shape) for a in per_row))


def cross_entropy_stats_backward(grad_lse, grad_entropy, input, softcap: float | None = None) -> np.ndarray:
    """dL/dx for L depending on the statistics lse and entropy (either gradient may be None).

    d lse / d y_j = p_j
    d H / d y_j   = -p_j (log p_j + H)      (H = -sum_c p_c log p_c, using d log p_c/d y_j = [c=j] - p_j)
    """
    x = as_float64(input)
    layout = class_layout(x.shape)
    y, cap_slope = soft_cap(layout.to_rows(x), softcap)
    lse, log_p = log_softmax_rows(y)

    def per_row(g):
        return np.zeros(layout.num_rows) if g is None else as_float64(g).reshape(layout.num_rows)

    with quiet():
        p = np.exp(log_p)
        entropy = entropy_rows(log_p)
        d_entropy = -np.where(log_p == -np.inf, 0.0, p * (log_p + entropy[:, None]))  # -p_j (log p_j + H)
        d_y = per_row(grad_lse)[:, None] * p + per_row(grad_entropy)[:, None] * d_entropy
        d_x = d_y if cap_slope is None else d_y * cap_slope
    return layout.from_rows(d_x)
