"""Cross-rank validation: either every rank of the group raises the same error, or none does.

A rank that raised alone would leave the others waiting in the next collective until the process group times
out. So each rank validates its own call locally, catches the error, and the ranks then exchange, in ONE small
all-reduce of a (world, FIELDS) int64 table, what each of them holds: its error flag, its shard of the
vocabulary, its row count, dtype and options, a checksum of its class-index target. Every rank reads the same
table, so every rank reaches the same verdict:

* some rank failed locally: the ranks exchange the error messages (all_gather_object, only on this error path)
  and every rank raises the first failing rank's exception type and message;
* the ranks disagree (shards that do not tile [0, V), different row counts, options or targets, a target
  beyond the global vocabulary): every rank raises the same error built from the table.

The table also guards the collectives that follow: their tensors have sizes computed from the row count and
the dtype, and ranks that disagreed on those would hang or corrupt each other's buffers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields

import torch
import torch.distributed as dist

_ERROR_TYPES = {cls.__name__: cls for cls in (IndexError, ValueError, TypeError, NotImplementedError, RuntimeError)}
_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("none", "mean", "sum")


def dtype_code(dtype: torch.dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def reduction_code(reduction: str) -> int:
    return _REDUCTIONS.index(reduction) if reduction in _REDUCTIONS else len(_REDUCTIONS)


def float_bits(value: float | None) -> int:
    """The float64 bit pattern of `value` as an int64 (-1 for None), so ranks compare options exactly."""
    return -1 if value is None else struct.unpack("<q", struct.pack("<d", float(value)))[0]


@dataclass
class RankRecord:
    """What one rank says about its call; every field must fit in int64."""

    vocab_start: int
    local_size: int
    batch: int
    spatial: int
    kind: int  # 0: class indices, 1: probabilities
    vocab_size: int  # the vocab_size argument, -1 when None
    dtype: int  # dtype_code of the logits
    acc_dtype: int
    reduction: int
    ignore_index: int
    smoothing: int  # float_bits
    z_loss: int
    softcap: int
    normalizer: int  # float_bits of a number normalizer, -2 for a tensor, -1 for None
    has_weight: int
    chunk_size: int  # -1 for None (the linear version holds two collectives per chunk)
    backward_collective: int  # 1 when the backward pass holds a collective every rank must join
    target_max: int  # largest non-ignored class index, -1 when none (class indices only)
    target_checksum: int  # sum_n (n + 1) * t_n over all rows, wrapping in int64 (class indices only)


FIELD_NAMES = [f.name for f in fields(RankRecord)]
# Options that every rank must pass identically (the tensors sized from them meet in the collectives).
SAME_ON_ALL_RANKS = [n for n in FIELD_NAMES if n not in ("vocab_start", "local_size", "target_max", "target_checksum")]


def target_checksum(target: torch.Tensor) -> int:
    """An order-sensitive fingerprint of a class-index target, to tell ranks that hold different targets."""
    flat = target.reshape(-1).long()
    positions = torch.arange(1, flat.numel() + 1, dtype=torch.long, device=flat.device)
    return int((flat * positions).sum())


def agree(
    fn: str,
    group,
    record: RankRecord | None,
    local_error: BaseException | None,
    device: torch.device,
) -> list[RankRecord]:
    """Exchange the records of all ranks (one all-reduce); raise the same error on every rank if any is wrong.

    Returns the records of all ranks, indexed by group rank, when all is well.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # table[r] holds rank r's [error flag, record fields...]; every other rank contributes zeros to that row,
    # so after the SUM every rank holds every rank's row.
    table = torch.zeros(world, 1 + len(FIELD_NAMES), dtype=torch.long, device=device)
    if local_error is None:
        try:
            table[rank, 1:] = torch.tensor([getattr(record, n) for n in FIELD_NAMES], dtype=torch.long)
        except Exception as caught:  # noqa: BLE001 - a value beyond int64: raised on every rank below
            local_error = caught
    table[rank, 0] = int(local_error is not None)
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    rows = table.tolist()
    if any(row[0] for row in rows):
        raise_everywhere(fn, group, local_error)
    records = [RankRecord(*row[1:]) for row in rows]
    problem = disagreement(records)
    if problem is not None:
        error_type, message = problem
        raise error_type(f"{fn}: {message}")
    return records


def raise_everywhere(fn: str, group, local_error: BaseException | None):
    """Some ranks of `group` hold an exception (every rank knows that some do): gather the messages and raise
    the first failing rank's exception type and message on every rank. Call it on every rank of the group."""
    mine = None if local_error is None else (type(local_error).__name__, str(local_error))
    messages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(messages, mine, group=group)
    failed = [r for r, message in enumerate(messages) if message is not None]
    first = failed[0] if failed else 0
    name, text = messages[first] if failed else ("RuntimeError", "invalid arguments")
    text = text.removeprefix(f"{fn}: ")
    error_type = _ERROR_TYPES.get(name, RuntimeError)
    others = f" (ranks {failed} failed)" if len(failed) > 1 else ""
    error = error_type(f"{fn}: rank {first}: {text}{others}")
    if local_error is not None:
        raise error from local_error
    raise error


def disagreement(records: list[RankRecord]) -> tuple[type[Exception], str] | None:
    """(exception type, message) if the ranks' calls do not form one vocabulary-parallel call, else None."""
    for name in SAME_ON_ALL_RANKS:
        values = [getattr(r, name) for r in records]
        if len(set(values)) > 1:
            return ValueError, _mismatch_message(name, values)
    shards = sorted((r.vocab_start, r.local_size, rank) for rank, r in enumerate(records))
    total = sum(size for _, size, _ in shards)
    vocab = records[0].vocab_size if records[0].vocab_size >= 0 else total
    position = 0
    for start, size, _ in shards:
        if start != position:
            break
        position += size
    if position != total or total != vocab:
        held = ", ".join(f"rank {rank}: [{start}, {start + size})" for start, size, rank in sorted(shards, key=_rank))
        return ValueError, (
            f"the vocabulary shards do not tile [0, {vocab}) exactly: {held}; sizes sum to {total}. Each "
            f"rank must pass vocab_start and a logits/weight shard such that the shards are disjoint and "
            f"cover every class once (is `group` the vocabulary-parallel group?)"
        )
    worst = max(records, key=lambda r: r.target_max)
    if records[0].kind == 0 and worst.target_max >= vocab:
        rank = records.index(worst)
        return IndexError, (
            f"Target {worst.target_max} is out of bounds (on rank {rank}; expected global class indices in "
            f"[0, {vocab - 1}] for a vocabulary of {vocab} classes, or ignore_index)"
        )
    if len({r.target_checksum for r in records}) > 1:
        return ValueError, _mismatch_message("target_checksum", [r.target_checksum for r in records])
    return None


def _readable(name: str, value: int):
    """A table entry as the caller wrote it: dtypes by name, options as floats."""
    if name in ("dtype", "acc_dtype"):
        return str(_DTYPES[value]) if value < len(_DTYPES) else "other"
    if name == "reduction":
        return _REDUCTIONS[value] if value < len(_REDUCTIONS) else "other"
    if name in ("smoothing", "z_loss", "softcap", "normalizer"):
        return None if value == -1 else struct.unpack("<d", struct.pack("<q", value))[0]
    return value


def _rank(shard):
    return shard[2]


def _mismatch_message(name: str, values: list[int]) -> str:
    if name == "target_checksum":
        return (
            "the ranks hold different class-index targets; every rank of the vocabulary-parallel group must "
            "pass the same target (global class indices)"
        )
    per_rank = ", ".join(f"rank {r}: {_readable(name, v)}" for r, v in enumerate(values))
    return f"the ranks disagree on {name} ({per_rank}); every rank must make the same call on its own shard"
