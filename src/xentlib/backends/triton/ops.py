"""Launches of xentlib's Triton kernels (the maths is in ``kernels.py``).

Two entry points, both free of host synchronisation (no ``.item()``):

* ``cross_entropy_rows(problem, grad_out, want_stats)``: per-row loss / lse / stats of a canonical
  ``(B, C, S)`` problem and, optionally, the scaled gradient written into ``grad_out`` (which may be the
  logits themselves). ``linear_cross_entropy`` (``xentlib/linear.py``) calls it on each chunk of logits.
* ``scale_unless_one_(buffer, scale)``: the backward's multiplication by grad_output.
"""

from __future__ import annotations

import math

import torch
import triton
from torch.library import wrap_triton

from xentlib.backends.dispatch import traced
from xentlib.backends.triton import kernels, require, supports_problem

# Largest class block a program holds at once; rows with more classes loop over blocks.
MAX_BLOCK_C = 4096
# Class-index problems with at most this many classes use the tile kernel (several rows per program, read
# along the contiguous axis); a tile holds about TILE_ELEMENTS logits.
TILE_MAX_CLASSES = 128
TILE_ELEMENTS = 4096


SCALE_BLOCK = 4096
SCALE_MAX_PROGRAMS = 4096
# The scale kernel computes in float32, so it takes float32 and half buffers only (float64 would be rounded).
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def launcher(kernel):
    """`kernel` itself for an eager launch; wrapped by `wrap_triton` where something records the call (make_fx,
    AOTAutograd tracing `torch.ops.xentlib.triton_cross_entropy`), so that the launch becomes a node of the
    graph. Eager launches skip the wrapper, whose dispatch costs more than a small kernel."""
    return wrap_triton(kernel) if traced() else kernel


def scale_unless_one_(buffer: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``buffer.mul_(scale)`` for a contiguous buffer and a one-element scale, without a pass over the buffer
    (nor a host synchronisation) when the scale is 1."""
    if not buffer.is_contiguous() or scale.numel() != 1:
        raise ValueError("scale_unless_one_ takes a contiguous buffer and a one-element scale")
    if buffer.dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_unless_one_ computes in float32: it takes float32/half buffers, not {buffer.dtype}")
    numel = buffer.numel()
    if numel:
        scale = scale.to(device=buffer.device, dtype=buffer.dtype).reshape(1)
        grid = (min(triton.cdiv(numel, SCALE_BLOCK), SCALE_MAX_PROGRAMS),)
        launcher(kernels.scale_unless_one_kernel)[grid](buffer, numel, scale, BLOCK=SCALE_BLOCK, num_warps=8)
    return buffer


def _row_result_type():
    from xentlib.backends.base import RowResult

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


def _class_weight_operand(problem, device: torch.device) -> torch.Tensor:
    if problem.class_weight is None:
        return torch.ones(problem.num_classes, dtype=torch.float32, device=device)
    return problem.class_weight.to(device=device, dtype=torch.float32).contiguous()


def extension_scalars(problem) -> dict:
    """The scalar arguments every kernel takes (smoothing, z_loss, softcap; 1.0 stands in for no cap)."""
    return dict(
        smoothing=float(problem.smoothing),
        z_loss=float(problem.z_loss),
        softcap=float(problem.softcap) if problem.softcap is not None else 1.0,
        HAS_SOFTCAP=problem.softcap is not None,
    )


def index_target_operands(problem, device: torch.device) -> dict:
    """The per-row inputs of the class-index kernels, flat (rows,): target, valid flag, target weight; the class
    weights (C,) when smoothing reads them (SMOOTH), else a float32 stand-in the kernel never reads."""
    smooth = problem.smoothing > 0
    target_weight = problem.target_weight if problem.target_weight is not None else problem.valid
    target_weight = _per_row(target_weight, torch.float32)
    return dict(
        target_ptr=_per_row(problem.target, torch.int64),
        valid_ptr=_per_row(problem.valid, torch.bool),
        target_weight_ptr=target_weight,
        class_weight_ptr=_class_weight_operand(problem, device) if smooth else target_weight,
        SMOOTH=smooth,
    )


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
        **extension_scalars(problem),
        WANT_GRAD=want_grad,
        WANT_STATS=want_stats,
        BLOCK_C=block,
        num_warps=_num_warps(block),
    )
    if problem.kind == "index":
        index_args = index_target_operands(problem, device)
        if strategy is None:
            strategy = "tile" if block_size is None and num_classes <= TILE_MAX_CLASSES else "row"
        if strategy == "tile":
            block_c = triton.next_power_of_2(num_classes)
            block_r = max(1, min(TILE_ELEMENTS // block_c, triton.next_power_of_2(rows)))
            grid = (triton.cdiv(rows, block_r),)
            tail = dict(common_tail, BLOCK_C=block_c, BLOCK_R=block_r, num_warps=_num_warps(block_c * block_r))
            launcher(kernels.index_target_tile_kernel)[grid](*common_head, R=rows, **index_args, **tail)
        else:
            launcher(kernels.index_target_rows_kernel)[(rows,)](*common_head, **index_args, **common_tail)
    elif problem.kind == "prob":
        target = problem.target
        launcher(kernels.prob_target_rows_kernel)[(rows,)](
            *common_head,
            target_ptr=target,
            stride_tb=target.stride(0),
            stride_tc=target.stride(1),
            stride_ts=target.stride(2),
            valid_ptr=_per_row(problem.valid, torch.bool),
            class_weight_ptr=_class_weight_operand(problem, device),
            **common_tail,
        )
    else:
        raise ValueError(f"unknown target kind {problem.kind!r}, expected 'index' or 'prob'")
    return result
