"""backend="triton-tiled": linear_cross_entropy by Triton kernels that never write logits.

Checked against float64 compositions (torch's own `cross_entropy(x @ W.T + b)` where it has the option, the
PyTorch backend in float64 for the extensions) and against the default path. Without a GPU the kernels run in
Triton's interpreter on CPU tensors (TRITON_INTERPRET=1, set before the kernels are first imported). The block
sizes of tiled.py (32 classes x 16 rows x 32 hidden) are larger than nothing here, so shapes are chosen to need
several tiles in every direction.
"""

import os

import pytest
import torch.nn.functional as F
from _triton_setup import DEVICE, MARKS, torch
from conftest import composed_cross_entropy
from torch.utils._python_dispatch import TorchDispatchMode

import xentlib

pytestmark = MARKS

TILED = "triton-tiled"


def make_case(lead=(37,), hidden=40, vocab=70, dtype=torch.float32, ignored=(3,), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=generator)
    w = torch.randn(vocab, hidden, generator=generator) / hidden**0.5 * 2
    b = torch.randn(vocab, generator=generator)
    target = torch.randint(0, vocab, lead, generator=generator)
    flat = target.view(-1)
    for row in ignored:
        flat[row] = -100
    class_weight = torch.rand(vocab, generator=generator) + 0.5
    cast = lambda t: t.to(DEVICE, dtype).requires_grad_()  # noqa: E731
    return cast(x), cast(w), cast(b), target.to(DEVICE), class_weight.to(DEVICE)


def float64_leaves(*tensors):
    return [t.detach().cpu().double().requires_grad_() for t in tensors]


def gradients(loss, leaves, upstream):
    return torch.autograd.grad(loss, leaves, upstream)


OPTIONS = [
    {},
    {"class_weight": True},
    {"label_smoothing": 0.15},
    {"class_weight": True, "label_smoothing": 0.3},
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"class_weight": True, "label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 4.0},
]


def _resolve(options, class_weight, dtype=None):
    out = dict(options)
    if out.pop("class_weight", False):
        out["weight"] = class_weight if dtype is None else class_weight.cpu().to(dtype)
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_matches_float64(options, reduction):
    x, w, b, target, class_weight = make_case()
    ours = xentlib.linear_cross_entropy(
        x, w, target, linear_bias=b, reduction=reduction, backend=TILED, **_resolve(options, class_weight)
    )
    upstream = torch.rand(ours.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    grads = gradients(ours, (x, w, b), upstream)

    leaves = float64_leaves(x, w, b)
    reference = _resolve(options, class_weight, torch.float64)
    weight = reference.pop("weight", None)
    logits = leaves[0] @ leaves[1].T + leaves[2]
    # torch's own expression; the extensions (z-loss, soft-capping) composed around it with torch ops
    truth = composed_cross_entropy(logits, target.cpu(), weight, reduction=reduction, **reference)
    expected = gradients(truth, leaves, upstream.cpu().double())

    assert ours.dtype == torch.float32 and ours.shape == truth.shape
    torch.testing.assert_close(ours.cpu().double(), truth.detach(), atol=2e-5, rtol=2e-5)
    for name, got, want in zip(("input", "weight", "bias"), grads, expected):
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got.cpu().double(), want, atol=2e-5, rtol=2e-5, msg=f"grad {name}")


def test_equals_the_default_path_with_leading_dims_shift_and_normalizer():
    x, w, b, target, class_weight = make_case(lead=(3, 11), ignored=(0, 5, 32))
    results = []
    for backend in (TILED, "torch"):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
        loss = xentlib.linear_cross_entropy(
            leaves[0], leaves[1], target, linear_bias=leaves[2], reduction="sum", normalizer=17.0, shift=True,
            weight=class_weight, label_smoothing=0.05, backend=backend,
        )  # fmt: skip
        results.append((loss, *torch.autograd.grad(loss, leaves)))
    for name, ours, default in zip(("loss", "input", "weight", "bias"), *results):
        torch.testing.assert_close(ours, default, atol=1e-5, rtol=1e-5, msg=name)
    assert results[0][1][:, -1].abs().max() == 0  # shift: the last position predicts nothing


@pytest.mark.parametrize("rows, hidden", [(0, 5), (3, 1)], ids=["no-rows", "hidden-1"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_edge_shapes_match_torch(rows, hidden, reduction):
    x, w, b, target, _ = make_case(lead=(rows,), hidden=hidden, vocab=40, ignored=())
    ours = xentlib.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction, backend=TILED)
    theirs = F.cross_entropy(x @ w.T + b, target, reduction=reduction)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5, equal_nan=True)
    for got, want in zip(torch.autograd.grad(ours.sum(), (x, w, b)), torch.autograd.grad(theirs.sum(), (x, w, b))):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_all_rows_ignored_gives_nan_mean_and_zero_gradients():
    x, w, b, target, _ = make_case(lead=(5,), ignored=range(5))
    loss = xentlib.linear_cross_entropy(x, w, target, linear_bias=b, backend=TILED)
    assert torch.isnan(loss)
    for grad in torch.autograd.grad(loss, (x, w, b)):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_bfloat16_error_close_to_torchs_own():
    """bf16 inputs: float32 accumulation inside, gradients rounded once. Error against float64 within twice
    torch's own bf16 error (torch rounds the logits and dZ to bf16 as well) plus one bf16 ulp of the values."""
    x, w, b, target, _ = make_case(dtype=torch.bfloat16, hidden=48, vocab=90)
    leaves = float64_leaves(x, w, b)
    truth = F.cross_entropy(leaves[0] @ leaves[1].T + leaves[2], target.cpu())
    exact = torch.autograd.grad(truth, leaves)
    ours = xentlib.linear_cross_entropy(x, w, target, linear_bias=b, backend=TILED)
    ours_grads = torch.autograd.grad(ours, (x, w, b))
    theirs = F.cross_entropy(x @ w.T + b, target)
    their_grads = torch.autograd.grad(theirs, (x, w, b))
    assert ours.dtype == theirs.dtype == torch.bfloat16

    def error(a, ref):
        return float((a.detach().cpu().double() - ref.detach()).abs().max())

    assert error(ours, truth) <= 2 * error(theirs, truth) + 2**-8 * float(truth.detach().abs())
    for name, got, other, want in zip(("input", "weight", "bias"), ours_grads, their_grads, exact):
        assert got.dtype == torch.bfloat16, name
        assert error(got, want) <= 2 * error(other, want) + 2**-8 * float(want.detach().abs().max()), name


class _AllocationLog(TorchDispatchMode):
    """Records the storage size in bytes of every tensor a torch op returns."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for item in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(item, torch.Tensor):  # storage, not numel: the problem's logits placeholder is an
                self.sizes.append((item.untyped_storage().nbytes(), str(func)))  # expand of no memory
        return out


def test_never_allocates_logits():
    """Forward and backward: no tensor as large as a row block of logits (16 rows x V), let alone (N, V). The
    largest buffers are the gradients' float32 accumulators (V x D, N x D), with D much smaller than V here."""
    rows, hidden, vocab = 64, 4, 300
    x, w, b, target, _ = make_case(lead=(rows,), hidden=hidden, vocab=vocab)
    with _AllocationLog() as log:
        loss = xentlib.linear_cross_entropy(x, w, target, linear_bias=b, backend=TILED, label_smoothing=0.1)
        grads = torch.autograd.grad(loss, (x, w, b))
    assert len(grads) == 3 and log.sizes, "the log saw nothing"
    largest = max(log.sizes)
    assert largest[0] <= vocab * hidden * 4, f"a storage of {largest[0]} bytes ({largest[1]}) appeared"
    assert 16 * vocab * 4 > vocab * hidden * 4  # one row block of float32 logits would have shown


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w, t, b, cw: xentlib.linear_cross_entropy(x, w, torch.softmax(x @ w.T, -1).detach(), linear_bias=b,
                                                              backend=TILED), NotImplementedError, "probability"),
        (lambda x, w, t, b, cw: xentlib.linear_cross_entropy(x, w, t, linear_bias=b, backend=TILED, return_stats=True),
         NotImplementedError, "return_stats"),
        (lambda x, w, t, b, cw: xentlib.linear_cross_entropy(x, w, t, linear_bias=b, backend=TILED, chunk_size=4),
         ValueError, "chunk_size"),
        (lambda x, w, t, b, cw: xentlib.linear_cross_entropy(x.double(), w.double(), t, linear_bias=b.double(),
                                                              backend=TILED), RuntimeError, "float64"),
        (lambda x, w, t, b, cw: xentlib.cross_entropy(x @ w.T, t, backend=TILED), ValueError, "backend must be"),
        (lambda x, w, t, b, cw: xentlib.linear_cross_entropy(x, w, t, linear_bias=b, backend="tiled"), ValueError,
         "backend must be"),
    ],
    ids=["prob-targets", "stats", "chunk-size", "float64", "cross-entropy", "unknown-name"],
)  # fmt: skip
def test_unsupported_calls_raise_clearly(call, error, match):
    x, w, b, target, class_weight = make_case(lead=(6,), ignored=())
    with pytest.raises(error, match=match):
        call(x, w, target, b, class_weight)


def test_double_backward_is_refused():
    x, w, b, target, _ = make_case(lead=(6,), ignored=())
    loss = xentlib.linear_cross_entropy(x, w, target, linear_bias=b, backend=TILED)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_without_the_interpreter_or_a_gpu_it_says_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: backend='triton-tiled' is available")
    code = (
        "import torch, xentlib\n"
        "x, w = torch.randn(4, 3), torch.randn(5, 3)\n"
        "try:\n"
        "    xentlib.linear_cross_entropy(x, w, torch.tensor([0, 1, 2, 3]), backend='triton-tiled')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "backend='triton' is not available" in out.stdout, out.stdout + out.stderr
