"""softmax and log_softmax along one dimension, with their analytic backward passes.

    softmax(x)_i     = exp(x_i - m) / sum_j exp(x_j - m)           m = max_j x_j
    log_softmax(x)_i = x_i - m - log(sum_j exp(x_j - m))

Subtracting the maximum first makes every exponent <= 0, so nothing overflows ([1e4, 0, -1e4] is fine).
The non-finite rules follow from IEEE arithmetic with no special cases: a slice holding NaN or +inf has
m = NaN or +inf, so x - m is NaN somewhere and the whole slice turns NaN; an all -inf slice has m = -inf and
-inf - (-inf) = NaN; a partial -inf gives exp(-inf) = 0, i.e. log p = -inf and p = 0 at that position only.
"""

from __future__ import annotations

import numpy as np

from xentlib.reference._common import as_float64, quiet


def resolve_dim(ndim: int, dim: int | None) -> int:
    """The dimension to normalize over; dim=None picks 0 for 0-, 1- and 3-D inputs and 1 otherwise."""
    if dim is None:
        dim = 0 if ndim in (0, 1, 3) else 1
    size = max(ndim, 1)  # a 0-d tensor accepts dim 0 and -1
    if not -size <= dim < size:
        raise IndexError(f"Dimension out of range (expected to be in range of [{-size}, {size - 1}], but got {dim})")
    return dim % size


def _shifted_exp(x: np.ndarray, dim: int):
    """(x - m, exp(x - m), sum_j exp(x_j - m)) with m the maximum along `dim`."""
    m = np.max(x, axis=dim, keepdims=True)  # m = max_j x_j (NaN if any x_j is NaN)
    shifted = x - m  # x_i - m <= 0: exp cannot overflow
    e = np.exp(shifted)  # exp(x_i - m), in (0, 1]
    return shifted, e, np.sum(e, axis=dim, keepdims=True)  # sum_j exp(x_j - m) >= 1


def _normalize(x, dim, finish):
    """Shared driver: float64, 0-d treated as one element, empty slices passed through."""
    x = as_float64(x)
    d = resolve_dim(x.ndim, dim)
    if x.ndim == 0:  # a single element is a one-class distribution
        return _normalize(x.reshape(1), 0, finish).reshape(())
    if x.shape[d] == 0:
        return x.copy()
    with quiet():
        return finish(*_shifted_exp(x, d))


def log_softmax(x, dim: int | None = None) -> np.ndarray:
    """log p_i = (x_i - m) - log(sum_j exp(x_j - m))."""
    return _normalize(x, dim, lambda shifted, e, total: shifted - np.log(total))


def softmax(x, dim: int | None = None) -> np.ndarray:
    """p_i = exp(x_i - m) / sum_j exp(x_j - m)."""
    return _normalize(x, dim, lambda shifted, e, total: e / total)


def log_softmax_backward(grad, out, dim: int | None = None) -> np.ndarray:
    """dL/dx from dL/d(log p) = g and the forward output log p.

    d log p_i / d x_j = [i == j] - p_j, so dL/dx_j = g_j - p_j * sum_i g_i,  with p_j = exp(log p_j).
    """
    g, out = as_float64(grad), as_float64(out)
    d = resolve_dim(out.ndim, dim)
    if out.ndim == 0:
        g, out = g.reshape(1), out.reshape(1)
    with quiet():
        result = g - np.exp(out) * np.sum(g, axis=d, keepdims=True)
    return result.reshape(np.shape(grad))


def softmax_backward(grad, out, dim: int | None = None) -> np.ndarray:
    """dL/dx from dL/dp = g and the forward output p.

    d p_i / d x_j = p_i ([i == j] - p_j), so dL/dx_j = p_j * (g_j - sum_i g_i p_i).
    """
    g, out = as_float64(grad), as_float64(out)
    d = resolve_dim(out.ndim, dim)
    if out.ndim == 0:
        g, out = g.reshape(1), out.reshape(1)
    with quiet():
        result = out * (g - np.sum(g * out, axis=d, keepdims=True))
    return result.reshape(np.shape(grad))
