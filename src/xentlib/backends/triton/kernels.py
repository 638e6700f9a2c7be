"""Triton kernels over materialized logits: the rows of a canonical ``(B, C, S)`` problem.

Only ``@triton.jit`` functions live here: no device queries, no allocation, nothing runs at import. Launches
(grid, block size, flags) are in ``ops.py``; the notation and the row maths the kernels share (online
log-sum-exp, weighted gaps, statistics, soft-capping) are in ``rowmath.py``.

    index_target_rows_kernel   class indices, one program per row, any number of classes (blocks of BLOCK_C)
    index_target_tile_kernel   class indices, C <= BLOCK_C: a [BLOCK_C, BLOCK_R] tile of whole rows per program
    prob_target_rows_kernel    class probabilities, one program per row
    scale_unless_one_kernel    the backward's multiplication by grad_output, skipped when it is 1

Each writes per-row loss (0 on ignored rows) and lse, the arg-max and entropy with WANT_STATS, and with
WANT_GRAD ``grad_scale * d(row loss)/d(logits)`` rounded once to the gradient's dtype.

Parameters, grouped by role (the same names in every kernel): logits and their (b, c, s) strides; the gradient
and its strides; per-row inputs (contiguous (B * S,): target, valid, target weight; the class weights (C,); the
upstream scale, 0-d read with stride 0 or per row); per-row outputs; sizes and extension scalars; flags. The two
class-index kernels take the same parameters (plus R and BLOCK_R for the tile): ops.py launches either with one
set of arguments.
"""

import triton
import triton.language as tl

from xentlib.backends.triton.rowmath import (
    finish_entropy,
    finish_lse,
    index_grad,
    index_row_loss,
    masked_soft_cap,
    merge_argmax,
    merge_entropy_sum,
    merge_lse,
    merge_weighted_gap,
    round_to,
    soft_cap,
    softcap_slope,
)


@triton.jit
def scale_unless_one_kernel(buffer_ptr, numel, scale_ptr, BLOCK: tl.constexpr):
    """buffer *= scale, for a scale that lives on the device (autograd's grad_output of a reduced loss).
    When the scale is 1, the usual ``loss.backward()``, every program returns before touching the buffer: the
    backward pass then costs no sweep over the gradient and no host synchronisation to find that out.
    ``scale_ptr`` holds the scale already rounded to the buffer's dtype, so the product is the one torch's
    ``buffer.mul_(scale)`` makes (float32 arithmetic, rounded once). Grid-stride loop over a capped grid."""
    scale = tl.load(scale_ptr).to(tl.float32)
    if scale != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, numel, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < numel
            value = tl.load(buffer_ptr + offs, mask=mask).to(tl.float32) * scale
            tl.store(buffer_ptr + offs, round_to(value, buffer_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------------
# Helpers of these kernels (a row of materialized logits, or a tile of rows)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_start(row, S, stride_b, stride_s):
    # Offset of row r = b * S + s in a (B, C, S) tensor with these strides.
    return (row // S) * stride_b + (row % S) * stride_s


@triton.jit
def _load_block(row_ptr, stride_c, start, C, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr):
    # One block of classes [start, start + BLOCK_C): their offsets, the in-range mask and the capped logits y in
    # float32, -inf on the padding past C.
    offs = start + tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(row_ptr + offs.to(tl.int64) * stride_c, mask=mask, other=float("-inf"))
    return offs, mask, masked_soft_cap(x, mask, softcap, HAS_SOFTCAP)


@triton.jit
def _merge_block(m, s, best, best_idx, ent, y, start, WANT_STATS: tl.constexpr):
    # One block of a row's first sweep: log-sum-exp, and the arg-max and entropy sums with WANT_STATS. Returns
    # the shifts (ref_old, ref_new) and e = exp(y - ref_new) for the caller's own sums.
    m_new, s_new, ref_old, ref_new, e = merge_lse(m, s, y)
    if WANT_STATS:
        best, best_idx = merge_argmax(best, best_idx, y, start)
        ent = merge_entropy_sum(ent, s, ref_old, ref_new, e, y)
    return m_new, s_new, ref_old, ref_new, e, best, best_idx, ent


@triton.jit
def _prob_weights(class_weight_ptr, target_row, stride_tc, offs, mask, smoothing, C):
    # q_c = w_c ((1 - eps) t_c + eps / C) of probability targets, 0 on the padding.
    t = tl.load(target_row + offs.to(tl.int64) * stride_tc, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return w * ((1.0 - smoothing) * t + smoothing / C)


@triton.jit
def _first_sweep(logits_row, stride_lc, target_row, stride_tc, class_weight_ptr, C, smoothing, softcap,
                 GAP: tl.constexpr, PROB: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_STATS: tl.constexpr,
                 BLOCK_C: tl.constexpr):  # fmt: skip
    # One read of a row, block by block: the log-sum-exp, with GAP the weighted gap (A, G) of a = the class
    # weights (smoothing of class-index targets) or, with PROB, a = q of probability targets; with WANT_STATS
    # the arg-max and the entropy sum T.
    m = float("-inf")
    s = 0.0
    a_sum = 0.0
    a_gap = 0.0
    best = float("-inf")
    best_idx = 0
    ent = 0.0
    for start in range(0, C, BLOCK_C):
        offs, mask, y = _load_block(logits_row, stride_lc, start, C, softcap, HAS_SOFTCAP, BLOCK_C)
        m, s, ref_old, ref_new, e, best, best_idx, ent = _merge_block(m, s, best, best_idx, ent, y, start, WANT_STATS)
        if GAP:
            if PROB:
                a = _prob_weights(class_weight_ptr, target_row, stride_tc, offs, mask, smoothing, C)
            else:
                a = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            a_sum, a_gap = merge_weighted_gap(a_sum, a_gap, ref_old, ref_new, a, y, mask)
    ref, log_s, lse = finish_lse(m, s)
    return ref, log_s, lse, s, a_sum, a_gap, best_idx, ent


@triton.jit
def _store_rows(rows, row_ok, valid, loss, lse, best_idx, ent_sum, s, loss_ptr, lse_ptr, argmax_ptr, entropy_ptr,
                WANT_STATS: tl.constexpr):  # fmt: skip
    # The per-row outputs: loss (0 on ignored rows), lse, and the statistics. `row_ok` may be None (every row).
    tl.store(loss_ptr + rows, tl.where(valid, loss, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    if WANT_STATS:
        tl.store(argmax_ptr + rows, best_idx.to(tl.int64), mask=row_ok)
        tl.store(entropy_ptr + rows, finish_entropy(ent_sum, s), mask=row_ok)


# ---------------------------------------------------------------------------------------------------------------
# The kernels
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def index_target_rows_kernel(
    logits_ptr, stride_lb, stride_lc, stride_ls,
    grad_ptr, stride_gb, stride_gc, stride_gs,
    target_ptr, valid_ptr, target_weight_ptr, class_weight_ptr, grad_scale_ptr, grad_scale_stride,
    loss_ptr, lse_ptr, argmax_ptr, entropy_ptr,
    S, C, smoothing, z_loss, softcap,
    SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_GRAD: tl.constexpr, WANT_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Class-index targets, one program per row: a sweep for the sums, the loss (rowmath.index_row_loss, with
    the weighted gap of a = w for smoothing), and a second sweep for the gradient (rowmath.index_grad)."""
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + _row_start(row, S, stride_lb, stride_ls)
    valid = tl.load(valid_ptr + row) != 0
    t = tl.load(target_ptr + row).to(tl.int64)
    w_t = tl.load(target_weight_ptr + row).to(tl.float32)

    ref, log_s, lse, s, w_sum, w_gap, best_idx, ent = _first_sweep(
        logits_row, stride_lc, logits_row, stride_lc, class_weight_ptr, C, smoothing, softcap,
        SMOOTH, False, HAS_SOFTCAP, WANT_STATS, BLOCK_C,
    )  # fmt: skip
    y_t = soft_cap(tl.load(logits_row + t * stride_lc), softcap, HAS_SOFTCAP)
    loss = index_row_loss(ref, log_s, lse, y_t, w_t, w_sum, w_gap, smoothing, z_loss, C, SMOOTH)
    _store_rows(row, None, valid, loss, lse, best_idx, ent, s, loss_ptr, lse_ptr, argmax_ptr, entropy_ptr, WANT_STATS)

    if WANT_GRAD:
        grad_row = grad_ptr + _row_start(row, S, stride_gb, stride_gs)
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        inv_s = 1.0 / s
        for start in range(0, C, BLOCK_C):
            offs, mask, y = _load_block(logits_row, stride_lc, start, C, softcap, HAS_SOFTCAP, BLOCK_C)
            p = tl.exp(y - ref) * inv_s
            w = 0.0
            if SMOOTH:
                w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dx = index_grad(
                p, offs == t, w_t, w, w_sum, lse, scale, valid, y, smoothing, z_loss, softcap, C, SMOOTH, HAS_SOFTCAP
            )
            tl.store(grad_row + offs.to(tl.int64) * stride_gc, round_to(dx, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def prob_target_rows_kernel(
    logits_ptr, stride_lb, stride_lc, stride_ls,
    grad_ptr, stride_gb, stride_gc, stride_gs,
    target_ptr, stride_tb, stride_tc, stride_ts, valid_ptr, class_weight_ptr, grad_scale_ptr, grad_scale_stride,
    loss_ptr, lse_ptr, argmax_ptr, entropy_ptr,
    S, C, smoothing, z_loss, softcap,
    HAS_SOFTCAP: tl.constexpr, WANT_GRAD: tl.constexpr, WANT_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Probability targets, one program per row: q_c = w_c ((1 - eps) t_c + eps / C).

    l = sum_c q_c (lse - y_c) + z lse^2 = Q log s + G + z lse^2 (weighted gap with a = q), and
    dl/dy = (Q + 2 z lse) p - q. The targets are read once per sweep, like the logits. As in torch, a -inf
    logit gives NaN even where q_c = 0 (0 * inf).
    """
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + _row_start(row, S, stride_lb, stride_ls)
    target_row = target_ptr + _row_start(row, S, stride_tb, stride_ts)
    valid = tl.load(valid_ptr + row) != 0
    ref, log_s, lse, s, q_sum, q_gap, best_idx, ent = _first_sweep(
        logits_row, stride_lc, target_row, stride_tc, class_weight_ptr, C, smoothing, softcap,
        True, True, HAS_SOFTCAP, WANT_STATS, BLOCK_C,
    )  # fmt: skip
    loss = q_sum * log_s + q_gap + z_loss * lse * lse
    _store_rows(row, None, valid, loss, lse, best_idx, ent, s, loss_ptr, lse_ptr, argmax_ptr, entropy_ptr, WANT_STATS)

    if WANT_GRAD:
        grad_row = grad_ptr + _row_start(row, S, stride_gb, stride_gs)
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        inv_s = 1.0 / s
        p_coef = q_sum + 2.0 * z_loss * lse
        for start in range(0, C, BLOCK_C):
            offs, mask, y = _load_block(logits_row, stride_lc, start, C, softcap, HAS_SOFTCAP, BLOCK_C)
            p = tl.exp(y - ref) * inv_s
            q = _prob_weights(class_weight_ptr, target_row, stride_tc, offs, mask, smoothing, C)
            dx = (p_coef * p - q) * softcap_slope(y, softcap, HAS_SOFTCAP) * scale
            dx = tl.where(valid, dx, 0.0)
            tl.store(grad_row + offs.to(tl.int64) * stride_gc, round_to(dx, grad_ptr.dtype.element_ty), mask=mask)


# Its parameters repeat index_target_rows_kernel's: a @triton.jit kernel takes every pointer and stride as its own
# argument (no struct, no helper call can carry them). Pinned by tests/backends/test_triton.py.
@triton.jit
def index_target_tile_kernel(
    logits_ptr, stride_lb, stride_lc, stride_ls,
    grad_ptr, stride_gb, stride_gc, stride_gs,
    target_ptr, valid_ptr, target_weight_ptr, class_weight_ptr, grad_scale_ptr, grad_scale_stride,
    loss_ptr, lse_ptr, argmax_ptr, entropy_ptr,
    R, S, C, smoothing, z_loss, softcap,
    SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WANT_GRAD: tl.constexpr, WANT_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """Class-index targets with few classes (C <= BLOCK_C): a program takes a [BLOCK_C, BLOCK_R] tile of
    BLOCK_R whole rows (rows r = b * S + s, of R in all). Consecutive rows are consecutive positions s, so a
    (B, C, S) input is read along its contiguous axis instead of one strided row at a time, and every element
    is read once and written once (the first sweep of index_target_rows_kernel is a single block here, and
    e = exp(y - ref) from it gives p = e / s for the gradient). Same maths, same helpers, per column.
    """
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = r < R
    c = tl.arange(0, BLOCK_C)
    mask = (c < C)[:, None] & row_ok[None, :]
    c64 = c.to(tl.int64)[:, None]
    x = tl.load(logits_ptr + _row_start(r, S, stride_lb, stride_ls) + c64 * stride_lc, mask=mask, other=float("-inf"))
    y = masked_soft_cap(x, mask, softcap, HAS_SOFTCAP)

    valid = tl.load(valid_ptr + r, mask=row_ok, other=0) != 0
    t = tl.load(target_ptr + r, mask=row_ok, other=0)
    w_t = tl.load(target_weight_ptr + r, mask=row_ok, other=0.0).to(tl.float32)
    zero = tl.zeros([BLOCK_R], tl.float32)
    minus_inf = zero + float("-inf")
    m, s, ref_old, ref, e, best, best_idx, ent = _merge_block(
        minus_inf, zero, minus_inf, tl.zeros([BLOCK_R], tl.int32), zero, y, 0, WANT_STATS
    )
    ref, log_s, lse = finish_lse(m, s)
    is_target = c[:, None] == t[None, :]
    y_t = tl.sum(tl.where(is_target, y, 0.0), axis=0)  # a gather: other entries contribute an exact 0
    w = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
    w_sum = zero
    w_gap = zero
    if SMOOTH:
        w = tl.load(class_weight_ptr + c, mask=c < C, other=0.0).to(tl.float32)[:, None] + w
        w = tl.where(mask, w, 0.0)
        w_sum, w_gap = merge_weighted_gap(zero, zero, ref_old, ref, w, y, mask)
    loss = index_row_loss(ref, log_s, lse, y_t, w_t, w_sum, w_gap, smoothing, z_loss, C, SMOOTH)
    _store_rows(r, row_ok, valid, loss, lse, best_idx, ent, s, loss_ptr, lse_ptr, argmax_ptr, entropy_ptr, WANT_STATS)

    if WANT_GRAD:
        scale = tl.load(grad_scale_ptr + r * grad_scale_stride, mask=row_ok, other=0.0).to(tl.float32)
        p = e / s[None, :]
        dx = index_grad(
            p, is_target, w_t[None, :], w, w_sum[None, :], lse[None, :], scale[None, :], valid[None, :], y,
            smoothing, z_loss, softcap, C, SMOOTH, HAS_SOFTCAP,
        )  # fmt: skip
        dx = round_to(dx, grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + _row_start(r, S, stride_gb, stride_gs) + c64 * stride_gc, dx, mask=mask)
