"""Per-token log-probabilities and entropy (for RL post-training), classes on the last dimension.

    y = c tanh(z / c)  (or y = z without soft-cap)     u = y / T
    log p = u - logsumexp(u)       logp = log p[t]       H = -sum_v p_v log p_v
Ignored rows (t == ignore_index) give logp = 0 and H = 0.

Backward for upstream gradients g (of logp) and h (of H), per row:
    d logp / du_j = [j == t] - p_j
    d H / du_j    = -p_j (log p_j + H)
        since H = lse - sum_v p_v u_v and d p_v / d u_j = p_v ([v == j] - p_j):
        dH/du_j = p_j - (p_j + p_j u_j - p_j sum_v p_v u_v) = -p_j (u_j - sum_v p_v u_v) = -p_j (log p_j + H)
    dL/dz = (g dlogp/du + h dH/du) / T * dy/dz,      dy/dz = 1 - tanh^2(z / c) = 1 - (y / c)^2
The linear variant has z = x W^T + b, so dL/dx = G W, dL/dW = G^T x, dL/db = sum_rows G with G = dL/dz.

>>> import numpy as np
>>> out = log_probs(np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), np.array([0, -100]))
>>> [round(float(v), 4) for v in out.log_prob], [round(float(v), 4) for v in out.entropy]
([-0.2395, 0.0], [0.6656, 0.0])
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from xentlib.reference._common import as_float64, linear_grads, linear_logits, quiet


class LogProbs(NamedTuple):
    log_prob: np.ndarray  # the target's shape
    entropy: np.ndarray  # the target's shape


class LinearLogProbsGrads(NamedTuple):
    input: np.ndarray
    weight: np.ndarray
    bias: np.ndarray | None


def _scaled(logits: np.ndarray, temperature: float, softcap: float | None):
    """(u = softcap(z) / T, dy/dz) in float64."""
    z = as_float64(logits)
    if softcap is None:
        return z / temperature, np.ones_like(z)
    y = softcap * np.tanh(z / softcap)
    return y / temperature, 1.0 - (y / softcap) ** 2


def _log_softmax(u: np.ndarray) -> np.ndarray:
    m = np.max(u, axis=-1, keepdims=True)
    shifted = u - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _rows(logits, target, ignore_index):
    t = np.asarray(target)
    valid = t != ignore_index
    vocab = np.shape(logits)[-1]
    if np.any(valid & ((t < 0) | (t >= vocab))):
        raise IndexError(f"a target is out of bounds (expected class indices in [0, {vocab - 1}] or ignore_index)")
    return np.where(valid, t, 0), valid


class LogProbsSteps(NamedTuple):
    """Every intermediate of `log_probs`, classes on the last dimension (float64)."""

    scaled: np.ndarray  # u = softcap(z) / T
    log_p: np.ndarray  # log softmax(u) = (u - max) - log sum exp(u - max)
    p: np.ndarray  # exp(log p)
    log_prob: np.ndarray  # log p[target], 0 on ignored rows (the target's shape)
    entropy: np.ndarray  # -sum p log p (0 log 0 = 0), 0 on ignored rows
    valid: np.ndarray  # target != ignore_index


def log_probs_steps(logits, target, *, temperature=1.0, ignore_index=-100, softcap=None) -> LogProbsSteps:
    """`LogProbsSteps` of logits (..., V) and class-index targets (...)."""
    safe, valid = _rows(logits, target, ignore_index)
    with quiet():
        u, _ = _scaled(logits, temperature, softcap)
        log_p = _log_softmax(u)
        p = np.exp(log_p)
        entropy = -np.sum(np.where(p > 0, p * log_p, 0.0), axis=-1)
    log_prob = np.take_along_axis(log_p, safe[..., None], axis=-1)[..., 0]
    return LogProbsSteps(u, log_p, p, np.where(valid, log_prob, 0.0), np.where(valid, entropy, 0.0), valid)


def log_probs(logits, target, *, temperature: float = 1.0, ignore_index: int = -100, softcap=None) -> LogProbs:
    """Per-token log p(target) and entropy of softmax(softcap(logits) / temperature); logits (..., V)."""
    steps = log_probs_steps(logits, target, temperature=temperature, ignore_index=ignore_index, softcap=softcap)
    return LogProbs(steps.log_prob, steps.entropy)


def log_probs_backward(grad_log_prob, grad_entropy, logits, target, *, temperature=1.0, ignore_index=-100,
                       softcap=None) -> np.ndarray:  # fmt: skip
    """dL/dlogits for L with dL/dlogp = grad_log_prob and dL/dH = grad_entropy (each of the target's shape,
    or None for no gradient)."""
    safe, valid = _rows(logits, target, ignore_index)
    shape = np.shape(target)
    g = np.where(valid, as_float64(0.0 if grad_log_prob is None else grad_log_prob), 0.0)[..., None]
    h = np.where(valid, as_float64(0.0 if grad_entropy is None else grad_entropy), 0.0)[..., None]
    g, h = np.broadcast_to(g, (*shape, 1)), np.broadcast_to(h, (*shape, 1))
    steps = log_probs_steps(logits, target, temperature=temperature, ignore_index=ignore_index, softcap=softcap)
    p, log_p, entropy = steps.p, steps.log_p, steps.entropy[..., None]
    with quiet():
        _, chain = _scaled(logits, temperature, softcap)
        onehot = np.zeros_like(p)
        np.put_along_axis(onehot, safe[..., None], 1.0, axis=-1)
        d_logp = onehot - p  # d logp / du
        d_entropy = -np.where(p > 0, p * (log_p + entropy), 0.0)  # d H / du
        grad = (g * d_logp + h * d_entropy) / temperature * chain
    return np.where(valid[..., None], grad, 0.0)


def linear_log_probs(input, weight, target, bias=None, *, temperature=1.0, ignore_index=-100, softcap=None):
    """`log_probs(input @ weight.T + bias, target, ...)` in float64."""
    return log_probs(
        linear_logits(input, weight, bias), target, temperature=temperature, ignore_index=ignore_index, softcap=softcap
    )


def linear_log_probs_backward(grad_log_prob, grad_entropy, input, weight, target, bias=None, *, temperature=1.0,
                              ignore_index=-100, softcap=None) -> LinearLogProbsGrads:  # fmt: skip
    """Gradients wrt input, weight and bias: G = dL/dz from `log_probs_backward`, then G W, G^T x, sum G."""
    grad_z = log_probs_backward(
        grad_log_prob, grad_entropy, linear_logits(input, weight, bias), target, temperature=temperature,
        ignore_index=ignore_index, softcap=softcap,
    )  # fmt: skip
    return LinearLogProbsGrads(*linear_grads(grad_z, input, weight, bias is not None))
