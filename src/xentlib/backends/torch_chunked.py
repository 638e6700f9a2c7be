"""The pure-PyTorch backend ("torch"): row chunks, gradient made in the forward pass, float32 accumulation, any device.

`cross_entropy_rows(problem, grad_out, want_stats) -> RowResult` fulfils the backend contract of
`backends/base.py`: given a validated `CrossEntropyProblem` it returns per-row statistics and, when asked, writes
d(loss)/d(logits) into `grad_out` (which may be the logits themselves, for the in-place gradient).

How a chunk is processed (derivation in docs/numerics.md, "Row loss and gradient"): with y the (capped) logits,
    log p = log_softmax(y)                         torch's stable, vectorized row kernel
    l     = -sum_c q_c log p_c + z_loss lse^2       class index without smoothing: -w_t log p_t (a gather)
    dl/dy = (sum(q) + 2 z_loss lse) p - q           p = exp(log p), written over log p
    dl/dz = dl/dy (1 - (y / softcap)^2)             with softcap
lse (needed for z-loss and statistics) is y_a - log p_a at the row's arg-max a. A chunk (CHUNK_ELEMENTS elements
in the accumulation dtype, 8 MiB in float32) stays in the cache, so the few passes over it cost little next to
the one read of the logits and the one write of the gradient; its work buffers are allocated once per call and
reused.

The other functions of the family live beside it: `softmax.py` (log_softmax / softmax, on the same chunks) and
`bce.py` (the binary cross-entropy pair). Their autograd functions stay importable from here under their old
names (`SoftmaxFunction`, `BinaryCrossEntropyFunction`, `BinaryCrossEntropyWithLogitsFunction`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xentlib._semantics import CrossEntropyProblem
from xentlib.backends.base import ChunkPolicy, RowResult

# Elements per chunk: 2M float32 = 8 MiB, meant to stay in a large shared L3 cache. Smaller chunks pay torch's
# per-op overhead (dispatch and a parallel region per op) too often (docs/numerics.md section 7; timings in
# docs/bench/).
CHUNK_ELEMENTS = 1 << 21
# linear_cross_entropy's chunks: float32 working copies of half-precision logits, so smaller chunks; pieces of a
# quarter of a chunk, so that their float32 buffers stay smaller than the chunk itself
CHUNK_POLICY = ChunkPolicy(rows_in_place=False, float32_weight_grad=False, own_chunks=4)


def chunk_shape(batch: int, classes: int, spatial: int, chunk_size: int | None) -> tuple[int, int]:
    """Rows per chunk as (batch rows, spatial positions). `chunk_size` counts rows (b, s) when given."""
    rows_wanted = chunk_size if chunk_size is not None else max(1, CHUNK_ELEMENTS // max(classes, 1))
    if spatial == 1:
        return max(1, min(batch, rows_wanted)), 1
    spatial_block = max(1, min(spatial, rows_wanted))
    batch_block = max(1, min(batch, rows_wanted // spatial_block)) if spatial_block == spatial else 1
    return batch_block, spatial_block


def iter_chunks(batch: int, spatial: int, block: tuple[int, int]):
    batch_block, spatial_block = block
    for b0 in range(0, batch, batch_block):
        for s0 in range(0, spatial, spatial_block):
            yield slice(b0, min(b0 + batch_block, batch)), slice(s0, min(s0 + spatial_block, spatial))


def cross_entropy_rows(
    problem: CrossEntropyProblem,
    grad_out: Tensor | None,
    want_stats: bool,
    chunk_size: int | None = None,
) -> RowResult:
    x = problem.logits
    batch, classes, spatial = x.shape
    acc = problem.acc_dtype
    result = RowResult(
        loss=torch.zeros(batch, spatial, dtype=acc, device=x.device),
        lse=torch.empty(batch, spatial, dtype=acc, device=x.device) if want_stats or problem.z_loss else None,
        argmax=torch.empty(batch, spatial, dtype=torch.long, device=x.device) if want_stats else None,
        entropy=torch.empty(batch, spatial, dtype=acc, device=x.device) if want_stats else None,
    )
    if x.numel() == 0:
        if result.lse is not None and classes == 0 and batch * spatial > 0:  # log-sum-exp of nothing
            result.lse.fill_(-math.inf)
        return result
    block = chunk_shape(batch, classes, spatial, chunk_size)
    buffers = _ChunkBuffers(problem, block, grad_out)
    for rows, cols in iter_chunks(batch, spatial, block):
        _process_chunk(problem, rows, cols, grad_out, result, buffers)
    return result


class _ChunkBuffers:
    """Work buffers allocated once per call and reused by every chunk (fresh memory is slow to write)."""

    def __init__(self, problem: CrossEntropyProblem, block: tuple[int, int], grad_out: Tensor | None):
        x = problem.logits
        shape = (block[0], x.shape[1], block[1])
        make = lambda: torch.empty(shape, dtype=problem.acc_dtype, device=x.device)  # noqa: E731
        writes_in_place = grad_out is not None and grad_out.dtype == problem.acc_dtype
        self.work = None if writes_in_place else make()
        self.capped = make() if problem.softcap is not None else None
        self.converted = make() if problem.softcap is None and x.dtype != problem.acc_dtype else None
        self.q = make() if problem.kind == "prob" else None
        weighted_smoothing = problem.smoothing > 0 and problem.class_weight is not None
        self.products = make() if problem.kind == "prob" or weighted_smoothing else None  # for _row/_class_dot

    @staticmethod
    def view(buffer: Tensor | None, like: Tensor) -> Tensor | None:
        if buffer is None:
            return None
        r, c, s = like.shape
        return buffer[:r, :c, :s]


def _process_chunk(problem, rows, cols, grad_out, result, buffers):
    """One chunk: log_softmax, loss terms, then the gradient written over the log-probabilities.

    With S = 1 the chunk is handled as a 2-D (R, C) view, which takes torch's vectorized last-dimension kernels.
    """
    acc = problem.acc_dtype
    x = problem.logits[rows, :, cols]
    spatial = x.shape[2]
    flat = (lambda t: t[:, :, 0]) if spatial == 1 else (lambda t: t)  # noqa: E731
    row = (lambda t: t.unsqueeze(1)) if spatial > 1 else (lambda t: t)  # (R, S) -> per-row shape  # noqa: E731
    grad_slice = None if grad_out is None else flat(grad_out[rows, :, cols])
    work = grad_slice if buffers.work is None else flat(buffers.view(buffers.work, x))
    cap = problem.softcap

    # y: the logits the softmax sees (capped, and in the accumulation dtype)
    if cap is not None:  # in the accumulation dtype from the start: widen, then divide (never x / cap in bfloat16)
        y = flat(buffers.view(buffers.capped, x))
        y.copy_(flat(x))
        y.div_(cap).tanh_().mul_(cap)
    elif x.dtype != acc:
        y = flat(buffers.view(buffers.converted, x))
        y.copy_(flat(x))
    else:
        y = flat(x)
    want_lse = problem.z_loss != 0 or result.argmax is not None
    if want_lse:  # lse = y_a - log p_a at the arg-max a, where log p_a = -log sum exp(y - y_a) is exact
        best = y.argmax(1, keepdim=True)
        y_best = y.gather(1, best)
    log_p = torch.log_softmax(y, 1, out=work)  # y may alias work (in-place gradient): safe row-wise
    if want_lse:
        lse = y_best - log_p.gather(1, best)
        result.lse[rows, cols] = lse.reshape(-1, spatial)
        if result.argmax is not None:
            result.argmax[rows, cols] = best.reshape(-1, spatial)

    # Loss terms from log p, before it is exponentiated. Without smoothing only the target is read.
    eps, classes = problem.smoothing, problem.num_classes
    valid = row(problem.valid[rows, cols])
    if problem.kind == "index":
        target = row(problem.target[rows, cols])
        w_t = row(problem.target_weight[rows, cols])
        loss = -w_t * log_p.gather(1, target)
        q_sum = w_t
        if eps > 0:  # torch's formula: (1 - eps) nll + eps / C sum_c w_c (-log p_c)
            w = problem.class_weight
            w_sum = float(classes) if w is None else w.sum()
            products = flat(buffers.view(buffers.products, x)) if w is not None else None
            smooth = -(log_p.sum(1, keepdim=True) if w is None else _class_dot(log_p, w, products))
            loss = (1.0 - eps) * loss + (eps / classes) * smooth
            q_sum = (1.0 - eps) * w_t + (eps / classes) * w_sum
    else:
        q = flat(buffers.view(buffers.q, x))
        q.copy_(flat(problem.target[rows, :, cols]))
        if eps > 0:
            q.mul_(1.0 - eps).add_(eps / classes)
        if problem.class_weight is not None:
            q.mul_(problem.class_weight.view((1, -1, 1)[: q.dim()]))
        q_sum = q.sum(1, keepdim=True)
        loss = -_row_dot(q, log_p, flat(buffers.view(buffers.products, x)))
    if problem.z_loss:
        loss = loss + problem.z_loss * lse * lse
    zero = torch.zeros((), dtype=acc, device=x.device)
    result.loss[rows, cols] = torch.where(valid, loss, zero).reshape(-1, spatial)

    p = work.exp_() if grad_out is not None or result.entropy is not None else None
    if result.entropy is not None:  # H = -sum p log p, and log p = log(exp(log p)) up to underflow (0 log 0 = 0)
        result.entropy[rows, cols] = (-torch.special.xlogy(p, p).sum(1, keepdim=True)).reshape(-1, spatial)
    if grad_out is None:
        return

    # dl/dy = (sum q + 2 z lse) p - q, times the reduction scale; the target slot becomes p_t c - s (1 - eps) w_t
    scale = problem.grad_scale
    coef = q_sum + 2.0 * problem.z_loss * lse if problem.z_loss else q_sum
    p.mul_(coef * scale)
    if problem.kind == "index":
        p.scatter_add_(1, target, -(1.0 - eps) * scale * w_t)
        if eps > 0:
            w = problem.class_weight
            smooth = (eps / classes) * scale
            p.sub_(smooth if w is None else smooth * w.view((1, -1, 1)[: p.dim()]))
    else:
        p.addcmul_(q, -scale)
    if cap is not None:  # dy/dz = 1 - tanh^2 = 1 - (y / softcap)^2
        y.div_(cap).square_().neg_().add_(1.0)
        p.mul_(y)
    p.masked_fill_(~valid, 0.0)  # unconditionally: asking whether any row is ignored would read the data
    if buffers.work is not None:
        grad_slice.copy_(p)


# Sums of products over the classes are formed elementwise into a chunk buffer and summed by torch's reduction
# (pairwise within vector lanes, float32 throughout), as torch's own cross_entropy does. A matrix-vector or batched
# product (BLAS, blocked dot products) was up to 10x further from float64 (docs/numerics.md, section 7;
# tests/test_accuracy.py::test_weighted_smoothing_row_losses).


def _row_dot(a: Tensor, b: Tensor, products: Tensor) -> Tensor:
    """sum_c a[r, c, ...] * b[r, c, ...] with keepdim, through `products` (a's shape, overwritten)."""
    return torch.mul(a, b, out=products).sum(1, keepdim=True)


def _class_dot(a: Tensor, w: Tensor, products: Tensor) -> Tensor:
    """sum_c a[r, c, ...] * w[c] with keepdim, through `products` (a's shape, overwritten)."""
    return torch.mul(a, w.view((1, -1, 1)[: a.dim()]), out=products).sum(1, keepdim=True)
