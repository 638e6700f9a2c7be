"""linear_cross_entropy: `cross_entropy(input @ weight.T + bias, target)` without ever holding the (N, V) logits.

One sweep over row chunks does the forward and the backward together (docs/numerics.md, "Chunked linear
cross-entropy"). For a chunk of R rows X_c:
    Z   = X_c W^T + b            (R, V)   the only chunk-sized buffer, reused by every chunk
    dZ  = backend rows on Z      written over Z in place: grad_scale * ((sum q + 2 z lse) p - q) (softcap chain)
    dX_c = dZ W                  (R, D)   each input row is written once
    dW  += dZ^T X_c              (V, D)   accumulated in the weight gradient itself
    db  += sum_r dZ              (V,)     float32
The sweep is the torch op `torch.ops.xentlib.linear_cross_entropy`, so torch.compile sees one node. On CPU rows
whose target is ignored are dropped before the matmul; on accelerators they are masked (no host read), and the
chunk buffer has the same shape from call to call. The backward pass only scales the saved gradients by
grad_output. reduction='none' (a gradient per row) runs the sweep again with the row scales; the rare paths
(gradients wrt probability targets or class weights, through the statistics, double backward) materialize the
logits and differentiate the composite of `backends/composite.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.backends import composite
from xentlib.backends.composite import CrossEntropyStats, as_leaf, composite_rows, reduce_rows
from xentlib.backends.dispatch import BACKENDS, chunk_policy, rows_function, select_backend

# The most memory one chunk of logits may take. Past ~2048 rows a larger chunk makes its matmuls little faster
# per row (measured on CPU at D=1024, V=32000 fp32: 1024 rows cost up to 5% more per row than 2048), so for large N
# it would buy little speed for much memory.
CHUNK_BYTES_CAP = 1 << 30


def default_chunk_rows(
    rows: int, vocab: int, element_size: int = 4, in_place_rows: bool = False, multiple_of: int = 1
) -> int:
    """Rows per chunk: the largest chunk whose working memory stays well inside a quarter of the full logits
    and under CHUNK_BYTES_CAP, at least 128 rows. Larger chunks mean larger, more
    efficient matmuls: each matmul with W pays a fixed cost per call (docs/numerics.md section 9), and the weight
    gradient is read and written once per chunk.

    `in_place_rows`: the rows are computed by the compiled CPU kernel or the Triton kernels, which turn a chunk of
    logits of any dtype into its gradient in place with no float32 copy: a chunk of R rows costs R V element_size
    bytes, so R = N/5 keeps it at a fifth of the logits. Otherwise (PyTorch ops) float32 and float64 logits are
    also turned into their gradient in place (R = N/8, an eighth), while bfloat16/float16 logits need two float32
    working copies of a quarter of the chunk (2 more bytes per logit): a row costs 4 V bytes against the logits'
    2 N V, R = N/16. Why larger chunks pay, on CPU and GPU: docs/numerics.md section 9.

    `multiple_of`: R rounded down to a multiple of it (still at least 128 rows). The post-training losses take
    128: on a 2-core Xeon the float32 weight gradient's product dZ^T X_c took 392 ms per 2048 rows in chunks of
    410 or 448 rows against 335-337 ms in chunks of 384 or 512 (D = 1024, V = 32000)."""
    # chunk bytes = rows * V * bytes_per_logit <= logits bytes (N V element_size) / fraction, and <= the cap
    fraction, bytes_per_logit = (5, element_size) if in_place_rows else (8, max(4, element_size))
    wanted = -(-rows * element_size // (fraction * bytes_per_logit))
    capped = min(wanted, CHUNK_BYTES_CAP // (max(vocab, 1) * bytes_per_logit))
    return max(1, min(rows, max(128, capped // multiple_of * multiple_of)))


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
    accumulated in, as the backend's `ChunkPolicy` says (float32 on the Triton path, whose GPUs have memory for it;
    the weight's own dtype on CPU, where a float32 copy of V x D would cost more than the chunk: docs/numerics.md
    section 9)."""

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
    if lp.input_rows is None:
        in_rows = rows
        x_c = x[rows]
    else:
        in_rows = lp.input_rows[rows]
        x_c = x.index_select(0, in_rows)
    logits = chunk_logits(x_c, weight, bias, buffer)
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
    accumulate_chunk_grads_(grad_logits, weight, x_c, in_rows, out.grad_input, out.grad_weight, out.grad_bias,
                            first=first, onednn=buffer is None)  # fmt: skip


def chunk_logits(x_c: Tensor, weight: Tensor, bias: Tensor | None, buffer: Tensor | None) -> Tensor:
    """Z = X_c W^T + b of a chunk: into the first rows of a reused `buffer`, or, where there is none (the
    matmuls that read W run in oneDNN: `_by_onednn`), oneDNN's own fresh output, bias fused."""
    if buffer is None:
        return torch.ops.mkldnn._linear_pointwise(x_c, weight, bias, "none", [], "")
    logits = buffer[: x_c.shape[0]]
    torch.mm(x_c, weight.t(), out=logits)
    if bias is not None:
        logits.add_(bias)
    return logits


def kept_rows(valid: Tensor | None, device: torch.device) -> Tensor | None:
    """The indices of the rows whose target is kept, where some row is ignored (the prompt, padding) and the rows
    are on the CPU (`device`): those rows are dropped before the work. None otherwise: no mask or nothing to drop,
    or on an accelerator, where finding them would read the mask on the host (every row is computed, the ignored
    ones masked)."""
    if valid is None or device.type != "cpu" or bool(valid.all()):
        return None
    return valid.nonzero().squeeze(1)


def accumulate_chunk_grads_(grad_z: Tensor, weight: Tensor, x_c: Tensor, rows, dx, dw, db, first: bool,
                            onednn: bool = False) -> None:  # fmt: skip
    """A chunk's share of the gradients of Z = X W^T + b from its dZ (R, V): dX[rows] = dZ W (rows: a slice or an
    index tensor), dW += dZ^T X_c (the first chunk overwrites: `accumulate_mm_`), db += sum_rows dZ in db's dtype;
    None for a gradient not wanted. `onednn`: dZ W runs in oneDNN (`_by_onednn`), else in torch.mm."""
    if dx is not None:
        if onednn:
            dx[rows] = torch.ops.mkldnn._linear_pointwise(grad_z, weight.t(), None, "none", [], "")
        elif isinstance(rows, slice):  # straight into the gradient's rows, no temporary
            torch.mm(grad_z, weight, out=dx[rows])
        else:
            dx[rows] = grad_z @ weight
    if dw is not None:
        accumulate_mm_(dw, grad_z.t(), x_c, first=first)
    if db is not None:
        db += grad_z.sum(0, dtype=db.dtype)


def _by_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether the chunk matmuls that read W (Z = X W^T + b and dX = dZ W) go through oneDNN: float32 on CPU,
    where oneDNN is the faster of the two (`_PREFER_ONEDNN`; measurements: docs/numerics.md section 9)."""
    float32_cpu = x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
    return _PREFER_ONEDNN and float32_cpu and x.is_contiguous() and weight.is_contiguous()


def _intel_cpu() -> bool:
    """Whether this is an Intel CPU (Linux: /proc/cpuinfo's vendor), where torch.mm's float32 matmuls run in MKL at
    full speed; elsewhere (an AMD EPYC measured) MKL paid a fixed cost per call that oneDNN does not."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            return "GenuineIntel" in cpuinfo.read(4096)
    except OSError:
        return False


_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_PREFER_ONEDNN = _ONEDNN_LINEAR and not _intel_cpu()


def _padded_to_chunks(active: Tensor, valid: Tensor, chunk: int) -> Tensor:
    """The kept rows `active` padded with an ignored row (loss and gradient 0) to a multiple of `chunk` (the rows
    of a chunk, at most all rows): every chunk then has the same shape from step to step, whatever the number of
    ignored rows, so the allocator reuses its memory instead of fragmenting over a run."""
    pad = -active.numel() % chunk
    if pad and active.numel() > 0:
        ignored = (~valid).nonzero()[:1]
        active = torch.cat([active, ignored.reshape(1).expand(pad)])
    return active


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
    # On CPU rows with an ignored target contribute nothing: skip them before the matmul (stats need every row).
    # On an accelerator that would read the mask on the host: there the kernels give ignored rows zeros.
    valid = problem.valid.reshape(-1)
    active = None if want_stats else kept_rows(valid, x.device)
    if active is not None:
        active = _padded_to_chunks(active, valid, min(plan.chunk, count))
    total = count if active is None else active.numel()
    out.grad_input = torch.zeros_like(x) if want_input else None
    # The first chunk overwrites the weight gradient (accumulate_mm_(first=True)); with no rows it stays zero.
    make_weight_grad = torch.empty_like if total > 0 else torch.zeros_like
    out.grad_weight = make_weight_grad(weight, dtype=plan.weight_grad_dtype) if want_weight else None
    out.grad_bias = torch.zeros(vocab, dtype=acc, device=x.device) if want_bias else None
    chunk = plan.chunk
    # the chunk's logits: one reused buffer, or, where oneDNN computes them, the matmul's own fresh output
    buffer = None
    if not _by_onednn(x, weight):  # sized by all rows, not the active ones: the same shape from step to step
        buffer = torch.empty(min(chunk, max(count, 1)), vocab, dtype=x.dtype, device=x.device)
    for start in range(0, total, chunk):
        stop = min(start + chunk, total)
        rows = slice(start, stop) if active is None else active[start:stop]
        _sweep_chunk(lp, weight, bias, plan, grads, want_stats, row_scale, out, rows, buffer, first=start == 0)
    if want_weight:
        out.grad_weight = out.grad_weight.to(weight.dtype)  # rounded once (a no-op without a float32 accumulator)
    return out


# The parameters are the op's schema (custom_op reads the annotations), hence listed in full, as in backends/ops.py.
@torch.library.custom_op("xentlib::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    class_weight: Tensor | None,
    normalizer: Tensor | None,
    input_rows: Tensor | None,
    row_scale: Tensor | None,
    normalizer_value: float,
    ignore_index: int,
    reduction: str,
    smoothing: float,
    z_loss: float,
    softcap: float | None,
    output_dtype: torch.dtype,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
    with_stats: bool,
    backend: str,
    chunk_size: int,
    grads_private: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad_input, grad_weight, grad_bias, lse, entropy, row_loss, argmax) of a flat (M, D) input, a
    (V, D) weight and flat (N,) or (N, V) targets. The gradients are for grad_output = 1, or, with `row_scale`
    (N,), for those per-row upstream gradients; a gradient not asked for (and the statistics without
    `with_stats`) is an empty tensor.
    `grads_private`: the caller never reads the gradient outputs (`linear_cross_entropy`), so the backward may
    scale them in place; a direct caller of the op gets them untouched (the backward scales a copy)."""
    problem = _rows_problem(
        input, weight, target, class_weight, normalizer, normalizer_value, ignore_index, reduction, smoothing,
        z_loss, softcap, output_dtype,
    )  # fmt: skip
    lp = sem.LinearProblem(rows=problem, flat_input=input, input_rows=input_rows)
    grads = (grad_input, grad_weight, grad_bias)
    sweep = _sweep(lp, weight, bias, _plan(input, weight, problem, backend, chunk_size), grads, with_stats, row_scale)
    loss = reduce_rows(problem, sweep.loss).to(output_dtype)
    empty = lambda: input.new_empty((0,))  # noqa: E731  (outputs of an op may not alias each other)
    grad_b = sweep.grad_bias.to(bias.dtype) if grad_bias else empty()
    outputs = (loss, sweep.grad_input if grad_input else empty(), sweep.grad_weight if grad_weight else empty(), grad_b)
    if not with_stats:
        stats = sweep.loss.new_empty((0,))
        return (*outputs, stats, stats.clone(), stats.clone(), stats.new_empty((0,), dtype=torch.long))
    return (*outputs, sweep.lse, sweep.entropy, sweep.loss.to(output_dtype, copy=True), sweep.argmax)


def _rows_problem(input, weight, target, class_weight, normalizer, normalizer_value, *scalars, check_targets=True):
    """The (N, V) problem of the op's flat call; its logits are a placeholder that holds no memory. `scalars`:
    ignore_index, reduction, smoothing, z_loss, softcap, output_dtype."""
    placeholder = sem.as_rows(sem.logits_placeholder(target.shape[0], weight.shape[0], input))
    norm = sem.normalizer_from_operands(normalizer, normalizer_value)
    return sem.problem_tensors(placeholder, target, class_weight, norm, *scalars, check_targets=check_targets)


@linear_cross_entropy_op.register_fake
def _(input, weight, bias, target, class_weight, normalizer, input_rows, row_scale, normalizer_value, ignore_index,
      reduction, smoothing, z_loss, softcap, output_dtype, grad_input, grad_weight, grad_bias, with_stats, backend,
      chunk_size, grads_private=False):  # fmt: skip
    count = target.shape[0]
    dtypes = [input.dtype] + ([target.dtype] if target.is_floating_point() else [])
    acc = sem.accumulation_dtype(*dtypes, *([class_weight.dtype] if class_weight is not None else []))
    loss = input.new_empty((count,) if reduction == "none" else (), dtype=output_dtype)
    empty = input.new_empty((0,))
    grads = (
        torch.empty_like(input) if grad_input else empty,
        torch.empty_like(weight) if grad_weight else empty,
        torch.empty_like(bias) if grad_bias else empty,
    )
    shape = (count,) if with_stats else (0,)
    stats = [input.new_empty(shape, dtype=dtype) for dtype in (acc, acc, output_dtype, torch.long)]
    return (loss, *grads, *stats)


def _plan(input: Tensor, weight: Tensor, problem, backend: str, chunk_size: int) -> _Plan:
    """The backend's row function, the rows per chunk and the weight gradient's accumulation dtype."""
    name, _ = select_backend(input.device, backend, problem, rows_contiguous=True)  # chunks are made contiguous
    policy = chunk_policy(name)
    count, vocab = problem.logits.shape[0], problem.logits.shape[1]
    chunk = (
        chunk_size if chunk_size > 0 else default_chunk_rows(count, vocab, input.element_size(), policy.rows_in_place)
    )
    weight_grad_dtype = torch.float32 if policy.float32_weight_grad and weight.element_size() < 4 else weight.dtype
    return _Plan(rows_function(name, policy.own_chunk_rows(chunk)), chunk, weight_grad_dtype)


_LINEAR_SCALARS = (
    "normalizer_value", "ignore_index", "reduction", "smoothing", "z_loss", "softcap", "output_dtype",
    "grad_input", "grad_weight", "grad_bias", "with_stats", "backend", "chunk_size", "grads_private",
)  # fmt: skip


def _linear_setup_context(ctx, inputs, output):
    *tensors, row_scale = inputs[:8]
    ctx.call = dict(zip(_LINEAR_SCALARS, inputs[8:], strict=True))
    loss, grad_input, grad_weight, grad_bias, lse, entropy, row_loss, argmax = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(grad_input, grad_weight, grad_bias, row_loss, argmax)
    made = ctx.call["grad_input"] or ctx.call["grad_weight"] or ctx.call["grad_bias"]
    # the gradients made in forward (not for reduction='none') are handed to autograd once
    ctx.grads = (grad_input, grad_weight, grad_bias) if made and ctx.call["reduction"] != "none" else None
    ctx.save_for_backward(*tensors)


def _linear_backward(ctx, grad_loss, _gi, _gw, _gb, grad_lse, grad_entropy, _row_loss, _argmax):
    tensors = ctx.saved_tensors  # input, weight, bias, target, class_weight, normalizer, input_rows
    needs = ctx.needs_input_grad[:5]
    saved, ctx.grads = ctx.grads, None
    none = (None,) * 17
    if not ctx.call["with_stats"]:  # the statistics were empty placeholders: nothing flows through them
        grad_lse = grad_entropy = None
    if grad_loss is None and grad_lse is None and grad_entropy is None:
        return (None,) * 5 + none
    stats_flow = grad_lse is not None or grad_entropy is not None
    if torch.is_grad_enabled() or needs[3] or needs[4] or stats_flow:
        return (*_composite_grads(ctx, tensors, needs, grad_loss, grad_lse, grad_entropy), *none)
    if saved is not None:
        grads = [
            None if g.numel() == 0 and not need else _scale(g if ctx.call["grads_private"] else g.clone(), grad_loss)
            for g, need in zip(saved, needs)
        ]
    else:  # reduction='none', or a second backward: sweep again with the row scales
        count = tensors[3].shape[0]
        row_scale = grad_loss.reshape(-1) if ctx.call["reduction"] == "none" else grad_loss.expand(count)
        call = dict(ctx.call, grad_input=needs[0], grad_weight=needs[1], grad_bias=needs[2], with_stats=False)
        out = torch.ops.xentlib.linear_cross_entropy(*tensors, row_scale.contiguous(), *call.values())
        grads = list(out[1:4])
    return (*[g if need else None for g, need in zip(grads, needs[:3])], None, None, *none)


linear_cross_entropy_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


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
        return tiled.TiledLinearCrossEntropyFunction.apply(input, weight, bias, lp)


def _scale(grad: Tensor, grad_loss: Tensor) -> Tensor:
    return composite.scale_by_grad_output_("sum", grad, grad_loss)


def _composite_grads(ctx, tensors, needs, grad_loss, grad_lse, grad_entropy):
    """The rare paths: materialize the logits and differentiate `composite_rows` (differentiable itself)."""
    input, weight, bias, target, class_weight, normalizer, input_rows = tensors
    scalars = [ctx.call[name] for name in _LINEAR_SCALARS[:7]]  # normalizer_value ... output_dtype
    problem = _rows_problem(
        input,
        weight,
        target.detach(),
        class_weight,
        normalizer,
        *scalars,
        check_targets=False,  # checked in forward
    )
    create_graph = torch.is_grad_enabled()  # read before enable_grad: True only for double backward
    with torch.enable_grad():
        leaves = [as_leaf(t) if need else t for t, need in zip(tensors[:5], needs)]
        x, w, b, t, cw = leaves
        if input_rows is not None:
            x = x.index_select(0, input_rows)
        logits = torch.nn.functional.linear(x, w, b).unsqueeze(2)
        if problem.kind == "prob":
            t = t.reshape(problem.logits.shape)
        loss_rows, lse, entropy = composite_rows(problem, logits, t, cw)
        pairs = [
            (reduce_rows(problem, loss_rows), grad_loss),
            (lse.reshape(-1), grad_lse),
            (entropy.reshape(-1), grad_entropy),
        ]
        pairs = [(out, g) for out, g in pairs if g is not None]
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


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    options=None,
    shift: bool = False,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | Tensor | None = None,
    return_stats: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    r"""`cross_entropy(linear(input, linear_weight, linear_bias), target, ...)` computed in row chunks, never
    holding the (N, C) logits. torch 2.13's `F.linear_cross_entropy` signature, then xentlib's extensions.

    Args:
        input: (in_features), (N, in_features), or (..., in_features): leading dimensions are flattened into rows.
        linear_weight: (C, in_features) output projection (e.g. an LM head); `linear_bias`: optional (C,).
        target: class indices of shape (...) or class probabilities of shape (..., C).
        weight: per-class weight (C,), as `cross_entropy`'s `weight`.
        reduction, label_smoothing: as `cross_entropy`.
        ignore_index: as `cross_entropy`; None (torch's default here) means -100.
        options: a `torch.nn.LinearCrossEntropyOptions` (or None). xentlib always chunks; `batch_chunk_size`
            sets the rows per chunk when `chunk_size` is not given. The other fields (`chunking_method`,
            `acc_policy`, `acc_dtype`, `allow_retain_graph`) have no effect: xentlib chunks over rows,
            computes each chunk's loss and logits' gradient in float32 (rounded once), and supports retain_graph
            and double backward always. The weight gradient of half-precision weights accumulates in float32 on
            Triton and in the weight's dtype elsewhere, rounded once per chunk (docs/numerics.md section 9).
        shift: keyword-only; predict `target[..., 1:]` from `input[..., :-1, :]` (next-token prediction) without
            copying the input.
        z_loss, softcap, normalizer, return_stats, backend: as `cross_entropy`. `backend="triton-tiled"` also
            exists here: Triton kernels that never write logits, not even a chunk (class-index targets;
            backends/triton/tiled.py).
        chunk_size: rows per chunk (default: a fifth of the rows where the compiled CPU kernel or Triton
            computes the rows, else an eighth in float32 and a sixteenth in half precision; at least 128 rows,
            so calls of fewer rows run in one chunk).

    reduction='none' returns the loss per row, of shape `target.shape` (shifted: `target[..., 1:].shape`).

    Example::

        >>> x, w = torch.randn(6, 4), torch.randn(10, 4)
        >>> t = torch.tensor([1, 2, 3, -100, 5, 9])
        >>> ref = torch.nn.functional.cross_entropy(x @ w.T, t)
        >>> torch.allclose(linear_cross_entropy(x, w, t), ref)
        True
    """
    reduction = sem.check_reduction(reduction)
    ignore_index = -100 if ignore_index is None else ignore_index
    chunk_size = _chunk_rows(options, chunk_size)
    if backend not in BACKENDS + (TILED_BACKEND,):
        raise ValueError(
            f"backend must be one of {', '.join(repr(b) for b in BACKENDS + (TILED_BACKEND,))}, got {backend!r}"
        )
    autocast = torch.is_autocast_enabled(input.device.type)
    input, linear_weight, linear_bias = _autocast_operands(input, linear_weight, linear_bias)
    lp = sem.check_linear_cross_entropy(
        input, linear_weight, target, linear_bias, weight, ignore_index, reduction, label_smoothing,
        shift=shift, z_loss=z_loss, softcap=softcap, normalizer=normalizer, autocast=autocast,
    )  # fmt: skip
    call = lp.rows
    if autocast:  # autocast runs cross_entropy in float32: so does the loss of the fused computation
        call.output_dtype = torch.promote_types(call.output_dtype, torch.float32)
    if composite.transforms_active(input, linear_weight, linear_bias, target, weight):
        return _composite_linear_cross_entropy(lp, linear_weight, linear_bias, return_stats)
    if backend == TILED_BACKEND:
        lp.rows = sem.problem_from_call(call)
        return _tiled_linear_cross_entropy(input, linear_weight, linear_bias, lp, return_stats, chunk_size or None)
    grad_on = torch.is_grad_enabled()
    wants = [grad_on and t is not None and t.requires_grad for t in (input, linear_weight, linear_bias)]
    normalizer_tensor, normalizer_value = sem.normalizer_operands(call.normalizer)
    with torch.autocast(input.device.type, enabled=False):
        outputs = torch.ops.xentlib.linear_cross_entropy(
            lp.flat_input, linear_weight, linear_bias, call.target, call.weight, normalizer_tensor, lp.input_rows,
            None, normalizer_value, call.ignore_index, call.reduction, call.smoothing, call.z_loss, call.softcap,
            call.output_dtype, *wants, return_stats, backend, chunk_size, True,
        )  # fmt: skip
    loss, *_, lse, entropy, row_loss, argmax = outputs
    shape = call.output_shape
    if reduction == "none":
        loss = loss.reshape(shape)
    if not return_stats:
        return loss
    argmax = argmax.reshape(shape)
    stats = CrossEntropyStats(
        lse=lse.reshape(shape), loss=row_loss.reshape(shape), argmax=argmax, correct=_correct(call, argmax),
        entropy=entropy.reshape(shape),
    )  # fmt: skip
    return loss, stats


def _correct(call: sem.CrossEntropyCall, argmax: Tensor) -> Tensor:
    """argmax == target on the rows that count (class indices), or == the target distribution's argmax."""
    shape = call.output_shape
    if call.kind == "prob":
        return argmax == call.target.reshape(*shape, -1).argmax(-1)
    index = call.target.reshape(shape)
    return (argmax == index) & (index != call.ignore_index)


def _composite_linear_cross_entropy(lp: sem.LinearProblem, weight: Tensor, bias: Tensor | None, return_stats):
    """Under the torch.func transforms and forward-mode AD: `cross_entropy(linear(...))` as plain torch ops,
    which those transforms differentiate like any torch code. It holds the (N, C) logits."""
    from xentlib.functional import _composite_cross_entropy

    call = lp.rows
    logits = torch.nn.functional.linear(lp.gathered_input(), weight, bias)
    loss, stats = _composite_cross_entropy(dataclasses.replace(call, logits=sem.as_rows(logits)), return_stats)
    if not return_stats:
        return loss
    return loss, CrossEntropyStats(**stats, correct=_correct(call, stats["argmax"]))


def _chunk_rows(options, chunk_size) -> int:
    """`chunk_size`, else the `batch_chunk_size` of torch's `LinearCrossEntropyOptions`; 0 for the default."""
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    return sem.check_chunk_size(chunk_size)
