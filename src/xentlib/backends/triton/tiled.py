"""linear_cross_entropy that never writes logits to memory: `backend="triton-tiled"`.

The chunked path (`backend="triton"`, the default on GPUs) holds one chunk of logits and runs its matmuls on
cuBLAS; this one holds none. Its kernels (`linear_index_*_kernel` in linear_kernels.py) compute each
[BLOCK_V classes x BLOCK_N rows] tile of Z = X W^T + b on the fly:

    forward   per row block, over the vocabulary tiles: online log-sum-exp (max m, s = sum exp(y - m)), the
              target logit, the weighted smoothing gap  ->  loss and lse per row (8 bytes a row kept)
    backward  per (vocabulary tile, row block): Z again, p = exp(y - lse), dZ as in docs/numerics.md section 2,
              dX[rows] += dZ^T W[tile], dW[tile] += dZ X[rows], db[tile] += sum dZ   (float32, atomic adds)

Memory beyond the inputs: float32 gradient accumulators for X, W, b (rounded once to their dtypes) and two
floats a row; no (N, V) or (chunk, V) buffer. Cost: the forward matmul is done twice (6NDV + 2NDV FLOPs) and the
backward adds with atomics, so the gradients' last bits depend on the order the GPU runs the programs in: this
path is opt-in and not deterministic, the chunked default is both faster on GPUs and deterministic.

Scope: class-index targets with class weights, ignore_index, label smoothing, z-loss, soft-capping, bias, every
reduction, `normalizer` and `shift` (which gathers the shifted input rows into an (N, D) copy). Probability
targets, `return_stats` and double backward are refused with a clear error (use backend="triton" or "torch").
"""

from __future__ import annotations

import torch
import triton

from xentlib.backends.composite import reduce_rows
from xentlib.backends.triton import linear_kernels, require, supports_problem
from xentlib.backends.triton.ops import extension_scalars, index_target_operands

BLOCK_V = 32
BLOCK_N = 16
BLOCK_D = 32


def check_supported(problem, *, want_stats: bool) -> None:
    """Raise NotImplementedError for what the tiled kernels do not cover (before any work is done). Class-index
    targets never take a class-weight gradient (torch refuses a weight that requires grad there)."""
    reasons = []
    if problem.kind != "index":
        reasons.append("probability targets")
    if want_stats:
        reasons.append("return_stats=True")
    if reasons:
        raise NotImplementedError(
            f"backend='triton-tiled' supports class-index targets without statistics; this call has "
            f"{' and '.join(reasons)}: use backend='triton' or backend='torch'"
        )
    ok, why = supports_problem(problem)
    if not ok:
        raise RuntimeError(f"backend='triton-tiled' cannot run this call: {why}")


def _matrix_operands(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    return (x, *x.stride(), weight, *weight.stride(), bias if bias is not None else x)


def _options(problem, bias, num_rows: int, num_classes: int, hidden: int, x_device_type: str) -> dict:
    return dict(
        N=num_rows,
        V=num_classes,
        D=hidden,
        **extension_scalars(problem),
        HAS_BIAS=bias is not None,
        DOT_FP32=x_device_type == "cpu",  # the interpreter: see linear_kernels.py
        BLOCK_V=BLOCK_V,
        BLOCK_N=BLOCK_N,
        BLOCK_D=BLOCK_D,
    )


def tiled_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, problem):
    """(loss, lse), each (N,) float32, of the rows of `x` (N, D) against `weight` (V, D)."""
    require(x.device)
    num_rows, hidden = x.shape
    num_classes = weight.shape[0]
    loss = torch.zeros(num_rows, dtype=torch.float32, device=x.device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    if num_rows == 0:
        return loss, lse
    rows = index_target_operands(problem, x.device)
    grid = (triton.cdiv(num_rows, BLOCK_N),)
    linear_kernels.linear_index_forward_kernel[grid](
        *_matrix_operands(x, weight, bias),
        **rows,
        loss_ptr=loss,
        lse_ptr=lse,
        **_options(problem, bias, num_rows, num_classes, hidden, x.device.type),
    )
    return loss, lse


def tiled_backward(x, weight, bias, problem, lse: torch.Tensor, row_scale: torch.Tensor, needs: tuple):
    """Gradients wrt (x, weight, bias) flagged in `needs`, with d(loss)/d(row loss) = `row_scale` (0-d or (N,))
    times the reduction's `problem.grad_scale`."""
    num_rows, hidden = x.shape
    num_classes = weight.shape[0]
    want_x, want_w, want_b = needs[0], needs[1], needs[2] and bias is not None
    fp32 = dict(dtype=torch.float32, device=x.device)
    grad_x = torch.zeros(num_rows, hidden, **fp32) if want_x else None
    grad_w = torch.zeros(num_classes, hidden, **fp32) if want_w else None
    grad_b = torch.zeros(num_classes, **fp32) if want_b else None
    if num_rows > 0 and (want_x or want_w or want_b):
        scale = (torch.as_tensor(problem.grad_scale, **fp32) * row_scale.to(**fp32)).reshape(-1).contiguous()
        rows = index_target_operands(problem, x.device)
        weight_sum = rows["class_weight_ptr"].sum().reshape(1) if problem.smoothing > 0 else scale
        grid = (triton.cdiv(num_classes, BLOCK_V), triton.cdiv(num_rows, BLOCK_N))
        linear_kernels.linear_index_backward_kernel[grid](
            *_matrix_operands(x, weight, bias),
            **rows,
            weight_sum_ptr=weight_sum,
            lse_ptr=lse,
            grad_scale_ptr=scale,
            grad_scale_stride=0 if scale.numel() == 1 else 1,
            grad_x_ptr=grad_x if want_x else scale,
            grad_w_ptr=grad_w if want_w else scale,
            grad_b_ptr=grad_b if want_b else scale,
            WANT_X=want_x,
            WANT_W=want_w,
            WANT_B=want_b,
            **_options(problem, bias, num_rows, num_classes, hidden, x.device.type),
        )
    return (
        None if grad_x is None else grad_x.to(x.dtype),
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(bias.dtype),
    )


class TiledLinearCrossEntropyFunction(torch.autograd.Function):
    """linear_cross_entropy's autograd function for backend="triton-tiled" (linear.py, `_tiled_linear_cross_entropy`):
    loss and per-row lse in forward (no logits kept); the backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, input, weight, bias, lp):
        row_loss, lse = tiled_forward(lp.gathered_input(), weight, bias, lp.rows)
        ctx.lp = lp
        ctx.save_for_backward(input, weight, bias, lse)
        return reduce_rows(lp.rows, row_loss).to(lp.rows.output_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        if torch.is_grad_enabled():
            raise NotImplementedError("backend='triton-tiled' has no double backward: use backend='torch'")
        input, weight, bias, lse = ctx.saved_tensors
        lp = ctx.lp
        row_scale = grad_loss.reshape(-1) if lp.rows.reduction == "none" else grad_loss
        needs = tuple(ctx.needs_input_grad[:3])
        grad_x, grad_w, grad_b = tiled_backward(lp.gathered_input(), weight, bias, lp.rows, lse, row_scale, needs)
        if grad_x is not None and lp.input_rows is not None:  # shift=True: back to the rows they were read from
            grad_x = torch.zeros_like(lp.flat_input).index_copy_(0, lp.input_rows, grad_x)
        if grad_x is not None:
            grad_x = grad_x.view(input.shape)
        return grad_x, grad_w, grad_b, None
