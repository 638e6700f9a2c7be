"""The fused cross-entropy as a torch op: `torch.ops.xentlib.cross_entropy`.

Registering the computation with `torch.library.custom_op` (a fake kernel for shapes, an autograd formula) makes
it one node that `torch.compile(fullgraph=True)`, `torch.export` and `torch.library.opcheck` see, instead of
Python that the tracer must follow. Everything that reads data happens inside the op: the class-index bounds
check (torch's IndexError on CPU; a device-side assertion on accelerators), the ignore mask and the weighted
denominator. The Python around it (`xentlib.functional.cross_entropy`) only checks shapes, dtypes and arguments.

The op returns the reduced loss, the gradient of that loss for grad_output = 1 (made in the same sweep as the
loss, see `backends/base.py`), and the per-row statistics when asked. Backward scales the saved gradient by
grad_output; the rare gradients (wrt probability targets or class weights, through the statistics, a second or
double backward) come from `backends/composite.py`, plain differentiable torch ops over the saved logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.backends import composite
from xentlib.backends.dispatch import rows_function, select_backend
from xentlib.backends.triton import installed as triton_installed

_EMPTY = (0,)
# read once, at import: a traced call must not search the file system (torch.compile's tracer cannot follow it)
_TRITON_INSTALLED = triton_installed()


def rows_for(problem, backend: str, chunk_size: int):
    """The chosen backend's row function; `chunk_size` (rows, > 0) applies to the PyTorch ops."""
    name, _ = select_backend(problem.logits.device, backend, problem)
    if name == "cpu" and chunk_size > 0:
        name = "torch"  # the compiled kernel has no chunks: an explicit chunk size asks for the PyTorch ops
    return rows_function(name, None if chunk_size <= 0 else chunk_size)


# torch.library.custom_op reads the op's schema from these annotated parameters, so they are listed in full here
# and in the other ops (linear.py's shares the options): a shared signature cannot be written.
def cross_entropy_impl(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    normalizer: Tensor | None,
    normalizer_value: float,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    z_loss: float,
    softcap: float | None,
    output_dtype: torch.dtype,
    with_grad: bool,
    with_stats: bool,
    backend: str,
    chunk_size: int,
    grad_output: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad, lse, entropy, row_loss, argmax) of (B, C, S) logits and canonical targets.

    `normalizer` (a 0-d tensor) or `normalizer_value` (> 0, a number) divides a 'sum'. `grad` is d loss / d
    logits for grad_output = 1, or for the 0-d `grad_output` given (the backward of half-precision logits passes
    it, so the scale is applied in float32 before the one rounding), or an empty tensor without `with_grad`;
    the statistics are (B, S), or empty."""
    norm = sem.normalizer_from_operands(normalizer, normalizer_value)
    problem = sem.problem_tensors(
        logits, target, weight, norm, ignore_index, reduction, smoothing, z_loss, softcap, output_dtype
    )
    if grad_output is not None:
        problem.grad_scale = problem.grad_scale * grad_output.to(problem.grad_scale.dtype)
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(_EMPTY)
    rows = rows_for(problem, backend, chunk_size)(problem, grad if with_grad else None, with_stats)
    loss = composite.reduce_rows(problem, rows.loss).to(output_dtype)
    if not with_stats:
        empty = rows.loss.new_empty(_EMPTY)
        return loss, grad, empty, empty.clone(), empty.clone(), empty.new_empty(_EMPTY, dtype=torch.long)
    return loss, grad, rows.lse, rows.entropy, rows.loss.to(output_dtype, copy=True), rows.argmax


cross_entropy = torch.library.custom_op("xentlib::cross_entropy", mutates_args=())(cross_entropy_impl)


@cross_entropy.register_fake
def _(logits, target, weight, normalizer, normalizer_value, ignore_index, reduction, smoothing, z_loss, softcap,
      output_dtype, with_grad, with_stats, backend, chunk_size, grad_output=None):  # fmt: skip
    batch, _, spatial = logits.shape
    acc = _acc_dtype(logits, target, weight)
    rows = (batch, spatial)
    loss = logits.new_empty(rows if reduction == "none" else (), dtype=output_dtype)
    grad = torch.empty_like(logits) if with_grad else logits.new_empty(_EMPTY)
    shape = rows if with_stats else _EMPTY
    stats = [logits.new_empty(shape, dtype=dtype) for dtype in (acc, acc, output_dtype, torch.long)]
    return (loss, grad, *stats)


def _acc_dtype(logits: Tensor, target: Tensor, weight: Tensor | None) -> torch.dtype:
    dtypes = [logits.dtype] + ([target.dtype] if target.is_floating_point() else [])
    return sem.accumulation_dtype(*dtypes, *([weight.dtype] if weight is not None else []))


_SCALARS = ("normalizer_value", "ignore_index", "reduction", "smoothing", "z_loss", "softcap", "output_dtype")


def setup_context(ctx, inputs, output):
    logits, target, weight, normalizer, *scalars = inputs
    ctx.call = dict(zip(_SCALARS, scalars[: len(_SCALARS)]))
    ctx.has_grad, ctx.with_stats, ctx.backend, ctx.chunk_size = scalars[len(_SCALARS) : len(_SCALARS) + 4]
    loss, grad, lse, entropy, row_loss, argmax = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(grad, row_loss, argmax)
    # The gradient buffer is handed to autograd once (x.grad takes it without a copy); a later backward of the
    # same graph (retain_graph=True) recomputes from the logits.
    ctx.grad_buffer = grad if grad.numel() or logits.numel() == 0 else None
    ctx.save_for_backward(logits, target, weight, normalizer)


def backward(ctx, grad_loss, _grad, grad_lse, grad_entropy, _row_loss, _argmax):
    logits, target, weight, normalizer = ctx.saved_tensors
    needs = ctx.needs_input_grad
    buffer, ctx.grad_buffer = ctx.grad_buffer, None
    if not ctx.with_stats:  # the statistics were empty placeholders: nothing flows through them
        grad_lse = grad_entropy = None
    reduction = ctx.call["reduction"]
    only_the_loss = grad_lse is None and grad_entropy is None and not (needs[1] or needs[2])
    # per-row scales of a half-precision gradient cannot be folded into one kernel scale: float32 composite
    per_row_half = reduction == "none" and logits.element_size() < 4 and _eager(grad_loss)
    if only_the_loss and not torch.is_grad_enabled() and ctx.has_grad and not per_row_half:
        if grad_loss is None:
            return (None,) * 15
        rounded_once = _rounded_once(reduction, logits, grad_loss)
        if rounded_once is not None or buffer is None:
            # half precision: the scale goes in before the one rounding; a second backward of the same graph:
            # the same kernel again, so the same bits
            call = dict(ctx.call, with_grad=True, with_stats=False, backend=ctx.backend, chunk_size=ctx.chunk_size)
            buffer = torch.ops.xentlib.cross_entropy(
                logits.detach(), target, weight, normalizer, **call, grad_output=rounded_once
            )[1]
            if rounded_once is not None:
                return (buffer,) + (None,) * 14
        return (composite.scale_by_grad_output_(reduction, buffer, grad_loss),) + (None,) * 14
    call = dict(ctx.call)
    norm = sem.normalizer_from_operands(normalizer, call.pop("normalizer_value"))
    # the targets were checked by the forward pass (and the compiler may be tracing this backward)
    problem = sem.problem_tensors(logits.detach(), target.detach(), weight, norm, **call, check_targets=False)
    x = logits.float() if per_row_half and only_the_loss else logits  # float32 all the way, rounded once
    grads = composite.gradients(problem, x, target, weight, needs[:3], grad_loss, grad_lse, grad_entropy)
    grads[0] = None if grads[0] is None else grads[0].to(logits.dtype)
    return (*grads,) + (None,) * 12


def _eager(tensor: Tensor) -> bool:
    """A real tensor (not one the compiler traces), whose data may be read."""
    return type(tensor) is Tensor


def _rounded_once(reduction: str, logits: Tensor, grad_loss: Tensor) -> Tensor | None:
    """The grad_output to fold into a recomputed half-precision gradient, or None where the saved one is scaled
    instead: float32/float64 gradients, grad_output 1, a traced graph, reduction='none' (per-row scales: the
    composite handles them on CPU), and accelerators, where reading grad_output would synchronise (there a
    grad_output other than 1 rounds a half-precision gradient twice)."""
    if logits.element_size() >= 4 or reduction == "none" or not _eager(grad_loss):
        return None
    if grad_loss.device.type != "cpu" or float(grad_loss) == 1.0:
        return None  # on an accelerator reading it would synchronise: the saved gradient is scaled on the device

    return grad_loss.detach().reshape(())


cross_entropy.register_autograd(backward, setup_context=setup_context)


def traced_op(logits: Tensor):
    """The op a traced call records. On an accelerator, with triton installed, `xentlib::triton_cross_entropy`:
    this implementation registered with `torch.library.triton_op` (backends/triton/registered.py), whose body
    AOTAutograd traces, so that Inductor launches the Triton kernels itself. On CPU the custom op above, whose C
    kernel no tracer can follow, and under torch.export on every device (an exported program keeps custom ops as
    they are, and a process that loads it registers this one by importing xentlib)."""
    if logits.device.type == "cpu" or not _TRITON_INSTALLED or torch.compiler.is_exporting():
        return torch.ops.xentlib.cross_entropy  # an exported program names the op that `import xentlib` registers
    from xentlib.backends.triton import registered  # noqa: F401  (registers the op on first use)

    return torch.ops.xentlib.triton_cross_entropy


class EagerCrossEntropy(torch.autograd.Function):
    """The op's implementation and autograd formula without the dispatcher, for eager calls (the dispatcher's
    Python layers cost more than the whole computation of a small call). Compiled graphs, export and opcheck
    see `torch.ops.xentlib.cross_entropy`; both run the same two functions above."""

    @staticmethod
    def forward(ctx, *inputs):
        output = cross_entropy_impl(*inputs)
        setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(backward)


def eager_cross_entropy(*inputs):
    """`torch.ops.xentlib.cross_entropy(*inputs)` for an eager call."""
    if inputs[0].requires_grad and torch.is_grad_enabled():
        return EagerCrossEntropy.apply(*inputs)
    return cross_entropy_impl(*inputs)
