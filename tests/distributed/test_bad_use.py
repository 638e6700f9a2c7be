"""Bad use of the vocabulary-parallel losses: every rank raises the same clear error, nobody hangs, and the
process group stays usable afterwards (the ranks left the failed call at the same collective)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from _launch import run_ranks, shard_bounds  # noqa: E402
from _reference import VOCAB, make_case  # noqa: E402

from xentlib.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy  # noqa: E402

dist = torch.distributed
pytestmark = pytest.mark.distributed

SIZES = {2: [6, 5], 3: [4, 4, 3]}


def _scenarios(rank, world):
    """(name, call) pairs; each call makes one rank (or the layout) wrong."""
    start, end = shard_bounds(SIZES[world], rank)
    x, t, w = make_case(1, (4, VOCAB), torch.float64, False, True, True)
    shard = x[:, start:end]
    last = world - 1

    def out_of_range(vocab_size):
        bad = t.clone()
        if rank == last:
            bad[1] = VOCAB + 3
        return lambda: vocab_parallel_cross_entropy(shard, bad, vocab_start=start, vocab_size=vocab_size)

    def one_rank(value, other):
        return value if rank == last else other

    group_of_two = dist.new_group([0, 1])  # every rank must take part in creating it
    other_target = t.clone()
    other_target[1] = (t[1] + 1) % VOCAB

    def call(logits=shard, target=t, weight=None, **options):
        options.setdefault("vocab_start", start)
        return lambda: vocab_parallel_cross_entropy(logits, target, weight, **options)

    def linear_call():
        x = torch.randn(4, 3, dtype=torch.float64)
        w = torch.randn(end - start, one_rank(2, 3), dtype=torch.float64)
        return vocab_parallel_linear_cross_entropy(x, w, t, vocab_start=start)

    return [
        ("sizes do not add up", call(vocab_size=20)),
        ("overlapping shards", call(vocab_start=0)),
        ("target out of range, V given", out_of_range(VOCAB)),
        ("target out of range, V inferred", out_of_range(None)),
        ("int32 target on one rank", call(target=one_rank(t.int(), t))),
        ("integer logits on one rank", call(logits=one_rank(shard.long(), shard))),
        ("float32 logits on one rank", call(logits=one_rank(shard.float(), shard))),
        ("fewer rows on one rank", call(logits=one_rank(shard[:3], shard), target=one_rank(t[:3], t))),
        ("different targets", call(target=one_rank(other_target, t))),
        ("full weight instead of its shard", call(weight=w)),
        ("different options", call(label_smoothing=one_rank(0.1, 0.0))),
        ("linear: weight shard of wrong width on one rank", linear_call),
        ("group that does not match the sharding", call(vocab_size=VOCAB, group=group_of_two)),
        ("probability target requiring grad", call(target=torch.rand_like(shard).requires_grad_())),
    ]


EXPECTED = {  # scenario -> (exception type, words in the message)
    "sizes do not add up": (ValueError, "do not tile [0, 20)"),
    "overlapping shards": (ValueError, "do not tile"),
    "target out of range, V given": (IndexError, "is out of bounds"),
    "target out of range, V inferred": (IndexError, "is out of bounds"),
    "int32 target on one rank": (RuntimeError, "expected target dtype to be Long or Byte, but got Int"),
    "integer logits on one rank": (NotImplementedError, "not implemented for 'Long'"),
    "float32 logits on one rank": (ValueError, "disagree on dtype"),
    "fewer rows on one rank": (ValueError, "disagree on batch"),
    "different targets": (ValueError, "different class-index targets"),
    "full weight instead of its shard": (RuntimeError, "this rank's shard of the class weight"),
    "different options": (ValueError, "disagree on smoothing"),
    "linear: weight shard of wrong width on one rank": (ValueError, "do not match"),
    "probability target requiring grad": (ValueError, "gradients wrt probability targets are not supported"),
}


def _run_bad_calls(rank, world):
    outcomes = {}
    for name, call in _scenarios(rank, world):
        try:
            call()
            outcomes[name] = None
        except Exception as error:  # noqa: BLE001 - compared across ranks by the test
            outcomes[name] = (type(error).__name__, str(error))
    # The group is still in step: a valid call afterwards gives the unsharded loss.
    start, end = shard_bounds(SIZES[world], rank)
    x, t, _ = make_case(2, (4, VOCAB), torch.float64, False, False, True)
    loss = vocab_parallel_cross_entropy(x[:, start:end], t, vocab_start=start)
    outcomes["valid call afterwards"] = float((loss - torch.nn.functional.cross_entropy(x, t)).abs())
    return outcomes


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_raises_the_same_error(world):
    per_rank = run_ranks(_run_bad_calls, world)
    for name, (error_type, words) in EXPECTED.items():
        outcomes = [r[name] for r in per_rank]
        assert all(o is not None for o in outcomes), f"{name}: some rank did not raise: {outcomes}"
        assert len(set(outcomes)) == 1, f"{name}: the ranks raised different errors: {outcomes}"
        raised_type, message = outcomes[0]
        assert raised_type == error_type.__name__, f"{name}: {raised_type}: {message}"
        assert words in message, f"{name}: {message!r} lacks {words!r}"
    for r in per_rank:
        assert r["valid call afterwards"] < 1e-12


def test_group_that_does_not_match_the_sharding():
    """3 ranks shard the vocabulary but pass a 2-rank group: its members find that their shards do not tile
    [0, V); the third rank is told it is not a member, before any collective."""
    per_rank = run_ranks(_run_bad_calls, 3)
    members = [r["group that does not match the sharding"] for r in per_rank[:2]]
    assert members[0] == members[1] and members[0][0] == "ValueError" and "do not tile" in members[0][1]
    outsider = per_rank[2]["group that does not match the sharding"]
    assert outsider[0] == "ValueError" and "not a member" in outsider[1]
