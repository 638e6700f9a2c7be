"""Distillation divergences: the generalized Jensen-Shannon divergence of GKD (TRL's `generalized_jsd_loss`).

Per row, with p = softmax(student / T) (the student), q = softmax(teacher / T) (the teacher), 0 <= beta <= 1:

    m   = beta q + (1 - beta) p
    L   = beta KL(q || m) + (1 - beta) KL(p || m)          for 0 < beta < 1
    L   = KL(q || p)   (forward KL)                         for beta = 0, exactly (not the limit, which is 0)
    L   = KL(p || q)   (reverse KL)                         for beta = 1, exactly

The endpoints are TRL's convention: JSD_beta / beta -> KL(q || p) as beta -> 0, so the two KLs are the scaled limits.
Gradient wrt the student logits z (docs/numerics.md, "Distillation divergences"), with s = z / T, log p = s - lse(s):

    beta = 0:       dL/dz = (p - q) / T
    0 < beta <= 1:  dL/dz = (1 - beta') p (r - KL(p || m')) / T,   r = log p - log m'
                    where beta' = beta, m' = m for 0 < beta < 1 and beta' = 0, m' = q for beta = 1.

The teacher is a constant: no gradient flows to the teacher's logits, inputs, weights or biases (they are detached).
Both functions are torch ops (`torch.ops.xentlib.distillation`, `torch.ops.xentlib.linear_distillation`) that make
the student's gradient in the forward sweep, chunk by chunk, in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.backends import cpu_kernel
from xentlib.backends.composite import refuse_transforms
from xentlib.linear import accumulate_chunk_grads_, default_chunk_rows, kept_rows

__all__ = ["distillation_loss", "linear_distillation_loss"]

# Rows per block of the float32 work: each block holds about four (rows, V) float32 temporaries.
_BLOCK_BYTES = 1 << 25


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return sem.accumulation_dtype(dtype)


def _log_softmax(z: Tensor, temperature: float, acc: torch.dtype) -> Tensor:
    """log softmax(z / T) in `acc`, in a fresh buffer (z itself is never written). torch's log_softmax forms
    (y - max) - log sum exp(y - max), not y - lse: lse = max + log s rounded to float32 is off by an ulp of the
    max, which y - lse would carry into every log-probability (docs/numerics.md)."""
    if temperature == 1.0:
        return torch.log_softmax(z, dim=1, dtype=acc)
    return torch.log_softmax(z.to(acc).div_(temperature) if z.dtype != acc else z / temperature, dim=1)


def _block_rows(zs: Tensor, zt: Tensor, beta: float, temperature: float, scale: Tensor | None, grad: Tensor | None):
    """Divergence per row (acc dtype) of one block of (R, V) student and teacher logits. With `grad`, writes
    scale[r] * dL_r/dz_s into it (it may be `zs` itself: zs is read before grad is written). A term whose
    probability is 0 is 0 (0 log 0 = 0), also for a class masked to -inf in both models."""
    acc = _acc_dtype(zs.dtype)
    log_p = _log_softmax(zs, temperature, acc)
    log_q = _log_softmax(zt, temperature, acc)
    if beta == 0.0:  # KL(q || p) = sum q (log q - log p);  dL/ds = p - q
        q = log_q.exp()
        loss = _times_(log_q.sub_(log_p), q).sum(1)
        if grad is not None:
            d = log_p.exp_().sub_(q)
            _write_grad(grad, d, scale, temperature)
        return loss
    if beta == 1.0:  # KL(p || q) = sum p (log p - log q): the general formula with m = q and weight 1
        log_m, kl_q, weight = log_q, None, 1.0
    else:  # log m = log(beta q + (1 - beta) p), computed as a logaddexp of log-probabilities (no 0 log 0)
        log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
        q = log_q.exp()
        kl_q = _times_(log_q.sub_(log_m), q).sum(1)  # KL(q || m)
        del q
        weight = 1.0 - beta
    r = torch.sub(log_p, log_m, out=log_m) if log_m is not log_q else log_q.neg_().add_(log_p)  # log p - log m
    p = log_p.exp_()
    kl_p = _times_(r.clone(), p).sum(1)  # KL(p || m)
    loss = kl_p if kl_q is None else beta * kl_q + weight * kl_p
    if grad is not None:  # d/ds_j [(1-beta) KL(p||m) + beta KL(q||m)] = (1-beta) p_j (r_j - KL(p||m))
        d = _times_(r.sub_(kl_p.unsqueeze(1)), p)
        _write_grad(grad, d, scale, temperature / weight)
    return loss


def _times_(value: Tensor, probability: Tensor) -> Tensor:
    """value * probability in place, 0 where the probability is 0 (whatever the value: -inf - -inf is NaN)."""
    return value.mul_(probability).masked_fill_(probability == 0, 0.0)


def _write_grad(grad: Tensor, d: Tensor, scale: Tensor | None, divisor: float) -> None:
    """grad = d * scale (per row) / divisor, rounded once into grad's dtype."""
    if divisor != 1.0:
        d.div_(divisor)
    if scale is not None:
        d.mul_(scale.unsqueeze(1))
    grad.copy_(d)


def _chunk_rows(zs: Tensor, zt: Tensor, beta, temperature, scale: Tensor | None, grad: Tensor | None) -> Tensor:
    """`_block_rows` over blocks of rows so the float32 temporaries stay small (about _BLOCK_BYTES each)."""
    count, vocab = zs.shape
    if cpu_kernel.supports_distillation(zs, zt, grad):  # a sweep per row in C, on torch's threads (cpu_post_training.c)
        loss = torch.empty(count, dtype=torch.float32, device="cpu")
        scale = None if scale is None else scale.to(torch.float32).contiguous()
        cpu_kernel.distillation_rows(zs, zt, beta, temperature, scale, loss, grad)
        return loss
    block = max(1, _BLOCK_BYTES // (max(vocab, 1) * 4))
    if count <= block:
        return _block_rows(zs, zt, beta, temperature, scale, grad)
    out = []
    for start in range(0, count, block):
        rows = slice(start, start + block)
        out.append(
            _block_rows(
                zs[rows], zt[rows], beta, temperature, None if scale is None else scale[rows],
                None if grad is None else grad[rows],
            )
        )  # fmt: skip
    return torch.cat(out)


def _row_scale(reduction, valid, row_scale: Tensor | None, count, batch, acc, device) -> Tensor:
    """Per-row coefficient of each row's gradient: grad_output (per row or expanded) / the denominator;
    0 on ignored rows."""
    den = sem.distillation_denominator(reduction, valid, count, batch, acc, device)
    scale = torch.ones(count, dtype=acc, device=device) if row_scale is None else row_scale.to(acc).clone()
    scale.div_(den)
    if valid is not None:
        scale = scale.masked_fill(~valid, 0.0)  # also when den = 0 ('mean' of no rows): no 0 * inf
    return scale


def _reduce(reduction, row_loss: Tensor, valid, count, batch) -> Tensor:
    if valid is not None:
        row_loss = row_loss.masked_fill(~valid, 0.0)
    if reduction == "none":
        return row_loss
    den = sem.distillation_denominator(reduction, valid, count, batch, row_loss.dtype, row_loss.device)
    return row_loss.sum() / den


# --------------------------------------------------------------------------------------------------------------
# distillation_loss on materialized logits: torch.ops.xentlib.distillation
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("xentlib::distillation", mutates_args=())
def distillation_op(
    student: Tensor,
    teacher: Tensor,
    valid: Tensor | None,
    row_scale: Tensor | None,
    beta: float,
    temperature: float,
    reduction: str,
    batch: int,
    with_grad: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """(loss, grad) of (N, V) logits. grad = d loss / d student for grad_output = 1 ('none': per row, each row's
    own gradient; with `row_scale`: times row_scale), or empty without `with_grad`."""
    count, vocab = student.shape
    acc = _acc_dtype(student.dtype)
    scale = _row_scale(reduction, valid, row_scale, count, batch, acc, student.device)
    row_loss = torch.zeros(count, dtype=acc, device=student.device)
    active = kept_rows(valid, student.device)
    grad = (torch.zeros_like if active is not None else torch.empty_like)(student) if with_grad else None
    total = count if active is None else active.numel()
    chunk = chunk_size if chunk_size > 0 else default_chunk_rows(count, vocab, student.element_size())
    for start in range(0, total, chunk):
        rows = slice(start, min(start + chunk, total)) if active is None else active[start : start + chunk]
        g = None if grad is None else (grad[rows] if active is None else torch.empty_like(student[rows]))
        row_loss[rows] = _chunk_rows(student[rows], teacher[rows], beta, temperature, scale[rows], g)
        if active is not None and grad is not None:
            grad[rows] = g
    if grad is not None and valid is not None and active is None:
        grad.masked_fill_(~valid.unsqueeze(1), 0.0)  # exact zeros on ignored rows, even where they hold NaN
    loss = _reduce(reduction, row_loss, valid, count, batch).to(student.dtype)
    return loss, grad if grad is not None else student.new_empty((0,))


@distillation_op.register_fake
def _(student, teacher, valid, row_scale, beta, temperature, reduction, batch, with_grad, chunk_size):
    loss = student.new_empty((student.shape[0],) if reduction == "none" else ())
    return loss, torch.empty_like(student) if with_grad else student.new_empty((0,))


_DISTILL_SCALARS = ("beta", "temperature", "reduction", "batch", "with_grad", "chunk_size")


def _distill_setup_context(ctx, inputs, output):
    student, teacher, valid, row_scale, *scalars = inputs
    ctx.call = dict(zip(_DISTILL_SCALARS, scalars))
    loss, grad = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(grad)
    ctx.grad_buffer = grad if ctx.call["with_grad"] and row_scale is None else None  # handed to autograd once
    ctx.save_for_backward(student, teacher, valid, row_scale)


def _distill_backward(ctx, grad_loss, _grad):
    student, teacher, valid, row_scale = ctx.saved_tensors
    none = (None,) * 9
    buffer, ctx.grad_buffer = ctx.grad_buffer, None
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None, *none)
    call = ctx.call
    if torch.is_grad_enabled():  # double backward: differentiate the plain torch composition
        return (_composite_grad(student, teacher, valid, row_scale, grad_loss, call), *none)
    if buffer is not None:  # 'none': each row's own gradient times its grad_output
        factor = grad_loss.reshape(-1, 1) if call["reduction"] == "none" else grad_loss
        return (_scaled(buffer, factor), *none)
    # a second backward of the same graph, or a row-scaled call: the sweep again, with the row scales
    scales = grad_loss.reshape(-1) if call["reduction"] == "none" else grad_loss.expand(student.shape[0])
    if row_scale is not None:
        scales = scales * row_scale
    again = dict(call, with_grad=True)
    grad = torch.ops.xentlib.distillation(student, teacher, valid, scales.contiguous(), **again)[1]
    return (grad, *none)


def _scaled(buffer: Tensor, factor: Tensor) -> Tensor:
    """The saved gradient times grad_output (a scalar, or a column of row factors), in place; skipped for the
    common scalar 1 on CPU. Half precision scales in float32 (a grad_output such as GradScaler's 65536 may not
    fit float16), rounded once. Traced by the compiler (fake tensors): out of place, it plans the memory."""
    if type(factor) is not Tensor:
        return (buffer.float() * factor.float()).to(buffer.dtype)
    if factor.numel() == 1 and factor.device.type == "cpu" and float(factor) == 1.0:
        return buffer
    if buffer.element_size() < 4:
        return buffer.copy_(buffer.float().mul_(factor.float()))
    return buffer.mul_(factor.to(buffer.dtype))


distillation_op.register_autograd(_distill_backward, setup_context=_distill_setup_context)


# --------------------------------------------------------------------------------------------------------------
# The same divergence as plain differentiable torch ops: double backward (create_graph=True) goes through it
# --------------------------------------------------------------------------------------------------------------


def composite_rows(zs: Tensor, zt: Tensor, beta: float, temperature: float) -> Tensor:
    """Per-row divergence of (N, V) logits by plain torch ops (differentiable in both arguments)."""
    acc = _acc_dtype(zs.dtype)
    log_p = torch.log_softmax(zs.to(acc) / temperature, dim=-1)
    log_q = torch.log_softmax(zt.to(acc) / temperature, dim=-1)
    if beta == 0.0:
        return _kl_terms(log_q, log_p).sum(-1)
    if beta == 1.0:
        return _kl_terms(log_p, log_q).sum(-1)
    log_m = torch.logaddexp(log_p + math.log1p(-beta), log_q + math.log(beta))
    return beta * _kl_terms(log_q, log_m).sum(-1) + (1 - beta) * _kl_terms(log_p, log_m).sum(-1)


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """a (log a - log b), 0 where a = 0; the difference is masked before the product, so that no NaN of a masked
    class (-inf - -inf) reaches the gradient either."""
    a = log_a.exp()
    return a * torch.where(a > 0, log_a - log_b, torch.zeros((), dtype=a.dtype, device=a.device))


def _composite_loss(zs, zt, valid, row_scale, call) -> Tensor:
    rows = composite_rows(zs, zt, call["beta"], call["temperature"])
    if row_scale is not None:
        rows = rows * row_scale
    if valid is not None:
        rows = torch.where(valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if call["reduction"] == "none":
        return rows.to(zs.dtype)
    den = sem.distillation_denominator(call["reduction"], valid, zs.shape[0], call["batch"], rows.dtype, rows.device)
    return (rows.sum() / den).to(zs.dtype)


def _composite_grad(student, teacher, valid, row_scale, grad_loss, call) -> Tensor:
    with torch.enable_grad():
        leaf = student if student.requires_grad else student.detach().requires_grad_()
        loss = _composite_loss(leaf, teacher.detach(), valid, row_scale, call)
        (grad,) = torch.autograd.grad(loss, leaf, grad_loss, create_graph=True)
    return grad


# --------------------------------------------------------------------------------------------------------------
# linear_distillation_loss: torch.ops.xentlib.linear_distillation (never the (N, V) logits of either model)
# --------------------------------------------------------------------------------------------------------------


def _linear_chunk(xs_c, ws, bs, xt_c, wt, bt, buffers, call, scale_c, grads, out, in_rows, first) -> Tensor:
    """One chunk of rows: both models' logits, the rows' divergences, and the student's gradient share:
    dZ (written over the student's logits) -> dX rows = dZ W_s, dW_s += dZ^T X_s, db_s += sum dZ."""
    zs, zt = buffers[0][: xs_c.shape[0]], buffers[1][: xs_c.shape[0]]
    _logits_into(zs, xs_c, ws, bs)
    _logits_into(zt, xt_c, wt, bt)
    grad = zs if any(grads) else None
    loss = _chunk_rows(zs, zt, call["beta"], call["temperature"], scale_c, grad)
    if grad is not None:
        accumulate_chunk_grads_(grad, ws, xs_c, in_rows, *out, first=first)
    return loss


def _default_linear_chunk(xs: Tensor, count: int, vocab: int) -> int:
    """Rows per chunk of both models' logits (two buffers of the student's dtype). Where the compiled CPU kernel
    computes the rows (no float32 temporaries), each buffer is a fifth of a model's logits; elsewhere the PyTorch
    ops' float32 blocks run beside them and the chunks are smaller (`default_chunk_rows`). Whole multiples of 128
    rows, as for the other post-training losses: at 2048 x 1024 x 32000 on a 2-core Xeon a step took 3% less time
    in chunks of 384 rows than of 410, in float32 and bfloat16."""
    in_place = cpu_kernel.distillation_covers(xs.device, xs.dtype)
    return default_chunk_rows(count, vocab, xs.element_size(), in_place_rows=in_place, multiple_of=128)


def _logits_into(buffer: Tensor, x: Tensor, w: Tensor, b: Tensor | None) -> None:
    if b is None:
        torch.mm(x, w.t(), out=buffer)
    else:
        torch.addmm(b, x, w.t(), out=buffer)


@torch.library.custom_op("xentlib::linear_distillation", mutates_args=())
def linear_distillation_op(
    student_input: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    valid: Tensor | None,
    row_scale: Tensor | None,
    beta: float,
    temperature: float,
    reduction: str,
    batch: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, d/d student_input, d/d student_weight, d/d student_bias) for grad_output = 1 (times `row_scale`
    per row when given); a gradient not asked for is an empty tensor. Inputs are (N, D_s) and (N, D_t)."""
    xs, xt = student_input, teacher_input
    count, vocab = xs.shape[0], student_weight.shape[0]
    acc, device = _acc_dtype(xs.dtype), xs.device
    call = {"beta": beta, "temperature": temperature}
    grads = (grad_input, grad_weight, grad_bias)
    scale = _row_scale(reduction, valid, row_scale, count, batch, acc, device)
    active = kept_rows(valid, device)
    total = count if active is None else active.numel()
    # the weight gradient's accumulator: float32 for half-precision weights on accelerators (rounded once); on
    # CPU the gradient itself, one rounding per chunk, as linear_cross_entropy does there (a float32 V x D buffer
    # would cost as much as a model's bfloat16 logits; docs/numerics.md section 9)
    half_on_accelerator = student_weight.element_size() < 4 and device.type != "cpu"
    weight_acc = torch.float32 if half_on_accelerator else student_weight.dtype
    out = [
        torch.zeros_like(xs) if grad_input else None,
        (torch.empty_like if total > 0 else torch.zeros_like)(student_weight, dtype=weight_acc)
        if grad_weight
        else None,
        torch.zeros(vocab, dtype=acc, device=device) if grad_bias else None,
    ]
    chunk = chunk_size if chunk_size > 0 else _default_linear_chunk(xs, count, vocab)
    size = min(chunk, max(count, 1))  # sized by all rows: the same buffers from step to step
    buffers = [torch.empty(size, vocab, dtype=xs.dtype, device=device) for _ in range(2)]
    row_loss = torch.zeros(count, dtype=acc, device=device)
    for start in range(0, total, chunk):
        rows = slice(start, min(start + chunk, total)) if active is None else active[start : start + chunk]
        row_loss[rows] = _linear_chunk(
            xs[rows], student_weight, student_bias, xt[rows], teacher_weight, teacher_bias, buffers, call,
            scale[rows], grads, out, rows, first=start == 0,
        )  # fmt: skip
    if grad_input and valid is not None and active is None:
        out[0].masked_fill_(~valid.unsqueeze(1), 0.0)
    loss = _reduce(reduction, row_loss, valid, count, batch).to(xs.dtype)
    gx = out[0] if grad_input else xs.new_empty((0,))
    gw = out[1].to(student_weight.dtype) if grad_weight else xs.new_empty((0,))  # rounded once
    gb = out[2].to(xs.dtype) if grad_bias else xs.new_empty((0,))
    return loss, gx, gw, gb


@linear_distillation_op.register_fake
def _(xs, ws, bs, xt, wt, bt, valid, row_scale, beta, temperature, reduction, batch, gi, gw, gb, chunk_size):
    loss = xs.new_empty((xs.shape[0],) if reduction == "none" else ())
    empty = xs.new_empty((0,))
    return (
        loss,
        torch.empty_like(xs) if gi else empty,
        torch.empty_like(ws) if gw else empty.clone(),
        torch.empty_like(bs) if gb and bs is not None else empty.clone(),
    )


_LINEAR_SCALARS = (
    "beta", "temperature", "reduction", "batch", "grad_input", "grad_weight", "grad_bias", "chunk_size",
)  # fmt: skip


def _linear_setup_context(ctx, inputs, output):
    tensors, scalars = inputs[:8], inputs[8:]
    ctx.call = dict(zip(_LINEAR_SCALARS, scalars))
    _loss, gx, gw, gb = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(gx, gw, gb)
    made = ctx.call["grad_input"] or ctx.call["grad_weight"] or ctx.call["grad_bias"]
    scaled = tensors[7] is not None
    ctx.grads = (gx, gw, gb) if made and ctx.call["reduction"] != "none" and not scaled else None
    ctx.save_for_backward(*tensors)


def _linear_backward(ctx, grad_loss, _gx, _gw, _gb):
    tensors = ctx.saved_tensors  # xs, ws, bs, xt, wt, bt, valid, row_scale
    needs = ctx.needs_input_grad[:3]
    saved, ctx.grads = ctx.grads, None
    none = (None,) * 13
    if grad_loss is None or not any(needs):
        return (None,) * 3 + none
    call = ctx.call
    if torch.is_grad_enabled():  # double backward: materialize the logits and differentiate the composition
        return (*_linear_composite_grads(tensors, needs, grad_loss, call), *none)
    if saved is not None:
        grads = [g if g.numel() == 0 else _scaled(g, grad_loss) for g in saved]
    else:  # reduction='none', a second backward, or a row-scaled call: the sweep again with the row scales
        xs, *_, row_scale = tensors
        scales = grad_loss.reshape(-1) if call["reduction"] == "none" else grad_loss.expand(xs.shape[0])
        if row_scale is not None:
            scales = scales * row_scale
        again = dict(call, grad_input=needs[0], grad_weight=needs[1], grad_bias=needs[2])
        grads = list(torch.ops.xentlib.linear_distillation(*tensors[:7], scales.contiguous(), **again)[1:])
    return (*[g if need else None for g, need in zip(grads, needs)], *none)


def _linear_composite_grads(tensors, needs, grad_loss, call):
    xs, ws, bs, xt, wt, bt, valid, row_scale = tensors
    with torch.enable_grad():
        leaves = [t if t is None or t.requires_grad else t.detach().requires_grad_() for t in (xs, ws, bs)]
        zs = torch.nn.functional.linear(*leaves)
        zt = torch.nn.functional.linear(xt, wt, bt).detach()
        loss = _composite_loss(zs, zt, valid, row_scale, call)
        sources = [leaf for leaf, need in zip(leaves, needs) if need]
        found = iter(torch.autograd.grad(loss, sources, grad_loss, create_graph=True))
    return [next(found) if need else None for need in needs]


linear_distillation_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------------------


def _wants(*tensors: Tensor | None) -> list[bool]:
    on = torch.is_grad_enabled()
    return [on and t is not None and t.requires_grad for t in tensors]


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    beta: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""Generalized Jensen-Shannon divergence between teacher and student (GKD; TRL's `generalized_jsd_loss`).

    With p = softmax(student_logits / T), q = softmax(teacher_logits / T) over the last dimension and
    m = beta q + (1 - beta) p, each row's divergence is `beta KL(q || m) + (1 - beta) KL(p || m)`; exactly
    KL(q || p) (forward KL) at beta = 0 and KL(p || q) (reverse KL) at beta = 1. No T^2 factor is applied.

    Args:
        student_logits, teacher_logits: (..., V), the same shape and dtype. Only the student gets a gradient;
            the teacher is treated as a constant (detached).
        target: optional (...) integer tensor; rows whose target equals `ignore_index` are left out.
        beta: in [0, 1]. temperature: finite, > 0.
        reduction: 'none' (per row, of shape (...), 0 on left-out rows), 'sum', 'mean' (sum / kept rows; NaN when
            no row is kept), 'batchmean' (with a target: sum / max(kept rows, 1); without: sum / max(B, 1), B the
            size of the first dimension (1 for a single (V,) row), as torch's `kl_div` and TRL).
        chunk_size: rows per chunk of the float32 work (default: chosen from the shapes).

    Example::

        >>> s, t = torch.randn(4, 10), torch.randn(4, 10)
        >>> kl_div = torch.nn.functional.kl_div
        >>> kl = kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="batchmean", log_target=True)
        >>> torch.allclose(distillation_loss(s, t, beta=0.0), kl)
        True
    """
    refuse_transforms("distillation_loss", student_logits, teacher_logits)
    fn = "distillation_loss"
    call = sem.check_distillation(
        fn, student_logits, teacher_logits, target, beta, temperature, reduction, ignore_index
    )
    chunk = sem.check_chunk_size(chunk_size)
    student = student_logits.reshape(call.rows, call.vocab)
    teacher = teacher_logits.detach().reshape(call.rows, call.vocab)
    (with_grad,) = _wants(student_logits)
    loss, _ = torch.ops.xentlib.distillation(
        student, teacher, call.valid, None, call.beta, call.temperature, call.reduction, call.batch, with_grad, chunk
    )
    return loss.reshape(call.row_shape) if call.reduction == "none" else loss


# The options repeat `distillation_loss`'s: public signatures are spelled out in full, as the policy losses' are.
def linear_distillation_loss(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    target: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    beta: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "batchmean",
    chunk_size: int | None = None,
) -> Tensor:
    r"""`distillation_loss(linear(student_input, student_weight, student_bias), linear(teacher_input,
    teacher_weight, teacher_bias), target, ...)` computed in row chunks, never holding either model's (N, V)
    logits: one chunk of each at a time. The student's gradients (input, weight, bias) are made in the same sweep.

    Args:
        student_input (..., D_s), student_weight (V, D_s), student_bias (V,) or None: the student's last hidden
            states and output projection (LM head). teacher_*: the teacher's, (..., D_t), (V, D_t), (V,); the
            teacher is a constant (no gradient). Both inputs have one leading shape (one row per token) and dtype.
        target, beta, temperature, ignore_index, reduction: as `distillation_loss`.
        chunk_size: rows per chunk (default: an eighth of the rows in float32, at least 128).

    Example::

        >>> xs, ws, xt, wt = torch.randn(6, 4), torch.randn(10, 4), torch.randn(6, 8), torch.randn(10, 8)
        >>> ref = distillation_loss(xs @ ws.T, xt @ wt.T, beta=0.5)
        >>> torch.allclose(linear_distillation_loss(xs, ws, xt, wt, beta=0.5), ref)
        True
    """
    refuse_transforms("linear_distillation_loss", student_input, student_weight, student_bias)
    fn = "linear_distillation_loss"
    call = sem.check_linear_distillation(
        fn, student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, target,
        beta, temperature, reduction, ignore_index,
    )  # fmt: skip
    chunk = sem.check_chunk_size(chunk_size)
    xs = student_input.reshape(call.rows, student_input.shape[-1])
    xt = teacher_input.detach().reshape(call.rows, teacher_input.shape[-1])
    wt = teacher_weight.detach()
    bt = None if teacher_bias is None else teacher_bias.detach()
    wants = _wants(student_input, student_weight, student_bias)
    loss = torch.ops.xentlib.linear_distillation(
        xs, student_weight, student_bias, xt, wt, bt, call.valid, None, call.beta, call.temperature,
        call.reduction, call.batch, *wants, chunk,
    )[0]  # fmt: skip
    return loss.reshape(call.row_shape) if call.reduction == "none" else loss
