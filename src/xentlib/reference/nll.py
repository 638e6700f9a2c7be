"""nll_loss: pick the (log-)probability of the target class, weight it, reduce.

    l_n = -w[t_n] * x[n, t_n]               (0 where t_n == ignore_index)
    'sum'  -> sum_n l_n
    'mean' -> sum_n l_n / sum_{n counted} w[t_n]      (the *weighted* count; 0/0 = NaN if nothing counts)

The input is read as log-probabilities but any values are allowed. Shapes: (C,) with target () or (1,);
(N, C) with (N,); (N, C, d1..dk) with (N, d1..dk); the class dimension is 1 (0 for a 1-D input).
"""

from __future__ import annotations

import numpy as np

# the helpers cross_entropy.py imports too: nll_loss is its case without a softmax (`nll_loss_steps`)
from xentlib.reference._common import (
    as_float64,
    check_reduction,
    class_layout,
    class_weights,
    index_targets,
    quiet,
    reduce,
    row_coefficients,
)
from xentlib.reference.cross_entropy import CrossEntropySteps, index_target_loss, index_target_weights


def nll_loss_steps(input, target, weight=None, ignore_index: int = -100) -> CrossEntropySteps:
    """The intermediates of `nll_loss(...)`: cross-entropy's steps with the input taken as log p as it is
    (no softmax), so q = w[t] onehot(t), l_n = w[t_n] (-x[n, t_n]) and dl_n/dx = -q."""
    x = as_float64(input)
    layout = class_layout(x.shape)
    w = class_weights(weight, layout.num_classes)
    targets = index_targets(target, layout, w, ignore_index)
    rows = layout.to_rows(x)
    q = index_target_weights(targets, w, 0.0, rows.shape)
    picked, smoothing, data = index_target_loss(rows, targets, w, 0.0)  # x[n, t_n] by gathering
    with quiet():
        losses = np.where(targets.counted, data, 0.0)  # l_n = -w[t_n] x[n, t_n]; ignored: +0
    return CrossEntropySteps(
        layout, rows, None, None, rows, targets.counted, q, w, 0.0, targets, None,
        picked, smoothing, losses, -q, targets.w_t.sum(),
    )  # fmt: skip


def _steps_and_divisor(input, target, weight, ignore_index, reduction) -> tuple[CrossEntropySteps, float]:
    """What forward and backward share: the steps, and what the summed row losses are divided by."""
    check_reduction(reduction)
    steps = nll_loss_steps(input, target, weight, ignore_index)
    divisor = steps.mean_denominator if reduction == "mean" else 1.0  # mean: sum_{n counted} w[t_n]
    return steps, divisor


def nll_loss(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean"):
    """Negative log-likelihood loss; see the module docstring for the formula."""
    steps, divisor = _steps_and_divisor(input, target, weight, ignore_index, reduction)
    return reduce(steps.loss, reduction, divisor, steps.layout.row_shape)


def nll_loss_backward(
    grad_output, input, target, weight=None, ignore_index: int = -100, reduction: str = "mean"
) -> np.ndarray:
    """dL/dx: only the target slot of a counted row depends on x, with dl_n/dx[n, t_n] = -w[t_n].

    So dL/dx[n, t_n] = -w[t_n] * c_n with c_n = grad_output[n] ('none'), grad_output ('sum') or
    grad_output / sum w[t] ('mean'); every other entry, and every ignored row, is exactly 0. A 'mean'
    whose counted weights sum to 0 gives -0 * inf = NaN at the target slots (as torch); all rows ignored
    gives zeros.
    """
    steps, divisor = _steps_and_divisor(input, target, weight, ignore_index, reduction)
    layout, targets = steps.layout, steps.indices
    coef = row_coefficients(grad_output, reduction, divisor, layout.row_shape)
    grad_rows = np.zeros_like(steps.logits)
    n = np.arange(layout.num_rows)[targets.counted]
    with quiet():
        grad_rows[n, targets.index[targets.counted]] = -targets.w_t[targets.counted] * coef[targets.counted]
    return layout.from_rows(grad_rows)
