"""Exact global token means under data parallelism and gradient accumulation.

2 ranks x 2 accumulation steps, micro-batches with very different numbers of ignored tokens: with
`normalizer=data_parallel_normalizer(...)` the DDP (and FSDP) gradient equals the single-process full-batch
gradient of the token mean; the usual per-micro-batch mean (divided by the number of steps) does not, which
shows the comparison can fail.
"""

from __future__ import annotations

import contextlib
import copy

import pytest

torch = pytest.importorskip("torch")
from _launch import run_ranks  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import xentlib.functional as XF  # noqa: E402
from xentlib.distributed import count_tokens, data_parallel_normalizer, vocab_shard_range  # noqa: E402

F = torch.nn.functional
dist = torch.distributed
pytestmark = pytest.mark.distributed

HIDDEN, CLASSES, BATCH, STEPS = 4, 6, 6, 2


def _data(world):
    """Inputs and targets of every (rank, step) micro-batch; micro-batch i has i % BATCH ignored tokens."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(world, STEPS, BATCH, HIDDEN, generator=g, dtype=torch.float64)
    t = torch.randint(0, CLASSES, (world, STEPS, BATCH), generator=g)
    for i, micro in enumerate(t.view(-1, BATCH)):
        micro[: (3 * i + 1) % BATCH] = -100
    weight = torch.rand(CLASSES, generator=g, dtype=torch.float64) + 0.5
    return x, t, weight


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(HIDDEN, CLASSES, dtype=torch.float64)


def _full_batch_grads(model, x, t, weight):
    """The single-process reference: the token mean over every micro-batch of every rank."""
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x.reshape(-1, HIDDEN)), t.reshape(-1), weight).backward()
    return [p.grad for p in reference.parameters()]


def _accumulate(wrapped, rank, x, t, weight, recipe, no_sync):
    """STEPS forward/backward passes on this rank's micro-batches, syncing gradients on the last one only."""
    if recipe == "global":
        normalizer = data_parallel_normalizer([t[rank, k] for k in range(STEPS)], weight=weight)
    for k in range(STEPS):
        context = no_sync() if k < STEPS - 1 else contextlib.nullcontext()
        with context:
            logits = wrapped(x[rank, k])
            if recipe == "global":
                loss = XF.cross_entropy(logits, t[rank, k], weight, reduction="sum", normalizer=normalizer)
            else:  # the usual mistake: a mean per micro-batch, averaged over steps (and by DDP over ranks)
                loss = F.cross_entropy(logits, t[rank, k], weight) / STEPS
            loss.backward()


def _max_difference(got, expected) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(got, expected, strict=True))


def _ddp_case(rank, world):
    x, t, weight = _data(world)
    errors = {}
    for recipe in ("global", "naive"):
        for w in (None, weight):
            model = _model()
            expected = _full_batch_grads(model, x, t, w)
            ddp = DistributedDataParallel(model)
            _accumulate(ddp, rank, x, t, w, recipe, ddp.no_sync)
            got = [p.grad for p in ddp.module.parameters()]
            errors[(recipe, w is not None)] = _max_difference(got, expected)
    return errors


def test_ddp_accumulation_equals_full_batch_gradient():
    for errors in run_ranks(_ddp_case, 2):
        assert errors[("global", False)] < 1e-12, errors
        assert errors[("global", True)] < 1e-12, errors
        assert errors[("naive", False)] > 1e-3, f"the naive recipe should differ (test too weak): {errors}"
        assert errors[("naive", True)] > 1e-3, f"the naive recipe should differ (test too weak): {errors}"


def _fsdp_case(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x, t, weight = _data(world)
    model = _model()
    expected = _full_batch_grads(model, x, t, weight)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))

    @contextlib.contextmanager
    def no_sync():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    _accumulate(model, rank, x, t, weight, "global", no_sync)
    got = [p.grad.full_tensor() for p in model.parameters()]
    return _max_difference(got, expected)


def test_fsdp_accumulation_equals_full_batch_gradient():
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:  # pragma: no cover - older torch
        pytest.skip("torch.distributed.fsdp.fully_shard is not available")
    for error in run_ranks(_fsdp_case, 2):
        assert error < 1e-12


def _count_case(rank, world):
    x, t, weight = _data(world)
    mine = [t[rank, k] for k in range(STEPS)]
    return (
        float(count_tokens(mine)),
        float(count_tokens(mine, weight=weight)),
        float(data_parallel_normalizer(mine)),
        float(data_parallel_normalizer(mine, gradients_averaged=False)),
    )


@pytest.mark.parametrize("world", [2, 3])
def test_count_tokens_over_ranks_and_micro_batches(world):
    _, t, weight = _data(world)
    valid = t != -100
    expected_count = float(valid.sum())
    expected_weighted = float(weight[t.clamp_min(0)][valid].sum())
    for count, weighted, averaged, summed in run_ranks(_count_case, world):
        assert count == expected_count
        assert weighted == pytest.approx(expected_weighted, rel=1e-14)
        assert averaged == pytest.approx(expected_count / world, rel=1e-14)
        assert summed == expected_count


def test_count_tokens_without_process_group():
    t = torch.tensor([[1, -100, 2], [-100, -100, 0]])
    assert float(count_tokens([t[0], t[1]])) == 3.0
    assert float(count_tokens(t, ignore_index=0)) == 5.0
    assert float(count_tokens(t[0], weight=torch.tensor([1.0, 2.0, 4.0]))) == 6.0
    with pytest.raises(TypeError, match="class-index targets"):
        count_tokens(torch.rand(3))


@pytest.mark.parametrize("vocab, world", [(11, 2), (11, 3), (7, 3), (2, 3), (50257, 8)])
def test_vocab_shard_range_is_torch_chunk(vocab, world):
    sizes = [c.numel() for c in torch.arange(vocab).chunk(world)]
    sizes += [0] * (world - len(sizes))
    starts = [sum(sizes[:r]) for r in range(world)]
    assert [vocab_shard_range(vocab, world, r) for r in range(world)] == list(zip(starts, sizes, strict=True))
