"""The clipped policy-gradient loss of PPO and GRPO on per-token log-probabilities, in float64.

Per token n (not ignored) with log-probability l = log p(target) at the temperature, entropy H, advantage A,
the sampling policy's log-probability l_old (l itself when not given: on-policy, r = 1) and a reference
model's l_ref:
    r = exp(l - l_old)                                   the importance ratio
    pg = -min(r A, clip(r, 1 - e_low, 1 + e_high) A)    the clipped surrogate, negated (a loss)
    kl = exp(l_ref - l) - (l_ref - l) - 1                the k3 estimate of KL(policy || reference), >= 0
    loss_n = pg + kl_coef kl - entropy_coef H
    loss = sum_n w_n loss_n / D,   D = sum_n w_n ('mean'; 0 when no token counts: loss 0) or 1 ('sum')
with token weights w (1 when not given). The derivatives the backward needs, per token:
    d pg / dl = -A r  where r A <= clip(r) A (the unclipped term is the minimum), else 0 (clipped: constant)
    d kl / dl = 1 - exp(l_ref - l)
    d loss_n / dH = -entropy_coef
then dL/dlogits = log_probs_backward(w dloss_n/dl / D, w dloss_n/dH / D). The advantages, old and reference
log-probabilities and weights are constants (no gradient), as in TRL's GRPO trainer.

>>> import numpy as np
>>> logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
>>> round(float(policy_loss(logits, np.array([0, 1]), np.array([1.0, -1.0]))), 4)  # on-policy: -(1 - 1) / 2
0.0
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from xentlib.reference._common import as_float64, linear_grads, linear_logits, quiet
from xentlib.reference.log_probs import LinearLogProbsGrads, log_probs, log_probs_backward


class PolicyTerms(NamedTuple):
    """Per-token values (the target's shape) of the policy loss, before weighting and reduction; the steps
    (ratio ... kl) are what `xentlib explain --example policy-loss` shows."""

    loss: np.ndarray  # loss_n, 0 on ignored tokens
    d_log_prob: np.ndarray  # d loss_n / d l
    d_entropy: np.ndarray  # d loss_n / d H
    ratio: np.ndarray  # r = exp(l - l_old)
    clipped: np.ndarray  # clip(r, 1 - e_low, 1 + e_high)
    surrogate: np.ndarray  # pg = -min(r A, clip(r) A)
    kl: np.ndarray  # exp(l_ref - l) - (l_ref - l) - 1 (0 without kl_coef)


def policy_terms(log_prob, entropy, valid, advantages, old_log_probs=None, ref_log_probs=None, *, epsilon=0.2,
                 epsilon_high=None, kl_coef=0.0, entropy_coef=0.0) -> PolicyTerms:  # fmt: skip
    """`PolicyTerms` of per-token log-probabilities and entropies (arrays of one shape; the rest broadcast)."""
    high = epsilon if epsilon_high is None else epsilon_high
    shape = np.shape(log_prob)
    lp, a = as_float64(log_prob), np.broadcast_to(as_float64(advantages), shape)
    with quiet():
        ratio = np.ones(shape) if old_log_probs is None else np.exp(lp - as_float64(old_log_probs))
        clipped = np.clip(ratio, 1.0 - epsilon, 1.0 + high)
        surrogate = -np.minimum(ratio * a, clipped * a)
        d_log_prob = np.where(ratio * a <= clipped * a, -a * ratio, 0.0)
        kl = np.zeros(shape)
        if kl_coef != 0.0:
            delta = as_float64(ref_log_probs) - lp
            kl = np.exp(delta) - delta - 1.0
            d_log_prob = d_log_prob + kl_coef * (1.0 - np.exp(delta))
        loss = surrogate + kl_coef * kl - entropy_coef * as_float64(entropy)
    d_entropy = np.full(shape, -float(entropy_coef))
    zero = lambda v: np.where(valid, v, 0.0)  # noqa: E731
    return PolicyTerms(zero(loss), zero(d_log_prob), zero(d_entropy), ratio, clipped, surrogate, kl)


def _weights_and_denominator(valid, token_weight, reduction: str):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    w = np.where(valid, np.broadcast_to(as_float64(1.0 if token_weight is None else token_weight), valid.shape), 0.0)
    denominator = float(w.sum()) if reduction == "mean" else 1.0
    return w, denominator


def _terms(logits, target, advantages, old_log_probs, ref_log_probs, temperature, ignore_index, softcap, scalars):
    lp = log_probs(logits, target, temperature=temperature, ignore_index=ignore_index, softcap=softcap)
    valid = np.asarray(target) != ignore_index
    return policy_terms(lp.log_prob, lp.entropy, valid, advantages, old_log_probs, ref_log_probs, **scalars), valid


def policy_loss(logits, target, advantages, old_log_probs=None, ref_log_probs=None, token_weight=None, *,
                epsilon=0.2, epsilon_high=None, kl_coef=0.0, entropy_coef=0.0, temperature=1.0, ignore_index=-100,
                softcap=None, reduction="mean") -> float:  # fmt: skip
    """The policy loss (a float) of logits (..., V), targets (...) and per-token advantages (broadcast)."""
    scalars = dict(epsilon=epsilon, epsilon_high=epsilon_high, kl_coef=kl_coef, entropy_coef=entropy_coef)
    terms, valid = _terms(logits, target, advantages, old_log_probs, ref_log_probs, temperature, ignore_index,
                          softcap, scalars)  # fmt: skip
    w, denominator = _weights_and_denominator(valid, token_weight, reduction)
    return float((w * terms.loss).sum() / denominator) if denominator != 0.0 else 0.0


def _upstream(grad_output, logits, target, advantages, old_log_probs, ref_log_probs, token_weight, temperature,
              ignore_index, softcap, reduction, scalars):  # fmt: skip
    """(dL/dl, dL/dH) per token for the scalar loss's upstream gradient."""
    terms, valid = _terms(logits, target, advantages, old_log_probs, ref_log_probs, temperature, ignore_index,
                          softcap, scalars)  # fmt: skip
    w, denominator = _weights_and_denominator(valid, token_weight, reduction)
    scale = float(grad_output) / denominator if denominator != 0.0 else 0.0
    return w * terms.d_log_prob * scale, w * terms.d_entropy * scale


def policy_loss_backward(grad_output, logits, target, advantages, old_log_probs=None, ref_log_probs=None,
                         token_weight=None, *, epsilon=0.2, epsilon_high=None, kl_coef=0.0, entropy_coef=0.0,
                         temperature=1.0, ignore_index=-100, softcap=None, reduction="mean") -> np.ndarray:  # fmt: skip
    """dL/dlogits of `policy_loss`."""
    scalars = dict(epsilon=epsilon, epsilon_high=epsilon_high, kl_coef=kl_coef, entropy_coef=entropy_coef)
    g, h = _upstream(grad_output, logits, target, advantages, old_log_probs, ref_log_probs, token_weight,
                     temperature, ignore_index, softcap, reduction, scalars)  # fmt: skip
    return log_probs_backward(g, h, logits, target, temperature=temperature, ignore_index=ignore_index,
                              softcap=softcap)  # fmt: skip


def linear_policy_loss(input, weight, target, advantages, bias=None, **options) -> float:
    """`policy_loss(input @ weight.T + bias, ...)`; options as `policy_loss`."""
    return policy_loss(linear_logits(input, weight, bias), target, advantages, **options)


def linear_policy_loss_backward(grad_output, input, weight, target, advantages, bias=None, *, old_log_probs=None,
                                ref_log_probs=None, token_weight=None, epsilon=0.2, epsilon_high=None, kl_coef=0.0,
                                entropy_coef=0.0, temperature=1.0, ignore_index=-100, softcap=None,
                                reduction="mean") -> LinearLogProbsGrads:  # fmt: skip
    """Gradients wrt input, weight and bias of `linear_policy_loss`."""
    scalars = dict(epsilon=epsilon, epsilon_high=epsilon_high, kl_coef=kl_coef, entropy_coef=entropy_coef)
    z = linear_logits(input, weight, bias)
    g, h = _upstream(grad_output, z, target, advantages, old_log_probs, ref_log_probs, token_weight, temperature,
                     ignore_index, softcap, reduction, scalars)  # fmt: skip
    grad_z = log_probs_backward(g, h, z, target, temperature=temperature, ignore_index=ignore_index, softcap=softcap)
    return LinearLogProbsGrads(*linear_grads(grad_z, input, weight, bias is not None))
