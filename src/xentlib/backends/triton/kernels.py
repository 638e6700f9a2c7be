"""Triton kernels for xentlib's row-wise cross-entropy.

Only ``@triton.jit`` functions live here: no device queries, no allocation, nothing runs at import.
Launches (grid, block size, flags) are in ``ops.py``.

Notation for one row (one ``(b, s)`` position of a ``(B, C, S)`` logits view, classes ``c`` at stride
``stride_c``):

    x_c   the logits as stored (any float dtype, read once per sweep, promoted to float32)
    y_c   the logits after soft-capping: y = cap * tanh(x / cap), or y = x without a cap
    lse   log(sum_c exp(y_c)),        p_c = exp(y_c - lse)
    q_c   target weights: class index  q = (1 - eps) * w_t * onehot(t) + (eps / C) * w
                          probability  q = w * ((1 - eps) * t + eps / C)
    loss  l = sum_c q_c * (lse - y_c) + z * lse**2
          formed as sum_c q_c * (log(s) + (ref - y_c)), never lse - y_c (see "Weighted gaps")
    grad  dl/dy_c = (sum(q) + 2 z lse) * p_c - q_c,   dl/dx_c = dl/dy_c * (1 - (y_c / cap)**2)

Online log-sum-exp. The first sweep reads each block of the row once and keeps a running maximum ``m`` and
``s = sum exp(y - ref)`` with ``ref = m`` (``ref = 0`` while every value seen is -inf, so that no
``-inf - -inf`` appears). When a new block raises the maximum from ``ref_old`` to ``ref_new`` the old sum is
rescaled by ``exp(ref_old - ref_new)``. At the end ``lse = ref + log(s)``.

Weighted gaps. ``sum_c a_c * (lse - y_c)`` (a = smoothing weights or probability targets) is written as
``A * log(s) + G`` with ``A = sum a_c`` and ``G = sum a_c * (ref - y_c)``. Every term of ``G`` is >= 0
because ``ref`` is the row maximum, and ``log(s) >= 0``, so nothing cancels, unlike ``A * lse - sum a_c y_c``
which loses all digits when the logits are large. The target term likewise is ``log(s) + (ref - y_t)``, never
``lse - y_t`` nor ``lse - ref``: ``lse`` is rounded at the logits' magnitude (ulp(1e4) ~ 1e-3), so a row
``[1e4, 1e4, 0]`` would give 0.6934 instead of ln 2 (docs/numerics.md, section 2). When ``ref`` grows,
``G += (ref_new - ref_old) * A_old``.
"""

import os

import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    # tanh without libdevice (so the CPU interpreter runs the same code as the GPU):
    #   |u| <  0.25: odd Taylor series u - u^3/3 + 2u^5/15 - 17u^7/315 + 62u^9/2835; the first dropped term
    #                (1382/155925) u^11 is < 1e-8 relative to u there.
    #   |u| >= 0.25: sign(u) * (1 - e) / (1 + e) with e = exp(-2|u|) <= 0.61, so 1 - e >= 0.39 has no
    #                cancellation; e -> 0 for large |u| gives exactly +-1.
    a = tl.abs(u)
    u2 = u * u
    series = 0.13333333333333333 + u2 * (-0.05396825396825397 + u2 * 0.021869488536155203)
    series = u * (1.0 + u2 * (-0.3333333333333333 + u2 * series))
    e = tl.exp(-2.0 * a)
    closed = (1.0 - e) / (1.0 + e)
    closed = tl.where(u < 0, -closed, closed)
    return tl.where(a < 0.25, series, closed)


@triton.jit
def _capped(x, softcap, HAS_SOFTCAP: tl.constexpr):
    # y = cap * tanh(x / cap); the identity without a cap.
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    return x


@triton.jit
def _softcap_slope(y, softcap, HAS_SOFTCAP: tl.constexpr):
    # Chain rule of the cap: d(cap * tanh(x / cap))/dx = 1 - tanh^2 = 1 - (y / cap)^2.
    slope = tl.full(y.shape, 1.0, tl.float32)
    if HAS_SOFTCAP:
        r = y / softcap
        slope = 1.0 - r * r
    return slope


@triton.jit
def _load_block(row_ptr, stride_c, start, C, softcap, HAS_SOFTCAP: tl.constexpr, BLOCK_C: tl.constexpr):
    # One block of classes [start, start + BLOCK_C): raw logits x and capped logits y in float32,
    # -inf on the padding past C (so they add exp(-inf) = 0 and never win a max).
    offs = start + tl.arange(0, BLOCK_C)
    mask = offs < C
    x = tl.load(row_ptr + offs.to(tl.int64) * stride_c, mask=mask, other=float("-inf")).to(tl.float32)
    y = tl.where(mask, _capped(x, softcap, HAS_SOFTCAP), float("-inf"))
    return offs, mask, x, y


# Triton's CPU interpreter converts float32 to bfloat16 by truncation; a GPU rounds to nearest even. Read when
# the kernels are decorated, which is also when triton picks interpreter or compiler.
ROUND_BF16_IN_SOFTWARE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@triton.jit
def _round_to(value, dtype: tl.constexpr):
    # float32 -> the gradient's dtype, rounding to nearest even: the GPU's own conversion. Under the interpreter,
    # bfloat16 is rounded on the bits (add 0x7FFF plus the lowest kept bit, drop the low 16 bits; inf keeps its
    # class). A NaN's payload could carry into the sign there (0x7FFFFFFF + 0x7FFF gives -0.0), so NaNs take the
    # plain conversion.
    if ROUND_BF16_IN_SOFTWARE and dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(value != value, value.to(tl.bfloat16), rounded)
    else:
        return value.to(dtype)


@triton.jit
def _shift_reference(m):
    # The value exponentials are taken relative to: the running maximum, or 0 while it is still -inf.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _merge_lse(m, s, y):
    # (m, s) over the values seen so far, merged with one block y.
    # s_new = s * exp(ref_old - ref_new) + sum exp(y - ref_new); e = exp(y - ref_new) is returned so the
    # entropy sum reuses it (one exp per element).
    # While nothing finite has been seen (m = -inf) the sums are 0 (or +inf for a gap), so the old reference
    # is taken equal to the new one: no rescaling, and no exp(0 - ref_new) that overflows below -88.
    m_new = tl.maximum(m, tl.max(y, axis=0))
    ref_new = _shift_reference(m_new)
    ref_old = tl.where(m == float("-inf"), ref_new, m)
    e = tl.exp(y - ref_new)
    s_new = s * tl.exp(ref_old - ref_new) + tl.sum(e, axis=0)
    return m_new, s_new, ref_old, ref_new, e


@triton.jit
def _merge_weighted_gap(a_sum, gap, ref_old, ref_new, a, y, mask):
    # A = sum a_c and G = sum a_c * (ref - y_c) (see the module docstring). Padding contributes 0
    # explicitly: a * (ref - (-inf)) would be 0 * inf = NaN. A real -inf logit with a_c > 0 gives +inf,
    # which is the exact value of that loss term; a_c = 0 there gives NaN, as torch's 0 * (-inf) does.
    gap = gap + (ref_new - ref_old) * a_sum
    gap = gap + tl.sum(tl.where(mask, a * (ref_new - y), 0.0), axis=0)
    a_sum = a_sum + tl.sum(a, axis=0)
    return a_sum, gap


@triton.jit
def _merge_argmax(best, best_idx, y, start):
    # Argmax of the capped logits y (what the distribution sees; saturated ties go to the first class, as
    # torch.argmax does): tl.argmax returns the first maximum of a block, and a later block replaces the
    # running best only when strictly larger.
    block_best = tl.max(y, axis=0)
    block_idx = start + tl.argmax(y, axis=0)
    take = block_best > best
    return tl.where(take, block_best, best), tl.where(take, block_idx, best_idx)


@triton.jit
def _merge_entropy_sum(t, s_old, ref_old, ref_new, e, y):
    # T = sum_c e_c * (y_c - ref) with e_c = exp(y_c - ref). When ref moves, e rescales by
    # alpha = exp(ref_old - ref_new) and (y - ref_new) = (y - ref_old) + (ref_old - ref_new), so
    # T_new = alpha * (T + (ref_old - ref_new) * s_old) + sum over the block. Entries with e = 0 add 0
    # (avoids 0 * -inf on padding and -inf logits).
    alpha = tl.exp(ref_old - ref_new)
    block = tl.sum(tl.where(e == 0.0, 0.0, e * (y - ref_new)), axis=0)
    return alpha * (t + (ref_old - ref_new) * s_old) + block


@triton.jit
def _finish_entropy(t, s):
    # p_c = e_c / s and log p_c = (y_c - ref) - log s, so H = -sum p log p = log s - T / s.
    return tl.log(s) - t / s


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
            tl.store(buffer_ptr + offs, _round_to(value, buffer_ptr.dtype.element_ty), mask=mask)


@triton.jit
def index_target_rows_kernel(
    logits_ptr,
    stride_lb,
    stride_lc,
    stride_ls,
    grad_ptr,
    stride_gb,
    stride_gc,
    stride_gs,
    target_ptr,
    valid_ptr,
    target_weight_ptr,
    class_weight_ptr,
    grad_scale_ptr,
    grad_scale_stride,
    loss_ptr,
    lse_ptr,
    argmax_ptr,
    entropy_ptr,
    S,
    C,
    smoothing,
    z_loss,
    softcap,
    SMOOTH: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    WANT_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Class-index targets, one program per row. Per-row arrays (target, valid, target_weight, grad_scale
    when not 0-d, outputs) are contiguous (B * S,); logits and grad have their own (b, c, s) strides.

    Row loss with q = (1 - eps) w_t onehot(t) + (eps / C) w:
        l = (1 - eps) w_t (lse - y_t) + (eps / C) sum_c w_c (lse - y_c) + z lse^2
          = (1 - eps) w_t (log s + (ref - y_t)) + (eps / C) (W log s + G) + z lse^2
    The target term gathers y_t (never a dot product with a one-hot, so a -inf logit on another class keeps
    the loss finite); the smoothing term is the weighted gap of the module docstring with a = w.
    Gradient dl/dy = (1 - eps) w_t (p - onehot) + (eps / C) (W p - w) + 2 z lse p with W = sum w: the
    target entry is w_t (p_t - 1) evaluated in float32, never 1 - p_t rounded to the logits dtype.
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s_pos = row % S
    logits_row = logits_ptr + b * stride_lb + s_pos * stride_ls

    valid = tl.load(valid_ptr + row) != 0
    t = tl.load(target_ptr + row).to(tl.int64)
    w_t = tl.load(target_weight_ptr + row).to(tl.float32)

    m = float("-inf")
    s = 0.0
    w_sum = 0.0
    w_gap = 0.0
    best = float("-inf")
    best_idx = 0
    ent = 0.0
    for start in range(0, C, BLOCK_C):
        offs, mask, x, y = _load_block(logits_row, stride_lc, start, C, softcap, HAS_SOFTCAP, BLOCK_C)
        s_old = s
        m, s, ref_old, ref_new, e = _merge_lse(m, s, y)
        if SMOOTH:
            w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w_sum, w_gap = _merge_weighted_gap(w_sum, w_gap, ref_old, ref_new, w, y, mask)
        if WANT_STATS:
            best, best_idx = _merge_argmax(best, best_idx, y, start)
            ent = _merge_entropy_sum(ent, s_old, ref_old, ref_new, e, y)
    ref = _shift_reference(m)
    log_s = tl.log(s)
    lse = ref + log_s

    x_t = tl.load(logits_row + t * stride_lc).to(tl.float32)
    y_t = _capped(x_t, softcap, HAS_SOFTCAP)
    hard = (1.0 - smoothing) * w_t
    soft = smoothing / C
    loss = hard * (log_s + (ref - y_t)) + z_loss * lse * lse
    if SMOOTH:
        loss += soft * (w_sum * log_s + w_gap)
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    if WANT_STATS:
        tl.store(argmax_ptr + row, best_idx.to(tl.int64))
        tl.store(entropy_ptr + row, _finish_entropy(ent, s))

    if WANT_GRAD:
        grad_row = grad_ptr + b * stride_gb + s_pos * stride_gs
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        inv_s = 1.0 / s
        lse_coef = 2.0 * z_loss * lse
        for start in range(0, C, BLOCK_C):
            offs, mask, x, y = _load_block(logits_row, stride_lc, start, C, softcap, HAS_SOFTCAP, BLOCK_C)
            p = tl.exp(y - ref) * inv_s
            onehot = tl.where(offs == t, 1.0, 0.0)
            dy = hard * (p - onehot) + lse_coef * p
            if SMOOTH:
                w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                dy += soft * (w_sum * p - w)
            dx = dy * _softcap_slope(y, softcap, HAS_SOFTCAP) * scale
            # where, not a product with valid: NaN logits in an ignored row must give exact zeros.
            dx = tl.where(valid, dx, 0.0)
            tl.store(grad_row + offs.to(tl.int64) * stride_gc, _round_to(dx, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def prob_target_rows_kernel(
    logits_ptr,
    stride_lb,
    stride_lc,
    stride_ls,
    grad_ptr,
    stride_gb,
    stride_gc,
    stride_gs,
    target_ptr,
    stride_tb,
    stride_tc,
    stride_ts,
    valid_ptr,
    class_weight_ptr,
    grad_scale_ptr,
    grad_scale_stride,
    loss_ptr,
    lse_ptr,
    argmax_ptr,
    entropy_ptr,
    S,
    C,
    smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    WANT_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Probability targets, one program per row: q_c = w_c ((1 - eps) t_c + eps / C).

    l = sum_c q_c (lse - y_c) + z lse^2 = Q log s + G + z lse^2 (weighted gap with a = q), and
    dl/dy = (Q + 2 z lse) p - q. The targets are read once per sweep, like the logits. As in torch, a -inf
    logit gives NaN even where q_c = 0 (0 * inf).
    """
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    s_pos = row % S
    logits_row = logits_ptr + b * stride_lb + s_pos * stride_ls
    target_row = target_ptr + b * stride_tb + s_pos * stride_ts
    valid = tl.load(valid_ptr + row) != 0
    uniform = smoothing / C

    m = float("-inf")
    s = 0.0
    q_sum = 0.0
    q_gap = 0.0
    best = float("-inf")
    best_idx = 0
    ent = 0.0
    for start in range(0, C, BLOCK_C):
        offs, mask, x, y = _load_block(logits_row, stride_lc, start, C, softcap, HAS_SOFTCAP, BLOCK_C)
        s_old = s
        m, s, ref_old, ref_new, e = _merge_lse(m, s, y)
        t = tl.load(target_row + offs.to(tl.int64) * stride_tc, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        q = w * ((1.0 - smoothing) * t + uniform)
        q_sum, q_gap = _merge_weighted_gap(q_sum, q_gap, ref_old, ref_new, q, y, mask)
        if WANT_STATS:
            best, best_idx = _merge_argmax(best, best_idx, y, start)
            ent = _merge_entropy_sum(ent, s_old, ref_old, ref_new, e, y)
    ref = _shift_reference(m)
    log_s = tl.log(s)
    lse = ref + log_s

    loss = q_sum * log_s + q_gap + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)
    if WANT_STATS:
        tl.store(argmax_ptr + row, best_idx.to(tl.int64))
        tl.store(entropy_ptr + row, _finish_entropy(ent, s))

    if WANT_GRAD:
        grad_row = grad_ptr + b * stride_gb + s_pos * stride_gs
        scale = tl.load(grad_scale_ptr + row * grad_scale_stride).to(tl.float32)
        inv_s = 1.0 / s
        p_coef = q_sum + 2.0 * z_loss * lse
        for start in range(0, C, BLOCK_C):
            offs, mask, x, y = _load_block(logits_row, stride_lc, start, C, softcap, HAS_SOFTCAP, BLOCK_C)
            p = tl.exp(y - ref) * inv_s
            t = tl.load(target_row + offs.to(tl.int64) * stride_tc, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(class_weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            q = w * ((1.0 - smoothing) * t + uniform)
            dx = (p_coef * p - q) * _softcap_slope(y, softcap, HAS_SOFTCAP) * scale
            dx = tl.where(valid, dx, 0.0)
            tl.store(grad_row + offs.to(tl.int64) * stride_gc, _round_to(dx, grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def index_target_tile_kernel(
    logits_ptr,
    stride_lb,
    stride_lc,
    stride_ls,
    grad_ptr,
    stride_gb,
    stride_gc,
    stride_gs,
    target_ptr,
    valid_ptr,
    target_weight_ptr,
    class_weight_ptr,
    grad_scale_ptr,
    grad_scale_stride,
    loss_ptr,
    lse_ptr,
    argmax_ptr,
    entropy_ptr,
    R,
    S,
    C,
    smoothing,
    z_loss,
    softcap,
    SMOOTH: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    WANT_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Class-index targets with few classes (C <= BLOCK_C): a program takes a [BLOCK_C, BLOCK_R] tile of
    BLOCK_R whole rows (rows r = b * S + s, of R in all). Consecutive rows are consecutive positions s, so a
    (B, C, S) input is read along its contiguous axis instead of one strided row at a time, and every element
    is read once and written once (the first sweep of index_target_rows_kernel is a single block here, and
    e = exp(y - ref) from it gives p = e / s for the gradient). Same maths, same helpers, per column.
    """
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    row_ok = r < R
    b = r // S
    s_pos = r % S
    c = tl.arange(0, BLOCK_C)
    mask = (c < C)[:, None] & row_ok[None, :]
    c64 = c.to(tl.int64)[:, None]
    x = tl.load(logits_ptr + b * stride_lb + s_pos * stride_ls + c64 * stride_lc, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    y = tl.where(mask, _capped(x, softcap, HAS_SOFTCAP), float("-inf"))

    valid = tl.load(valid_ptr + r, mask=row_ok, other=0) != 0
    t = tl.load(target_ptr + r, mask=row_ok, other=0)
    w_t = tl.load(target_weight_ptr + r, mask=row_ok, other=0.0).to(tl.float32)
    zero = tl.zeros([BLOCK_R], tl.float32)
    m, s, ref_old, ref, e = _merge_lse(zero + float("-inf"), zero, y)
    log_s = tl.log(s)
    lse = ref + log_s
    is_target = c[:, None] == t[None, :]
    y_t = tl.sum(tl.where(is_target, y, 0.0), axis=0)  # a gather: other entries contribute an exact 0

    hard = (1.0 - smoothing) * w_t
    soft = smoothing / C
    loss = hard * (log_s + (ref - y_t)) + z_loss * lse * lse
    w = tl.zeros([BLOCK_C, BLOCK_R], tl.float32)
    w_sum = zero
    if SMOOTH:
        w = tl.load(class_weight_ptr + c, mask=c < C, other=0.0).to(tl.float32)[:, None] + w
        w = tl.where(mask, w, 0.0)
        w_sum, w_gap = _merge_weighted_gap(zero, zero, ref_old, ref, w, y, mask)
        loss += soft * (w_sum * log_s + w_gap)
    tl.store(loss_ptr + r, tl.where(valid, loss, 0.0), mask=row_ok)
    tl.store(lse_ptr + r, lse, mask=row_ok)
    if WANT_STATS:
        best, best_idx = _merge_argmax(zero + float("-inf"), tl.zeros([BLOCK_R], tl.int32), y, 0)
        tl.store(argmax_ptr + r, best_idx.to(tl.int64), mask=row_ok)
        tl.store(
            entropy_ptr + r,
            _finish_entropy(_merge_entropy_sum(zero, zero, ref_old, ref, e, y), s),
            mask=row_ok,
        )

    if WANT_GRAD:
        scale = tl.load(grad_scale_ptr + r * grad_scale_stride, mask=row_ok, other=0.0).to(tl.float32)
        p = e / s[None, :]
        dy = hard[None, :] * (p - tl.where(is_target, 1.0, 0.0)) + (2.0 * z_loss * lse)[None, :] * p
        if SMOOTH:
            dy += soft * (w_sum[None, :] * p - w)
        dx = dy * _softcap_slope(y, softcap, HAS_SOFTCAP) * scale[None, :]
        dx = tl.where(valid[None, :], dx, 0.0)
        dx = _round_to(dx, grad_ptr.dtype.element_ty)
        tl.store(grad_ptr + b * stride_gb + s_pos * stride_gs + c64 * stride_gc, dx, mask=mask)


# ------------------------------------------------------------------------------------------------------------
# linear_cross_entropy without logits in memory (backend="triton-tiled", launched by tiled.py)
#
# Z = X W^T + b is never stored. A program works on a tile of BLOCK_V classes x BLOCK_N rows, laid out as
# [classes, rows] like index_target_tile_kernel so the row helpers above reduce over axis 0:
#     Z_tile = W[v-block] @ X[n-block]^T (+ b)      tl.dot over D in BLOCK_D steps, float32 accumulation
# The forward walks the vocabulary tiles of its rows and merges their log-sum-exp online; the backward
# recomputes each tile from the saved lse and adds its share of dX and dW.
# ------------------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, bias_ptr, rows, cols, row_ok, col_ok, D,
    HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    # Z[cols, rows] = sum_d W[cols, d] X[rows, d] (+ b[cols]) in float32; rows and cols are int64 offsets.
    # DOT_FP32 converts half-precision operands before tl.dot (Triton's CPU interpreter multiplies bfloat16
    # operands wrongly); on a GPU they go to the tensor cores as they are, accumulating in float32.
    acc = tl.zeros([BLOCK_V, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = d < D
        # masked lanes load 0 (without `other` they are undefined on a GPU and would enter the sums)
        w_mask = col_ok[:, None] & d_ok[None, :]
        x_mask = row_ok[:, None] & d_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * stride_wv + d[None, :] * stride_wd, mask=w_mask, other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd, mask=x_mask, other=0.0)
        if DOT_FP32:
            w = w.to(tl.float32)
            x = x.to(tl.float32)
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
    """Per-row loss and lse of class-index targets for BLOCK_N rows, merged over the vocabulary tiles.
    Same row maths as index_target_rows_kernel (loss = (1 - eps) w_t (lse - y_t) + (eps / V) sum_c w_c
    (lse - y_c) + z lse^2), with y_t picked from the tile that holds the target."""
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
        y = tl.where(mask, _capped(z, softcap, HAS_SOFTCAP), float("-inf"))
        m, s, ref_old, ref_new, e = _merge_lse(m, s, y)
        y_t += tl.sum(tl.where(cols[:, None] == t[None, :], y, 0.0), axis=0)  # a gather: one tile holds t
        if SMOOTH:
            w = tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
            w = tl.where(mask, w + zero[None, :], 0.0)
            w_sum, w_gap = _merge_weighted_gap(w_sum, w_gap, ref_old, ref_new, w, y, mask)
    ref = _shift_reference(m)
    log_s = tl.log(s)
    lse = ref + log_s
    loss = (1.0 - smoothing) * w_t * (log_s + (ref - y_t)) + z_loss * lse * lse
    if SMOOTH:
        loss += smoothing / V * (w_sum * log_s + w_gap)
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
    """One (vocabulary tile, row block): recompute Z, then dZ = scale ((1 - eps) w_t (p - onehot) + (eps / V)
    (W_sum p - w) + 2 z lse p) (1 - (y / cap)^2), zero on ignored rows, and add dX[rows] += dZ^T W[tile],
    dW[tile] += dZ X[rows], db[tile] += sum_rows dZ into float32 buffers with atomic adds (several programs
    share each row of dX and each class of dW, so the summation order, and the last bits, vary run to run)."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    rows = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = cols < V
    row_ok = rows < N
    mask = col_ok[:, None] & row_ok[None, :]
    z = _logits_tile(
        x_ptr, stride_xn, stride_xd, w_ptr, stride_wv, stride_wd, bias_ptr, rows, cols, row_ok, col_ok, D,
        HAS_BIAS, DOT_FP32, BLOCK_V, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    y = tl.where(mask, _capped(z, softcap, HAS_SOFTCAP), float("-inf"))

    valid = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
    t = tl.load(target_ptr + rows, mask=row_ok, other=0).to(tl.int64)
    w_t = tl.load(target_weight_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(grad_scale_ptr + rows * grad_scale_stride, mask=row_ok, other=0.0).to(tl.float32)
    p = tl.exp(y - lse[None, :])
    onehot = tl.where(cols[:, None] == t[None, :], 1.0, 0.0)
    dy = ((1.0 - smoothing) * w_t)[None, :] * (p - onehot) + (2.0 * z_loss * lse)[None, :] * p
    if SMOOTH:
        w = tl.load(class_weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        dy += smoothing / V * (tl.load(weight_sum_ptr) * p - w)
    dz = dy * _softcap_slope(y, softcap, HAS_SOFTCAP) * scale[None, :]
    dz = tl.where(mask & valid[None, :], dz, 0.0)  # where, not a product: NaN in an ignored row stays out

    if WANT_B:
        tl.atomic_add(grad_b_ptr + cols, tl.sum(dz, axis=1), mask=col_ok)
    dz_in = dz.to(x_ptr.dtype.element_ty)  # the matmuls take dZ in the inputs' dtype, as F.linear's backward does
    if DOT_FP32:
        dz_in = dz_in.to(tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_ok = d < D
        if WANT_X:
            w_blk = tl.load(
                w_ptr + cols[:, None] * stride_wv + d[None, :] * stride_wd,
                mask=col_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:
                w_blk = w_blk.to(tl.float32)
            part_x = tl.dot(tl.trans(dz_in), w_blk, input_precision="ieee", out_dtype=tl.float32)  # [BLOCK_N, BLOCK_D]
            tl.atomic_add(grad_x_ptr + rows[:, None] * D + d[None, :], part_x, mask=row_ok[:, None] & d_ok[None, :])
        if WANT_W:
            x_blk = tl.load(
                x_ptr + rows[:, None] * stride_xn + d[None, :] * stride_xd,
                mask=row_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if DOT_FP32:
                x_blk = x_blk.to(tl.float32)
            part_w = tl.dot(dz_in, x_blk, input_precision="ieee", out_dtype=tl.float32)  # [BLOCK_V, BLOCK_D]
            tl.atomic_add(grad_w_ptr + cols[:, None] * D + d[None, :], part_w, mask=col_ok[:, None] & d_ok[None, :])
