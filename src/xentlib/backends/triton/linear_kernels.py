"""Triton kernels of linear_cross_entropy without logits in memory (backend="triton-tiled", launched by tiled.py).

Only ``@triton.jit`` functions live here. Z = X W^T + b is never stored. A program works on a tile of BLOCK_V
classes x BLOCK_N rows, laid out as [classes, rows] like ``kernels.index_target_tile_kernel``, so the row maths of
``rowmath.py`` reduces over axis 0:

    Z_tile = W[v-block] @ X[n-block]^T (+ b)      tl.dot over D in BLOCK_D steps, float32 accumulation

The forward walks the vocabulary tiles of its rows and merges their log-sum-exp online; the backward recomputes
each tile from the saved lse and adds its share of dX and dW.

DOT_FP32 converts half-precision operands to float32 before tl.dot (Triton's CPU interpreter multiplies bfloat16
operands wrongly); on a GPU they go to the tensor cores as they are, accumulating in float32.
"""

import triton
import triton.language as tl

from xentlib.backends.triton.rowmath import (
    finish_lse,
    index_grad,
    index_row_loss,
    masked_soft_cap,
    merge_lse,
    merge_weighted_gap,
)


@triton.jit
def _load_slab(ptr, stride_row, stride_d, idx, idx_ok, d, d_ok, DOT_FP32: tl.constexpr):
    # The [len(idx), BLOCK_D] block of a (rows, D) matrix at rows `idx` and columns `d`. Masked lanes load 0
    # (without `other` they are undefined on a GPU and would enter the sums).
    slab = tl.load(
        ptr + idx[:, None] * stride_row + d[None, :] * stride_d, mask=idx_ok[:, None] & d_ok[None, :], other=0.0
    )
    if DOT_FP32:
        slab = slab.to(tl.float32)
    return slab


@triton.jit
def _logits_tile(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, bias_ptr, rows, cols, row_ok, col_ok, D,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Z[cols, rows] = sum_d W[cols, d] X[rows, d] (+ b[cols]) in float32; rows and cols are int64 offsets.
    acc = tl.zeros([BLOCK_V, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = d < D
        w = _load_slab(w_ptr, stride_wv, stride_wd, cols, col_ok, d, d_ok, DOT_FP32)
        x = _load_slab(x_ptr, stride_xn, stride_xd, rows, row_ok, d, d_ok, DOT_FP32)
        acc += tl.dot(w, tl.trans(x), input_precision="ieee", out_dtype=tl.float32)  # full float32, no TF32
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
    return acc


@triton.jit
def linear_index_forward_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, bias_ptr,
    target_ptr, valid_ptr, target_weight_ptr, class_weight_ptr, loss_ptr, lse_ptr,
    N, V, D, smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Per-row loss and lse of class-index targets for BLOCK_N rows, merged over the vocabulary tiles: the row
    maths of ``kernels.index_target_rows_kernel`` (rowmath.index_row_loss), with y_t picked from the tile that
    holds the target."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    valid = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
    t = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    w_t = tl.load(target_weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)

    zero = tl.zeros([BLOCK_N], tl.float32)
    m = zero + float("-inf")
    s = zero
    y_t = zero
    w_sum = zero
    w_gap = zero
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        z = _logits_tile(
            x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, bias_ptr, rows, cols, row_ok, col_ok, D,
            HAS_BIAS, DOT_FP32, BLOCK_V, BLOCK_N, BLOCK_D,
        )  # fmt: skip
        mask = col_ok[:, None] & row_ok[None, :]
        y = masked_soft_cap(z, mask, softcap, HAS_SOFTCAP)
        m, s, ref_old, ref_new, e = merge_lse(m, s, y)
        y_t += tl.sum(tl.where(cols[:, None] == t[None, :], y, 0.0), axis=0)  # a gather: one tile holds t
        if SMOOTH:
            w = tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
            w = tl.where(mask, w + zero[None, :], 0.0)
            w_sum, w_gap = merge_weighted_gap(w_sum, w_gap, ref_old, ref_new, w, y, mask)
    ref, log_s, lse = finish_lse(m, s)
    loss = index_row_loss(ref, log_s, lse, y_t, w_t, w_sum, w_gap, smoothing, z_loss, V, SMOOTH)
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def linear_index_backward_kernel(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, bias_ptr,
    target_ptr, valid_ptr, target_weight_ptr, class_weight_ptr, weight_sum_ptr, lse_ptr,
    grad_scale_ptr, grad_scale_stride, grad_x_ptr, grad_w_ptr, grad_b_ptr,
    N, V, D, smoothing, z_loss, softcap,
    HAS_BIAS: tl.constexpr, SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    WANT_X: tl.constexpr, WANT_W: tl.constexpr, WANT_B: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (vocabulary tile, row block): recompute Z, then dZ = scale * rowmath.index_grad (zero on ignored rows),
    and add dX[rows] += dZ^T W[tile], dW[tile] += dZ X[rows], db[tile] += sum_rows dZ into float32 buffers with
    atomic adds (several programs share each row of dX and each class of dW, so the summation order, and the
    last bits, vary run to run)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < V
    row_ok = rows < N
    mask = col_ok[:, None] & row_ok[None, :]
    z = _logits_tile(
        x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, bias_ptr, rows, cols, row_ok, col_ok, D,
        HAS_BIAS, DOT_FP32, BLOCK_V, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    y = masked_soft_cap(z, mask, softcap, HAS_SOFTCAP)

    valid = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
    t = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    w_t = tl.load(target_weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(grad_scale_ptr + rows * grad_scale_stride, mask=row_ok, other=0.0).to(tl.float32)
    p = tl.exp(y - lse[None, :])
    w = 0.0
    w_sum = 0.0
    if SMOOTH:
        w = tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        w_sum = tl.load(weight_sum_ptr)
    dz = index_grad(
        p, cols[:, None] == t[None, :], w_t[None, :], w, w_sum, lse[None, :], scale[None, :], mask & valid[None, :],
        y, smoothing, z_loss, softcap, V, SMOOTH, HAS_SOFTCAP,
    )  # fmt: skip

    if WANT_B:
        tl.atomic_add(grad_b_ptr + cols, tl.sum(dz, axis=1), mask=col_ok)
    dz_in = dz.to(x_ptr.dtype.element_ty)  # the matmuls take dZ in the inputs' dtype, as F.linear's backward does
    if DOT_FP32:
        dz_in = dz_in.to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = d < D
        if WANT_X:
            w_blk = _load_slab(w_ptr, stride_wv, stride_wd, cols, col_ok, d, d_ok, DOT_FP32)
            part_x = tl.dot(tl.trans(dz_in), w_blk, input_precision="ieee", out_dtype=tl.float32)  # [BLOCK_N, BLOCK_D]
            tl.atomic_add(grad_x_ptr + rows[:, None] * D + d[None, :], part_x, mask=row_ok[:, None] & d_ok[None, :])
        if WANT_W:
            x_blk = _load_slab(x_ptr, stride_xn, stride_xd, rows, row_ok, d, d_ok, DOT_FP32)
            part_w = tl.dot(dz_in, x_blk, input_precision="ieee", out_dtype=tl.float32)  # [BLOCK_V, BLOCK_D]
            tl.atomic_add(grad_w_ptr + cols[:, None] * D + d[None, :], part_w, mask=col_ok[:, None] & d_ok[None, :])
