"""`inplace_backward=True`: the gradient is written over the logits, so no gradient-sized buffer is allocated.

An eager-mode memory option: the forward pass turns the logits into d(loss)/d(logits) (for grad_output = 1) and
the backward pass scales them by grad_output and hands them to autograd. The caller's tensor is marked as
modified, so autograd refuses any other use of its old values. Under torch.compile the op of `backends/ops.py`
runs instead and the compiler plans the memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xentlib._semantics import CrossEntropyProblem
from xentlib.backends import composite


def check_writable(input: Tensor) -> None:
    """Refuse what torch refuses for an in-place write: a leaf that requires grad, and memory shared by several
    elements (expanded or overlapping strides), where the gradients of different elements would collide."""
    if input.is_leaf and input.requires_grad:
        raise RuntimeError(
            "a leaf Variable that requires grad is being used in an in-place operation (inplace_backward=True "
            "writes the gradient over the logits: pass logits computed from the parameters, not a leaf)"
        )
    base = input._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise RuntimeError(
            "a view of a leaf Variable that requires grad is being used in an in-place operation "
            "(inplace_backward=True would overwrite the leaf's values with the gradient)"
        )
    if torch._debug_has_internal_overlap(input) != 0:
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to a single memory "
            "location (inplace_backward=True needs logits whose elements do not share memory: pass a contiguous "
            "tensor, e.g. logits.contiguous())"
        )


class InplaceCrossEntropy(torch.autograd.Function):
    """Inputs: (input, problem, rows_fn). Output: the reduced loss."""

    @staticmethod
    def forward(ctx, input, problem: CrossEntropyProblem, rows_fn):
        buffer = problem.logits.detach() if ctx.needs_input_grad[0] else None
        rows = rows_fn(problem, buffer, False)
        if buffer is not None:  # written through a raw pointer or out=: tell autograd, as an in-place op would
            torch.autograd.graph.increment_version(input)
        ctx.reduction, ctx.buffer, ctx.input_shape = problem.reduction, buffer, input.shape
        ctx.set_materialize_grads(False)
        return composite.reduce_rows(problem, rows.loss).to(problem.output_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        buffer, ctx.buffer = ctx.buffer, None
        if buffer is None or torch.is_grad_enabled():
            raise RuntimeError(
                "inplace_backward=True overwrote the logits with their gradient, so this backward (a second "
                "backward or a double backward) cannot be computed; call without inplace_backward for it"
            )
        if grad_loss is None:
            return None, None, None
        return composite.scale_by_grad_output_(ctx.reduction, buffer, grad_loss).view(ctx.input_shape), None, None
