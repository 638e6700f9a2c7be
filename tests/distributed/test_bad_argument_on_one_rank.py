"""A bad argument on ONE rank only: every rank raises the same error at once, and the group stays in step.

Each scenario runs in a fresh process group with a short collective timeout, so a rank that raised alone
(leaving the others in a collective) fails the test quickly, by a timeout or by the ranks' different outcomes.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from _launch import run_ranks, shard_bounds  # noqa: E402
from _reference import VOCAB, make_case  # noqa: E402

from xentlib.distributed import (  # noqa: E402
    count_tokens,
    data_parallel_normalizer,
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)

dist = torch.distributed
pytestmark = pytest.mark.distributed

SIZES = {2: [6, 5], 3: [4, 4, 3]}
BAD_RANK = {2: 1, 3: 1}  # the middle rank of three: neither the first nor the last to reach a collective
HIDDEN = 3


def _vocab_call(rank, world, bad, **bad_options):
    """vocab_parallel_cross_entropy with `bad_options` on the bad rank only (weighted, some rows ignored)."""
    start, end = shard_bounds(SIZES[world], rank)
    x, t, w = make_case(1, (4, VOCAB), torch.float64, False, True, True)
    args = dict(logits=x[:, start:end].clone().requires_grad_(), target=t, weight=w[start:end], vocab_start=start)
    args.update(bad_options if bad else {})
    loss = vocab_parallel_cross_entropy(
        args.pop("logits"), args.pop("target"), args.pop("weight"), label_smoothing=0.1, **args
    )
    loss.backward()


def _linear_call(rank, world, bad, **bad_options):
    """vocab_parallel_linear_cross_entropy (forward and backward), `bad_options` on the bad rank only."""
    start, end = shard_bounds(SIZES[world], rank)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(10, HIDDEN, generator=g, dtype=torch.float64).requires_grad_()
    W = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    b = torch.randn(VOCAB, generator=g, dtype=torch.float64)
    t = torch.randint(0, VOCAB, (10,), generator=g)
    args = dict(input=x, weight_shard=W[start:end].clone().requires_grad_(), bias_shard=b[start:end], chunk_size=4)
    args.update(bad_options if bad else {})
    loss = vocab_parallel_linear_cross_entropy(
        args.pop("input"), args.pop("weight_shard"), t, args.pop("bias_shard"), vocab_start=start, **args
    )
    loss.backward()


def _count_call(rank, world, bad, function=count_tokens, **bad_options):
    t = torch.tensor([[rank, -100, 2], [1, 0, -100]])
    args = dict(targets=[t[0], t[1]], weight=torch.ones(4, dtype=torch.float64))
    args.update(bad_options if bad else {})
    function(args.pop("targets"), **args)


def _float_target(rank, world, bad):
    _count_call(rank, world, bad, targets=torch.rand(3))


def _meta(shape):
    return torch.empty(shape, dtype=torch.float64, device="meta")


# name -> (call(rank, world, bad), expected exception type, words of the message)
SCENARIOS = {
    "chunk_size=0": (lambda r, w, bad: _vocab_call(r, w, bad, chunk_size=0), ValueError, "chunk_size"),
    "vocab_start beyond int64": (lambda r, w, bad: _vocab_call(r, w, bad, vocab_start=2**63), ValueError, "2**63"),
    "weight shard on another device": (
        lambda r, w, bad: _vocab_call(r, w, bad, weight=_meta(SIZES[w][r])),
        RuntimeError,
        "same device",
    ),
    "reduction misspelt": (lambda r, w, bad: _vocab_call(r, w, bad, reduction="avg"), ValueError, "avg"),
    "linear chunk_size=0": (lambda r, w, bad: _linear_call(r, w, bad, chunk_size=0), ValueError, "chunk_size"),
    "linear chunk_size differs": (
        lambda r, w, bad: _linear_call(r, w, bad, chunk_size=3),  # 4 chunks of 10 rows against 3
        ValueError,
        "disagree on chunk_size",
    ),
    "linear input frozen on one rank": (
        lambda r, w, bad: _linear_call(r, w, bad, input=torch.zeros(10, HIDDEN, dtype=torch.float64)),
        ValueError,  # the others' backward all-reduces dX: all take part or none
        "disagree on backward_collective",
    ),
    "linear bias shard on another device": (
        lambda r, w, bad: _linear_call(r, w, bad, bias_shard=_meta(SIZES[w][r])),
        RuntimeError,
        "same device",
    ),
    "count_tokens float target": (_float_target, TypeError, "class-index targets"),
    "count_tokens no targets": (lambda r, w, bad: _count_call(r, w, bad, targets=[]), ValueError, "non-empty"),
    "count_tokens target beyond the weight": (
        lambda r, w, bad: _count_call(r, w, bad, weight=torch.ones(2, dtype=torch.float64)),
        IndexError,
        "out of bounds",
    ),
    "count_tokens ignore_index not an int": (
        lambda r, w, bad: _count_call(r, w, bad, ignore_index="pad"),
        TypeError,
        "ignore_index",
    ),
    "data_parallel_normalizer float target": (
        lambda r, w, bad: _count_call(r, w, bad, function=data_parallel_normalizer, targets=torch.rand(3)),
        TypeError,
        "class-index targets",
    ),
}


def _run_scenario(rank, world, name):
    call = SCENARIOS[name][0]
    try:
        call(rank, world, rank == BAD_RANK[world])
        outcome = None
    except Exception as error:  # noqa: BLE001 - compared across ranks by the test
        outcome = (type(error).__name__, str(error))
    # The group is still in step: one more collective gives every rank the sum of the ranks.
    mine = torch.tensor([float(rank)])
    dist.all_reduce(mine)
    return outcome, float(mine)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_bad_argument_on_one_rank_raises_everywhere(name, world):
    _, error_type, words = SCENARIOS[name]
    per_rank = run_ranks(_run_scenario, world, name, timeout=12.0, collective_timeout=4.0)
    outcomes = [outcome for outcome, _ in per_rank]
    assert all(o is not None for o in outcomes), f"some rank did not raise: {outcomes}"
    assert len(set(outcomes)) == 1, f"the ranks raised different errors: {outcomes}"
    raised_type, message = outcomes[0]
    assert raised_type == error_type.__name__, message
    assert words in message and f"rank {BAD_RANK[world]}" in message, message
    assert all(total == sum(range(world)) for _, total in per_rank), per_rank
