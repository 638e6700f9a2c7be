"""Plumbing shared by the reference functions: float64 conversion, the class-dimension layout, reductions.

Every loss in the family has the same shape: a value per *row* (one sample, or one spatial position of a
sample), then a reduction over the rows. A "row" is everything except the class dimension, which is
dimension 0 for a 1-D input and dimension 1 otherwise. `Layout` turns an input of shape (N, C, d1..dk) into a
matrix of shape (R, C), R = N*d1*...*dk, and turns a gradient of shape (R, C) back.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

REDUCTIONS = ("none", "mean", "sum")


def as_float64(a) -> np.ndarray:
    """Any array-like (any float or integer dtype) as a float64 array: the reference computes in float64."""
    return np.asarray(a, dtype=np.float64)


def linear_logits(input, weight, bias=None) -> np.ndarray:
    """z = x W^T + b in float64: x (..., D), W (V, D), b (V,) or None."""
    z = as_float64(input) @ as_float64(weight).T
    return z if bias is None else z + as_float64(bias)


def linear_grads(grad_z, input, weight, with_bias: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The gradients of z = x W^T + b from G = dL/dz (..., V): dx = G W, dW = G^T x, db = sum over rows of G."""
    x, w = as_float64(input), as_float64(weight)
    g_rows, x_rows = np.reshape(grad_z, (-1, w.shape[0])), x.reshape(-1, w.shape[1])
    return (g_rows @ w).reshape(x.shape), g_rows.T @ x_rows, g_rows.sum(axis=0) if with_bias else None


def quiet():
    """IEEE arithmetic already gives torch's answers for inf/NaN inputs (0/0 = NaN, log 0 = -inf, ...);
    this silences numpy's warnings about them."""
    return np.errstate(all="ignore")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")


class Layout(NamedTuple):
    """Where the classes sit in an input, and how its rows map to an (R, C) matrix."""

    shape: tuple  # the input's shape
    row_shape: tuple  # shape of one value per row = the reduction='none' output shape

    @property
    def num_rows(self) -> int:
        return math.prod(self.row_shape)

    @property
    def num_classes(self) -> int:
        return self.shape[0] if len(self.shape) == 1 else self.shape[1]

    def to_rows(self, a: np.ndarray) -> np.ndarray:
        """(C,) -> (1, C);  (N, C, d1..dk) -> (N*d1*..*dk, C) with the class dimension moved last."""
        if a.ndim == 1:
            return a[None, :]
        return np.moveaxis(a, 1, -1).reshape(-1, self.num_classes)

    def from_rows(self, a: np.ndarray) -> np.ndarray:
        """Inverse of `to_rows`: an (R, C) matrix back to the input's shape."""
        if len(self.shape) == 1:
            return a[0]
        moved = a.reshape((*self.row_shape, self.num_classes))  # (N, d1..dk, C)
        return np.moveaxis(moved, -1, 1)  # (N, C, d1..dk)


def class_layout(shape: tuple) -> Layout:
    """The layout of a loss input: class dimension 0 for shape (C,), 1 for (N, C, d1..dk)."""
    if len(shape) == 0:
        raise ValueError("Expected 1 or more dimensions (got 0)")
    row_shape = () if len(shape) == 1 else (shape[0], *shape[2:])
    return Layout(tuple(shape), row_shape)


def class_weights(weight, num_classes: int) -> np.ndarray:
    """The per-class weight vector w (all ones when weight is None)."""
    if weight is None:
        return np.ones(num_classes)
    w = as_float64(weight)
    if w.shape != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},), got {w.shape}")
    return w


class IndexTargets(NamedTuple):
    """Class-index targets, one per row, with the ignore mask applied."""

    index: np.ndarray  # (R,) int64: t_n on counted rows, 0 on ignored rows (so it can always index)
    counted: np.ndarray  # (R,) bool: t_n != ignore_index
    w_t: np.ndarray  # (R,) float64: w[t_n] on counted rows, 0 on ignored rows


def index_targets(target, layout: Layout, w: np.ndarray, ignore_index: int) -> IndexTargets:
    """Check class-index targets against the layout and gather w[t_n].

    Shapes: input (C,) takes a target () or (1,); input (N, C, d1..dk) takes (N, d1..dk).
    `ignore_index` is compared with the raw target before the range check, so any integer may be ignored.
    """
    t = np.asarray(target)
    allowed = ((), (1,)) if len(layout.shape) == 1 else (layout.row_shape,)
    if t.shape not in allowed:
        raise ValueError(f"target shape {t.shape} does not fit input shape {layout.shape}")
    if t.size and not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"class-index targets must be integers, got dtype {t.dtype}")
    t = t.reshape(-1).astype(np.int64)
    counted = t != ignore_index
    out_of_range = counted & ((t < 0) | (t >= layout.num_classes))
    if out_of_range.any():
        raise IndexError(f"Target {t[out_of_range][0]} is out of bounds.")
    index = np.where(counted, t, 0)
    w_t = np.where(counted, w[index], 0.0)  # w[t_n]; ignored rows weigh nothing
    return IndexTargets(index, counted, w_t)


def reduce(values: np.ndarray, reduction: str, divisor, row_shape: tuple):
    """Reduce per-row values: 'none' -> reshaped to `row_shape`; 'sum'/'mean' -> sum(values) / divisor.

    The caller picks the divisor: 1 for 'sum' (or the normalizer M), the mean's denominator for 'mean'.
    A zero denominator gives 0/0 = NaN like torch (all rows ignored, empty batch).
    """
    if reduction == "none":
        return values.reshape(row_shape)
    with quiet():
        return np.float64(values.sum()) / divisor


def row_coefficients(grad_output, reduction: str, divisor, row_shape: tuple) -> np.ndarray:
    """d(reduced loss)/d(row value) times the incoming gradient, one number per row (flattened).

    'none': L_n = l_n, so the coefficient is grad_output[n];  'sum'/'mean': L = sum_n l_n / divisor,
    so every row gets grad_output / divisor.
    """
    g = as_float64(grad_output)
    if reduction == "none":
        if g.shape != tuple(row_shape):
            raise ValueError(f"grad_output must have shape {tuple(row_shape)}, got {g.shape}")
        return g.reshape(-1)
    if g.size != 1:
        raise ValueError(f"grad_output of a '{reduction}' reduction must be a scalar, got shape {g.shape}")
    with quiet():
        return np.full(math.prod(row_shape), np.float64(g.item()) / divisor)
