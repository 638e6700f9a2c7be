"""xentlib's float64 NumPy reference: the oracle every fast path is tested against, written to be read.

Every function takes NumPy arrays (any float dtype; class-index targets as integers), computes in float64 and
returns float64. Each forward has an analytic backward beside it (no autodiff, no finite differences). Only
NumPy is imported: this package works where torch is not installed.

    log_softmax, softmax (+ _backward)              softmax.py
    nll_loss (+ _backward, _steps)                  nll.py
    cross_entropy (+ _backward), cross_entropy_stats (+ _backward), cross_entropy_steps (every intermediate)
                                                    cross_entropy.py  (the unified formula lives there)
    linear_cross_entropy (+ _backward)              linear.py
    log_probs, linear_log_probs (+ _backward, log_probs_steps)
                                                    log_probs.py  (per-token log p(target) and entropy, for RL)
    policy_loss, linear_policy_loss (+ _backward, policy_terms)
                                                    policy.py  (PPO/GRPO's clipped surrogate on those)
    binary_cross_entropy(_with_logits) (+ _backward) bce.py
    distillation, linear_distillation (+ _backward, distillation_steps)
                                                    distillation.py  (GKD's generalized Jensen-Shannon divergence)

Cross-entropy of logits x against a class t is -log softmax(x)_t = log sum_c exp(x_c) - x_t. Two rows:

>>> import numpy as np
>>> from xentlib.reference import cross_entropy
>>> logits = np.array([[0.0541, 0.1762, 0.9489], [-0.0288, -0.8072, 0.4909]])
>>> [round(float(v), 4) for v in cross_entropy(logits, np.array([0, 2]), reduction="none")]
[1.521, 0.6247]
>>> round(float(cross_entropy(logits, np.array([0, 2]))), 3)  # 'mean' of the two rows
1.073

Three identical rows, one per class: the mean of -log p_c over the classes.

>>> round(float(cross_entropy(np.array([[0.1234, 0.5555, 0.3211]] * 3), np.array([0, 1, 2]))), 4)
1.1142

The backward of the mean is (softmax(x) - onehot(t)) / N:

>>> from xentlib.reference import cross_entropy_backward, softmax
>>> grads = cross_entropy_backward(1.0, logits, np.array([0, 2]))
>>> bool(np.allclose(grads.input, (softmax(logits, 1) - np.eye(3)[[0, 2]]) / 2))
True
"""

from xentlib.reference.bce import (
    BCEGrads,
    binary_cross_entropy,
    binary_cross_entropy_backward,
    binary_cross_entropy_with_logits,
    binary_cross_entropy_with_logits_backward,
)
from xentlib.reference.cross_entropy import (
    CrossEntropyGrads,
    CrossEntropyStats,
    CrossEntropySteps,
    SoftmaxSteps,
    cross_entropy,
    cross_entropy_backward,
    cross_entropy_stats,
    cross_entropy_stats_backward,
    cross_entropy_steps,
)
from xentlib.reference.distillation import (
    DistillationSteps,
    LinearDistillationGrads,
    distillation,
    distillation_backward,
    distillation_steps,
    linear_distillation,
    linear_distillation_backward,
)
from xentlib.reference.linear import (
    LinearCrossEntropyGrads,
    linear_cross_entropy,
    linear_cross_entropy_backward,
)
from xentlib.reference.log_probs import (
    LinearLogProbsGrads,
    LogProbs,
    LogProbsSteps,
    linear_log_probs,
    linear_log_probs_backward,
    log_probs,
    log_probs_backward,
    log_probs_steps,
)
from xentlib.reference.nll import nll_loss, nll_loss_backward, nll_loss_steps
from xentlib.reference.policy import (
    PolicyTerms,
    linear_policy_loss,
    linear_policy_loss_backward,
    policy_loss,
    policy_loss_backward,
    policy_terms,
)
from xentlib.reference.softmax import log_softmax, log_softmax_backward, softmax, softmax_backward

__all__ = [
    "BCEGrads",
    "CrossEntropyGrads",
    "CrossEntropyStats",
    "CrossEntropySteps",
    "DistillationSteps",
    "LinearCrossEntropyGrads",
    "LinearLogProbsGrads",
    "LogProbs",
    "LogProbsSteps",
    "PolicyTerms",
    "LinearDistillationGrads",
    "SoftmaxSteps",
    "binary_cross_entropy",
    "binary_cross_entropy_backward",
    "binary_cross_entropy_with_logits",
    "binary_cross_entropy_with_logits_backward",
    "cross_entropy",
    "cross_entropy_backward",
    "cross_entropy_stats",
    "cross_entropy_stats_backward",
    "cross_entropy_steps",
    "distillation",
    "distillation_backward",
    "distillation_steps",
    "linear_cross_entropy",
    "linear_cross_entropy_backward",
    "linear_log_probs",
    "linear_log_probs_backward",
    "linear_distillation",
    "linear_distillation_backward",
    "linear_policy_loss",
    "linear_policy_loss_backward",
    "log_softmax",
    "log_softmax_backward",
    "log_probs",
    "log_probs_backward",
    "log_probs_steps",
    "nll_loss",
    "nll_loss_backward",
    "nll_loss_steps",
    "policy_loss",
    "policy_loss_backward",
    "policy_terms",
    "softmax",
    "softmax_backward",
]
