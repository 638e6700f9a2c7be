"""vocab_parallel_cross_entropy on 2 and 3 gloo ranks with uneven shards, against the unsharded loss.

References: torch's `F.cross_entropy` composed with the pinned extensions (softcap first, z_loss * lse^2 per
non-ignored row, normalizer dividing the sum), `xentlib.functional.cross_entropy`, and, where it applies,
PyTorch's own `loss_parallel()` on DTensor. Loss and the gradient wrt each rank's shard are compared under a
random grad_output.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from _launch import count_all_reduces, run_ranks, shard_bounds  # noqa: E402
from _reference import VOCAB, make_case, torch_reference  # noqa: E402

import xentlib.functional as XF  # noqa: E402
from xentlib.distributed import vocab_parallel_cross_entropy, vocab_shard_range  # noqa: E402

F = torch.nn.functional
pytestmark = pytest.mark.distributed

# Uneven shard sizes per world size (V = 11); the 3-rank layout is also out of rank order in `start` below.
SIZES = {2: [7, 4], 3: [2, 5, 4]}
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-6)}


# (name, case options, loss options): every option of cross_entropy, every reduction, the extensions
CASES = [
    ("plain mean", dict(), dict()),
    ("sum", dict(), dict(reduction="sum")),
    ("none", dict(), dict(reduction="none")),
    ("weight ignore mean", dict(weighted=True, ignore_rows=True), dict()),
    ("weight ignore none", dict(weighted=True, ignore_rows=True), dict(reduction="none")),
    ("smoothing", dict(ignore_rows=True), dict(label_smoothing=0.3)),
    ("weight smoothing mean", dict(weighted=True, ignore_rows=True), dict(label_smoothing=0.2)),
    ("weight smoothing sum", dict(weighted=True), dict(label_smoothing=0.1, reduction="sum")),
    ("smoothing 1", dict(), dict(label_smoothing=1.0)),
    ("ignore_index 3", dict(), dict(ignore_index=3)),
    ("z_loss", dict(ignore_rows=True), dict(z_loss=1e-2)),
    ("softcap", dict(), dict(softcap=2.5)),
    (
        "everything",
        dict(weighted=True, ignore_rows=True),
        dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0),
    ),
    ("normalizer", dict(ignore_rows=True), dict(reduction="sum", normalizer=7.0)),
    ("normalizer tensor", dict(weighted=True), dict(reduction="sum", normalizer=torch.tensor(3.5))),
    ("prob mean", dict(prob=True), dict()),
    ("prob weight smoothing", dict(prob=True, weighted=True), dict(label_smoothing=0.2)),
    ("prob none z softcap", dict(prob=True), dict(reduction="none", z_loss=0.1, softcap=4.0)),
    ("prob sum normalizer", dict(prob=True, weighted=True), dict(reduction="sum", normalizer=2.0)),
    ("spatial (N, V, d1, d2)", dict(shape=(3, VOCAB, 2, 2), ignore_rows=True), dict(label_smoothing=0.1)),
    ("spatial prob", dict(shape=(2, VOCAB, 3), prob=True), dict(reduction="none")),
    ("unbatched (V,)", dict(shape=(VOCAB,)), dict()),
    ("all ignored mean", dict(), dict(ignore_index=-5)),  # patched below: every target ignored -> NaN
    ("float32", dict(dtype=torch.float32, weighted=True, ignore_rows=True), dict(label_smoothing=0.1)),
]


def _check_cases(rank, world, sizes, order):
    """Every case on this rank; returns the list of failures (empty when all match)."""
    start, end = shard_bounds_in_order(sizes, order, rank)
    failures = []
    for i, (name, case, options) in enumerate(CASES):
        case = dict(dict(shape=(6, VOCAB), dtype=torch.float64, prob=False, weighted=False, ignore_rows=False), **case)
        x, t, w = make_case(100 + i, **case)
        if name.startswith("all ignored"):
            t = torch.full_like(t, -5)
        class_dim = 0 if x.dim() == 1 else 1
        opts = dict(dict(ignore_index=-100, reduction="mean", label_smoothing=0.0), **options)
        extensions = {k: opts.pop(k) for k in ("z_loss", "softcap", "normalizer") if k in opts}
        shard = x.narrow(class_dim, start, end - start).clone().requires_grad_()
        t_shard = t.narrow(class_dim, start, end - start) if case["prob"] else t
        w_shard = None if w is None else w[start:end]
        try:
            ours = vocab_parallel_cross_entropy(
                shard, t_shard, w_shard, opts["ignore_index"], opts["reduction"], opts["label_smoothing"],
                group=None, vocab_start=start, vocab_size=VOCAB, chunk_size=4, **extensions,
            )  # fmt: skip
            full = x.clone().requires_grad_()
            ref = torch_reference(
                full, t, w, opts["ignore_index"], opts["reduction"], opts["label_smoothing"],
                extensions.get("z_loss", 0.0), extensions.get("softcap"), extensions.get("normalizer"),
            )  # fmt: skip
            full_xent = x.clone().requires_grad_()
            ref_xent = XF.cross_entropy(full_xent, t, w, **opts, **extensions)
            grad_out = torch.rand(ref.shape, generator=torch.Generator().manual_seed(i), dtype=ref.dtype) + 0.5
            (grad,) = torch.autograd.grad(ours, shard, grad_out)
            (ref_grad,) = torch.autograd.grad(ref, full, grad_out)
            (xent_grad,) = torch.autograd.grad(ref_xent, full_xent, grad_out)
            tol = TOL[x.dtype]
            assert ours.dtype == ref.dtype and ours.shape == ref.shape, (ours.dtype, ref.dtype, ours.shape)
            torch.testing.assert_close(ours, ref, equal_nan=True, **tol)
            torch.testing.assert_close(ours, ref_xent, equal_nan=True, **tol)
            torch.testing.assert_close(grad, ref_grad.narrow(class_dim, start, end - start), **tol)
            torch.testing.assert_close(grad, xent_grad.narrow(class_dim, start, end - start), **tol)
        except Exception as error:  # noqa: BLE001 - collected and reported with the case name
            failures.append(f"rank {rank} case {name!r}: {type(error).__name__}: {error}")
    return failures


def shard_bounds_in_order(sizes, order, rank):
    """Shards laid out in the vocabulary in `order` (a permutation of ranks), not necessarily rank order."""
    position = order.index(rank)
    start = sum(sizes[r] for r in order[:position])
    return start, start + sizes[rank]


@pytest.mark.parametrize("world", [2, 3])
def test_matches_unsharded_for_every_option(world):
    order = list(range(world)) if world == 2 else [1, 2, 0]  # 3 ranks: rank 0 holds the LAST classes
    failures = run_ranks(_check_cases, world, SIZES[world], order)
    flat = [f for per_rank in failures for f in per_rank]
    assert not flat, "\n".join(flat)


def _bf16_case(rank, world):
    """bfloat16 logits: the sharded loss is as close to a float64 evaluation as torch's own bf16 result."""
    start, end = shard_bounds(SIZES[world], rank)
    x, t, _ = make_case(7, (64, VOCAB), torch.float64, False, False, True)
    xb = x.to(torch.bfloat16)
    ours = vocab_parallel_cross_entropy(xb[:, start:end], t, vocab_start=start, label_smoothing=0.1)
    exact = F.cross_entropy(xb.double(), t, label_smoothing=0.1)
    theirs = F.cross_entropy(xb, t, label_smoothing=0.1)
    return float((ours.double() - exact).abs()), float((theirs.double() - exact).abs()), ours.dtype


def test_bfloat16_error_at_most_torchs():
    for ours_error, torch_error, dtype in run_ranks(_bf16_case, 2):
        assert dtype == torch.bfloat16
        assert ours_error <= torch_error + 4e-3, (ours_error, torch_error)


def _loss_parallel_case(rank, world):
    """PyTorch's loss_parallel() on a DTensor sharded with Shard(1) as a second reference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import loss_parallel

    mesh = init_device_mesh("cpu", (world,))
    start, size = vocab_shard_range(VOCAB, world, rank)
    results = []
    for name, weighted, ignore_rows, reduction in [
        ("plain", False, False, "mean"),
        ("ignore sum", False, True, "sum"),
        ("ignore none", False, True, "none"),
        ("weight mean", True, False, "mean"),
    ]:
        x, t, w = make_case(3, (5, VOCAB), torch.float64, False, weighted, ignore_rows)
        logits = distribute_tensor(x, mesh, [Shard(1)]).requires_grad_()
        assert logits.to_local().shape[1] == size, "vocab_shard_range must match DTensor's Shard(1) layout"
        with loss_parallel():
            w_dt = None if w is None else distribute_tensor(w, mesh, [Replicate()])
            theirs = F.cross_entropy(logits, t, w_dt, reduction=reduction)
            grad_out = torch.rand(theirs.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype) + 0.5
            theirs.backward(distribute_tensor(grad_out, mesh, [Replicate()]))
        theirs_full = theirs.full_tensor() if hasattr(theirs, "full_tensor") else theirs
        shard = x[:, start : start + size].clone().requires_grad_()
        ours = vocab_parallel_cross_entropy(
            shard, t, None if w is None else w[start : start + size], reduction=reduction, vocab_start=start
        )
        ours.backward(grad_out)
        torch.testing.assert_close(ours, theirs_full.detach(), rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(shard.grad, logits.grad.to_local(), rtol=1e-10, atol=1e-12, msg=name)
        results.append(name)
    return results


@pytest.mark.parametrize("world", [2, 3])
def test_matches_torch_loss_parallel(world):
    try:
        from torch.distributed.tensor.parallel import loss_parallel  # noqa: F401
    except ImportError:  # pragma: no cover - older torch
        pytest.skip("torch.distributed.tensor.parallel.loss_parallel is not available")

    results = run_ranks(_loss_parallel_case, world)
    assert all(len(r) == 4 for r in results)


def _count_collectives(rank, world, validate):
    """Number of all_reduce calls in forward and in backward."""
    start, end = shard_bounds(SIZES[world], rank)
    x, t, w = make_case(5, (40, VOCAB), torch.float64, False, True, True)
    shard = x[:, start:end].clone().requires_grad_()
    with count_all_reduces() as calls:
        loss = vocab_parallel_cross_entropy(
            shard, t, w[start:end], vocab_start=start, vocab_size=VOCAB, label_smoothing=0.1, chunk_size=8,
            validate=validate,
        )  # fmt: skip
        forward = calls["n"]
        loss.backward()
        backward = calls["n"] - forward
    expected = F.cross_entropy(x, t, w, label_smoothing=0.1)
    return forward, backward, float((loss - expected).abs())


@pytest.mark.parametrize("validate", [True, False])
def test_collective_count(validate):
    """Forward: [validation table] + MAX + one stacked SUM, whatever the chunking; backward: none."""
    for forward, backward, error in run_ranks(_count_collectives, 2, validate):
        assert (forward, backward) == (3 if validate else 2, 0)
        assert error < 1e-12
