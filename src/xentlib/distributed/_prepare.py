"""Validation of a vocabulary-parallel call: torch's rules from `xentlib._semantics`, plus the shard layout.

The local rules are exactly `prepare_cross_entropy`'s: a class-index target is checked against a stand-in
for the GLOBAL logits (a stride-0 tensor of the global shape, no memory), so shapes, dtypes, ignore_index
and the range of the global class indices follow the single-device rules and messages. A probability target is
checked against the local shard, whose shape it must have. Then `_agree.agree` makes every rank raise the same
error, or none.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.distributed._agree import (
    RankRecord,
    agree,
    dtype_code,
    float_bits,
    reduction_code,
    target_checksum,
)
from xentlib.distributed._shard import ShardProblem


def resolve_group(fn: str, group):
    """The process group to use (the default group for None); this process must belong to it."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn} needs an initialized torch.distributed process group (dist.init_process_group)")
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError(f"{fn}: this process (global rank {dist.get_rank()}) is not a member of `group`")
    return group


def prepare_shard(
    fn: str,
    group,
    device: torch.device,
    local_call: Callable[[], tuple[Tensor, Tensor, Tensor | None, bool]],
    ignore_index,
    reduction,
    label_smoothing,
    *,
    vocab_start,
    vocab_size,
    z_loss,
    softcap,
    normalizer,
    chunk_size,
    validate: bool = True,
) -> ShardProblem:
    """Validate on this rank, agree with the other ranks (one small all-reduce), return the shard problem.

    `local_call()` returns (logits shard in the cross_entropy layout, target, class-weight shard, whether the
    backward pass holds a collective); it may raise, like any local check, and then every rank raises.
    With validate=False only the local checks run (no collective): a rank with bad input raises alone and the
    others wait in the next collective until the process group's timeout; vocab_size is then required.
    """

    def validate_here():
        logits, target, weight, backward_collective = local_call()
        return _prepare_local(
            fn, logits, target, weight, ignore_index, reduction, label_smoothing,
            vocab_start, vocab_size, z_loss, softcap, normalizer, chunk_size, backward_collective,
        )  # fmt: skip

    if not validate:
        if vocab_size is None:
            raise ValueError(f"{fn}: validate=False needs vocab_size (the ranks do not exchange shard sizes)")
        problem, _ = validate_here()
        problem.vocab_size, problem.group = vocab_size, group
        return problem
    problem = record = error = None
    try:
        problem, record = validate_here()
    except Exception as caught:  # noqa: BLE001 - re-raised on every rank by `agree`
        error = caught
    records = agree(fn, group, record, error, device)
    problem.vocab_size = sum(r.local_size for r in records)
    problem.group = group
    return problem


def _check_int(fn: str, name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not minimum <= value < 2**63:
        raise ValueError(f"{fn}: {name} must be an int in [{minimum}, 2**63), got {value!r}")
    return int(value)


def _prepare_local(
    fn, logits, target, weight, ignore_index, reduction, label_smoothing,
    vocab_start, vocab_size, z_loss, softcap, normalizer, chunk_size, backward_collective,
):  # fmt: skip
    reduction = sem.check_reduction(reduction)
    sem.check_tensor(fn, "input", 1, logits)
    sem.check_tensor(fn, "target", 2, target)
    sem.check_tensor(fn, "weight", 3, weight, optional=True)
    check_same_device(logits, target=target, weight=weight)
    vocab_start = _check_int(fn, "vocab_start", vocab_start, 0)
    if vocab_size is not None:
        vocab_size = _check_int(fn, "vocab_size", vocab_size, 1)
    if chunk_size is not None:
        chunk_size = _check_int(fn, "chunk_size (rows per chunk)", chunk_size, 1)
    if logits.dim() == 0:
        raise ValueError(f"{fn}: the logits shard needs a class dimension (got a 0-d tensor)")
    class_dim = sem.class_dim_of(logits)
    local_size = logits.shape[class_dim]
    options = dict(z_loss=z_loss, softcap=softcap, normalizer=normalizer)
    if logits.shape == target.shape:  # probabilities, sharded like the logits
        rules = sem.prepare_cross_entropy(logits, target, None, ignore_index, reduction, label_smoothing, **options)
        _check_weight_shard(fn, weight, local_size, logits, probabilities=True)
        if target.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{fn}: gradients wrt probability targets are not supported; pass target.detach()")
        shard_target = sem.as_rows(target)
    else:  # global class indices: checked against a stand-in of the global logits
        stand_in = _global_stand_in(logits, class_dim, _bound(vocab_start + local_size, vocab_size, target))
        rules = sem.prepare_cross_entropy(stand_in, target, None, ignore_index, reduction, label_smoothing, **options)
        _check_weight_shard(fn, weight, local_size, logits, probabilities=False)
        shard_target = rules.target
    if weight is not None:
        _promote_for_weight(rules, logits, target, weight)
    if rules.kind == "index" and bool(rules.valid.any()):
        target_max = int(rules.target[rules.valid].max())
    else:
        target_max = -1
    problem = ShardProblem(
        rules=rules,
        logits=sem.as_rows(logits),
        target=shard_target,
        class_weight=None if weight is None else weight.detach().to(rules.acc_dtype),
        vocab_start=vocab_start,
        local_size=local_size,
        vocab_size=-1,  # known after the ranks agree
        group=None,
    )
    batch, _, spatial = problem.logits.shape
    record = RankRecord(
        vocab_start=vocab_start,
        local_size=local_size,
        batch=batch,
        spatial=spatial,
        kind=0 if rules.kind == "index" else 1,
        vocab_size=-1 if vocab_size is None else vocab_size,
        dtype=dtype_code(logits.dtype),
        acc_dtype=dtype_code(rules.acc_dtype),
        reduction=reduction_code(reduction),
        ignore_index=sem.check_ignore_index(fn, ignore_index),
        smoothing=float_bits(rules.smoothing),
        z_loss=float_bits(rules.z_loss),
        softcap=float_bits(rules.softcap),
        normalizer=-1 if normalizer is None else float_bits(float(normalizer)),
        has_weight=int(weight is not None),
        chunk_size=-1 if chunk_size is None else chunk_size,
        backward_collective=int(bool(backward_collective)),
        target_max=target_max,
        target_checksum=target_checksum(rules.target) if rules.kind == "index" else 0,
    )
    return problem, record


def _bound(local_end: int, vocab_size: int | None, target: Tensor) -> int:
    """The class count to check indices against locally: the global V when given; otherwise large enough for
    every index this rank holds (the global bound is then checked once the ranks have agreed on V)."""
    if vocab_size is not None:
        return vocab_size
    if target.numel() and not target.is_floating_point() and not target.is_complex():
        return max(local_end, int(target.max()) + 1)
    return max(local_end, 1)


def _global_stand_in(logits: Tensor, class_dim: int, classes: int) -> Tensor:
    """A tensor with the global logits' shape, dtype and device that holds one element (all strides 0)."""
    shape = list(logits.shape)
    shape[class_dim] = classes
    return logits.new_empty(()).expand(shape)


def _check_weight_shard(fn: str, weight: Tensor | None, local_size: int, logits: Tensor, probabilities: bool):
    """The class weight is passed as this rank's slice weight[vocab_start : vocab_start + local_size]."""
    if weight is None:
        return
    if probabilities:
        if weight.requires_grad and torch.is_grad_enabled():
            raise ValueError(f"{fn}: gradients wrt the class weight are not supported; pass weight.detach()")
    else:
        sem.check_not_requires_grad("nll_loss_forward", "weight", weight)
    if weight.dim() != 1 or weight.numel() != local_size:
        raise RuntimeError(
            f"{fn}: the weight must be this rank's shard of the class weight, with the {local_size} "
            f"classes of its logits shard (weight[vocab_start : vocab_start + {local_size}]), but got "
            f"weight tensor of shape: {sem.shape_list(weight.shape)}"
        )
    if not probabilities and weight.dtype != logits.dtype:
        raise RuntimeError(
            f"expected scalar type {sem.dtype_name(logits.dtype)} but found {sem.dtype_name(weight.dtype)} "
            f"(the class weight must have the input's dtype)"
        )


def _promote_for_weight(rules: sem.CrossEntropyProblem, logits: Tensor, target: Tensor, weight: Tensor) -> None:
    """Probability targets promote with the weight's dtype, as in torch's composite path."""
    if rules.kind != "prob":
        return
    rules.output_dtype = torch.promote_types(rules.output_dtype, weight.dtype)
    acc = sem.accumulation_dtype(logits.dtype, target.dtype, weight.dtype)
    if acc != rules.acc_dtype:
        rules.acc_dtype = acc
        rules.denominator = rules.denominator.to(acc)
        rules.grad_scale = rules.grad_scale.to(acc)


def check_same_device(first: Tensor, **others: Tensor | None) -> None:
    """torch's rule for the tensors of one op, checked before the collectives (after them, a rank that raised
    alone would leave the others waiting)."""
    for name, tensor in others.items():
        if tensor is not None and tensor.device != first.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, {first.device} "
                f"and {tensor.device} ({name})"
            )
