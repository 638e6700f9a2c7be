"""The autograd glue every cross-entropy backend shares.

The forward pass asks a backend's `cross_entropy_rows` for the per-row losses and, in the same sweep, for the
gradient of the reduced loss wrt the logits (for grad_output = 1). The backward pass only scales that buffer by
grad_output: no second read of the logits, and the buffer is handed to autograd without a copy.

Everything rarer is computed by `composite_rows`, a differentiable composition of plain torch ops that states the
same maths: gradients wrt probability targets and class weights, gradients flowing in through the statistics
(lse, entropy), a second backward after the buffer was handed out (retain_graph=True), and double backward
(create_graph=True).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from xentlib._semantics import CrossEntropyProblem


class CrossEntropyStats(NamedTuple):
    """Per-row statistics, each of the reduction='none' output shape."""

    lse: Tensor  # log-sum-exp of the (capped) logits, float32 (float64 for float64 inputs); differentiable
    loss: Tensor  # the per-row value reduction='none' returns
    argmax: Tensor  # predicted class (int64)
    correct: Tensor  # argmax == target (False on ignored rows; probability targets: argmax of the target)
    entropy: Tensor  # entropy of the predicted distribution, float32 (float64 for float64 inputs); differentiable


def reduce_rows(problem: CrossEntropyProblem, row_loss: Tensor) -> Tensor:
    """'none' -> the output shape; 'sum' -> sum / normalizer; 'mean' -> sum / denominator (weighted count or rows)."""
    if problem.reduction == "none":
        return row_loss.reshape(problem.output_shape)
    return row_loss.sum() / problem.denominator


def composite_rows(problem: CrossEntropyProblem, logits: Tensor, target: Tensor, weight: Tensor | None):
    """Differentiable (row loss, lse, entropy), each (B, S), from plain torch ops; `logits` is (B, C, S).

    The same formula as the fused backends (docs/numerics.md), written for autograd rather than for speed.
    """
    acc = problem.acc_dtype
    y = logits.to(acc)
    if problem.softcap is not None:
        y = problem.softcap * torch.tanh(y / problem.softcap)
    lse = torch.logsumexp(y, dim=1)
    log_p = torch.log_softmax(y, dim=1)  # not y - lse: a +inf or NaN logit makes the row NaN, as in torch
    eps, classes = problem.smoothing, problem.num_classes
    w = None if weight is None else weight.to(acc).view(1, -1, 1)
    if problem.kind == "index":
        loss = -log_p.gather(1, problem.target.unsqueeze(1)).squeeze(1) * problem.target_weight
        if eps > 0:
            smooth = -(log_p if w is None else log_p * w).sum(1)
            loss = (1.0 - eps) * loss + (eps / classes) * smooth
    else:
        q = target.to(acc)
        if eps > 0:
            q = q * (1.0 - eps) + eps / classes
        if w is not None:
            q = q * w
        loss = -(q * log_p).sum(1)
    if problem.z_loss:
        loss = loss + problem.z_loss * lse * lse
    loss = torch.where(problem.valid, loss, torch.zeros((), dtype=acc, device=loss.device))
    entropy = -(torch.softmax(y, dim=1) * log_p).sum(1)
    return loss, lse, entropy


class FusedCrossEntropy(torch.autograd.Function):
    """Inputs: (input, target, weight, problem, rows_fn, want_stats, inplace). Outputs: (loss, lse, entropy, aux).

    `rows_fn(problem, grad_out, want_stats)` is a backend's `cross_entropy_rows`.
    """

    @staticmethod
    def forward(ctx, input, target, weight, problem, rows_fn, want_stats, inplace):
        want_input_grad = ctx.needs_input_grad[0]
        grad_buffer = None
        if want_input_grad:
            grad_buffer = problem.logits.detach() if inplace else torch.empty_like(problem.logits)
        rows = rows_fn(problem, grad_buffer, want_stats)
        loss = reduce_rows(problem, rows.loss).to(problem.output_dtype)
        lse = rows.lse.reshape(problem.output_shape) if want_stats else input.new_empty(0, dtype=problem.acc_dtype)
        entropy = rows.entropy.reshape(problem.output_shape) if want_stats else lse.new_empty(0)
        aux = (rows.loss.reshape(problem.output_shape), rows.argmax.reshape(problem.output_shape)) if want_stats else ()
        ctx.problem = problem
        ctx.grad_buffer = grad_buffer
        ctx.inplace = inplace
        ctx.input_shape = input.shape
        # The input is saved by reference (no copy) for the rare paths of `composite_rows`; with inplace it now
        # holds the gradient, so those paths are unavailable and say so.
        ctx.save_for_backward(None if inplace else input, target, weight)
        ctx.mark_non_differentiable(*aux)
        ctx.set_materialize_grads(False)
        return (loss, lse, entropy, *aux)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse, grad_entropy, *_):
        problem = ctx.problem
        input, target, weight = ctx.saved_tensors
        needs = tuple(ctx.needs_input_grad[:3])
        buffer, ctx.grad_buffer = ctx.grad_buffer, None  # handed to autograd below: x.grad takes it without a copy
        if torch.is_grad_enabled() or (needs[0] and buffer is None):
            # double backward, or a second backward after the buffer was handed out: all from the composite
            grads = _composite_grads(ctx, input, target, weight, needs, grad_loss, grad_lse, grad_entropy)
            return (*grads, None, None, None, None)
        grads = [None, None, None]
        if needs[0]:
            if grad_loss is not None:
                grads[0] = _scale_buffer(problem, buffer, grad_loss).view(ctx.input_shape)
            if grad_lse is not None or grad_entropy is not None:
                extra = _composite_grads(ctx, input, target, weight, (True, False, False), None, grad_lse, grad_entropy)
                grads[0] = extra[0] if grads[0] is None else grads[0] + extra[0]
        if (needs[1] or needs[2]) and grad_loss is not None:
            extra = _composite_grads(ctx, input, target, weight, (False, *needs[1:]), grad_loss, None, None)
            grads[1], grads[2] = extra[1], extra[2]
        return (*grads, None, None, None, None)


def _scale_buffer(problem: CrossEntropyProblem, buffer: Tensor, grad_loss: Tensor) -> Tensor:
    """The saved gradient times grad_output, in place (per row for reduction='none')."""
    if problem.reduction == "none":
        batch, _, spatial = buffer.shape
        return buffer.mul_(grad_loss.reshape(batch, 1, spatial).to(buffer.dtype))
    return scale_by_grad_output_(buffer, grad_loss)


def scale_by_grad_output_(grad: Tensor, grad_loss: Tensor) -> Tensor:
    """grad *= grad_loss (one element) in place, as `grad.mul_(grad_loss.to(grad.dtype))`, skipping the sweep
    over grad when grad_loss is 1, the common `loss.backward()`. On a GPU reading grad_loss would synchronise,
    so a Triton kernel checks it on the device (H200, bf16 16384x256000 cross-entropy: the sweep was a fifth of
    the step)."""
    if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
        return grad
    if grad.device.type == "cuda" and grad.is_contiguous() and _triton_runs_on(grad.device):
        from xentlib.backends.triton.ops import SCALE_DTYPES, scale_unless_one_

        if grad.dtype in SCALE_DTYPES:
            return scale_unless_one_(grad, grad_loss)
    return grad.mul_(grad_loss.to(grad.dtype))


def _triton_runs_on(device: torch.device) -> bool:
    from xentlib.backends import triton as triton_backend

    return triton_backend.is_available(device)[0]


def _composite_grads(ctx, input, target, weight, wrt, grad_loss, grad_lse, grad_entropy):
    """Gradients wrt the flagged tensors of (input, target, weight) from `composite_rows`, by autograd.

    Only the outputs whose incoming gradient is not None take part. The result is differentiable when the
    backward runs with create_graph=True, because the saved tensors stay connected to the caller's graph.
    """
    if input is None:
        raise RuntimeError(
            "inplace_backward=True overwrote the logits with their gradient, so this backward (a second backward, "
            "double backward, or gradients through statistics, target or weight) cannot be computed; call "
            "without inplace_backward for it"
        )
    problem = ctx.problem
    tensors = (input, target, weight)
    create_graph = torch.is_grad_enabled()  # read before enable_grad: True only for double backward
    with torch.enable_grad():
        leaves = [as_leaf(t) if flag else t for t, flag in zip(tensors, wrt)]
        x, t, w = leaves
        if problem.kind == "prob":
            t = t.reshape(problem.logits.shape)
        loss_rows, lse, entropy = composite_rows(problem, x.reshape(problem.logits.shape), t, w)
        pairs = [
            (reduce_rows(problem, loss_rows), grad_loss),
            (lse.reshape(problem.output_shape), grad_lse),
            (entropy.reshape(problem.output_shape), grad_entropy),
        ]
        outputs, grads = zip(*[(out, g) for out, g in pairs if g is not None])
        sources = [leaf for leaf, flag in zip(leaves, wrt) if flag]
        result = torch.autograd.grad(outputs, sources, grads, create_graph=create_graph, allow_unused=True)
    found = iter(result)
    grads = [next(found) if flag else None for flag in wrt]
    return [None if g is None else g.reshape(tensor.shape).to(tensor.dtype) for g, tensor in zip(grads, tensors)]


def as_leaf(tensor: Tensor) -> Tensor:
    """The tensor itself when autograd tracks it (so double backward reaches the caller's graph), else a leaf."""
    return tensor if tensor.requires_grad else tensor.detach().requires_grad_()
