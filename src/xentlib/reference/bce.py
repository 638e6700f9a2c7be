"""Binary cross-entropy on probabilities and on logits, element by element, with backward passes.

binary_cross_entropy (x = probability, y = target, w = weight broadcast to x's shape):
    l = -w (y max(log x, -100) + (1-y) max(log(1-x), -100))
  Each log is clamped at -100 before multiplying, so x=0, y=0 gives 0 * (-100) = 0, not NaN.
    dl/dx = w (x - y) / max(x (1-x), EPS)      EPS = float32(1e-12), also for float64 inputs
    dl/dy = w (log(1-x) - log x)               unclamped: +inf at x=0, -inf at x=1

binary_cross_entropy_with_logits (x = logit, p = pos_weight, both weights broadcast to x's shape):
    l = w [ (1-y) x + (1 + (p-1) y) (log(1 + exp(-|x|)) + max(-x, 0)) ]
      = -w [ p y log sigmoid(x) + (1-y) log sigmoid(-x) ]
  The first form is the one evaluated: it never overflows, and at x = +-inf it gives NaN where (1-y) x is
  0 * inf, as torch does.
    dl/dx = w ((p y + 1 - y) sigmoid(x) - p y)
    dl/dy = w (log sigmoid(-x) - p log sigmoid(x))

Reductions: 'none' -> l, 'sum' -> sum l, 'mean' -> sum l / numel (never divided by the weights; empty: NaN).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from xentlib.reference._common import as_float64, check_reduction, quiet, reduce, row_coefficients

GRAD_EPS = float(np.float32(1e-12))  # the float32 constant 1e-12 = 9.99999996e-13, used for every dtype


class BCEGrads(NamedTuple):
    input: np.ndarray
    target: np.ndarray


def _broadcast(a, shape: tuple, name: str) -> np.ndarray:
    """A weight broadcast (right-aligned) to `shape`; ones when None. It may not enlarge the shape."""
    if a is None:
        return np.ones(shape)
    a = as_float64(a)
    if np.broadcast_shapes(a.shape, shape) != shape:
        raise ValueError(f"{name} of shape {a.shape} does not broadcast to the input shape {shape}")
    return np.broadcast_to(a, shape)


def _inputs(input, target, reduction):
    check_reduction(reduction)
    x, y = as_float64(input), as_float64(target)
    if x.shape != y.shape:
        raise ValueError(f"target shape {y.shape} must equal input shape {x.shape}")
    divisor = np.float64(x.size) if reduction == "mean" else 1.0  # 'mean' averages over all elements
    return x, y, divisor


def softplus(z: np.ndarray) -> np.ndarray:
    """log(1 + exp(z)) = log(1 + exp(-|z|)) + max(z, 0): the exponent is never positive."""
    return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0.0)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), written so that the exponent is never positive."""
    e = np.exp(-np.abs(z))  # exp(-|z|) in (0, 1]
    return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def binary_cross_entropy(input, target, weight=None, reduction: str = "mean"):
    """Binary cross-entropy of probabilities `input` against `target` (same shape)."""
    x, y, divisor = _inputs(input, target, reduction)
    w = _broadcast(weight, x.shape, "weight")
    with quiet():
        log_x = np.maximum(np.log(x), -100.0)  # max(log x, -100)
        log_1mx = np.maximum(np.log1p(-x), -100.0)  # max(log(1-x), -100), accurate for tiny x
        losses = -w * (y * log_x + (1.0 - y) * log_1mx)
    return reduce(losses.reshape(-1), reduction, divisor, x.shape)


def binary_cross_entropy_backward(grad_output, input, target, weight=None, reduction: str = "mean") -> BCEGrads:
    """Gradients wrt input and target of `binary_cross_entropy(...)` given dL/d(output)."""
    x, y, divisor = _inputs(input, target, reduction)
    w = _broadcast(weight, x.shape, "weight")
    coef = row_coefficients(grad_output, reduction, divisor, x.shape).reshape(x.shape) * w  # c * w
    with quiet():
        grad_x = coef * (x - y) / np.maximum(x * (1.0 - x), GRAD_EPS)  # w (x - y) / max(x(1-x), EPS)
        grad_y = coef * (np.log1p(-x) - np.log(x))  # w (log(1-x) - log x), unclamped
    return BCEGrads(grad_x, grad_y)


def binary_cross_entropy_with_logits(input, target, weight=None, reduction: str = "mean", pos_weight=None):
    """Binary cross-entropy of logits `input` against `target` (same shape), with optional pos_weight."""
    x, y, divisor = _inputs(input, target, reduction)
    w = _broadcast(weight, x.shape, "weight")
    p = _broadcast(pos_weight, x.shape, "pos_weight")
    with quiet():
        log_weight = 1.0 + (p - 1.0) * y  # 1 + (p-1) y
        softplus_neg_x = softplus(-x)  # log(1 + exp(-x)) = -log sigmoid(x)
        losses = w * ((1.0 - y) * x + log_weight * softplus_neg_x)
    return reduce(losses.reshape(-1), reduction, divisor, x.shape)


def binary_cross_entropy_with_logits_backward(
    grad_output, input, target, weight=None, reduction: str = "mean", pos_weight=None
) -> BCEGrads:
    """Gradients wrt input and target of `binary_cross_entropy_with_logits(...)` given dL/d(output)."""
    x, y, divisor = _inputs(input, target, reduction)
    w = _broadcast(weight, x.shape, "weight")
    p = _broadcast(pos_weight, x.shape, "pos_weight")
    coef = row_coefficients(grad_output, reduction, divisor, x.shape).reshape(x.shape) * w  # c * w
    with quiet():
        grad_x = coef * ((p * y + 1.0 - y) * sigmoid(x) - p * y)  # w ((p y + 1 - y) sigmoid(x) - p y)
        grad_y = coef * (-softplus(x) + p * softplus(-x))  # w (log sigmoid(-x) - p log sigmoid(x))
    return BCEGrads(grad_x, grad_y)
