"""The exact global token mean under gradient accumulation and data parallelism.

One optimizer step sees K micro-batches on each of R data-parallel ranks. The loss the step should minimize is
the mean over ALL of its non-ignored tokens (weighted by w[t] with class weights):

    L = sum_{r, k, n} l_{r,k,n} / T,        T = sum_{r, k, n} w[t_{r,k,n}]  (the count when unweighted)

Per-micro-batch 'mean' losses divide each micro-batch by its own count, so micro-batches with few real tokens
weigh as much as full ones: that is a different loss whenever the counts differ (padding, packing, masking).
Instead, count T once per step (`count_tokens`: one all-reduce of two numbers, the count and an error flag) and use
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

from xentlib import _semantics as sem
from xentlib.distributed._agree import raise_everywhere

FN = "count_tokens"


def count_tokens(
    targets: Tensor | Sequence[Tensor],
    ignore_index: int = -100,
    weight: Tensor | None = None,
    group=None,
) -> Tensor:
    """Non-ignored class-index targets of all micro-batches and all ranks of `group`, as a 0-d float64 tensor.

    With a (full, unsharded) class weight, the sum of weight[t] over the non-ignored targets: the denominator
    of reduction='mean'. Without an initialized process group, the local count. Every rank of `group` must
    call it (it holds one all-reduce of two numbers) and gets the same value, or the same error when the
    arguments of any rank are wrong.

    Example (two micro-batches on one rank)::

        >>> count_tokens([torch.tensor([[5, 2, -100]]), torch.tensor([[-100, -100, 7]])])
        tensor(3., dtype=torch.float64)
    """
    group = _data_parallel_group(group)
    if group is None:
        return _local_count(targets, ignore_index, weight)
    error = None
    # Before: [this rank's (weighted) token count over its micro-batches, 1 if its arguments are wrong else 0].
    # After:  the sums over all ranks, identical on every rank: every rank returns the count or raises.
    count_and_errors = torch.zeros(2, dtype=torch.float64, device=_device_of(targets))
    try:
        count_and_errors[0] = _local_count(targets, ignore_index, weight)
    except Exception as caught:  # noqa: BLE001 - raised on every rank below
        error = caught
        count_and_errors[1] = 1.0
    dist.all_reduce(count_and_errors, op=dist.ReduceOp.SUM, group=group)
    if count_and_errors[1] > 0:
        raise_everywhere(FN, group, error)
    return count_and_errors[0].clone()


def _data_parallel_group(group):
    """The group to count over, or None to count locally (no process group, or a group of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError(f"{FN}: this process (global rank {dist.get_rank()}) is not a member of `group`")
    return group if dist.get_world_size(group) > 1 else None


def _device_of(targets) -> torch.device:
    """Where the count lives: the first target's device (the CPU when the arguments hold no tensor)."""
    if _is_sequence(targets) and len(targets) > 0:
        targets = targets[0]
    return targets.device if isinstance(targets, Tensor) else torch.device("cpu")


def _is_sequence(value) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str)


def _local_count(targets, ignore_index, weight) -> Tensor:
    """This rank's (weighted) count of non-ignored targets, as a 0-d float64 tensor; raises on bad arguments."""
    if isinstance(targets, Tensor):
        targets = [targets]
    if not _is_sequence(targets) or len(targets) == 0:
        raise ValueError(f"{FN} needs a target tensor or a non-empty sequence of them, got {targets!r}")
    ignore_index = sem.check_ignore_index(FN, ignore_index)
    if weight is not None and (not isinstance(weight, Tensor) or weight.dim() != 1 or not weight.is_floating_point()):
        raise ValueError(f"{FN}: weight must be the full class weight, a 1-D floating tensor, got {weight!r}")
    total = torch.zeros((), dtype=torch.float64, device=_device_of(targets))
    for target in targets:
        _check_target(target, ignore_index, weight)
        valid = target != ignore_index
        if weight is None:
            total += valid.sum()
        else:
            safe = torch.where(valid, target, torch.zeros((), dtype=target.dtype, device=target.device)).long()
            picked = weight.detach().to(torch.float64)[safe]
            total += torch.where(valid, picked, torch.zeros((), dtype=torch.float64, device=total.device)).sum()
    return total


def _check_target(target, ignore_index: int, weight: Tensor | None) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{FN} expects class-index target tensors, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"{FN} expects class-index targets (int64 or uint8), got {target.dtype}; probability "
            f"targets count rows: pass their number as the normalizer"
        )
    if weight is None:
        return
    valid = target[target != ignore_index]
    low, high = (int(valid.min()), int(valid.max())) if valid.numel() else (0, 0)
    if low < 0 or high >= weight.numel():
        bad = low if low < 0 else high
        raise IndexError(
            f"{FN}: Target {bad} is out of bounds (expected class indices in [0, {weight.numel() - 1}] for the "
            f"class weight of {weight.numel()} classes, or ignore_index)"
        )


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
    group = _data_parallel_group(group)
    if not gradients_averaged or group is None:
        return count
    return count / dist.get_world_size(group)


def vocab_shard_range(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """(vocab_start, local_size) of `rank` when V classes are split like `torch.chunk` (sizes ceil(V / world),
    the last shards smaller or empty): the layout of DTensor's Shard(dim) placement.

    Example (V = 10 over 4 ranks: shards of 3, 3, 3 and 1 classes)::

        >>> [vocab_shard_range(10, 4, rank) for rank in range(4)]
        [(0, 3), (3, 3), (6, 3), (9, 1)]
    """
    step = -(-vocab_size // world_size)
    start = min(rank * step, vocab_size)
    return start, min(step, vocab_size - start)
