"""Cross-entropy of x W^T + b with the output layer W (V, D) sharded over the vocabulary across ranks.

Rank r holds W_r = W[a : a + C_r] and b_r; the input x (N, D) is replicated. Token chunks of R rows:

    Z_r = x_chunk W_r^T + b_r                 (R, C_r), never more than one chunk of it
    merge the row statistics of Z_r with the other ranks (all-reduce MAX, then ONE all-reduce SUM), as in
    `vocab_parallel_cross_entropy` (see _shard.py), and make dZ_r = dl/dZ_r from them
    dX_partial[chunk] = dZ_r W_r,   dW_r += dZ_r^T x_chunk,   db_r += sum_rows dZ_r   (float32 accumulators)

The weight and bias gradients are local. The input gradient is the sum over ranks of dZ_r W_r, so the backward
pass holds ONE all-reduce of dX_partial (N, D). With reduction='none' the per-row grad_output is only known in
backward, so the forward keeps the merged row statistics (a few numbers a row) and the backward recomputes
each chunk's logits locally (no new statistics to merge) before the same single all-reduce.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.distributed._prepare import check_same_device, prepare_shard, resolve_group
from xentlib.distributed._shard import (
    RowStats,
    ShardProblem,
    all_reduce_max,
    all_reduce_partials,
    capped,
    finish_rows,
    local_partials,
    local_row_max,
    mean_denominator,
    write_gradient,
)

FN = "vocab_parallel_linear_cross_entropy"
# Logit elements per chunk by default: 2**22 float32 (16 MiB), at least 512 rows when the shard allows.
CHUNK_ELEMENTS = 1 << 22


# The options repeat `vocab_parallel_cross_entropy`'s (and so torch's cross_entropy's): public keyword signatures.
def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    bias_shard: Tensor | None = None,
    *,
    group=None,
    vocab_start: int,
    vocab_size: int | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | Tensor | None = None,
    chunk_size: int | None = None,
    validate: bool = True,
) -> Tensor:
    """`cross_entropy(input @ W.T + b, target, ...)` with W, b sharded over the vocabulary across `group`.

    Args:
        input: (..., D), the same on every rank (replicated activations).
        weight_shard: (C_r, D), rows ``[vocab_start, vocab_start + C_r)`` of the output layer's weight.
        target: GLOBAL class indices of shape (...), the same on every rank; or this rank's shard of class
            probabilities, of shape (..., C_r).
        bias_shard: (C_r,) or None.
        class_weight: this rank's slice of the class weight, (C_r,), or None.
        Other arguments: as in `vocab_parallel_cross_entropy`; classes are on the last dimension.
        chunk_size: rows (tokens) per chunk (default: about 16 MiB of float32 logits per chunk).
        validate: as in `vocab_parallel_cross_entropy` (False skips the validation all-reduce).

    Collectives: forward = 1 validation all-reduce + 2 per token chunk (MAX, SUM); backward = 1 all-reduce of
    the input gradient (none when the input does not require grad).
    """
    group = resolve_group(FN, group)
    shape = {}

    def local_call():
        _check_linear_args(input, weight_shard, bias_shard)
        rows = math.prod(input.shape[:-1])
        local = weight_shard.shape[0]
        lead = tuple(input.shape[:-1])
        logits_shape = (rows, local) if input.dim() > 1 else (local,)
        stand_in = input.new_empty(()).expand(logits_shape)  # the logits shard's shape, without its memory
        if tuple(target.shape) == lead + (local,):
            flat_target = target.reshape(logits_shape)
        elif tuple(target.shape) == lead:
            flat_target = target.reshape(logits_shape[:1] if input.dim() > 1 else ())
        else:
            raise ValueError(
                f"{FN}: target must have shape {lead} (class indices) or {lead + (local,)} (probabilities of "
                f"this rank's classes), got {tuple(target.shape)}"
            )
        shape.update(lead=lead, target=flat_target)
        # the backward pass all-reduces the input gradient: every rank must take part or none
        return stand_in, flat_target, class_weight, input.requires_grad and torch.is_grad_enabled()

    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    problem = prepare_shard(
        FN, group, device, local_call, ignore_index, reduction, label_smoothing,
        vocab_start=vocab_start, vocab_size=vocab_size, z_loss=z_loss, softcap=softcap, normalizer=normalizer,
        chunk_size=chunk_size, validate=validate,
    )  # fmt: skip
    loss = _VocabParallelLinearCrossEntropy.apply(
        input, weight_shard, bias_shard, problem, _rows_per_chunk(problem, chunk_size)
    )
    if problem.rules.reduction == "none":
        return loss.reshape(shape["lead"])
    return loss


def _check_linear_args(input, weight_shard, bias_shard) -> None:
    sem.check_tensor(FN, "input", 1, input)
    sem.check_tensor(FN, "weight_shard", 2, weight_shard)
    sem.check_tensor(FN, "bias_shard", 4, bias_shard, optional=True)
    check_same_device(input, weight_shard=weight_shard, bias_shard=bias_shard)
    if input.dim() == 0 or weight_shard.dim() != 2 or input.shape[-1] != weight_shard.shape[1]:
        raise ValueError(
            f"{FN}: input (..., D) and weight_shard (C_r, D) do not match: {tuple(input.shape)} and "
            f"{tuple(weight_shard.shape)}"
        )
    if bias_shard is not None and tuple(bias_shard.shape) != (weight_shard.shape[0],):
        raise ValueError(f"{FN}: bias_shard must have shape ({weight_shard.shape[0]},), got {tuple(bias_shard.shape)}")
    sem.check_floating_input("linear", input)
    for name, tensor in (("weight_shard", weight_shard), ("bias_shard", bias_shard)):
        if tensor is not None and tensor.dtype != input.dtype:
            raise RuntimeError(
                f"{FN}: {name} has dtype {tensor.dtype} but the input has {input.dtype} (they must match)"
            )


def _rows_per_chunk(problem: ShardProblem, chunk_size: int | None) -> int:
    """Rows per token chunk, the same on every rank (each chunk holds two collectives): from the size of an
    even shard of the global vocabulary, never from this rank's own shard size."""
    if chunk_size is not None:
        return chunk_size
    even_shard = -(-problem.vocab_size // dist.get_world_size(problem.group))
    return max(512, CHUNK_ELEMENTS // max(even_shard, 1))


def _fields_of(stats: RowStats) -> tuple[Tensor, ...]:
    return (stats.row_max, stats.sum_exp, stats.lse, stats.coef, stats.target_weight, stats.loss)


def _chunk_logits(x2: Tensor, weight: Tensor, bias: Tensor | None, rows: slice) -> Tensor:
    """(R, C_r, 1) logits of a token chunk, in the input dtype (as x @ W.T + b rounds them)."""
    z = x2[rows] @ weight.T
    if bias is not None:
        z = z + bias
    return z.unsqueeze(2)


class _VocabParallelLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, problem: ShardProblem, chunk_rows: int):
        rules, acc, group = problem.rules, problem.acc, problem.group
        x2 = input.reshape(-1, input.shape[-1])
        rows_total, local = x2.shape[0], weight.shape[0]
        needs = ctx.needs_input_grad[:3]
        grad_now = any(needs) and rules.reduction != "none"
        accumulators = _Accumulators(x2, weight, bias, acc, needs) if grad_now else None
        exp_buffer = torch.empty((min(chunk_rows, rows_total), local, 1), dtype=acc, device=x2.device)
        saved = [torch.empty((rows_total, 1, 1), dtype=acc, device=x2.device) for _ in range(6)]
        stats_all = RowStats(*saved)
        keep = slice(None)
        for start in range(0, rows_total, chunk_rows):
            rows = slice(start, min(start + chunk_rows, rows_total))
            z = _chunk_logits(x2, weight, bias, rows)
            row_max = all_reduce_max(local_row_max(z, acc, rules.softcap), group)
            exp_d = exp_buffer[: z.shape[0]]
            partials = all_reduce_partials(local_partials(problem, z, row_max, rows, keep, exp_d).contiguous(), group)
            stats = finish_rows(problem, partials, row_max, rows, keep)
            for field, value in zip(saved, _fields_of(stats), strict=True):
                field[rows] = value
            if grad_now:  # unscaled dl/dZ (scale 1); the 1/denominator is applied once in backward
                dz = write_gradient(problem, stats, z, exp_d, rows, keep, 1.0)
                accumulators.add(dz.squeeze(2), x2[rows], rows)
        denominator = mean_denominator(problem, stats_all.target_weight)
        row_loss = stats_all.loss.reshape(-1)
        if rules.reduction == "none":
            loss = row_loss.to(rules.output_dtype)
            ctx.save_for_backward(input, weight, bias, *saved)
        else:
            loss = (row_loss.sum() / denominator).to(rules.output_dtype)
            ctx.save_for_backward(input, weight, bias)
        ctx.accumulators, ctx.problem, ctx.chunk_rows = accumulators, problem, chunk_rows
        ctx.scale = 1.0 / denominator
        ctx.set_materialize_grads(False)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        problem = ctx.problem
        input, weight, bias, *saved = ctx.saved_tensors
        if grad_loss is None:
            return None, None, None, None, None
        if problem.rules.reduction == "none":
            accumulators = _recompute(ctx, input, weight, bias, RowStats(*saved), grad_loss.reshape(-1, 1, 1))
            scale = 1.0
        else:
            accumulators, ctx.accumulators = ctx.accumulators, None
            if accumulators is None:
                raise RuntimeError(f"{FN}: backward through the graph a second time is not supported")
            scale = ctx.scale * grad_loss.to(ctx.scale.dtype)
        grads = accumulators.finish(scale, problem.group, input, weight, bias)
        return (*grads, None, None)


def _recompute(ctx, input, weight, bias, stats_all: RowStats, grad_rows: Tensor) -> _Accumulators:
    """reduction='none': dl/dZ per chunk from the saved merged statistics, times the per-row grad_output."""
    problem, chunk_rows = ctx.problem, ctx.chunk_rows
    acc, keep = problem.acc, slice(None)
    x2 = input.reshape(-1, input.shape[-1])
    accumulators = _Accumulators(x2, weight, bias, acc, ctx.needs_input_grad[:3])
    for start in range(0, x2.shape[0], chunk_rows):
        rows = slice(start, min(start + chunk_rows, x2.shape[0]))
        z = _chunk_logits(x2, weight, bias, rows)
        stats = stats_all.chunk(rows, keep)
        exp_d = capped(z, acc, problem.rules.softcap).sub_(stats.row_max).exp_()
        dz = write_gradient(problem, stats, z, exp_d, rows, keep, grad_rows[rows].to(acc))
        accumulators.add(dz.squeeze(2), x2[rows], rows)
    return accumulators


class _Accumulators:
    """float32 (float64 for float64 inputs) sums of dX_partial = dZ W_r, dW_r = dZ^T x, db_r = sum_rows dZ."""

    def __init__(self, x2: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype, needs):
        self.needs = needs
        self.weight_acc = weight.detach().to(acc) if needs[0] else None
        self.dx = torch.zeros(x2.shape, dtype=acc, device=x2.device) if needs[0] else None
        self.dw = torch.zeros(weight.shape, dtype=acc, device=x2.device) if needs[1] else None
        self.db = torch.zeros(weight.shape[0], dtype=acc, device=x2.device) if needs[2] and bias is not None else None

    def add(self, dz: Tensor, x_rows: Tensor, rows: slice) -> None:
        if self.dx is not None:
            torch.mm(dz, self.weight_acc, out=self.dx[rows])
        if self.dw is not None:
            self.dw.addmm_(dz.T, x_rows.detach().to(dz.dtype))
        if self.db is not None:
            self.db += dz.sum(0)

    def finish(self, scale, group, input, weight, bias):
        grad_input = grad_weight = grad_bias = None
        if self.dx is not None:
            # Before: dx[n] = sum over THIS rank's classes c of dl_n/dz_nc W[c] (unscaled for 'mean'/'sum').
            # After:  the sum over the whole vocabulary, i.e. dl_n/dx_n, identical on every rank.
            dist.all_reduce(self.dx, op=dist.ReduceOp.SUM, group=group)
            grad_input = self.dx.mul_(scale).to(input.dtype).view(input.shape)
        if self.dw is not None:
            grad_weight = self.dw.mul_(scale).to(weight.dtype)
        if self.db is not None:
            grad_bias = self.db.mul_(scale).to(bias.dtype)
        return grad_input, grad_weight, grad_bias
