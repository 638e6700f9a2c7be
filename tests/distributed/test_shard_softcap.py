"""Soft-capping with raw logits far above the cap, over vocabulary shards: the rows must be shifted by the max of
the CAPPED logits. Shifting by the raw max is exact in maths (any shift is) but, with raw logits of 1e4 and a cap
of 30, exp(y - max) underflows to 0 for every class and the loss becomes inf. The other distributed tests use
softcap only on moderate logits, where either shift gives the same numbers.

Truth: torch's `F.cross_entropy` of `softcap * tanh(x / softcap)` in float64 (tests/distributed/_reference.py).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from _launch import run_ranks  # noqa: E402
from _reference import make_case, torch_reference  # noqa: E402

from xentlib.distributed import (  # noqa: E402
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
    vocab_shard_range,
)

pytestmark = pytest.mark.distributed

ROWS, VOCAB, HIDDEN, SOFTCAP = 6, 11, 4, 30.0
TOL = dict(rtol=1e-5, atol=1e-5)


def _check(rank, world, linear):
    start, size = vocab_shard_range(VOCAB, world, rank)
    mine = slice(start, start + size)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(ROWS, HIDDEN, generator=g, dtype=torch.float64)
    W = 3000 * torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    _, t, _ = make_case(7, (ROWS, VOCAB), torch.float64, False, False, True)
    logits = x @ W.T  # raw logits of a few thousand, capped at 30
    if linear:
        leaves = [x.clone().requires_grad_(), W[mine].clone().requires_grad_()]
        ours = vocab_parallel_linear_cross_entropy(*leaves, t, vocab_start=start, softcap=SOFTCAP, chunk_size=4)
        full = [x.clone().requires_grad_(), W.clone().requires_grad_()]
        truth = torch_reference(full[0] @ full[1].T, t, None, -100, "mean", 0.0, 0.0, SOFTCAP, None)
        grads = torch.autograd.grad(ours, leaves)
        true_grads = torch.autograd.grad(truth, full)
        true_grads = (true_grads[0], true_grads[1][mine])
    else:
        leaves = [logits[:, mine].clone().requires_grad_()]
        ours = vocab_parallel_cross_entropy(leaves[0], t, vocab_start=start, softcap=SOFTCAP, chunk_size=4)
        full = [logits.clone().requires_grad_()]
        truth = torch_reference(full[0], t, None, -100, "mean", 0.0, 0.0, SOFTCAP, None)
        grads = torch.autograd.grad(ours, leaves)
        true_grads = (torch.autograd.grad(truth, full)[0][:, mine],)
    assert bool(torch.isfinite(truth)), "the truth itself must be finite"
    torch.testing.assert_close(ours, truth, **TOL)
    for ours_grad, true_grad in zip(grads, true_grads, strict=True):
        torch.testing.assert_close(ours_grad, true_grad, **TOL)
    return float(logits.abs().max())


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
def test_softcap_with_raw_logits_far_above_the_cap(world, linear):
    largest = run_ranks(_check, world, linear)
    assert min(largest) > 100 * SOFTCAP  # the case is extreme enough: exp(30 - largest) is 0 in float64
