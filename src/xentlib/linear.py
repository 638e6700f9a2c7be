"""linear_cross_entropy: `cross_entropy(input @ weight.T + bias, target)` without ever holding the (N, V) logits.

One sweep over row chunks does the forward and the backward together (docs/numerics.md, "Chunked linear
cross-entropy"). For a chunk of R rows X_c:
    Z   = X_c W^T + b            (R, V)   the only chunk-sized buffer, reused by every chunk
    dZ  = backend rows on Z      written over Z in place: grad_scale * ((sum q + 2 z lse) p - q) (softcap chain)
    dX_c = dZ W                  (R, D)   each input row is written once
    dW  += dZ^T X_c              (V, D)   accumulated in the weight gradient itself
    db  += sum_r dZ              (V,)     float32
Rows whose target is ignored are dropped before the matmul. The backward pass then only scales the saved
gradients by grad_output. reduction='none' (a gradient per row) recomputes the sweep in backward with the row
scales; the rare paths (gradients wrt probability targets or class weights, through the statistics, double
backward) materialize the logits and use the composite of `backends.autograd`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.backends import cpu_kernel, torch_chunked
from xentlib.backends.autograd import CrossEntropyStats, as_leaf, composite_rows, reduce_rows, scale_by_grad_output_
from xentlib.backends.dispatch import rows_function, select_backend

# The most memory one chunk of logits may take. Past ~2048 rows a larger chunk makes its matmuls little faster
# per row (measured on CPU at D=1024, V=32000 fp32: 1024 rows cost up to 5% more per row than 2048), so for large N
# it would buy little speed for much memory.
CHUNK_BYTES_CAP = 1 << 30


def default_chunk_rows(rows: int, vocab: int, element_size: int = 4, in_place_rows: bool = False) -> int:
    """Rows per chunk: the largest chunk whose working memory stays well inside a quarter of the full logits
    (issue 3's memory budget) and under CHUNK_BYTES_CAP, at least 128 rows. Larger chunks mean larger, more
    efficient matmuls: each matmul with W pays a fixed cost per call (docs/numerics.md section 9), and the weight
    gradient is read and written once per chunk.

    `in_place_rows`: the rows are computed by the compiled CPU kernel or the Triton kernels, which turn a chunk of
    logits of any dtype into its gradient in place with no float32 copy: a chunk of R rows costs R V element_size
    bytes, so R = N/5 keeps it at a fifth of the logits. Otherwise (PyTorch ops) float32 and float64 logits are
    also turned into their gradient in place (R = N/8, an eighth), while bfloat16/float16 logits need two float32
    working copies of a quarter of the chunk (2 more bytes per logit): a row costs 4 V bytes against the logits'
    2 N V, R = N/16. Why larger chunks pay, on CPU and GPU: docs/numerics.md section 9."""
    # chunk bytes = rows * V * bytes_per_logit <= logits bytes (N V element_size) / fraction, and <= the cap
    fraction, bytes_per_logit = (5, element_size) if in_place_rows else (8, max(4, element_size))
    wanted = -(-rows * element_size // (fraction * bytes_per_logit))
    capped = min(wanted, CHUNK_BYTES_CAP // (max(vocab, 1) * bytes_per_logit))
    return max(1, min(rows, max(128, capped)))


@dataclass
class _Sweep:
    loss: Tensor  # (N,) per-row loss, accumulation dtype
    lse: Tensor | None = None
    argmax: Tensor | None = None
    entropy: Tensor | None = None
    grad_input: Tensor | None = None  # (M, D) like flat_input
    grad_weight: Tensor | None = None
    grad_bias: Tensor | None = None


@dataclass(frozen=True)
class _Plan:
    """How the sweep runs: the backend's row function, rows per chunk, and the dtype the weight gradient is
    accumulated in (float32 on the Triton path, whose GPUs have memory for it; the weight's own dtype on the
    PyTorch path, where a float32 copy of V x D would cost more than the chunk: docs/numerics.md section 9)."""

    rows_fn: object
    chunk: int
    weight_grad_dtype: torch.dtype


def accumulate_mm_(acc: Tensor, a: Tensor, b: Tensor, first: bool = False) -> None:
    """acc += a @ b, where acc may be float32 for half-precision a and b. `first`: acc holds nothing yet (it may
    be uninitialized memory) and is overwritten, which saves a pass of zeros and a read of acc."""
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
        return
    if first:
        acc.zero_()
    if a.is_cuda:
        try:  # CUDA: half inputs, float32 output, no temporary
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.add_(torch.mm(a, b))  # elsewhere: the chunk's product rounded once, the sum across chunks in float32


def _chunk_problem(problem: sem.CrossEntropyProblem, rows, logits: Tensor) -> sem.CrossEntropyProblem:
    return dataclasses.replace(
        problem,
        logits=logits.view(logits.shape[0], logits.shape[1], 1),
        target=problem.target[rows],
        valid=problem.valid[rows],
        target_weight=None if problem.target_weight is None else problem.target_weight[rows],
    )


def _sweep_chunk(lp: sem.LinearProblem, weight, bias, plan, grads, want_stats, row_scale, out, rows, buffer, first):
    """One chunk of rows: its logits, their per-row results, and its share of the gradients. Its tensors die when
    it returns, so a chunk's fresh logits (oneDNN) are freed before the next chunk's are made."""
    problem, x = lp.rows, lp.flat_input
    want_input, want_weight, want_bias = grads
    if lp.input_rows is None:
        in_rows = rows
        x_c = x[rows]
    else:
        in_rows = lp.input_rows[rows]
        x_c = x.index_select(0, in_rows)
    if buffer is None:  # no reused buffer: the matmuls that read W run in oneDNN (_by_onednn)
        logits = torch.ops.mkldnn._linear_pointwise(x_c, weight, bias, "none", [], "")
    else:
        logits = buffer[: x_c.shape[0]]
        torch.mm(x_c, weight.t(), out=logits)
        if bias is not None:
            logits.add_(bias)
    sub = _chunk_problem(problem, rows, logits)
    result = plan.rows_fn(sub, sub.logits if any(grads) else None, want_stats)
    out.loss[rows] = result.loss[:, 0]
    if want_stats:
        out.lse[rows] = result.lse[:, 0]
        out.entropy[rows] = result.entropy[:, 0]
        out.argmax[rows] = result.argmax[:, 0]
    if not any(grads):
        return
    grad_logits = logits  # now holds dZ
    if row_scale is not None:
        grad_logits.mul_(row_scale[rows].to(grad_logits.dtype).unsqueeze(1))
    if want_input:
        if buffer is None:
            out.grad_input[in_rows] = torch.ops.mkldnn._linear_pointwise(grad_logits, weight.t(), None, "none", [], "")
        elif isinstance(in_rows, slice):  # straight into the gradient's rows, no temporary
            torch.mm(grad_logits, weight, out=out.grad_input[in_rows])
        else:
            out.grad_input[in_rows] = grad_logits @ weight
    if want_weight:
        accumulate_mm_(out.grad_weight, grad_logits.t(), x_c, first=first)
    if want_bias:
        out.grad_bias += grad_logits.sum(0, dtype=problem.acc_dtype)


def _by_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether the chunk matmuls that read W (Z = X W^T + b and dX = dZ W) go through oneDNN: float32 on CPU.
    There torch.mm (MKL) pays a fixed cost per call that grows with W, twice per chunk; oneDNN does not, and made
    the whole float32 step 4-15% faster (measurements: docs/numerics.md section 9)."""
    float32_cpu = x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
    return _ONEDNN_LINEAR and float32_cpu and x.is_contiguous() and weight.is_contiguous()


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _sweep(lp: sem.LinearProblem, weight, bias, plan: _Plan, grads, want_stats: bool, row_scale=None):
    """One pass over the row chunks: per-row losses (and stats), and the gradients flagged in `grads`."""
    problem, x = lp.rows, lp.flat_input
    count, vocab = problem.logits.shape[0], problem.logits.shape[1]
    acc = problem.acc_dtype
    want_input, want_weight, want_bias = grads
    out = _Sweep(loss=torch.zeros(count, dtype=acc, device=x.device))
    if want_stats:
        out.lse = torch.zeros(count, dtype=acc, device=x.device)
        out.entropy = torch.zeros(count, dtype=acc, device=x.device)
        out.argmax = torch.zeros(count, dtype=torch.long, device=x.device)
    # Rows with an ignored target contribute nothing: skip them before the matmul (stats need every row).
    active = None
    if not want_stats and not bool(problem.valid.all()):
        active = problem.valid.reshape(-1).nonzero().squeeze(1)
    total = count if active is None else active.numel()
    out.grad_input = torch.zeros_like(x) if want_input else None
    # The first chunk overwrites the weight gradient (accumulate_mm_(first=True)); with no rows it stays zero.
    make_weight_grad = torch.empty_like if total > 0 else torch.zeros_like
    out.grad_weight = make_weight_grad(weight, dtype=plan.weight_grad_dtype) if want_weight else None
    out.grad_bias = torch.zeros(vocab, dtype=acc, device=x.device) if want_bias else None
    chunk = plan.chunk
    # the chunk's logits: one reused buffer, or, where oneDNN computes them, the matmul's own fresh output
    buffer = None
    if not _by_onednn(x, weight):
        buffer = torch.empty(min(chunk, max(total, 1)), vocab, dtype=x.dtype, device=x.device)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        rows = slice(start, stop) if active is None else active[start:stop]
        _sweep_chunk(lp, weight, bias, plan, grads, want_stats, row_scale, out, rows, buffer, first=start == 0)
    if want_weight:
        out.grad_weight = out.grad_weight.to(weight.dtype)  # rounded once (a no-op without a float32 accumulator)
    return out


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, target, class_weight, lp, plan, want_stats):
        problem = lp.rows
        needs = tuple(ctx.needs_input_grad[:3])
        rare = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        grads_now = any(needs) and problem.reduction != "none" and not rare
        sweep = _sweep(lp, weight, bias, plan, needs if grads_now else (False,) * 3, want_stats)
        ctx.lp, ctx.plan, ctx.input_shape = lp, plan, input.shape
        ctx.grads = (sweep.grad_input, sweep.grad_weight, sweep.grad_bias) if grads_now else None
        ctx.save_for_backward(input, weight, bias, target, class_weight)
        ctx.set_materialize_grads(False)
        loss = reduce_rows(problem, sweep.loss).to(problem.output_dtype)
        if not want_stats:
            return loss
        shape = problem.output_shape
        row_loss, argmax = sweep.loss.reshape(shape).to(problem.output_dtype), sweep.argmax.reshape(shape)
        ctx.mark_non_differentiable(row_loss, argmax)
        return loss, sweep.lse.reshape(shape), sweep.entropy.reshape(shape), row_loss, argmax

    @staticmethod
    def backward(ctx, grad_loss, grad_lse=None, grad_entropy=None, *_):
        input, weight, bias, target, class_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        none = (None,) * 3  # lp, plan, want_stats
        saved, ctx.grads = ctx.grads, None
        stats_flow = grad_lse is not None or grad_entropy is not None
        if grad_loss is None and not stats_flow:  # every output gradient undefined: nothing flows back
            return (None,) * 8
        if torch.is_grad_enabled() or needs[3] or needs[4] or stats_flow or (saved is None and grad_loss is None):
            tensors = (input, weight, bias, target, class_weight)
            return (*_composite_grads(ctx.lp, tensors, needs, grad_loss, grad_lse, grad_entropy), *none)
        if saved is not None:
            grads = [_scale(g, grad_loss) for g in saved]
        else:  # reduction='none', or a second backward: sweep again with the row scales
            row_scale = (
                grad_loss.reshape(-1)
                if ctx.lp.rows.reduction == "none"
                else grad_loss.expand(ctx.lp.rows.logits.shape[0])
            )
            sweep = _sweep(ctx.lp, weight, bias, ctx.plan, needs[:3], False, row_scale)
            grads = [sweep.grad_input, sweep.grad_weight, sweep.grad_bias]
        grad_input, grad_weight, grad_bias = grads
        if grad_input is not None:
            grad_input = grad_input.view(ctx.input_shape)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_input, grad_weight, grad_bias, None, None, *none


TILED_BACKEND = "triton-tiled"


def _tiled_linear_cross_entropy(input, weight, bias, lp, return_stats, chunk_size):
    """backend='triton-tiled': the Triton kernels that never write logits (backends/triton/tiled.py)."""
    from xentlib.backends import triton as triton_backend

    if chunk_size is not None:
        raise ValueError("chunk_size does not apply to backend='triton-tiled', which holds no chunk of logits")
    triton_backend.require(input.device)
    from xentlib.backends.triton import tiled

    tiled.check_supported(lp.rows, want_stats=return_stats)
    with torch.autocast(input.device.type, enabled=False):
        return TiledLinearCrossEntropyFunction.apply(input, weight, bias, lp)


def _gathered_rows(lp: sem.LinearProblem) -> Tensor:
    """The (N, D) input rows the loss rows read: the flat input, or with shift=True a copy of its rows."""
    return lp.flat_input if lp.input_rows is None else lp.flat_input.index_select(0, lp.input_rows)


class TiledLinearCrossEntropyFunction(torch.autograd.Function):
    """Loss and per-row lse in forward (no logits kept); the backward recomputes the logits tile by tile."""

    @staticmethod
    def forward(ctx, input, weight, bias, lp):
        from xentlib.backends.triton import tiled

        row_loss, lse = tiled.tiled_forward(_gathered_rows(lp), weight, bias, lp.rows)
        ctx.lp = lp
        ctx.save_for_backward(input, weight, bias, lse)
        return reduce_rows(lp.rows, row_loss).to(lp.rows.output_dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        from xentlib.backends.triton import tiled

        if torch.is_grad_enabled():
            raise NotImplementedError("backend='triton-tiled' has no double backward: use backend='torch'")
        input, weight, bias, lse = ctx.saved_tensors
        lp = ctx.lp
        row_scale = grad_loss.reshape(-1) if lp.rows.reduction == "none" else grad_loss
        needs = tuple(ctx.needs_input_grad[:3])
        grad_x, grad_w, grad_b = tiled.tiled_backward(_gathered_rows(lp), weight, bias, lp.rows, lse, row_scale, needs)
        if grad_x is not None and lp.input_rows is not None:  # shift=True: back to the rows they were read from
            grad_x = torch.zeros_like(lp.flat_input).index_copy_(0, lp.input_rows, grad_x)
        if grad_x is not None:
            grad_x = grad_x.view(input.shape)
        return grad_x, grad_w, grad_b, None


def _scale(grad: Tensor | None, grad_loss: Tensor) -> Tensor | None:
    return None if grad is None else scale_by_grad_output_(grad, grad_loss)


def _composite_grads(lp: sem.LinearProblem, tensors, needs, grad_loss, grad_lse, grad_entropy):
    """The rare paths: materialize the logits and differentiate `composite_rows` (differentiable itself)."""
    problem = lp.rows
    create_graph = torch.is_grad_enabled()  # read before enable_grad: True only for double backward
    with torch.enable_grad():
        leaves = [as_leaf(t) if need else t for t, need in zip(tensors, needs)]
        input, weight, bias, target, class_weight = leaves
        x = input.reshape(lp.flat_input.shape)
        if lp.input_rows is not None:
            x = x.index_select(0, lp.input_rows)
        logits = torch.nn.functional.linear(x, weight, bias).unsqueeze(2)
        if problem.kind == "prob":
            if lp.input_rows is not None:  # shift=True: positions 1.. of the target
                target = target[..., 1:, :]
            target = target.reshape(-1, target.shape[-1], 1)
        loss_rows, lse, entropy = composite_rows(problem, logits, target, class_weight)
        pairs = [(reduce_rows(problem, loss_rows), grad_loss), (lse, grad_lse), (entropy, grad_entropy)]
        pairs = [(out.reshape(problem.output_shape) if out.dim() else out, g) for out, g in pairs if g is not None]
        outputs, grads = zip(*pairs)
        sources = [leaf for leaf, need in zip(leaves, needs) if need]
        found = iter(torch.autograd.grad(outputs, sources, grads, create_graph=create_graph, allow_unused=True))
    return [next(found) if need else None for need in needs]


def _autocast_operands(input: Tensor, weight: Tensor, bias: Tensor | None):
    """Under autocast the matmul runs in the autocast dtype, as `F.linear` would: cast the operands (the casts
    are differentiable, so the gradients come back in the caller's dtypes)."""
    device = input.device.type
    if not torch.is_autocast_enabled(device) or not input.is_floating_point():
        return input, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return input.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _rows_for_chunks(name: str, chunk: int):
    """The backend's row function. The PyTorch backend works on a quarter of a logits chunk at a time, so its
    float32 buffers stay smaller than the chunk itself."""
    if name != "torch":
        return rows_function(name)
    return functools.partial(torch_chunked.cross_entropy_rows, chunk_size=max(1, chunk // 4))


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    class_weight: Tensor | None = None,
    shift: bool = False,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | Tensor | None = None,
    return_stats: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    r"""`cross_entropy(input @ weight.T + bias, target, ...)` computed in row chunks, never holding (N, V) logits.

    Args:
        input: (..., D) hidden states; the leading dimensions are flattened into rows.
        weight: (V, D) output projection (e.g. an LM head); `bias`: optional (V,).
        target: class indices of shape (...) or class probabilities of shape (..., V).
        size_average, ignore_index, reduce, reduction, label_smoothing: as `cross_entropy`.
        class_weight: keyword-only per-class weight (the `weight` of `cross_entropy`).
        shift: keyword-only; predict `target[..., 1:]` from `input[..., :-1, :]` (next-token prediction) without
            copying the input.
        z_loss, softcap, normalizer, return_stats, backend: as `cross_entropy`. `backend="triton-tiled"` also
            exists here: Triton kernels that never write logits, not even a chunk (class-index targets;
            backends/triton/tiled.py).
        chunk_size: rows per chunk (default: a fifth of the rows where the compiled CPU kernel computes the
            rows, else an eighth in float32 and a sixteenth in half precision; at least 128. A chunk's memory
            is then a fifth to an eighth of the logits' memory).

    reduction='none' returns the loss per row, of shape `target.shape` (shifted: `target[..., 1:].shape`).

    Example::

        >>> x, w = torch.randn(6, 4), torch.randn(10, 4)
        >>> t = torch.tensor([1, 2, 3, -100, 5, 9])
        >>> ref = torch.nn.functional.cross_entropy(x @ w.T, t)
        >>> torch.allclose(linear_cross_entropy(x, w, t), ref)
        True
    """
    reduction = sem.resolve_reduction(size_average, reduce, reduction)
    autocast = torch.is_autocast_enabled(input.device.type)
    input, weight, bias = _autocast_operands(input, weight, bias)
    if autocast and class_weight is not None and class_weight.is_floating_point():
        # autocast runs cross_entropy in float32 whatever the class weight's float dtype; the fused problem
        # checks it against the (autocast-dtype) operands, so cast it like them (differentiably)
        class_weight = class_weight.to(input.dtype)
    lp = sem.prepare_linear_cross_entropy(
        input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing,
        shift=shift, z_loss=z_loss, softcap=softcap, normalizer=normalizer,
    )  # fmt: skip
    if autocast:  # autocast runs cross_entropy in float32: so does the loss of the fused computation
        lp.rows.output_dtype = torch.promote_types(lp.rows.output_dtype, torch.float32)
    if backend == TILED_BACKEND:
        return _tiled_linear_cross_entropy(input, weight, bias, lp, return_stats, chunk_size)
    name, _ = select_backend(input.device, backend, lp.rows)
    count = lp.rows.logits.shape[0]
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    # the Triton kernels, like the compiled CPU kernel, turn a chunk of logits into its gradient in place
    in_place_rows = name == "triton" or (
        name == "torch" and cpu_kernel.supports_call(input.device, input.dtype, lp.rows)
    )
    vocab = lp.rows.logits.shape[1]
    chunk = chunk_size or default_chunk_rows(count, vocab, input.element_size(), in_place_rows)
    with torch.autocast(input.device.type, enabled=False):
        weight_grad_dtype = torch.float32 if name == "triton" and weight.element_size() < 4 else weight.dtype
        plan = _Plan(_rows_for_chunks(name, chunk), chunk, weight_grad_dtype)
        outputs = LinearCrossEntropyFunction.apply(input, weight, bias, target, class_weight, lp, plan, return_stats)
    if not return_stats:
        return outputs
    loss, lse, entropy, row_loss, argmax = outputs
    problem = lp.rows
    if problem.kind == "prob":
        probs = target[..., 1:, :] if shift else target
        correct = argmax == probs.argmax(-1)
    else:
        shape = problem.output_shape
        correct = (argmax == problem.target.reshape(shape)) & problem.valid.reshape(shape)
    return loss, CrossEntropyStats(lse=lse, loss=row_loss, argmax=argmax, correct=correct, entropy=entropy)
