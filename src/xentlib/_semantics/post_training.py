"""The rules of the post-training losses: per-token log-probabilities and distillation divergences."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from xentlib._semantics.arguments import (
    accumulation_dtype,
    check_extensions,
    check_floating_input,
    check_head_bias_and_dtype,
    check_ignore_index,
    check_tensor,
    dtype_name,
)

# --------------------------------------------------------------------------------------------------------------
# Per-token log-probabilities (xentlib.rl): log p(target) and entropy of softmax(softcap(logits) / temperature)
# --------------------------------------------------------------------------------------------------------------


def check_log_probs_call(fn, input, target, weight=None, bias=None, *, temperature, ignore_index, softcap):
    """The rules of `log_probs` (weight None: `input` is the (..., V) logits) and `linear_log_probs` (`input`
    is (..., D), `weight` (V, D), `bias` (V,)). Classes lie on the last dimension; the target has the input's
    leading shape and holds int64 class indices. Returns (temperature, ignore_index, softcap) canonical."""
    check_tensor(fn, "input", 1, input)
    check_tensor(fn, "target", 3 if weight is not None else 2, target)
    check_floating_input(fn, input)
    if weight is not None:
        check_tensor(fn, "weight", 2, weight)
        check_tensor(fn, "bias", 4, bias, optional=True)
        if weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1]:
            raise RuntimeError(
                f"{fn}: input {tuple(input.shape)} and weight {tuple(weight.shape)} cannot be multiplied "
                "(expected input (..., D) and weight (V, D))"
            )
        check_head_bias_and_dtype(fn, input, weight, bias)
    elif input.dim() < 1:
        raise RuntimeError(f"{fn}: logits must have at least one dimension (..., V), got a 0-d tensor")
    if target.dtype != torch.long:
        raise RuntimeError(
            f"{fn}: expected target dtype Long, got {dtype_name(target.dtype)} (class indices must be int64, "
            "e.g. target.long())"
        )
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"{fn}: target shape {tuple(target.shape)} does not match the input's leading shape "
            f"{tuple(input.shape[:-1])} (one class index per row of the input; the classes lie on the last dimension)"
        )
    if isinstance(temperature, Tensor) and temperature.dim() == 0:
        temperature = temperature.item()
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"{fn}: temperature must be a float, not {type(temperature).__name__}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    ignore_index = check_ignore_index(fn, ignore_index)
    softcap = check_extensions("none", 0.0, softcap, None)[1]
    return float(temperature), ignore_index, softcap


# Distillation divergences (xentlib.distill): argument rules and reduction denominators
# --------------------------------------------------------------------------------------------------------------

DISTILLATION_REDUCTIONS = ("none", "batchmean", "sum", "mean")


@dataclass
class DistillationCall:
    """A validated distillation call. Rows are the leading dimensions flattened; the classes are the last one.

    `valid` is the (rows,) keep mask (`target != ignore_index`), None when every row counts (no target).
    `batch` is the 'batchmean' denominator without a target: the batch size input.shape[0] of a (B, ..., V) input
    (1 for a single (V,) row), as torch's kl_div and TRL's generalized_jsd_loss divide by it."""

    rows: int
    vocab: int
    row_shape: tuple
    valid: Tensor | None
    beta: float
    temperature: float
    reduction: str
    batch: int


def check_distillation_scalars(fn: str, beta, temperature, reduction, ignore_index) -> tuple[float, float, str, int]:
    """beta in [0, 1], temperature finite and > 0, a known reduction, an integer ignore_index."""
    for name, value in (("beta", beta), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{fn}(): argument '{name}' must be float, not {type(value).__name__}")
    beta, temperature = float(beta), float(temperature)
    if not 0.0 <= beta <= 1.0:  # also NaN
        raise ValueError(f"{fn}: beta must be between 0.0 and 1.0 (0: forward KL, 1: reverse KL), got {beta}")
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature}")
    if not (isinstance(reduction, str) and reduction in DISTILLATION_REDUCTIONS):
        raise ValueError(
            f"{reduction} is not a valid value for reduction (expected one of "
            f"{', '.join(repr(r) for r in DISTILLATION_REDUCTIONS)})"
        )
    return beta, temperature, reduction, check_ignore_index(fn, ignore_index)


def check_distillation_pair(fn: str, student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    """Student and teacher tensors of the same floating dtype and device."""
    check_tensor(fn, f"student_{what}", 1, student)
    check_tensor(fn, f"teacher_{what}", 2, teacher)
    check_floating_input(fn, student)
    if teacher.dtype != student.dtype:
        raise RuntimeError(
            f"{fn}: expected teacher_{what} to have the student's dtype {dtype_name(student.dtype)}, "
            f"got {dtype_name(teacher.dtype)}"
        )
    if teacher.device != student.device:
        raise RuntimeError(f"{fn}: student and teacher are on different devices: {student.device} and {teacher.device}")


def check_distillation_rows(fn, lead: tuple, vocab: int, target, beta, temperature, reduction, ignore_index):
    """The rows' target mask and the reduction for student/teacher values of leading shape `lead`."""
    beta, temperature, reduction, ignore_index = check_distillation_scalars(
        fn, beta, temperature, reduction, ignore_index
    )
    rows = math.prod(lead)
    valid = None
    if target is not None:
        check_tensor(fn, "target", 3, target)
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise RuntimeError(f"{fn}: target must hold integer class indices, got dtype {dtype_name(target.dtype)}")
        if tuple(target.shape) != tuple(lead):
            raise ValueError(
                f"{fn}: target shape {tuple(target.shape)} does not match the leading shape {tuple(lead)} "
                "(one class index per row; only target == ignore_index matters)"
            )
        valid = (target.reshape(rows) != ignore_index).to(torch.bool)
    batch = lead[0] if len(lead) >= 1 else 1
    return DistillationCall(rows, vocab, tuple(lead), valid, beta, temperature, reduction, batch)


def check_distillation(fn: str, student: Tensor, teacher: Tensor, target, beta, temperature, reduction, ignore_index):
    """distillation_loss: (..., V) student and teacher logits of equal shape (at least 1-D, V >= 1)."""
    check_distillation_pair(fn, student, teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{fn}: student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} must have the "
            "same shape (..., V)"
        )
    if student.dim() < 1:
        raise ValueError(f"{fn}: expected logits of shape (..., V) with at least one dimension, got a 0-d tensor")
    lead, vocab = tuple(student.shape[:-1]), student.shape[-1]
    return check_distillation_rows(fn, lead, vocab, target, beta, temperature, reduction, ignore_index)


def check_linear_distillation(
    fn, student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, target, beta,
    temperature, reduction, ignore_index,
):  # fmt: skip
    """linear_distillation_loss: inputs (..., D_s) and (..., D_t) of one leading shape, weights (V, D_s) and
    (V, D_t) with the same V, biases (V,) or None; every tensor of one model shares that model's input dtype."""
    check_distillation_pair(fn, student_input, teacher_input, what="input")
    models = (
        ("student", student_input, student_weight, student_bias),
        ("teacher", teacher_input, teacher_weight, teacher_bias),
    )
    for who, x, w, b in models:
        check_tensor(fn, f"{who}_weight", 2, w)
        check_tensor(fn, f"{who}_bias", 3, b, optional=True)
        if x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
            raise RuntimeError(
                f"{fn}: {who}_input {tuple(x.shape)} and {who}_weight {tuple(w.shape)} cannot be multiplied "
                "(expected input (..., D) and weight (V, D))"
            )
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise RuntimeError(f"{fn}: {who}_bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        for name, other in ((f"{who}_weight", w), (f"{who}_bias", b)):
            if other is not None and (other.dtype != x.dtype or other.device != x.device):
                raise RuntimeError(
                    f"{fn}: expected {name} to have the input's dtype {dtype_name(x.dtype)} and device {x.device}, "
                    f"got {dtype_name(other.dtype)} on {other.device}"
                )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"{fn}: student and teacher vocabularies differ: {student_weight.shape[0]} and {teacher_weight.shape[0]}"
        )
    if student_input.shape[:-1] != teacher_input.shape[:-1]:
        raise ValueError(
            f"{fn}: student_input {tuple(student_input.shape)} and teacher_input {tuple(teacher_input.shape)} must "
            "have the same leading shape (one row per token)"
        )
    lead, vocab = tuple(student_input.shape[:-1]), student_weight.shape[0]
    return check_distillation_rows(fn, lead, vocab, target, beta, temperature, reduction, ignore_index)


def distillation_denominator(reduction: str, valid: Tensor | None, rows: int, batch: int, dtype, device) -> Tensor:
    """What the sum of the kept rows' divergences is divided by (a 0-d tensor; no host read of the mask):
    'none', 'sum': 1. 'mean': the number of kept rows (no kept rows: 0/0 = NaN, as cross_entropy's 'mean').
    'batchmean': with a target, the number of kept rows but at least 1 (no kept rows: 0, as TRL); without a
    target, the batch size input.shape[0] but at least 1 (as torch's kl_div and TRL)."""
    if reduction in ("none", "sum"):
        return torch.ones((), dtype=dtype, device=device)
    if valid is None:
        count = torch.tensor(float(batch if reduction == "batchmean" else rows), dtype=dtype, device=device)
    else:
        count = valid.sum().to(dtype)
    return count.clamp_min(1.0) if reduction == "batchmean" else count


# --------------------------------------------------------------------------------------------------------------
# The clipped policy-gradient loss (xentlib.policy): PPO / GRPO on per-token log-probabilities
# --------------------------------------------------------------------------------------------------------------

POLICY_REDUCTIONS = ("mean", "sum")


@dataclass
class PolicyCall:
    """A validated policy-loss call: the per-token tensors flattened to (N,) in the accumulation dtype (None
    where not given), the clipping range [1 - epsilon_low, 1 + epsilon_high] and the coefficients."""

    advantages: Tensor
    old_log_probs: Tensor | None
    ref_log_probs: Tensor | None
    token_weight: Tensor | None
    epsilon_low: float
    epsilon_high: float
    kl_coef: float
    entropy_coef: float
    reduction: str


def _real(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}(): argument '{name}' must be float, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    return float(value)


def _per_token(fn: str, name: str, value, target: Tensor, like: Tensor, optional: bool = True) -> Tensor | None:
    """A floating tensor broadcastable to the target's shape (e.g. (B, 1) advantages for (B, L) tokens), on the
    input's device, as (N,) in the accumulation dtype of `like`."""
    if value is None and optional:
        return None
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(value).__name__}")
    if not value.is_floating_point():
        raise RuntimeError(f"{fn}: {name} must be a floating tensor, got dtype {dtype_name(value.dtype)}")
    if value.device != like.device:
        raise RuntimeError(f"{fn}: {name} is on {value.device}, the input on {like.device}")
    try:
        value = value.broadcast_to(target.shape)
    except RuntimeError:
        raise ValueError(
            f"{fn}: {name} of shape {tuple(value.shape)} does not broadcast to the target's shape "
            f"{tuple(target.shape)} (one value per token, or e.g. (B, 1) for one per sequence)"
        ) from None
    return value.reshape(-1).to(accumulation_dtype(like.dtype)).detach()


def check_policy_call(fn, like: Tensor, target: Tensor, advantages, old_log_probs, ref_log_probs, token_weight, *,
                      epsilon, epsilon_high, kl_coef, entropy_coef, reduction) -> PolicyCall:  # fmt: skip
    """The per-token tensors (advantages required) and the loss's scalars; `like` is the logits or the input."""
    epsilon = _real(fn, "epsilon", epsilon)
    epsilon_high = epsilon if epsilon_high is None else _real(fn, "epsilon_high", epsilon_high)
    if not 0.0 <= epsilon < 1.0 or epsilon_high < 0.0:
        raise ValueError(
            f"{fn}: expected 0 <= epsilon < 1 and epsilon_high >= 0 (the ratio is clipped to "
            f"[1 - epsilon, 1 + epsilon_high]), got epsilon={epsilon}, epsilon_high={epsilon_high}"
        )
    kl_coef, entropy_coef = _real(fn, "kl_coef", kl_coef), _real(fn, "entropy_coef", entropy_coef)
    if kl_coef != 0.0 and ref_log_probs is None:
        raise ValueError(f"{fn}: kl_coef={kl_coef} needs ref_log_probs (the reference model's log-probabilities)")
    if not (isinstance(reduction, str) and reduction in POLICY_REDUCTIONS):
        raise ValueError(f"{reduction} is not a valid value for reduction (expected 'mean' or 'sum')")
    tensors = [
        _per_token(fn, name, value, target, like, optional=name != "advantages")
        for name, value in (
            ("advantages", advantages), ("old_log_probs", old_log_probs), ("ref_log_probs", ref_log_probs),
            ("token_weight", token_weight),
        )
    ]  # fmt: skip
    return PolicyCall(*tensors, epsilon, epsilon_high, kl_coef, entropy_coef, reduction)
