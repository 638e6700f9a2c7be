"""The exact global token mean under gradient accumulation and data parallelism.

One optimizer step sees K micro-batches on each of R data-parallel ranks. The loss the step should minimize is
the mean over ALL of its non-ignored tokens (weighted by w[t] with class weights):

    L = sum_{r, k, n} l_{r,k,n} / T,        T = sum_{r, k, n} w[t_{r,k,n}]  (the count when unweighted)

Per-micro-batch 'mean' losses divide each micro-batch by its own count, so micro-batches with few real tokens
weigh as much as full ones: that is a different loss whenever the counts differ (padding, packing, masking).
Instead, count T once per step (`count_tokens`: one all-reduce of one number) and use
`cross_entropy(..., reduction='sum', normalizer=T)` on every micro-batch: gradients accumulate as sums, so
after K backward passes rank r holds dL_r/dtheta with L_r = sum_{k,n} l_{r,k,n} / T.

DDP (and FSDP, whose reduce-scatter also averages by default) then AVERAGES the ranks' gradients, dividing
by R: (1/R) sum_r dL_r = dL / R. Feeding `normalizer = T / R` instead (`data_parallel_normalizer`) cancels
that factor, so the averaged gradient is exactly dL/dtheta. Without gradient averaging (a plain all-reduce
SUM), use T itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def count_tokens(
    targets: Tensor | Sequence[Tensor],
    ignore_index: int = -100,
    weight: Tensor | None = None,
    group=None,
) -> Tensor:
    """Non-ignored class-index targets of all micro-batches and all ranks of `group`, as a 0-d float64 tensor.

    With a (full, unsharded) class weight, the sum of weight[t] over the non-ignored targets: the denominator
    of reduction='mean'. Without an initialized process group, the local count. Every rank of `group` must
    call it (it holds one all-reduce of one number) and gets the same value.
    """
    if isinstance(targets, Tensor):
        targets = [targets]
    if len(targets) == 0:
        raise ValueError("count_tokens needs at least one target tensor")
    device = targets[0].device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for target in targets:
        if target.is_floating_point() or target.is_complex():
            raise TypeError(
                f"count_tokens expects class-index targets (int64 or uint8), got {target.dtype}; probability "
                f"targets count rows: pass their number as the normalizer"
            )
        valid = target != ignore_index
        if weight is None:
            total += valid.sum()
        else:
            safe = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device)).long()
            picked = weight.detach().to(torch.float64)[safe]
            total += torch.where(valid, picked, torch.zeros((), dtype=torch.float64, device=device)).sum()
    if dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD if group is None else group
        if dist.get_world_size(group) > 1:
            # Before: this rank's (weighted) token count over its micro-batches.
            # After: the count over all ranks, identical on every rank.
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


def data_parallel_normalizer(
    targets: Tensor | Sequence[Tensor],
    ignore_index: int = -100,
    weight: Tensor | None = None,
    group=None,
    gradients_averaged: bool = True,
) -> Tensor:
    """`normalizer=` for reduction='sum' losses under DDP/FSDP so the averaged gradient is the full-batch one.

    `count_tokens(...) / world_size` when the data-parallel wrapper averages gradients over the `group` ranks
    (DDP and FSDP do by default); the plain count when it sums them.
    """
    count = count_tokens(targets, ignore_index, weight, group)
    if not gradients_averaged or not (dist.is_available() and dist.is_initialized()):
        return count
    return count / dist.get_world_size(dist.group.WORLD if group is None else group)


def vocab_shard_range(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """(vocab_start, local_size) of `rank` when V classes are split like `torch.chunk` (sizes ceil(V / world),
    the last shards smaller or empty): the layout of DTensor's Shard(dim) placement."""
    step = -(-vocab_size // world_size)
    start = min(rank * step, vocab_size)
    return start, min(step, vocab_size - start)
