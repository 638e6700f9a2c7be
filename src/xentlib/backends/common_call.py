"""The common call, with little Python around it: `cross_entropy(logits, target)` with float32 (N, C) CPU logits,
int64 class indices, and no option but `ignore_index` and `reduction`.

Why it exists: on small logits the arithmetic costs nothing and the Python around it everything. The general
path (the semantic checks, the problem's tensors, the op and its autograd formula) costs tens of microseconds
a call where torch's costs three, and a learner's training loop on (64, 10) logits pays it every step. This
path checks what the general path would check for such a call with a few attribute reads, and sends the rest
to one C call (`xent_common_call` in cpu_rows.c), which applies the data-dependent rules where it reads the
data (the targets' bounds, the ignore mask, the mean's denominator) and computes the rows with the "cpu"
backend's row kernel, gradient included.

The same bits as the general path: the row kernel is the same, its scale for 'mean' is 1 / denominator rounded
to float32 once, and the row losses are reduced with the same torch ops (`sum() / denominator`).
tests/backends/test_common_call.py holds both paths to equal bits, and the general path to taking over
for every call this one does not cover. A target out of range raises the family's IndexError (the general
path's check, run on the same data). Anything else (another dtype, layout or option, a torch.func transform or
forward-mode AD, a tracer recording the call (`dispatch.traced`), the kernel not built) returns None: the
general path runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.backends import cpu_kernel
from xentlib.backends.composite import forward_ad_active
from xentlib.backends.dispatch import traced

_MEAN = {"mean": 1, "sum": 0, "none": 0}
_INT64 = (-(2**63), 2**63)


def cross_entropy(input: Tensor, target: Tensor, ignore_index, reduction) -> Tensor | None:
    """The loss of the common call, or None where the call is not one (then the general path computes it)."""
    if not _covered(input, target, ignore_index, reduction):
        return None
    if input.requires_grad and torch.is_grad_enabled():
        return CommonCrossEntropy.apply(input, target, ignore_index, reduction)
    return _run(input, target, ignore_index, reduction, None)


def _covered(input, target, ignore_index, reduction) -> bool:
    """float32 (N, C) CPU logits with contiguous rows, int64 (N,) targets, N and C at least 1, an int
    ignore_index, a valid reduction; plain tensors (no subclass, no torch.func wrapper, no tangent); the kernel
    built. Checks that read no data, as the general path's do."""
    return (
        type(input) is Tensor
        and type(target) is Tensor
        and input.dtype == torch.float32
        and target.dtype == torch.int64
        and input.is_cpu
        and target.is_cpu
        and input.dim() == 2
        and target.dim() == 1
        and target.shape[0] == input.shape[0]
        and input.numel() > 0
        and input.is_contiguous()
        and target.is_contiguous()
        and type(ignore_index) is int
        and _INT64[0] <= ignore_index < _INT64[1]
        and type(reduction) is str
        and reduction in _MEAN
        and not torch._C._are_functorch_transforms_active()
        and not forward_ad_active()
        and not traced()
        and cpu_kernel.common_call_function() is not None
    )


def _run(input: Tensor, target: Tensor, ignore_index: int, reduction: str, grad: Tensor | None) -> Tensor:
    """One C call: row losses (and the gradient for grad_output = 1 into `grad`), then the reduction."""
    rows, classes = input.shape
    row_loss = input.new_empty(rows)  # float32 on the CPU, like the logits (a device context does not move it)
    parallel = rows * classes >= cpu_kernel.PARALLEL_MIN_ELEMENTS
    call = cpu_kernel.CommonCallArguments(
        input.data_ptr(),
        rows,
        classes,
        target.data_ptr(),
        ignore_index,
        _MEAN[reduction],
        row_loss.data_ptr(),
        None if grad is None else grad.data_ptr(),
        min(torch.get_num_threads(), rows) if parallel else 1,
    )
    cpu_kernel.common_call_function()(call)  # every thread it starts is joined before it returns
    if call.status == 1:
        sem.checked_class_indices(target, ignore_index, classes)  # raises the family's IndexError
    if call.status != 0:
        raise RuntimeError(f"xentlib's CPU kernel could not allocate its row masks for {rows} rows")
    if reduction == "none":
        return row_loss
    if reduction == "sum":
        return row_loss.sum()
    # the general path's sum() / denominator; torch's mean on CPU is that sum divided in place: one op fewer
    return row_loss.mean() if call.count == rows else row_loss.sum().div_(call.count)


class CommonCrossEntropy(torch.autograd.Function):
    """The common call's autograd node. Forward makes the gradient for grad_output = 1 in the same sweep as the
    loss; backward scales it in float32 (one rounding, per row for 'none'), as the op's backward does
    (`composite.scale_by_grad_output_`). The rare cases (a second backward of the same graph, a differentiable
    gradient for double backward) recompute through the general path, whose op has the formula for them."""

    @staticmethod
    def forward(ctx, input, target, ignore_index, reduction):
        grad = torch.empty_like(input)
        loss = _run(input, target, ignore_index, reduction, grad)
        ctx.save_for_backward(input, target)
        ctx.grad_buffer, ctx.ignore_index, ctx.reduction = grad, ignore_index, reduction
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        buffer, ctx.grad_buffer = ctx.grad_buffer, None
        if buffer is None or torch.is_grad_enabled():
            return _general_gradient(ctx, grad_loss), None, None, None
        if ctx.reduction == "none":
            return buffer.mul_(grad_loss.unsqueeze(1)), None, None, None
        if float(grad_loss) == 1.0:  # the common loss.backward(): the buffer is the gradient
            return buffer, None, None, None
        return buffer.mul_(grad_loss), None, None, None


def _general_gradient(ctx, grad_loss: Tensor) -> Tensor:
    """The gradient through the general path's op: differentiable when autograd records the backward."""
    from xentlib import functional

    input, target = ctx.saved_tensors
    create_graph = torch.is_grad_enabled()
    x = input if create_graph else input.detach().requires_grad_()
    with torch.enable_grad():
        options = dict(ignore_index=ctx.ignore_index, reduction=ctx.reduction, backend="cpu")  # not the common call
        loss = functional.cross_entropy(x, target, **options)
        return torch.autograd.grad(loss, x, grad_loss, create_graph=create_graph)[0]
