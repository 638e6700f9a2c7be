"""linear_cross_entropy's rules: the same problem, with logits = input @ weight.T + bias never materialized."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xentlib._semantics.arguments import check_floating_input, check_head_bias_and_dtype, check_tensor
from xentlib._semantics.cross_entropy import (
    CrossEntropyCall,
    CrossEntropyProblem,
    check_cross_entropy,
    problem_from_call,
)

# --------------------------------------------------------------------------------------------------------------
# linear_cross_entropy: the same problem, with logits = input @ weight.T + bias that are never materialized
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LinearProblem:
    """A validated linear_cross_entropy call. `rows` describes the (N, V) logits problem (its `logits` is a
    zero-stride placeholder holding no memory): a `CrossEntropyCall` before the data is read, a
    `CrossEntropyProblem` after. `input_rows[i]` is the row of `flat_input` that row i reads."""

    rows: CrossEntropyCall | CrossEntropyProblem
    flat_input: Tensor  # (M, D) view of the input
    input_rows: Tensor | None  # (N,) int64 row ids into flat_input, or None for the identity (N == M)

    def gathered_input(self) -> Tensor:
        """The (N, D) input rows the loss rows read: the flat input, or with shift=True a copy of its rows."""
        return self.flat_input if self.input_rows is None else self.flat_input.index_select(0, self.input_rows)


def logits_placeholder(rows: int, vocab: int, like: Tensor) -> Tensor:
    """A (rows, vocab) tensor of `like`'s dtype and device that holds no memory: the shape of logits that are
    never materialized."""
    return torch.empty((), dtype=like.dtype, device=like.device).expand(rows, vocab)


def check_linear_cross_entropy(
    input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing,
    *, shift=False, z_loss=0.0, softcap=None, normalizer=None, autocast=False,
) -> LinearProblem:  # fmt: skip
    """Every check of linear_cross_entropy that needs no data; `rows` is a `CrossEntropyCall`."""
    fn = "linear_cross_entropy"
    check_tensor(fn, "input", 1, input)
    check_tensor(fn, "linear_weight", 2, weight)
    check_tensor(fn, "target", 3, target)
    check_tensor(fn, "linear_bias", 4, bias, optional=True)
    if not isinstance(shift, bool):
        raise TypeError(
            f"linear_cross_entropy: shift must be a bool (True: position t predicts target t + 1), got {shift!r}"
        )
    if weight.dim() > 2:
        raise NotImplementedError(
            f"linear_cross_entropy: a K-dimensional linear_weight {tuple(weight.shape)} is not supported; "
            "xentlib takes a (C, in_features) weight (rows of the input are flattened instead)"
        )
    if input.dim() < 1 or weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"linear_cross_entropy: input {tuple(input.shape)} and linear_weight {tuple(weight.shape)} cannot be "
            "multiplied (expected input (..., in_features) and linear_weight (C, in_features))"
        )
    vocab, hidden = weight.shape
    check_head_bias_and_dtype(fn, input, weight, bias, names=("linear_weight", "linear_bias"))
    check_floating_input("linear_cross_entropy", input)
    lead = input.shape[:-1]
    prob = target.shape == lead + (vocab,)
    target_lead = target.shape[:-1] if prob else target.shape
    if target_lead != lead:
        raise ValueError(
            f"linear_cross_entropy: target shape {tuple(target.shape)} does not match the input's leading shape "
            f"{tuple(lead)} (expected class indices of shape {tuple(lead)} or probabilities of shape "
            f"{tuple(lead) + (vocab,)})"
        )
    flat_input = input.reshape(-1, hidden)
    input_rows = None
    if shift:
        if len(lead) < 1 or lead[-1] < 1:
            raise ValueError("linear_cross_entropy: shift=True needs input of shape (..., T, D) with T >= 1")
        # position t predicts target t + 1: rows (..., :-1) of the input against target (..., 1:)
        positions = torch.arange(math.prod(lead), device=input.device).reshape(lead)
        input_rows = positions[..., :-1].reshape(-1)
        target = target[..., 1:, :] if prob else target[..., 1:]
    rows_lead = target.shape[:-1] if prob else target.shape
    count = math.prod(rows_lead)
    flat_target = target.reshape(count, vocab) if prob else target.reshape(count)
    call = check_cross_entropy(
        logits_placeholder(count, vocab, input), flat_target, class_weight, ignore_index, reduction,
        label_smoothing, z_loss=z_loss, softcap=softcap, normalizer=normalizer, autocast=autocast,
    )  # fmt: skip
    call.output_shape = tuple(rows_lead)
    return LinearProblem(rows=call, flat_input=flat_input, input_rows=input_rows)


def prepare_linear_cross_entropy(*args, **kwargs) -> LinearProblem:
    """`check_linear_cross_entropy`, with the rows' problem built (reads the targets)."""
    lp = check_linear_cross_entropy(*args, **kwargs)
    lp.rows = problem_from_call(lp.rows)
    return lp
