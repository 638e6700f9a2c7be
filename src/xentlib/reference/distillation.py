"""Distillation divergences: the generalized Jensen-Shannon divergence of GKD, in float64, with its backward.

Per row of student logits z_s and teacher logits z_t (classes on the last dimension), temperature T, 0 <= beta <= 1:

    log p = log_softmax(z_s / T)      log q = log_softmax(z_t / T)      m = beta q + (1 - beta) p
    D     = beta KL(q || m) + (1 - beta) KL(p || m)          0 < beta < 1
    D     = KL(q || p)                                       beta = 0   (forward KL)
    D     = KL(p || q)                                       beta = 1   (reverse KL)

Backward wrt z_s (the teacher is a constant). Write r = log p - log m. d/dp_j of D holds p only through
(1 - beta) sum p log p and -sum m log m (because beta KL(q||m) + (1 - beta) KL(p||m) = beta sum q log q +
(1 - beta) sum p log p - sum m log m), so dD/dp_j = (1 - beta) r_j; through the softmax, dD/ds_j =
p_j (g_j - sum_i p_i g_i), and s = z_s / T:

    0 < beta < 1:  dD/dz_s = (1 - beta) p (r - KL(p || m)) / T
    beta = 1:      dD/dz_s = p (r - KL(p || q)) / T,  r = log p - log q
    beta = 0:      dD/dz_s = (p - q) / T

Reductions over the kept rows (target != ignore_index; every row without a target): 'none', 'sum',
'mean' = sum / kept (NaN when none), 'batchmean' = sum / max(kept, 1) with a target, sum / max(B, 1) without one
(B = the first dimension's size, 1 for one (V,) row).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from xentlib.reference._common import as_float64, linear_grads, linear_logits, quiet

DISTILLATION_REDUCTIONS = ("none", "batchmean", "sum", "mean")


class LinearDistillationGrads(NamedTuple):
    """Gradients of linear_distillation wrt the student's input, weight and bias (None without a bias)."""

    input: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None


def _log_softmax_last(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    shifted = z - m
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _rows(student_logits, teacher_logits, target, ignore_index):
    """(z_s, z_t) as (R, V) float64, the keep mask (R,), the leading shape and the batch size B."""
    zs, zt = as_float64(student_logits), as_float64(teacher_logits)
    if zs.shape != zt.shape or zs.ndim == 0:
        raise ValueError(f"student and teacher logits must have one shape (..., V): {zs.shape} and {zt.shape}")
    lead, vocab = zs.shape[:-1], zs.shape[-1]
    keep = np.ones(int(np.prod(lead)), dtype=bool)
    if target is not None:
        t = np.asarray(target)
        if t.shape != lead:
            raise ValueError(f"target shape {t.shape} does not match the leading shape {lead}")
        keep = t.reshape(-1) != ignore_index
    batch = lead[0] if lead else 1
    return zs.reshape(-1, vocab), zt.reshape(-1, vocab), keep, lead, batch


class DistillationSteps(NamedTuple):
    """Every intermediate of the divergence, per row of (R, V) logits (float64).

    For 0 < beta < 1 the mixture m = beta q + (1 - beta) p; at the endpoints m is the distribution the remaining
    KL is taken against: m = p for beta = 0 (kl_teacher = KL(q || p), kl_student = 0) and m = q for beta = 1
    (kl_student = KL(p || q), kl_teacher = 0), so divergence = w_t kl_teacher + w_s kl_student with the weights
    (w_t, w_s) = (beta, 1 - beta) inside and (1, 0) resp. (0, 1) at the endpoints.
    """

    log_p: np.ndarray  # (R, V) log softmax(z_s / T), the student
    log_q: np.ndarray  # (R, V) log softmax(z_t / T), the teacher
    log_m: np.ndarray  # (R, V) log m
    kl_teacher: np.ndarray  # (R,) KL(q || m)
    kl_student: np.ndarray  # (R,) KL(p || m)
    weights: tuple[float, float]  # (w_t, w_s)
    divergence: np.ndarray  # (R,)
    grad: np.ndarray  # (R, V) d divergence / d z_s


def distillation_steps(student_logits, teacher_logits, *, beta: float = 0.0, temperature: float = 1.0):
    """`DistillationSteps` of (R, V) student and teacher logits: the unreduced divergence and its gradient. A term
    whose probability is 0 is 0 (the convention 0 log 0 = 0), also where both log-probabilities are -inf (a class
    masked out of both models), which would otherwise be 0 * (-inf - -inf) = NaN."""
    zs, zt = as_float64(student_logits), as_float64(teacher_logits)
    with quiet():
        log_p = _log_softmax_last(zs / temperature)
        log_q = _log_softmax_last(zt / temperature)
        p, q = np.exp(log_p), np.exp(log_q)
        if beta == 0.0:  # KL(q || p); dD/dz_s = (p - q) / T
            kl_teacher = _times(q, log_q - log_p).sum(-1)
            zero = np.zeros_like(kl_teacher)
            return DistillationSteps(
                log_p, log_q, log_p, kl_teacher, zero, (1.0, 0.0), kl_teacher, (p - q) / temperature
            )
        if beta == 1.0:
            log_m, weights = log_q, (0.0, 1.0)
        else:
            log_m = np.logaddexp(np.log(beta) + log_q, np.log1p(-beta) + log_p)  # log(beta q + (1 - beta) p)
            weights = (beta, 1.0 - beta)
        kl_teacher = _times(q, log_q - log_m).sum(-1)
        r = log_p - log_m
        kl_student = _times(p, r).sum(-1)
        grad = weights[1] * _times(p, r - kl_student[:, None]) / temperature
        divergence = weights[0] * kl_teacher + weights[1] * kl_student
        return DistillationSteps(log_p, log_q, log_m, kl_teacher, kl_student, weights, divergence, grad)


def _times(probability: np.ndarray, value: np.ndarray) -> np.ndarray:
    """probability * value, 0 where the probability is 0 (whatever the value: -inf - -inf is NaN)."""
    return np.where(probability > 0, probability * value, 0.0)


def _divergence_and_grad(zs: np.ndarray, zt: np.ndarray, beta: float, temperature: float):
    """Per-row divergence (R,) and its gradient wrt z_s (R, V)."""
    steps = distillation_steps(zs, zt, beta=beta, temperature=temperature)
    return steps.divergence, steps.grad


def _denominator(reduction: str, keep: np.ndarray, has_target: bool, batch: int) -> float:
    if reduction in ("none", "sum"):
        return 1.0
    if reduction == "mean":
        return float(keep.sum())
    return float(max(keep.sum() if has_target else batch, 1))


def _check(beta, temperature, reduction):
    if reduction not in DISTILLATION_REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be between 0 and 1, got {beta}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def distillation(
    student_logits, teacher_logits, target=None, *, beta=0.0, temperature=1.0, ignore_index=-100,
    reduction="batchmean",
):  # fmt: skip
    """The generalized JSD of GKD (module docstring), reduced; 'none' gives (...) with 0 on left-out rows."""
    _check(beta, temperature, reduction)
    zs, zt, keep, lead, batch = _rows(student_logits, teacher_logits, target, ignore_index)
    with quiet():
        value, _ = _divergence_and_grad(zs, zt, beta, temperature)
        value = np.where(keep, value, 0.0)
        if reduction == "none":
            return value.reshape(lead)
        return np.float64(value.sum()) / _denominator(reduction, keep, target is not None, batch)


def distillation_backward(
    grad_output, student_logits, teacher_logits, target=None, *, beta=0.0, temperature=1.0, ignore_index=-100,
    reduction="batchmean",
):  # fmt: skip
    """d(distillation)/d(student_logits) times grad_output (per row for 'none'); left-out rows get 0."""
    _check(beta, temperature, reduction)
    zs, zt, keep, lead, batch = _rows(student_logits, teacher_logits, target, ignore_index)
    g = as_float64(grad_output)
    with quiet():
        _, grad = _divergence_and_grad(zs, zt, beta, temperature)
        if reduction == "none":
            coef = np.broadcast_to(g, lead).reshape(-1)
        else:
            coef = np.full(zs.shape[0], g.item() / _denominator(reduction, keep, target is not None, batch))
        coef = np.where(keep, coef, 0.0)
        return (grad * coef[:, None]).reshape(np.shape(student_logits))


def linear_distillation(
    student_input, student_weight, teacher_input, teacher_weight, target=None, *, student_bias=None,
    teacher_bias=None, **options,
):  # fmt: skip
    """`distillation` of z_s = x_s W_s^T + b_s and z_t = x_t W_t^T + b_t; options as `distillation`."""
    zs = linear_logits(student_input, student_weight, student_bias)
    zt = linear_logits(teacher_input, teacher_weight, teacher_bias)
    return distillation(zs, zt, target, **options)


def linear_distillation_backward(
    grad_output, student_input, student_weight, teacher_input, teacher_weight, target=None, *, student_bias=None,
    teacher_bias=None, **options,
):  # fmt: skip
    """Gradients wrt x_s, W_s, b_s with G = d/dz_s: dx_s = G W_s, dW_s = G^T x_s, db_s = sum_rows G."""
    zs = linear_logits(student_input, student_weight, student_bias)
    zt = linear_logits(teacher_input, teacher_weight, teacher_bias)
    g = distillation_backward(grad_output, zs, zt, target, **options)
    return LinearDistillationGrads(*linear_grads(g, student_input, student_weight, student_bias is not None))
