"""Per-token log-probabilities and entropy for RL post-training (GRPO, PPO), without a full log_softmax copy.

For each row (token) with logits z, target t, temperature T and optional soft-cap c:
    y = c tanh(z / c)  (or z)        u = y / T        lse = log sum_v exp(u_v)
    log p_t = u_t - lse              H = -sum_v p_v log p_v            (p = softmax(u))
The RL objective weights the log-probabilities by advantages and adds an entropy bonus, for example
`loss = -(A * logp).sum() - beta * H.sum()`, so both outputs are differentiable. Their gradients wrt u are
(docs/numerics.md, "Per-token log-probabilities"):
    d log p_t / du = onehot_t - p          d H / du = -p (log p + H)
so for upstream gradients g (of log p_t) and h (of H), row by row,
    dL/du = g onehot_t - p (g + h (log p + H))       dL/dz = dL/du / T * (1 - (y / c)^2)   (the soft-cap chain)
These upstream gradients are not known in the forward pass, so the forward keeps only lse and H per row and the
backward recomputes p = exp(u - lse) chunk by chunk. `linear_log_probs` does the same for z = x W^T + b and never
holds the (N, V) logits: the forward computes one chunk of logits at a time; the backward recomputes each
chunk's logits, turns them into dZ in place and accumulates dX = dZ W, dW += dZ^T X, db += sum dZ.

Ignored rows (target == ignore_index) give log p = 0 and H = 0 (convenient for masking: sums over tokens need
no mask) and an exact zero gradient. Both functions are torch ops (`torch.ops.xentlib.log_probs`,
`torch.ops.xentlib.linear_log_probs` and their backward ops), so torch.compile sees one node each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.backends import cpu_kernel
from xentlib.backends.composite import refuse_transforms
from xentlib.backends.torch_chunked import CHUNK_ELEMENTS
from xentlib.linear import (
    _autocast_operands,
    _by_onednn,
    accumulate_chunk_grads_,
    chunk_logits,
    default_chunk_rows,
    kept_rows,
)

__all__ = ["linear_log_probs", "log_probs"]

_BACKENDS = ("auto", "torch")


# --------------------------------------------------------------------------------------------------------------
# Row maths on blocks of rows small enough to stay in cache (CHUNK_ELEMENTS float32 values)
# --------------------------------------------------------------------------------------------------------------


class _Rows:
    """The problem's constants and float32 (float64) work buffers, allocated once per call and reused.

    Where the compiled CPU kernel covers the rows (`cpu_kernel.log_probs_covers`: CPU float32/bfloat16 rows
    with contiguous classes, no soft-capping), a block is a whole chunk and one C call computes it in a sweep
    per row (cpu_post_training.c, `xent_log_probs`: the same maths, on torch's threads); elsewhere the PyTorch
    ops below run on blocks of rows small enough to stay in cache, a pass per step."""

    def __init__(self, vocab: int, dtype, device, temperature, softcap, with_entropy: bool, rows_contiguous=True):
        self.acc = sem.accumulation_dtype(dtype)
        self.vocab, self.temperature, self.softcap = vocab, temperature, softcap
        self.kernel = rows_contiguous and vocab > 0 and cpu_kernel.log_probs_covers(device, dtype, softcap)
        if self.kernel:
            self.block = None
            return
        self.block = max(1, CHUNK_ELEMENTS // max(vocab, 1))  # rows per block
        make = lambda: torch.empty(self.block, vocab, dtype=self.acc, device=device)  # noqa: E731
        self.work = make()
        self.capped = make() if softcap is not None else None
        self.probs = make() if with_entropy else None

    def blocks(self, rows: int):
        block = self.block or max(rows, 1)
        for start in range(0, rows, block):
            yield slice(start, min(start + block, rows))

    def log_softmax(self, z: Tensor, owned: bool) -> Tensor:
        """log softmax(softcap(z) / T) of a block, in float32 (float64), one pass per step: written over z when
        the caller `owned` it (a chunk of computed logits), else into the work buffer (the caller's logits are
        never modified). The soft-cap is computed in float32 from the start."""
        work = z if owned and z.dtype == self.acc else self.work[: z.shape[0]]
        u = work
        if z.dtype != self.acc:  # widen first: an op on bfloat16 z would round its result to bfloat16
            u.copy_(z)
            z = u
        if self.softcap is not None:
            torch.div(z, self.softcap, out=u).tanh_().mul_(self.softcap / self.temperature)
        elif self.temperature != 1.0:
            torch.mul(z, 1.0 / self.temperature, out=u)
        else:
            u = z  # log_softmax reads z and writes the work buffer (or z itself): no copy
        return torch.log_softmax(u, 1, out=work)  # row-wise, so u may be its own output

    def forward(self, z: Tensor, target: Tensor, valid: Tensor, want_entropy: bool, owned: bool = False):
        """(log p_t, lse, H or None) of a block of rows z (R, V); 0 on ignored rows."""
        if self.kernel:
            new = lambda: torch.empty(z.shape[0], dtype=torch.float32, device="cpu")  # noqa: E731
            logp, lse, entropy = new(), new(), new() if want_entropy else None
            out = (logp, lse, entropy)
            cpu_kernel.log_probs_rows(z, target.contiguous(), valid.contiguous(), self.temperature, out)
            return logp, lse, entropy
        m = self._max_of_scaled(z)
        log_p = self.log_softmax(z, owned)
        # lse = m - max_v log p_v: log_softmax is monotonic, so its row maximum sits at the arg-max a of u, where
        # log p_a = -log sum exp(u - u_a) lies in [-log V, 0]: exact, with no cancellation
        lse = m - log_p.amax(1)
        # log p_t straight from log_softmax ((u_t - m) - log s), never u_t - lse, which cancels
        logp = log_p.gather(1, target.unsqueeze(1)).squeeze(1)
        zero = torch.zeros((), dtype=self.acc, device=z.device)
        entropy = None
        if want_entropy:  # H = sum_v entr(p_v), entr(p) = -p log p (0 at p = 0)
            entropy = torch.where(valid, torch.special.entr(log_p.exp_(), out=log_p).sum(1), zero)
        return torch.where(valid, logp, zero), lse, entropy

    def _max_of_scaled(self, z: Tensor) -> Tensor:
        """max_v u_v of each row, u = softcap(z) / T: both maps are increasing, so it is the map of max_v z_v."""
        m = z.amax(1, keepdim=True).to(self.acc)  # then the same float32 ops as `log_softmax`
        if self.softcap is not None:
            return m.div_(self.softcap).tanh_().mul_(self.softcap / self.temperature).squeeze(1)
        return (m.mul_(1.0 / self.temperature) if self.temperature != 1.0 else m).squeeze(1)

    def backward_(self, z: Tensor, target, valid, lse, entropy, g: Tensor, h: Tensor | None, out: Tensor) -> None:
        """dL/dz of a block into `out` (R, V), for upstream gradients g of log p_t and h of H (R,), both zero on
        ignored rows. The derivation is in the module docstring."""
        if self.kernel:
            upstream = (g.contiguous(), None if h is None else h.contiguous(), entropy)
            cpu_kernel.log_probs_rows(z, target.contiguous(), valid.contiguous(), self.temperature, grad=out,
                                      upstream=upstream)  # fmt: skip
            return
        rows = z.shape[0]
        inv_t = 1.0 / self.temperature
        if self.softcap is None:
            log_p = out if out.dtype == self.acc else self.work[:rows]
            torch.add(-lse.unsqueeze(1), z, alpha=inv_t, out=log_p)  # log p = z / T - lse, one pass
        else:  # y = c tanh(z / c) kept for the chain factor
            y = self.capped[:rows]
            y.copy_(z).div_(self.softcap).tanh_().mul_(self.softcap)
            log_p = self.work[:rows]
            torch.add(-lse.unsqueeze(1), y, alpha=inv_t, out=log_p)
        g = g.unsqueeze(1) * inv_t  # the 1/T of du/dz, folded into the per-row coefficients
        if h is None:  # dL/du = g onehot - g p
            grad = log_p.exp_().mul_(-g)
        else:  # dL/du = g onehot - p (g + h (log p + H)) = g onehot + p (-h log p - (g + h H))
            p = torch.exp(log_p, out=self.probs[:rows])
            h = h.unsqueeze(1) * inv_t
            grad = torch.addcmul(-(g + h * entropy.unsqueeze(1)), log_p, -h, out=log_p).mul_(p)
            grad.masked_fill_(p == 0, 0.0)  # p = 0 (a -inf logit): the limit of p log p, not 0 * inf = NaN
        grad.scatter_add_(1, target.unsqueeze(1), g)
        if self.softcap is not None:  # dy/dz = 1 - tanh^2(z / c) = 1 - (y / c)^2
            grad.mul_(y.div_(self.softcap).square_().neg_().add_(1.0))
        # exact zeros on ignored rows, even for non-finite logits (elsewhere g = h = 0 there already); on CPU the
        # mask is read on the host to skip the pass when every row counts
        if valid.device.type != "cpu" or not bool(valid.all()):
            grad.masked_fill_(~valid.unsqueeze(1), 0.0)
        if grad is not out:
            out.copy_(grad)


def checked_log_probs_call(fn: str, input, target, weight=None, bias=None, *, temperature, ignore_index, softcap):
    """The first steps of log_probs, linear_log_probs and the policy losses: refuse the torch.func transforms
    (these ops have no rule for them yet), then `sem.check_log_probs_call`; returns (temperature, ignore_index,
    softcap) canonical."""
    refuse_transforms(fn, input, weight, bias)
    return sem.check_log_probs_call(
        fn, input, target, weight, bias, temperature=temperature, ignore_index=ignore_index, softcap=softcap
    )


def _targets(target: Tensor, ignore_index: int, vocab: int):
    """(safe class indices, valid mask): the bounds check reads the data inside the op (IndexError on CPU)."""
    valid = target != ignore_index
    if torch.compiler.is_compiling():
        return torch.ops.xentlib.class_indices(target, ignore_index, vocab), valid
    return sem.class_indices(target, ignore_index, vocab), valid


def _upstream(grad: Tensor | None, count: int, valid: Tensor, acc: torch.dtype) -> Tensor:
    """An output's incoming gradient as (N,) float32 with zeros on ignored rows (None: no gradient flows)."""
    if grad is None:
        return torch.zeros(count, dtype=acc, device=valid.device)
    zero = torch.zeros((), dtype=acc, device=valid.device)
    return torch.where(valid, grad.reshape(count).to(acc), zero)


# --------------------------------------------------------------------------------------------------------------
# log_probs: materialized logits (N, V)
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("xentlib::log_probs", mutates_args=())
def log_probs_op(
    logits: Tensor, target: Tensor, temperature: float, ignore_index: int, softcap: float | None, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(log p_t, entropy, lse), each (N,) in float32 (float64), of (N, V) logits; entropy is empty without
    `with_entropy`. lse (of the scaled logits) is what the backward needs to recompute p."""
    count, vocab = logits.shape
    safe, valid = _targets(target, ignore_index, vocab)
    contiguous = cpu_kernel.classes_contiguous(logits, vocab)
    rows = _Rows(vocab, logits.dtype, logits.device, temperature, softcap, False, contiguous)
    logp = torch.empty(count, dtype=rows.acc, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty((0,))
    for block in rows.blocks(count):
        lp, ls, ent = rows.forward(logits[block], safe[block], valid[block], with_entropy)
        logp[block], lse[block] = lp, ls
        if with_entropy:
            entropy[block] = ent
    return logp, entropy, lse


@log_probs_op.register_fake
def _(logits, target, temperature, ignore_index, softcap, with_entropy):
    return _fake_rows(logits, with_entropy)


def _fake_rows(like: Tensor, with_entropy: bool):
    """(log p, entropy or empty, lse) of the forward ops, one per row of `like`, in the accumulation dtype."""
    acc = sem.accumulation_dtype(like.dtype)
    out = like.new_empty((like.shape[0],), dtype=acc)
    return out, like.new_empty((like.shape[0] if with_entropy else 0,), dtype=acc), torch.empty_like(out)


# Each op's annotated parameters are its schema (torch.library.custom_op reads them): listed in full in every op.
@torch.library.custom_op("xentlib::log_probs_backward", mutates_args=())
def log_probs_backward_op(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
    softcap: float | None,
) -> Tensor:
    """dL/dlogits (N, V) in the logits' dtype, recomputing p block by block from the saved lse (and entropy)."""
    count, vocab = logits.shape
    safe, valid = _targets(target, ignore_index, vocab)
    with_entropy = grad_entropy is not None
    contiguous = cpu_kernel.classes_contiguous(logits, vocab)
    rows = _Rows(vocab, logits.dtype, logits.device, temperature, softcap, with_entropy, contiguous)
    g = _upstream(grad_logp, count, valid, rows.acc)
    h = _upstream(grad_entropy, count, valid, rows.acc) if with_entropy else None
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    for block in rows.blocks(count):
        rows.backward_(
            logits[block], safe[block], valid[block], lse[block], entropy[block] if with_entropy else None,
            g[block], None if h is None else h[block], grad[block],
        )  # fmt: skip
    return grad


@log_probs_backward_op.register_fake
def _(logits, target, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _log_probs_setup_context(ctx, inputs, output):
    logits, target, temperature, ignore_index, softcap, with_entropy = inputs
    logp, entropy, lse = output
    ctx.call = (temperature, ignore_index, softcap)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, target, lse, entropy)


def _log_probs_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    logits, target, lse, entropy = ctx.saved_tensors
    if entropy.numel() == 0 and lse.numel() != 0:
        grad_entropy = None  # the entropy was an empty placeholder
    if (grad_logp is None and grad_entropy is None) or not ctx.needs_input_grad[0]:
        return (None,) * 6
    grad = torch.ops.xentlib.log_probs_backward(logits, target, lse, entropy, grad_logp, grad_entropy, *ctx.call)
    return (grad,) + (None,) * 5


log_probs_op.register_autograd(_log_probs_backward, setup_context=_log_probs_setup_context)


def log_probs(
    logits: Tensor,
    target: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
):
    r"""Per-token log-probability of the target under softmax(softcap(logits) / temperature), and optionally the
    entropy of that distribution, without a (..., V) log_softmax copy.

    Equals `torch.log_softmax(softcap(logits.float()) / temperature, -1).gather(-1, target[..., None])[..., 0]`,
    with 0 where `target == ignore_index`; the entropy is `-(p * log p).sum(-1)`, also 0 on ignored rows.

    Args:
        logits: (..., V) with the classes on the last dimension (any floating dtype).
        target: (...) int64 class indices in [0, V), or `ignore_index`.
        temperature: a finite number > 0 the (capped) logits are divided by (the sampling temperature).
        ignore_index: rows with this target give log p = 0, entropy = 0 and a zero gradient.
        return_entropy: also return the per-token entropy.
        softcap: replace the logits by `softcap * tanh(logits / softcap)` first (Gemma 2), or None.

    Returns:
        `logp` of the target's shape, float32 (float64 for float64 logits), or `(logp, entropy)`. Both are
        differentiable wrt the logits (e.g. `-(advantages * logp).sum() - beta * entropy.sum()`).

    Memory: the forward keeps two floats per row (the log-sum-exp and the entropy); the backward recomputes the
    probabilities in blocks of rows and writes the logits' gradient, one logits-sized tensor.

    Example::

        >>> logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
        >>> logp, entropy = log_probs(logits, torch.tensor([0, -100]), return_entropy=True)
        >>> [round(v, 4) for v in logp.tolist()], [round(v, 4) for v in entropy.tolist()]
        ([-0.2395, 0.0], [0.6656, 0.0])
    """
    temperature, ignore_index, softcap = checked_log_probs_call(
        "log_probs", logits, target, temperature=temperature, ignore_index=ignore_index, softcap=softcap
    )
    vocab = logits.shape[-1]
    with torch.autocast(logits.device.type, enabled=False):
        logp, entropy, _ = torch.ops.xentlib.log_probs(
            logits.reshape(-1, vocab), target.reshape(-1), temperature, ignore_index, softcap, bool(return_entropy)
        )
    logp = logp.reshape(target.shape)
    return (logp, entropy.reshape(target.shape)) if return_entropy else logp


# --------------------------------------------------------------------------------------------------------------
# linear_log_probs: logits = x W^T + b, one chunk of rows at a time
# --------------------------------------------------------------------------------------------------------------


class _LinearChunks:
    """Chunks of rows of x and their logits Z = x W^T + b (`linear.chunk_logits`): a reused buffer, or where oneDNN
    computes the matmuls (float32 on CPUs where it is the faster: `linear._by_onednn`) its own output, freed chunk
    by chunk."""

    def __init__(self, x: Tensor, weight: Tensor, bias: Tensor | None, valid: Tensor, chunk_size: int):
        """Over the rows of x whose target counts (`valid`; on CPU the others are dropped: `kept_rows`), in chunks
        of `chunk_size` rows (0: `default_chunk_rows`)."""
        self.x, self.weight, self.bias = x, weight, bias
        self.active = active = kept_rows(valid, x.device)
        self.total = x.shape[0] if active is None else active.numel()
        rows, vocab = x.shape[0], weight.shape[0]
        # the row work runs in the compiled kernel or in small float32 blocks beside the chunk, so a fifth of the
        # logits, in whole 128-row multiples (see `default_chunk_rows`); where oneDNN makes each chunk's float32
        # logits anew, the resident peak is about two chunks
        default = default_chunk_rows(rows, vocab, x.element_size(), in_place_rows=True, multiple_of=128)
        self.chunk = chunk_size if chunk_size > 0 else default
        self.onednn = _by_onednn(x, weight)
        shape = (min(self.chunk, max(self.total, 1)), vocab)
        self.buffer = None if self.onednn else torch.empty(shape, dtype=x.dtype, device=x.device)

    def __iter__(self):
        """(row index: a slice or an index tensor, x rows, their logits)"""
        for start in range(0, self.total, self.chunk):
            stop = min(start + self.chunk, self.total)
            rows = slice(start, stop) if self.active is None else self.active[start:stop]
            x_c = self.x[rows] if self.active is None else self.x.index_select(0, rows)
            yield rows, x_c, chunk_logits(x_c, self.weight, self.bias, self.buffer)


@torch.library.custom_op("xentlib::linear_log_probs", mutates_args=())
def linear_log_probs_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    temperature: float,
    ignore_index: int,
    softcap: float | None,
    with_entropy: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(log p_t, entropy, lse), each (N,), of logits x W^T + b for a flat (N, D) input; entropy is empty
    without `with_entropy`. Ignored rows give 0 (and lse 0: the backward never reads it)."""
    count, vocab = input.shape[0], weight.shape[0]
    safe, valid = _targets(target, ignore_index, vocab)
    rows = _Rows(vocab, input.dtype, input.device, temperature, softcap, with_entropy=False)
    logp = torch.zeros(count, dtype=rows.acc, device=input.device)
    lse = torch.zeros_like(logp)
    entropy = torch.zeros_like(logp) if with_entropy else logp.new_empty((0,))
    chunks = _LinearChunks(input, weight, bias, valid, chunk_size)
    for index, _, z in chunks:
        t_c, v_c = safe[index], valid[index]
        for block in rows.blocks(z.shape[0]):
            lp, ls, ent = rows.forward(z[block], t_c[block], v_c[block], with_entropy, owned=True)
            logp[_sub(index, block)], lse[_sub(index, block)] = lp, ls
            if with_entropy:
                entropy[_sub(index, block)] = ent
    return logp, entropy, lse


def _sub(index, block: slice):
    """Rows `block` of a chunk whose rows are `index` (a slice of all rows, or an index tensor)."""
    if isinstance(index, slice):
        return slice(index.start + block.start, index.start + block.stop)
    return index[block]


@linear_log_probs_op.register_fake
def _(input, weight, bias, target, temperature, ignore_index, softcap, with_entropy, chunk_size):
    return _fake_rows(input, with_entropy)


@torch.library.custom_op("xentlib::linear_log_probs_backward", mutates_args=())
def linear_log_probs_backward_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    lse: Tensor,
    entropy: Tensor,
    grad_logp: Tensor | None,
    grad_entropy: Tensor | None,
    temperature: float,
    ignore_index: int,
    softcap: float | None,
    chunk_size: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dX, dW, db) for the flagged tensors (others empty): each chunk's logits are recomputed and turned into
    dZ in place, then dX_c = dZ W, dW += dZ^T X_c, db += sum_rows dZ (db in float32, rounded once)."""
    count, vocab = input.shape[0], weight.shape[0]
    safe, valid = _targets(target, ignore_index, vocab)
    with_entropy = grad_entropy is not None
    rows = _Rows(vocab, input.dtype, input.device, temperature, softcap, with_entropy)
    g = _upstream(grad_logp, count, valid, rows.acc)
    h = _upstream(grad_entropy, count, valid, rows.acc) if with_entropy else None
    chunks = _LinearChunks(input, weight, bias, valid, chunk_size)
    dx = torch.zeros_like(input) if grad_input else input.new_empty((0,))
    # the first chunk overwrites dW (accumulate_mm_(first=True)); with no rows it stays zero
    dw = (torch.empty_like if chunks.total else torch.zeros_like)(weight) if grad_weight else weight.new_empty((0,))
    db = torch.zeros(vocab, dtype=rows.acc, device=input.device) if grad_bias else None
    for number, (index, x_c, z) in enumerate(chunks):
        t_c, v_c, lse_c, g_c = safe[index], valid[index], lse[index], g[index]
        ent_c = entropy[index] if with_entropy else None
        h_c = h[index] if with_entropy else None
        for block in rows.blocks(z.shape[0]):  # z becomes dZ, block by block
            rows.backward_(
                z[block], t_c[block], v_c[block], lse_c[block], None if ent_c is None else ent_c[block],
                g_c[block], None if h_c is None else h_c[block], z[block],
            )  # fmt: skip
        accumulate_chunk_grads_(z, weight, x_c, index, dx if grad_input else None, dw if grad_weight else None, db,
                                first=number == 0, onednn=chunks.onednn)  # fmt: skip
    return dx, dw, db.to(bias.dtype) if grad_bias else weight.new_empty((0,))


@linear_log_probs_backward_op.register_fake
def _(input, weight, bias, target, lse, entropy, grad_logp, grad_entropy, temperature, ignore_index, softcap,
      chunk_size, grad_input, grad_weight, grad_bias):  # fmt: skip
    empty = input.new_empty((0,))
    return (
        torch.empty_like(input) if grad_input else empty,
        torch.empty_like(weight) if grad_weight else weight.new_empty((0,)),
        torch.empty_like(bias) if grad_bias else weight.new_empty((0,)),
    )


def _linear_setup_context(ctx, inputs, output):
    input, weight, bias, target, temperature, ignore_index, softcap, with_entropy, chunk_size = inputs
    logp, entropy, lse = output
    ctx.call = (temperature, ignore_index, softcap, chunk_size)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, bias, target, lse, entropy)


def _linear_backward(ctx, grad_logp, grad_entropy, _grad_lse):
    input, weight, bias, target, lse, entropy = ctx.saved_tensors
    if entropy.numel() == 0 and lse.numel() != 0:
        grad_entropy = None  # the entropy was an empty placeholder
    needs = ctx.needs_input_grad[:3]
    if (grad_logp is None and grad_entropy is None) or not any(needs):
        return (None,) * 9
    grads = torch.ops.xentlib.linear_log_probs_backward(
        input, weight, bias, target, lse, entropy, grad_logp, grad_entropy, *ctx.call, *needs
    )
    return (*[grad if need else None for grad, need in zip(grads, needs)], None, None, None, None, None, None)


linear_log_probs_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def linear_log_probs(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    r"""`log_probs(input @ weight.T + bias, target, ...)` without ever holding the (N, V) logits: per-token
    log-probabilities (and entropies) of an LM head's next-token distribution, for policy-gradient losses.

    Args:
        input: (..., D) hidden states (e.g. the last hidden state of a causal LM, already shifted so that row i
            predicts target i).
        weight: (V, D) output projection (the LM head); `bias`: optional (V,). Same dtype as the input.
        target: (...) int64 token ids, or `ignore_index` (prompt tokens, padding): those rows give 0 and cost
            no matmul on CPU.
        temperature, ignore_index, return_entropy, softcap: as `log_probs`.
        chunk_size: rows of logits per chunk (default: a fifth of the rows rounded down to
            a multiple of 128, at least 128, at most 1 GiB of logits).
        backend: "auto" or "torch" (chunks of PyTorch ops, any device).

    Returns:
        `logp` (float32; float64 for float64 input) of the target's shape, or `(logp, entropy)`; both
        differentiable wrt input, weight and bias.

    Cost: the forward does one chunked matmul and keeps lse and entropy per row; the backward recomputes each
    chunk's logits (a second forward matmul, since the upstream gradients are unknown in the forward) and then
    runs the two gradient matmuls: four (N, D, V) matmuls in all, against three for the logits and their
    gradient alone. Extra memory: one chunk of logits plus float32 blocks of about 8 MiB.

    Example::

        >>> x, w = torch.randn(5, 4), torch.randn(10, 4)
        >>> t = torch.tensor([1, 2, 3, -100, 9])
        >>> ref = torch.log_softmax(x @ w.T, -1).gather(-1, t.clamp(min=0)[:, None])[:, 0] * (t != -100)
        >>> torch.allclose(linear_log_probs(x, w, t), ref, atol=1e-6)
        True
    """
    temperature, ignore_index, softcap = checked_log_probs_call(
        "linear_log_probs", input, target, weight, bias,
        temperature=temperature, ignore_index=ignore_index, softcap=softcap,
    )  # fmt: skip
    if backend not in _BACKENDS:
        raise ValueError(
            f"linear_log_probs: backend must be 'auto' or 'torch' (it runs on chunks of PyTorch ops), got {backend!r}"
        )
    chunk_size = sem.check_chunk_size(chunk_size, "linear_log_probs")
    input, weight, bias = _autocast_operands(input, weight, bias)
    with torch.autocast(input.device.type, enabled=False):
        logp, entropy, _ = torch.ops.xentlib.linear_log_probs(
            input.reshape(-1, input.shape[-1]), weight, bias, target.reshape(-1), temperature, ignore_index,
            softcap, bool(return_entropy), chunk_size,
        )  # fmt: skip
    logp = logp.reshape(target.shape)
    return (logp, entropy.reshape(target.shape)) if return_entropy else logp
