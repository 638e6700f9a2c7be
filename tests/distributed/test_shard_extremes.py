"""Layouts and values that exercise the merge itself: logits so large that exp() overflows in float32 unless
every rank subtracts the GLOBAL row max, empty shards (V = 2 over 3 ranks), one-class shards, with ignored
rows, class weights, label smoothing, probability targets and every reduction.

Truth: torch's `F.cross_entropy` (with the pinned z-loss) on the full logits in float64, for the loss and the
gradient wrt each rank's shard (and, for the linear version, wrt the input, the weight shard and the bias).
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

ROWS, HIDDEN = 6, 4
# float32 against a float64 truth: a loss of a few hundred carries ~1e-5 of float32 rounding
TOL = dict(rtol=2e-6, atol=2e-5)

# (name, vocabulary, world): the shards are vocab_shard_range's (torch.chunk's) layout
LAYOUTS = [
    ("2 uneven shards", 11, 2),  # 6 + 5
    ("an empty shard", 2, 3),  # 1 + 1 + 0
    ("one-class shards", 3, 3),  # 1 + 1 + 1
]
# (name, case flags, loss options)
CASES = [
    ("mean", dict(), dict()),
    ("weight ignore smoothing", dict(weighted=True, ignore_rows=True), dict(label_smoothing=0.2)),
    ("none ignore", dict(ignore_rows=True), dict(reduction="none")),
    ("sum smoothing 1 z_loss", dict(weighted=True), dict(reduction="sum", label_smoothing=1.0, z_loss=1e-4)),
    ("prob smoothing", dict(prob=True), dict(label_smoothing=0.1)),
    ("prob weight none", dict(prob=True, weighted=True), dict(reduction="none")),
]


def _options(options):
    return dict(dict(ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0), **options)


def _truth(x, t, w, options):
    """torch's loss of the full logits `x` in x's dtype (float64 for the truth)."""
    o = _options(options)
    w = None if w is None else w.to(x.dtype)
    t = t.to(x.dtype) if t.is_floating_point() else t
    return torch_reference(x, t, w, o["ignore_index"], o["reduction"], o["label_smoothing"], o["z_loss"], None, None)


def _check_vocab_parallel(rank, world, vocab, scale):
    start, size = vocab_shard_range(vocab, world, rank)
    failures = []
    for i, (name, flags, options) in enumerate(CASES):
        case = dict(dict(prob=False, weighted=False, ignore_rows=False), **flags)
        x, t, w = make_case(200 + i, (ROWS, vocab), torch.float32, scale=scale, **case)
        try:
            shard = x[:, start : start + size].clone().requires_grad_()
            t_shard = t[:, start : start + size] if case["prob"] else t
            w_shard = None if w is None else w[start : start + size]
            ours = vocab_parallel_cross_entropy(shard, t_shard, w_shard, vocab_start=start, chunk_size=4, **options)
            full = x.double().requires_grad_()
            truth = _truth(full, t, w, options)
            grad_out = torch.rand(truth.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) + 0.5
            (grad,) = torch.autograd.grad(ours, shard, grad_out.float())
            (true_grad,) = torch.autograd.grad(truth, full, grad_out)
            assert ours.dtype == torch.float32 and ours.shape == truth.shape
            torch.testing.assert_close(ours.double(), truth, **TOL)
            torch.testing.assert_close(grad.double(), true_grad[:, start : start + size], **TOL)
        except Exception as error:  # noqa: BLE001 - collected and reported with the case name
            failures.append(f"rank {rank} case {name!r}: {type(error).__name__}: {error}")
    return failures


@pytest.mark.parametrize("scale", [3.0, 100.0], ids=["moderate", "large logits"])
@pytest.mark.parametrize("layout, vocab, world", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_vocab_parallel_against_float64_torch(layout, vocab, world, scale):
    failures = [f for per_rank in run_ranks(_check_vocab_parallel, world, vocab, scale) for f in per_rank]
    assert not failures, "\n".join(failures)


def test_large_logits_overflow_without_the_max_shift():
    """The large cases are extreme enough: exp() of the logits overflows without a shift (float32 logits of
    scale 100; float64 linear logits from a weight of scale 1000)."""
    x, _, _ = make_case(200, (ROWS, 11), torch.float32, False, False, False, scale=100.0)
    assert torch.isinf(x.exp()).any()
    g = torch.Generator().manual_seed(300)
    x = torch.randn(ROWS, HIDDEN, generator=g, dtype=torch.float64)
    W = 1000 * torch.randn(2, HIDDEN, generator=g, dtype=torch.float64)  # as _check_linear's first case, V = 2
    assert torch.isinf((x @ W.T).exp()).any()


def _check_linear(rank, world, vocab):
    """float64 with logits x @ W.T + b of a few thousand, so that exp() overflows even float64 without the
    shift (float32 logits of that size are rounded by ~1e-4, which would blur the comparison)."""
    start, size = vocab_shard_range(vocab, world, rank)
    mine = slice(start, start + size)
    failures = []
    for i, (name, flags, options) in enumerate(CASES):
        case = dict(dict(prob=False, weighted=False, ignore_rows=False), **flags)
        g = torch.Generator().manual_seed(300 + i)
        x = torch.randn(ROWS, HIDDEN, generator=g, dtype=torch.float64)
        W = 1000 * torch.randn(vocab, HIDDEN, generator=g, dtype=torch.float64)
        b = torch.randn(vocab, generator=g, dtype=torch.float64)
        _, t, w = make_case(300 + i, (ROWS, vocab), torch.float64, **case)
        try:
            leaves = [x.clone().requires_grad_(), W[mine].clone().requires_grad_(), b[mine].clone().requires_grad_()]
            ours = vocab_parallel_linear_cross_entropy(
                *leaves[:2], t[:, mine] if case["prob"] else t, leaves[2], vocab_start=start,
                class_weight=None if w is None else w[mine], chunk_size=4, **options,
            )  # fmt: skip
            full = [x.clone().requires_grad_(), W.clone().requires_grad_(), b.clone().requires_grad_()]
            truth = _truth(full[0] @ full[1].T + full[2], t, w, options)
            grad_out = torch.rand(truth.shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64) + 0.5
            grads = torch.autograd.grad(ours, leaves, grad_out)
            true_grads = torch.autograd.grad(truth, full, grad_out)
            tol = dict(rtol=1e-9, atol=1e-9 * float(truth.abs().max()))
            torch.testing.assert_close(ours, truth, **tol)
            torch.testing.assert_close(grads[0], true_grads[0], rtol=1e-9, atol=1e-6)
            torch.testing.assert_close(grads[1], true_grads[1][mine], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(grads[2], true_grads[2][mine], rtol=1e-9, atol=1e-9)
        except Exception as error:  # noqa: BLE001 - collected and reported with the case name
            failures.append(f"rank {rank} case {name!r}: {type(error).__name__}: {error}")
    return failures


@pytest.mark.parametrize("layout, vocab, world", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_linear_large_logits_against_float64_torch(layout, vocab, world):
    failures = [f for per_rank in run_ranks(_check_linear, world, vocab) for f in per_rank]
    assert not failures, "\n".join(failures)
