"""Launches of xentlib's Triton kernels (the maths is in ``kernels.py``).

Two entry points, both free of host synchronisation (no ``.item()``):

* ``cross_entropy_rows(problem, grad_out, want_stats)``: per-row loss / lse / stats of a canonical
  ``(B, C, S)`` problem and, optionally, the scaled gradient written into ``grad_out`` (which may be the
  logits themselves).
* ``linear_cross_entropy_chunked(input2d, weight, bias, problem, ...)``: the same for
  ``logits = input2d @ weight.T + bias`` without ever holding all ``(N, V)`` logits: token chunks of logits
  are computed into one reused buffer, the kernel overwrites the buffer with ``dlogits``, and the chunk's
  contribution to every gradient is taken before the buffer is reused.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import triton

from xentlib.backends.triton import kernels, require, supports_problem
from xentlib.linear import accumulate_mm_

# Largest class block a program holds at once; rows with more classes loop over blocks.
MAX_BLOCK_C = 4096
# Logits elements held by one chunk of linear_cross_entropy_chunked by default (2**26: 128 MiB in bf16).
DEFAULT_CHUNK_ELEMENTS = 2**26
MIN_CHUNK_ROWS = 256
# Class-index problems with at most this many classes use the tile kernel (several rows per program, read
# along the contiguous axis); a tile holds about TILE_ELEMENTS logits.
TILE_MAX_CLASSES = 128
TILE_ELEMENTS = 4096


SCALE_BLOCK = 4096
SCALE_MAX_PROGRAMS = 4096


def scale_unless_one_(buffer: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``buffer.mul_(scale)`` for a contiguous buffer and a one-element scale, without a pass over the buffer
    (nor a host synchronisation) when the scale is 1."""
    if not buffer.is_contiguous() or scale.numel() != 1:
        raise ValueError("scale_unless_one_ takes a contiguous buffer and a one-element scale")
    numel = buffer.numel()
    if numel:
        scale = scale.to(device=buffer.device, dtype=buffer.dtype).reshape(1)
        grid = (min(triton.cdiv(numel, SCALE_BLOCK), SCALE_MAX_PROGRAMS),)
        kernels.scale_unless_one_kernel[grid](buffer, numel, scale, BLOCK=SCALE_BLOCK, num_warps=8)
    return buffer


def _row_result_type():
    from xentlib.backends.torch_chunked import RowResult

    return RowResult


def choose_block_size(num_classes: int) -> int:
    """Power-of-two class block: the whole row when it fits, else MAX_BLOCK_C per loop step."""
    return min(triton.next_power_of_2(max(num_classes, 1)), MAX_BLOCK_C)


def _num_warps(block: int) -> int:
    return 4 if block <= 1024 else 8 if block <= 2048 else 16


def _per_row(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) per-row input as a contiguous flat vector, row = b * S + s."""
    return tensor.to(dtype).contiguous().reshape(-1)


def _grad_scale_operand(grad_scale: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, int]:
    """0-d scale -> read with stride 0 by every row; a (B, S) scale (per-row upstream gradients, e.g. the
    backward of reduction='none') -> stride 1."""
    grad_scale = torch.as_tensor(grad_scale, dtype=torch.float32, device=device)
    if grad_scale.dim() == 0:
        return grad_scale.reshape(1), 0
    return grad_scale.contiguous().reshape(-1), 1


def _class_weight_operand(problem, num_classes: int, device: torch.device) -> torch.Tensor:
    if problem.class_weight is None:
        return torch.ones(num_classes, dtype=torch.float32, device=device)
    return problem.class_weight.to(device=device, dtype=torch.float32).contiguous()


def cross_entropy_rows(
    problem,
    grad_out: torch.Tensor | None,
    want_stats: bool,
    *,
    block_size: int | None = None,
    strategy: str | None = None,
):
    """Per-row cross-entropy of ``problem`` (a ``CrossEntropyProblem``), one Triton program per row.

    Returns a ``RowResult`` (loss, lse: (B, S) float32; argmax int64 and entropy float32 when
    ``want_stats``). When ``grad_out`` (``(B, C, S)``, any strides, may be ``problem.logits``) is given, it
    is filled with ``grad_scale * d(row loss)/d(logits)``, exact zeros on ignored rows. ``grad_scale`` may
    be 0-d or (B, S). ``block_size`` overrides the class block of the row kernel (a power of two; tests use
    it to force several blocks per row). ``strategy``: "row" (one program per row, any C) or "tile" (class
    indices with C <= TILE_MAX_CLASSES: several whole rows per program); by default "tile" when it applies.
    """
    logits = problem.logits
    require(logits.device)
    supported, reason = supports_problem(problem)
    if not supported:
        raise RuntimeError(f"backend='triton' cannot run this call: {reason} (use backend='torch')")
    batch, num_classes, positions = logits.shape
    device = logits.device
    rows = batch * positions

    loss = torch.zeros((batch, positions), dtype=torch.float32, device=device)
    lse = torch.full_like(loss, -math.inf)  # the value for zero classes: log-sum-exp of nothing
    argmax = torch.zeros((batch, positions), dtype=torch.int64, device=device) if want_stats else None
    entropy = torch.zeros_like(loss) if want_stats else None
    result = _row_result_type()(loss=loss, lse=lse, argmax=argmax, entropy=entropy)
    if rows == 0 or num_classes == 0:
        return result
    if grad_out is not None and grad_out.shape != logits.shape:
        raise ValueError(f"grad_out has shape {tuple(grad_out.shape)}, expected {tuple(logits.shape)}")

    block = block_size or choose_block_size(num_classes)
    want_grad = grad_out is not None
    grad = grad_out if want_grad else logits  # never written when WANT_GRAD is False
    scale, scale_stride = _grad_scale_operand(problem.grad_scale, device)
    valid = _per_row(problem.valid, torch.bool)
    common_head = (logits, *logits.stride(), grad, *grad.stride())
    common_tail = dict(
        grad_scale_ptr=scale,
        grad_scale_stride=scale_stride,
        loss_ptr=loss,
        lse_ptr=lse,
        argmax_ptr=argmax if want_stats else loss,
        entropy_ptr=entropy if want_stats else loss,
        S=positions,
        C=num_classes,
        smoothing=float(problem.smoothing),
        z_loss=float(problem.z_loss),
        softcap=float(problem.softcap) if problem.softcap is not None else 1.0,
        HAS_SOFTCAP=problem.softcap is not None,
        WANT_GRAD=want_grad,
        WANT_STATS=want_stats,
        BLOCK_C=block,
        num_warps=_num_warps(block),
    )
    if problem.kind == "index":
        smooth = problem.smoothing > 0
        target_weight = problem.target_weight
        if target_weight is None:
            target_weight = problem.valid
        index_args = dict(
            target_ptr=_per_row(problem.target, torch.int64),
            valid_ptr=valid,
            target_weight_ptr=_per_row(target_weight, torch.float32),
            class_weight_ptr=_class_weight_operand(problem, num_classes, device) if smooth else scale,
            SMOOTH=smooth,
        )
        if strategy is None:
            strategy = "tile" if block_size is None and num_classes <= TILE_MAX_CLASSES else "row"
        if strategy == "tile":
            block_c = triton.next_power_of_2(num_classes)
            block_r = max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(rows)))
            grid = (triton.cdiv(rows, block_r),)
            tail = dict(common_tail, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=_num_warps(block_c * block_r))
            kernels.index_target_tile_kernel[grid](*common_head, R=rows, **index_args, **tail)
        else:
            kernels.index_target_rows_kernel[(rows,)](*common_head, **index_args, **common_tail)
    elif problem.kind == "prob":
        target = problem.target
        kernels.prob_target_rows_kernel[(rows,)](
            *common_head,
            target_ptr=target,
            stride_tb=target.stride(0),
            stride_tc=target.stride(1),
            stride_ts=target.stride(2),
            valid_ptr=valid,
            class_weight_ptr=_class_weight_operand(problem, num_classes, device),
            **common_tail,
        )
    else:
        raise ValueError(f"unknown target kind {problem.kind!r}, expected 'index' or 'prob'")
    return result


@dataclass
class LinearCrossEntropyResult:
    """Output of ``linear_cross_entropy_chunked``: per-row results of shape (N, 1) and the gradients
    (already multiplied by ``problem.grad_scale``) of the inputs that asked for one, else None."""

    rows: object  # RowResult with (N, 1) fields
    grad_input: torch.Tensor | None
    grad_weight: torch.Tensor | None
    grad_bias: torch.Tensor | None


def default_chunk_size(num_rows: int, num_classes: int) -> int:
    """Token rows per chunk: about DEFAULT_CHUNK_ELEMENTS logits, at least MIN_CHUNK_ROWS rows (smaller
    chunks make the matmuls inefficient), never more than the number of rows."""
    rows = max(MIN_CHUNK_ROWS, DEFAULT_CHUNK_ELEMENTS // max(num_classes, 1))
    return max(1, min(num_rows, rows))


def _slice_rows(problem, logits_chunk: torch.Tensor, lo: int, hi: int):
    """The problem of rows [lo, hi) of an (N, V, 1) problem, with the chunk's logits."""
    grad_scale = problem.grad_scale
    if torch.is_tensor(grad_scale) and grad_scale.dim() > 0:
        grad_scale = grad_scale[lo:hi]
    target_weight = problem.target_weight
    return dataclasses.replace(
        problem,
        logits=logits_chunk,
        target=problem.target[lo:hi],
        valid=problem.valid[lo:hi],
        target_weight=None if target_weight is None else target_weight[lo:hi],
        grad_scale=grad_scale,
    )


def linear_cross_entropy_chunked(
    input2d: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    problem,
    *,
    needs_input_grad: tuple[bool, bool, bool] = (False, False, False),
    want_stats: bool = False,
    chunk_size: int | None = None,
    block_size: int | None = None,
) -> LinearCrossEntropyResult:
    """Cross-entropy of ``logits = input2d @ weight.T (+ bias)`` in token chunks.

    ``problem`` is the ``CrossEntropyProblem`` of the (N, V, 1) logits (built as for cross_entropy on an
    (N, V) input); its ``logits`` field is never read (a zero-stride placeholder such as
    ``input2d.new_empty(()).expand(N, V, 1)`` is fine). Its per-row fields (target, valid, target_weight, a
    (N, 1) grad_scale) are sliced per chunk. ``needs_input_grad`` = (input, weight, bias) as in autograd's
    ``ctx.needs_input_grad``.

    Per chunk of rows X_k: Z_k = X_k W^T + b into a reused buffer; the kernel replaces Z_k by
    dZ_k = grad_scale * dl/dZ_k; then dX_k = dZ_k W, dW += dZ_k^T X_k (float32 accumulator),
    db += sum_rows dZ_k (float32). Chunks run in a fixed order, so the result is deterministic.
    Extra memory: chunk x V logits + V x D float32 (+ V) accumulators, independent of N.
    """
    num_rows, hidden = input2d.shape
    num_classes = weight.shape[0]
    want_input, want_weight, want_bias = needs_input_grad
    want_bias = want_bias and bias is not None
    want_grad = want_input or want_weight or want_bias
    device, dtype = input2d.device, input2d.dtype
    chunk = chunk_size or default_chunk_size(num_rows, num_classes)

    row_result = _row_result_type()
    loss = torch.empty((num_rows, 1), dtype=torch.float32, device=device)
    lse = torch.empty_like(loss)
    argmax = torch.empty((num_rows, 1), dtype=torch.int64, device=device) if want_stats else None
    entropy = torch.empty_like(loss) if want_stats else None
    grad_input = torch.empty_like(input2d) if want_input else None
    fp32 = dict(dtype=torch.float32, device=device)
    grad_weight_acc = torch.zeros((num_classes, hidden), **fp32) if want_weight else None
    grad_bias_acc = torch.zeros(num_classes, **fp32) if want_bias else None

    buffer = torch.empty((min(chunk, num_rows), num_classes), dtype=dtype, device=device)
    weight_t = weight.t()
    for lo in range(0, num_rows, chunk):
        hi = min(lo + chunk, num_rows)
        x_chunk = input2d[lo:hi]
        z = buffer[: hi - lo]
        if bias is None:
            torch.mm(x_chunk, weight_t, out=z)
        else:
            torch.addmm(bias, x_chunk, weight_t, out=z)
        logits3d = z.unsqueeze(-1)
        part = cross_entropy_rows(
            _slice_rows(problem, logits3d, lo, hi),
            logits3d if want_grad else None,
            want_stats,
            block_size=block_size,
        )
        loss[lo:hi] = part.loss
        lse[lo:hi] = part.lse
        if want_stats:
            argmax[lo:hi] = part.argmax
            entropy[lo:hi] = part.entropy
        if want_input:
            torch.mm(z, weight, out=grad_input[lo:hi])
        if want_weight:
            accumulate_mm_(grad_weight_acc, z.t(), x_chunk)
        if want_bias:
            grad_bias_acc += z.sum(0, dtype=torch.float32)

    return LinearCrossEntropyResult(
        rows=row_result(loss=loss, lse=lse, argmax=argmax, entropy=entropy),
        grad_input=grad_input,
        grad_weight=None if grad_weight_acc is None else grad_weight_acc.to(weight.dtype),
        grad_bias=None if grad_bias_acc is None else grad_bias_acc.to(bias.dtype),
    )
