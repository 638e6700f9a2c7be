"""Cross-entropy of logits sharded over the vocabulary across a process group (tensor parallelism).

Collectives per call (see docs/distributed.md): forward = 1 small validation all-reduce (a (world, 21) int64
table; skipped with validate=False) + 1 all-reduce MAX of the row max (rows floats) + 1 all-reduce SUM of the
stacked partial sums (k x rows floats, k = 2..5); backward = none (the gradient is made in the forward pass
from the global lse).
"""

from __future__ import annotations

import torch
from torch import Tensor

from xentlib.backends.torch_chunked import chunk_shape, iter_chunks
from xentlib.distributed._prepare import prepare_shard, resolve_group
from xentlib.distributed._shard import (
    ShardProblem,
    all_reduce_max,
    all_reduce_partials,
    finish_rows,
    local_partials,
    local_row_max,
    mean_denominator,
    write_gradient,
)

FN = "vocab_parallel_cross_entropy"


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    group=None,
    vocab_start: int,
    vocab_size: int | None = None,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int | None = None,
    validate: bool = True,
) -> Tensor:
    r"""`xentlib.functional.cross_entropy` of logits whose class dimension is sharded across `group`.

    Rank r holds the classes ``[vocab_start, vocab_start + C_r)`` of a vocabulary of V classes; shards may be
    uneven and in any order, but must tile ``[0, V)``. Every rank returns the same loss, equal to
    ``cross_entropy(torch.cat(all shards, class_dim), target, full weight, ...)``, and the gradient wrt its
    own shard. Label smoothing spreads ``eps`` over the GLOBAL vocabulary (``eps / V`` per class), as torch
    defines it.

    Args:
        logits_shard: (C_r), (N, C_r) or (N, C_r, d1, ..., dk): this rank's slice of the class dimension.
        target: GLOBAL class indices of shape (), (N) or (N, d1, ..., dk), the same on every rank; or this
            rank's shard of class probabilities, of the logits shard's shape.
        weight: this rank's slice of the class weight, ``weight[vocab_start : vocab_start + C_r]`` (the same
            sharding as the logits), or None.
        ignore_index, reduction, label_smoothing: as in `torch.nn.functional.cross_entropy`.
        group: the vocabulary-parallel process group (default: the world).
        vocab_start: the global index of this shard's first class.
        vocab_size: the global V; checked against the shards when given.
        z_loss, softcap, normalizer: as in `xentlib.functional.cross_entropy`.
        chunk_size: rows per chunk of the local work (default: that of the PyTorch backend, about 8 MiB of
            float32 per chunk).
        validate: exchange a small table so that bad use raises the same error on every rank (default). With
            False the call holds only the two merge collectives, checks only locally, and needs vocab_size.

    Collectives: 3 in forward (a small validation table, a MAX over rows, one SUM of stacked row statistics;
    2 with validate=False), none in backward. Every rank raises the same error on bad use (shards that do not
    tile the vocabulary, a target out of range or of the wrong dtype on any rank, ranks that disagree on
    shapes or options).

    Example: in a group of one rank, the shard is the whole vocabulary and the loss is `cross_entropy`'s. With
    two ranks and V = 5 split as 3 + 2, rank 0 passes ``logits[:, :3]`` with ``vocab_start=0`` and rank 1
    ``logits[:, 3:]`` with ``vocab_start=3``; both get the same loss::

        >>> logits, target = torch.randn(4, 5), torch.tensor([0, 4, 2, 1])
        >>> loss = vocab_parallel_cross_entropy(logits, target, vocab_start=0, label_smoothing=0.1)
        >>> torch.allclose(loss, torch.nn.functional.cross_entropy(logits, target, label_smoothing=0.1))
        True
    """
    group = resolve_group(FN, group)

    def local_call():
        return logits_shard, target, weight, False  # the backward pass holds no collective

    device = logits_shard.device if isinstance(logits_shard, Tensor) else torch.device("cpu")
    problem = prepare_shard(
        FN, group, device, local_call, ignore_index, reduction, label_smoothing,
        vocab_start=vocab_start, vocab_size=vocab_size, z_loss=z_loss, softcap=softcap, normalizer=normalizer,
        chunk_size=chunk_size, validate=validate,
    )  # fmt: skip
    return _VocabParallelCrossEntropy.apply(logits_shard, problem, chunk_size)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: merge the shards' row statistics (2 collectives) and make the gradient of the reduced loss
    wrt this shard; backward: scale it by grad_output, without communication."""

    @staticmethod
    def forward(ctx, logits_shard: Tensor, problem: ShardProblem, chunk_size: int | None):
        want_grad = ctx.needs_input_grad[0]
        rules, acc, group = problem.rules, problem.acc, problem.group
        z3 = problem.logits
        batch, classes, spatial = z3.shape
        row_max = all_reduce_max(local_row_max(z3, acc, rules.softcap), group)
        block = chunk_shape(batch, classes, spatial, chunk_size)
        if want_grad:
            exp_full = torch.empty(z3.shape, dtype=acc, device=z3.device)  # becomes the gradient
        else:
            exp_full = torch.empty((block[0], classes, block[1]), dtype=acc, device=z3.device)  # scratch
        partials = torch.empty((len(problem.slots()), batch, spatial), dtype=acc, device=z3.device)
        for rows, cols in iter_chunks(batch, spatial, block):
            exp_d = _exp_view(exp_full, want_grad, rows, cols, z3)
            partials[:, rows, cols] = local_partials(
                problem, z3[rows, :, cols], row_max[rows, :, cols], rows, cols, exp_d
            )
        all_reduce_partials(partials, group)
        everything = slice(None)
        stats = finish_rows(problem, partials, row_max, everything, everything)
        denominator = mean_denominator(problem, stats.target_weight)
        row_loss = stats.loss.squeeze(1)
        if rules.reduction == "none":
            loss = row_loss.reshape(rules.output_shape).to(rules.output_dtype)
        else:
            loss = (row_loss.sum() / denominator).to(rules.output_dtype)
        if want_grad:
            scale = 1.0 if rules.reduction == "none" else 1.0 / denominator
            for rows, cols in iter_chunks(batch, spatial, block):
                chunk_stats = stats.chunk(rows, cols)
                write_gradient(problem, chunk_stats, z3[rows, :, cols], exp_full[rows, :, cols], rows, cols, scale)
        ctx.grad = exp_full if want_grad else None
        ctx.reduction = rules.reduction
        ctx.input_shape, ctx.input_dtype = logits_shard.shape, logits_shard.dtype
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad, ctx.grad = ctx.grad, None
        if grad_loss is None:
            return None, None, None
        if grad is None:
            raise RuntimeError(f"{FN}: backward through the graph a second time is not supported")
        if ctx.reduction == "none":
            batch, _, spatial = grad.shape
            grad.mul_(grad_loss.reshape(batch, 1, spatial).to(grad.dtype))
        elif not (grad_loss.device.type == "cpu" and float(grad_loss) == 1.0):  # loss.backward(): nothing to do
            grad.mul_(grad_loss.to(grad.dtype))
        return grad.to(ctx.input_dtype).view(ctx.input_shape), None, None


def _exp_view(exp_full: Tensor, is_full: bool, rows: slice, cols: slice, z3: Tensor) -> Tensor:
    """Where exp(y - M) of a chunk goes: its place in the gradient buffer, or the start of the scratch."""
    if is_full:
        return exp_full[rows, :, cols]
    r = len(range(*rows.indices(z3.shape[0])))
    s = len(range(*cols.indices(z3.shape[2])))
    return exp_full[:r, :, :s]
