"""The row maths every Triton kernel of xentlib shares: ``@triton.jit`` helpers only, nothing runs at import.

The kernels that use them: ``kernels.py`` (rows of materialized logits) and ``linear_kernels.py`` (tiles of
``X W^T`` that are never stored). A helper works on one block of a row, ``[BLOCK_C]``, or on a tile of several
rows laid out ``[classes, rows]``: reductions run over axis 0 and per-row values broadcast as ``[None, :]``.

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

The same maths exists in backends/torch_chunked.py (torch ops) and backends/cpu_rows.c (C); the kernels are pinned
to it by tests/backends/test_triton.py (a float64 torch composition, the NumPy reference, the PyTorch backend) and
tests/test_accuracy.py (the "triton" cases: error against float64 no larger than torch's).
"""

import os

import triton
import triton.language as tl

# Triton's CPU interpreter converts float32 to bfloat16 by truncation; a GPU rounds to nearest even. Read when
# the kernels are decorated, which is also when triton picks interpreter or compiler.
ROUND_BF16_IN_SOFTWARE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


# ---------------------------------------------------------------------------------------------------------------
# Soft-capping and rounding
# ---------------------------------------------------------------------------------------------------------------


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
def soft_cap(x, softcap, HAS_SOFTCAP: tl.constexpr):
    # y = cap * tanh(x / cap) in float32; the identity without a cap.
    x = x.to(tl.float32)
    if HAS_SOFTCAP:
        x = softcap * _tanh(x / softcap)
    return x


@triton.jit
def masked_soft_cap(x, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    # soft_cap, and -inf where `mask` is off: padding past the last class (or row) adds exp(-inf) = 0 to the
    # sums and never wins a max.
    return tl.where(mask, soft_cap(x, softcap, HAS_SOFTCAP), float("-inf"))


@triton.jit
def softcap_slope(y, softcap, HAS_SOFTCAP: tl.constexpr):
    # Chain rule of the cap: d(cap * tanh(x / cap))/dx = 1 - tanh^2 = 1 - (y / cap)^2.
    slope = tl.full(y.shape, 1.0, tl.float32)
    if HAS_SOFTCAP:
        r = y / softcap
        slope = 1.0 - r * r
    return slope


@triton.jit
def round_to(value, dtype: tl.constexpr):
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


# ---------------------------------------------------------------------------------------------------------------
# Online merges over the blocks of a row (axis 0)
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def shift_reference(m):
    # The value exponentials are taken relative to: the running maximum, or 0 while it is still -inf.
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def merge_lse(m, s, y):
    # (m, s) over the values seen so far, merged with one block y.
    # s_new = s * exp(ref_old - ref_new) + sum exp(y - ref_new); e = exp(y - ref_new) is returned so the
    # entropy sum reuses it (one exp per element).
    # While nothing finite has been seen (m = -inf) the sums are 0 (or +inf for a gap), so the old reference
    # is taken equal to the new one: no rescaling, and no exp(0 - ref_new) that overflows below -88.
    m_new = tl.maximum(m, tl.max(y, axis=0))
    ref_new = shift_reference(m_new)
    ref_old = tl.where(m == float("-inf"), ref_new, m)
    e = tl.exp(y - ref_new)
    s_new = s * tl.exp(ref_old - ref_new) + tl.sum(e, axis=0)
    return m_new, s_new, ref_old, ref_new, e


@triton.jit
def merge_weighted_gap(a_sum, gap, ref_old, ref_new, a, y, mask):
    # A = sum a_c and G = sum a_c * (ref - y_c) (see the module docstring). Padding contributes 0
    # explicitly: a * (ref - (-inf)) would be 0 * inf = NaN. A real -inf logit with a_c > 0 gives +inf,
    # which is the exact value of that loss term; a_c = 0 there gives NaN, as torch's 0 * (-inf) does.
    gap = gap + (ref_new - ref_old) * a_sum
    gap = gap + tl.sum(tl.where(mask, a * (ref_new - y), 0.0), axis=0)
    a_sum = a_sum + tl.sum(a, axis=0)
    return a_sum, gap


@triton.jit
def merge_argmax(best, best_idx, y, start):
    # Argmax of the capped logits y (what the distribution sees; saturated ties go to the first class, as
    # torch.argmax does): tl.argmax returns the first maximum of a block, and a later block replaces the
    # running best only when strictly larger.
    block_best = tl.max(y, axis=0)
    block_idx = start + tl.argmax(y, axis=0)
    take = block_best > best
    return tl.where(take, block_best, best), tl.where(take, block_idx, best_idx)


@triton.jit
def merge_entropy_sum(t, s_old, ref_old, ref_new, e, y):
    # T = sum_c e_c * (y_c - ref) with e_c = exp(y_c - ref). When ref moves, e rescales by
    # alpha = exp(ref_old - ref_new) and (y - ref_new) = (y - ref_old) + (ref_old - ref_new), so
    # T_new = alpha * (T + (ref_old - ref_new) * s_old) + sum over the block. Entries with e = 0 add 0
    # (avoids 0 * -inf on padding and -inf logits).
    alpha = tl.exp(ref_old - ref_new)
    block = tl.sum(tl.where(e == 0.0, 0.0, e * (y - ref_new)), axis=0)
    return alpha * (t + (ref_old - ref_new) * s_old) + block


@triton.jit
def finish_entropy(t, s):
    # p_c = e_c / s and log p_c = (y_c - ref) - log s, so H = -sum p log p = log s - T / s.
    return tl.log(s) - t / s


@triton.jit
def finish_lse(m, s):
    # (ref, log s, lse = ref + log s) of a row whose sweep ended with maximum m and sum s.
    ref = shift_reference(m)
    log_s = tl.log(s)
    return ref, log_s, ref + log_s


# ---------------------------------------------------------------------------------------------------------------
# Class-index targets: the loss and gradient of a row from its sums
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def index_row_loss(ref, log_s, lse, y_t, w_t, w_sum, w_gap, smoothing, z_loss, C, SMOOTH: tl.constexpr):
    # q = (1 - eps) w_t onehot(t) + (eps / C) w, so with the weighted gap of a = w:
    #   l = (1 - eps) w_t (lse - y_t) + (eps / C) sum_c w_c (lse - y_c) + z lse^2
    #     = (1 - eps) w_t (log s + (ref - y_t)) + (eps / C) (W log s + G) + z lse^2
    # y_t is gathered (never a dot product with a one-hot, so a -inf logit on another class keeps l finite).
    loss = (1.0 - smoothing) * w_t * (log_s + (ref - y_t)) + z_loss * lse * lse
    if SMOOTH:
        loss += smoothing / C * (w_sum * log_s + w_gap)
    return loss


@triton.jit
def index_grad(p, is_target, w_t, w, w_sum, lse, scale, keep, y, smoothing, z_loss, softcap, C,
               SMOOTH: tl.constexpr, HAS_SOFTCAP: tl.constexpr):  # fmt: skip
    # dl/dy = (1 - eps) w_t (p - onehot) + (eps / C) (W p - w) + 2 z lse p with W = sum w; the target entry is
    # w_t (p_t - 1) in float32, never 1 - p_t rounded to the logits' dtype. Then the cap's chain rule, the
    # upstream scale, and zeros where `keep` is off: a where, not a product, so NaN logits in an ignored row
    # still give exact zeros.
    dy = (1.0 - smoothing) * w_t * (p - tl.where(is_target, 1.0, 0.0)) + 2.0 * z_loss * lse * p
    if SMOOTH:
        dy += smoothing / C * (w_sum * p - w)
    dx = dy * softcap_slope(y, softcap, HAS_SOFTCAP) * scale
    return tl.where(keep, dx, 0.0)
