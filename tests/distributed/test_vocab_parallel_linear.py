"""vocab_parallel_linear_cross_entropy on 2 and 3 gloo ranks: loss and the gradients wrt the input, the weight
shard and the bias shard equal those of the unsharded `cross_entropy(x @ W.T + b, ...)`; collective counts."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from _launch import count_all_reduces, run_ranks, shard_bounds  # noqa: E402
from _reference import VOCAB, torch_reference  # noqa: E402

from xentlib.distributed import vocab_parallel_linear_cross_entropy  # noqa: E402

pytestmark = pytest.mark.distributed

SIZES = {2: [3, 8], 3: [4, 4, 3]}
HIDDEN = 5

# (name, input lead shape, options, case flags)
CASES = [
    ("mean", (7,), dict(), dict()),
    ("sum bias", (7,), dict(reduction="sum"), dict(bias=True)),
    ("none (B, T)", (2, 4), dict(reduction="none"), dict(bias=True)),
    ("weight ignore smoothing", (9,), dict(label_smoothing=0.2), dict(weighted=True, ignore=True)),
    ("z softcap none", (6,), dict(reduction="none", z_loss=1e-2, softcap=3.0), dict(ignore=True)),
    ("normalizer", (2, 3), dict(reduction="sum", normalizer=4.0), dict(ignore=True, bias=True)),
    ("prob weight smoothing", (5,), dict(label_smoothing=0.1), dict(prob=True, weighted=True)),
    ("prob none", (2, 3), dict(reduction="none"), dict(prob=True, bias=True)),
    ("unbatched (D,)", (), dict(), dict()),
    ("frozen input", (7,), dict(), dict(input_grad=False)),
]


def _case_tensors(seed, lead, prob, weighted, ignore, bias):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, HIDDEN, generator=g, dtype=torch.float64)
    W = torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64)
    b = torch.randn(VOCAB, generator=g, dtype=torch.float64) if bias else None
    if prob:
        t = torch.softmax(torch.randn(*lead, VOCAB, generator=g, dtype=torch.float64), -1)
    else:
        t = torch.randint(0, VOCAB, lead, generator=g)
        if ignore:
            t.view(-1)[::2] = -100
    w = torch.rand(VOCAB, generator=g, dtype=torch.float64) + 0.3 if weighted else None
    return x, W, b, t, w


def _check_linear(rank, world, sizes):
    start, end = shard_bounds(sizes, rank)
    failures = []
    for i, (name, lead, options, flags) in enumerate(CASES):
        flags = dict(dict(prob=False, weighted=False, ignore=False, bias=False, input_grad=True), **flags)
        x, W, b, t, w = _case_tensors(10 + i, lead, flags["prob"], flags["weighted"], flags["ignore"], flags["bias"])
        try:
            xs = x.clone().requires_grad_(flags["input_grad"])
            Ws = W[start:end].clone().requires_grad_()
            bs = None if b is None else b[start:end].clone().requires_grad_()
            ts = t[..., start:end] if flags["prob"] else t
            ours = vocab_parallel_linear_cross_entropy(
                xs, Ws, ts, bs, vocab_start=start, class_weight=None if w is None else w[start:end],
                chunk_size=2, **options,
            )  # fmt: skip
            xr, Wr = x.clone().requires_grad_(), W.clone().requires_grad_()
            br = None if b is None else b.clone().requires_grad_()
            logits = xr @ Wr.T + (0 if br is None else br)
            flat_logits = logits.reshape(-1, VOCAB) if logits.dim() > 1 else logits
            flat_t = t.reshape(-1, VOCAB) if flags["prob"] and t.dim() > 1 else (t.reshape(-1) if t.dim() else t)
            opts = dict(dict(reduction="mean", label_smoothing=0.0), **options)
            ref = torch_reference(
                flat_logits, flat_t, w, -100, opts["reduction"], opts["label_smoothing"],
                opts.get("z_loss", 0.0), opts.get("softcap"), opts.get("normalizer"),
            )  # fmt: skip
            if opts["reduction"] == "none":
                ref = ref.reshape(lead)
            grad_out = torch.rand(ref.shape, generator=torch.Generator().manual_seed(i), dtype=ref.dtype) + 0.5
            ours_leaves = [t_ for t_ in (xs, Ws, bs) if t_ is not None and t_.requires_grad]
            ref_leaves = [
                t_ for t_, o in zip((xr, Wr, br), (xs, Ws, bs), strict=True) if o is not None and o.requires_grad
            ]
            ours_grads = torch.autograd.grad(ours, ours_leaves, grad_out)
            ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
            torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
            for leaf, mine, theirs in zip(ours_leaves, ours_grads, ref_grads, strict=True):
                if leaf is not xs:  # weight and bias: this rank's rows only
                    theirs = theirs[start:end]
                torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
        except Exception as error:  # noqa: BLE001 - collected and reported with the case name
            failures.append(f"rank {rank} case {name!r}: {type(error).__name__}: {error}")
    return failures


@pytest.mark.parametrize("world", [2, 3])
def test_linear_matches_unsharded(world):
    failures = [f for per_rank in run_ranks(_check_linear, world, SIZES[world]) for f in per_rank]
    assert not failures, "\n".join(failures)


def _count_linear_collectives(rank, world, rows, chunk, input_grad):
    start, end = shard_bounds(SIZES[world], rank)
    x, W, b, t, _ = _case_tensors(0, (rows,), False, False, True, True)
    xs = x.requires_grad_(input_grad)
    Ws = W[start:end].clone().requires_grad_()
    with count_all_reduces() as calls:
        loss = vocab_parallel_linear_cross_entropy(xs, Ws, t, b[start:end], vocab_start=start, chunk_size=chunk)
        forward = calls["n"]
        loss.backward()
        backward = calls["n"] - forward
    return forward, backward


def test_linear_collective_count():
    """Forward: 1 validation + 2 per token chunk (MAX, SUM); backward: 1 all-reduce of dX (0, x frozen)."""
    for forward, backward in run_ranks(_count_linear_collectives, 2, 10, 4, True):
        assert (forward, backward) == (1 + 2 * 3, 1)
    for forward, backward in run_ranks(_count_linear_collectives, 2, 10, 16, False):
        assert (forward, backward) == (1 + 2 * 1, 0)


def _default_chunks_with_uneven_shards(rank, world, rows):
    """The default chunk (no chunk_size) must be the same on every rank even when the shards differ in size:
    each chunk holds two collectives. A small CHUNK_ELEMENTS makes 3- and 8-class shards want different ones."""
    import xentlib.distributed.linear as linear

    linear.CHUNK_ELEMENTS = 1 << 12  # this forked rank only: 4096 // 3 = 1365 rows, 4096 // 8 = 512 rows
    start, end = shard_bounds(SIZES[world], rank)
    x, W, b, t, _ = _case_tensors(1, (rows,), False, False, True, True)
    xs = x.clone().requires_grad_()
    ours = vocab_parallel_linear_cross_entropy(xs, W[start:end], t, b[start:end], vocab_start=start)
    ours.backward()
    xr = x.clone().requires_grad_()
    ref = torch_reference(xr @ W.T + b, t, None, -100, "mean", 0.0, 0.0, None, None)
    ref.backward()
    return float((ours - ref).abs()), float((xs.grad - xr.grad).abs().max())


def test_default_chunks_agree_across_uneven_shards():
    for loss_error, grad_error in run_ranks(
        _default_chunks_with_uneven_shards, 2, 1000, timeout=20.0, collective_timeout=5.0
    ):
        assert loss_error < 1e-12 and grad_error < 1e-12
