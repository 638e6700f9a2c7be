"""The cross-entropy maths as plain differentiable torch ops, and the autograd pieces the fused paths share.

The fused backends compute the loss and, in the same sweep, the gradient of the reduced loss wrt the logits;
backward then only scales that gradient by grad_output. `composite_rows` states the same maths as a
composition of torch ops, for everything rarer: gradients wrt probability targets and class weights, gradients
flowing in through the statistics (lse, entropy), a second backward of the same graph, double backward, and the
torch.func transforms and forward-mode AD (which differentiate it like any torch code).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd import forward_ad

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


def scale_by_grad_output_(reduction: str, buffer: Tensor, grad_loss: Tensor) -> Tensor:
    """The saved gradient times grad_output, in place: per row for reduction='none', else one scale that is
    skipped when it is 1 (the common `loss.backward()`). On CPU that is read on the host; on a GPU reading it
    would synchronise, so a Triton kernel checks it on the device. Half types multiply in float32 (one
    rounding); float32 and float64 in their own precision."""
    wide = torch.promote_types(buffer.dtype, torch.float32)
    if type(grad_loss) is not Tensor:  # traced by the compiler (fake/functional tensors): it plans the memory
        scale = grad_loss.reshape(buffer.shape[0], 1, buffer.shape[2]) if reduction == "none" else grad_loss
        return (buffer.to(wide) * scale.to(wide)).to(buffer.dtype)
    if reduction == "none":
        batch, _, spatial = buffer.shape
        return buffer.copy_(buffer.to(wide).mul_(grad_loss.reshape(batch, 1, spatial).to(wide)))
    if grad_loss.device.type == "cpu" and float(grad_loss) == 1.0:
        return buffer
    if buffer.device.type == "cuda" and buffer.is_contiguous() and _triton_runs_on(buffer.device):
        from xentlib.backends.triton.ops import SCALE_DTYPES, scale_unless_one_

        if buffer.dtype in SCALE_DTYPES:  # computes in float32
            return scale_unless_one_(buffer, grad_loss)
    if buffer.element_size() < 4:  # grad_output may not fit a half type (GradScaler's 65536 overflows float16)
        return buffer.copy_(buffer.float().mul_(grad_loss.float()))
    return buffer.mul_(grad_loss.to(buffer.dtype))


def _triton_runs_on(device: torch.device) -> bool:
    from xentlib.backends import triton as triton_backend

    return triton_backend.is_available(device)[0]


def gradients(problem: CrossEntropyProblem, input, target, weight, wrt, grad_loss, grad_lse, grad_entropy):
    """Gradients wrt the flagged tensors of (input, target, weight) by autograd through `composite_rows`.

    Only the outputs whose incoming gradient is not None take part. The result is differentiable when the
    backward runs with create_graph=True, because the saved tensors stay connected to the caller's graph.
    """
    tensors = (input, target, weight)
    if grad_loss is None and grad_lse is None and grad_entropy is None:  # nothing flows back
        return [None, None, None]
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


def transforms_active(*tensors) -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) or forward-mode AD is active on these tensors:
    then the composite runs, which those transforms differentiate like any torch code."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active():
        return True
    return _has_tangent(tensors)


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open (a dual tensor may exist); cheap, without looking at tensors."""
    return forward_ad._current_level >= 0


def _has_tangent(tensors) -> bool:
    if not forward_ad_active():
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def refuse_transforms(name: str, *tensors) -> None:
    """For the ops that have no rule for the torch.func transforms and forward-mode AD yet: refuse rather than
    return a result without its tangent or batch dimension."""
    if transforms_active(*tensors):
        raise NotImplementedError(
            f"xentlib.{name} does not support torch.func transforms or forward-mode AD yet; compute it from "
            "torch.log_softmax for those (plain autograd and torch.compile work)"
        )


def as_leaf(tensor: Tensor) -> Tensor:
    """The tensor itself when autograd tracks it (so double backward reaches the caller's graph), else a leaf."""
    return tensor if tensor.requires_grad else tensor.detach().requires_grad_()
