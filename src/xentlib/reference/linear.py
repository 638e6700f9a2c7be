"""linear_cross_entropy: cross-entropy of the logits z = x W^T + b, with the classes on the last dimension.

    input x (..., D), weight W (V, D), bias b (V,), target (...) class indices or (..., V) probabilities
    z = x W^T + b                                        (..., V)
    loss = cross_entropy(z flattened to (rows, V), target flattened, options)

For a 2-D input this is exactly `cross_entropy(x @ W.T + b, target, ...)`. The reference materializes z; the
point of the fast versions is not to. Backward, with G = dL/dz from `cross_entropy_backward`:

    dL/dx = G W          dL/dW = G^T x          dL/db = sum_rows G
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from xentlib.reference._common import as_float64, linear_grads, linear_logits
from xentlib.reference.cross_entropy import cross_entropy, cross_entropy_backward


class LinearCrossEntropyGrads(NamedTuple):
    """Gradients of linear_cross_entropy; target and class_weight only for probability targets."""

    input: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None
    target: np.ndarray | None
    class_weight: np.ndarray | None


def _logits(input, weight, bias, target):
    """(x, z in row layout, target in row layout, leading shape) with z = x W^T + b."""
    x, w = as_float64(input), as_float64(weight)
    if x.ndim == 0 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"input (..., D) and weight (V, D) do not match: {x.shape} and {w.shape}")
    z = linear_logits(x, w, bias)  # z[..., v] = sum_d x[..., d] W[v, d] + b[v]
    t = np.asarray(target)
    if x.ndim == 1:  # one sample: z (V,) with target () or probabilities (V,)
        return x, z, t, ()
    lead = x.shape[:-1]
    vocab = w.shape[0]
    t_rows = t.reshape(-1, vocab) if t.shape == z.shape else t.reshape(-1)
    return x, z.reshape(-1, vocab), t_rows, lead


# Both signatures spell out `xentlib.linear_cross_entropy`'s options (and so repeat `cross_entropy`'s): the tests
# call the reference with the arguments of the fast function (tests/test_linear.py, `check_linear`).
def linear_cross_entropy(
    input,
    weight,
    target,
    bias=None,
    *,
    class_weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer=None,
):
    """Cross-entropy of x W^T + b (classes on the last dimension); options as in `cross_entropy`."""
    _, z, t, lead = _logits(input, weight, bias, target)
    loss = cross_entropy(
        z, t, class_weight, ignore_index, reduction, label_smoothing,
        z_loss=z_loss, softcap=softcap, normalizer=normalizer,
    )  # fmt: skip
    return loss.reshape(lead) if reduction == "none" else loss


def linear_cross_entropy_backward(
    grad_output,
    input,
    weight,
    target,
    bias=None,
    *,
    class_weight=None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer=None,
) -> LinearCrossEntropyGrads:
    """Gradients of `linear_cross_entropy(...)` given dL/d(output) = grad_output (same arguments)."""
    x, z, t, lead = _logits(input, weight, bias, target)
    g = as_float64(grad_output)
    if reduction == "none" and x.ndim > 1:
        g = g.reshape(-1)  # per-row gradient in row layout
    grads = cross_entropy_backward(
        g, z, t, class_weight, ignore_index, reduction, label_smoothing,
        z_loss=z_loss, softcap=softcap, normalizer=normalizer,
    )  # fmt: skip
    # G = dL/dz: dL/dx = G W, dL/dW = G^T x, dL/db = sum over rows of G
    grad_input, grad_weight, grad_bias = linear_grads(grads.input, x, weight, bias is not None)
    grad_target = None if grads.target is None else grads.target.reshape(np.shape(target))
    return LinearCrossEntropyGrads(grad_input, grad_weight, grad_bias, grad_target, grads.weight)
