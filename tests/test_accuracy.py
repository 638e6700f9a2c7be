"""Accuracy against float64: every backend's float32 (and half-precision) results are at least as close to a float64
evaluation of the same inputs as torch's own float32 (or float32-composed) results.

What each test pins (docs/numerics.md):
  * the loss is formed as log s - (y_t - m), never lse - y_t, which cancels at large logits
    (test_float32_accuracy_at_large_logits, test_linear_float32_accuracy_at_large_logits, test_tied_large_logits);
  * soft-capping of half-precision logits is done in float32 after widening (test_softcap_half_precision_gradient);
  * weighted label smoothing sums its products elementwise in float32 (test_weighted_smoothing_row_losses).

The truth is torch itself, run on float64 copies of the very same (float32 or bfloat16-valued) inputs; torch's
float32 error is the yardstick, plus one float32 ulp of slack at the compared scale.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # Triton's interpreter on CPU tensors; set before xentlib's kernels are imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import xentlib  # noqa: E402
import xentlib.functional as X  # noqa: E402
from xentlib.backends import cpu_kernel  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps
MAGNITUDES = (10.0, 1e2, 1e4, 1e6)
OPTIONS = {
    "index": dict(),
    "smoothing": dict(label_smoothing=0.1),
    "weights": dict(weight=True),
    "weights-smoothing": dict(weight=True, label_smoothing=0.2),
    "probabilities": dict(probs=True),
    "probabilities-weights-smoothing": dict(probs=True, weight=True, label_smoothing=0.1),
}


def _triton_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    from xentlib.backends import triton as triton_backend

    return triton_backend.is_available("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def kernel_off(monkeypatch):
    """The PyTorch ops of the torch backend instead of the compiled CPU kernel."""
    monkeypatch.setattr(cpu_kernel, "supports", lambda problem, grad_out: False)
    monkeypatch.setattr(cpu_kernel, "supports_call", lambda device, dtype, problem: False)


def large_rows(rows: int, classes: int, magnitude: float, seed: int = 0) -> torch.Tensor:
    """float32 logits of size `magnitude`: half the rows shifted (magnitude + N(0, 3^2), so the softmax is spread
    and the loss small next to the logits), a quarter scaled (N(0, (magnitude / 3)^2)), a quarter with two tied
    maxima at +-magnitude and the rest near 0 (the [1e4, 1e4, 0] case)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, classes, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(rows, 1, generator=g) < 0.5, -1.0, 1.0).double()
    x = sign * magnitude + 3.0 * noise
    quarter, half = rows // 4, rows // 2
    x[half : half + quarter] = noise[half : half + quarter] * (magnitude / 3)
    tied = x[half + quarter :]
    tied.copy_(noise[half + quarter :])
    tied[:, :2] = sign[half + quarter :] * magnitude
    return x.float()


def make_case(rows, classes, magnitude, options, seed=0):
    """(logits, target, kwargs for cross_entropy) with float32 tensors; targets hit the tied maxima too."""
    g = torch.Generator().manual_seed(seed + 1)
    x = large_rows(rows, classes, magnitude, seed)
    if options.get("probs"):
        target = torch.softmax(torch.randn(rows, classes, generator=g) * 2, 1)
    else:
        target = torch.randint(0, classes, (rows,), generator=g)
        target[rows // 2 + rows // 4 :: 2] = 0
    kwargs = {k: v for k, v in options.items() if k not in ("probs", "weight")}
    if options.get("weight"):
        kwargs["weight"] = torch.rand(classes, generator=g) + 0.5
    return x, target, kwargs


def as_float64(kwargs):
    return {k: (v.double() if torch.is_tensor(v) else v) for k, v in kwargs.items()}


def loss_and_grad(fn, x, target, kwargs):
    """Per-row losses (reduction='none') and the gradient of their sum."""
    leaf = x.detach().clone().requires_grad_()
    loss = fn(leaf, target, reduction="none", **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), leaf)
    return loss.detach(), grad


def row_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    """max over rows of |value - truth| / max(|truth|, 1): relative where the loss is large, absolute below 1."""
    value, truth = value.double(), truth.double()
    return float(((value - truth).abs() / truth.abs().clamp_min(1.0)).max())


def abs_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return float((value.double() - truth.double()).abs().max())


def assert_as_accurate_as_torch(ours_fn, x, target, kwargs, torch_fn=F.cross_entropy, ulps=1):
    """Loss (per row) and gradient: our error against torch in float64 is at most torch's float32 error plus `ulps`
    float32 ulps at the compared scale (1 for the row losses, max |grad| for the gradient)."""
    truth_loss, truth_grad = loss_and_grad(torch_fn, x.double(), target_64(target), as_float64(kwargs))
    torch_loss, torch_grad = loss_and_grad(torch_fn, x, target, kwargs)
    ours_loss, ours_grad = loss_and_grad(ours_fn, x, target, kwargs)
    assert ours_loss.dtype == torch.float32 and ours_grad.dtype == torch.float32
    ours, theirs = row_error(ours_loss, truth_loss), row_error(torch_loss, truth_loss)
    assert ours <= theirs + ulps * EPS32, f"row loss error {ours:.3e} > torch's {theirs:.3e}"
    grad_scale = float(truth_grad.abs().max())
    ours, theirs = abs_error(ours_grad, truth_grad), abs_error(torch_grad, truth_grad)
    assert ours <= theirs + ulps * EPS32 * grad_scale, f"gradient error {ours:.3e} > torch's {theirs:.3e}"


def target_64(target):
    return target.double() if target.is_floating_point() else target


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("path", ["cpu-kernel", "torch-ops"])
def test_float32_accuracy_at_large_logits(request, path, options, magnitude):
    if path == "cpu-kernel" and not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    if path == "torch-ops":
        request.getfixturevalue("kernel_off")
    x, target, kwargs = make_case(64, 37, magnitude, options)
    assert_as_accurate_as_torch(X.cross_entropy, x, target, kwargs)


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter evaluates both sides of tl.where in NumPy
@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
@pytest.mark.parametrize("classes", [37, 300], ids=["tile", "rows"])  # index targets: tile kernel up to 128
def test_triton_float32_accuracy_at_large_logits(options, magnitude, classes):
    available, why = _triton_available()
    if not available:
        pytest.skip(why)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, target, kwargs = make_case(16, classes, magnitude, options)

    def triton_ce(x, target, **kw):
        moved = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
        return X.cross_entropy(x.to(device), target.to(device), backend="triton", **moved).cpu()

    # 8 ulps: the interpreter's tl.sum over a tile's class axis is NumPy's running sum (a GPU adds in a tree), so
    # small terms are rounded against the large partial sum; the cancellation this test is for costs 1e3-1e7 ulps
    # from magnitude 1e2 up.
    assert_as_accurate_as_torch(triton_ce, x, target, kwargs, ulps=8)


@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("options", ["index", "weights-smoothing"])
@pytest.mark.parametrize("path", ["cpu-kernel", "torch-ops"])
def test_linear_float32_accuracy_at_large_logits(request, path, options, magnitude):
    """linear_cross_entropy with logits = X W^T + b of size `magnitude`. X and W hold small multiples of 1/8 and
    the bias is magnitude + small integers, so every logit is exact in float32 whatever the matmul's order: the
    only errors are those of the loss and gradient, which is what is compared."""
    if path == "cpu-kernel" and not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    if path == "torch-ops":
        request.getfixturevalue("kernel_off")
    g = torch.Generator().manual_seed(3)
    rows, hidden, classes = 48, 16, 37
    inputs = torch.randint(-8, 9, (rows, hidden), generator=g).float() / 8
    weight = torch.randint(-8, 9, (classes, hidden), generator=g).float() / 8
    bias = magnitude + torch.randint(-3, 4, (classes,), generator=g).float()
    target = torch.randint(0, classes, (rows,), generator=g)
    kwargs = dict(OPTIONS[options])
    class_weight = torch.rand(classes, generator=g) + 0.5 if kwargs.pop("weight", False) else None

    def ours(x, t, b, cw, **kw):
        return xentlib.linear_cross_entropy(x, weight_of(x), t, linear_bias=b, weight=cw, **kw)

    def theirs(x, t, b, cw, **kw):
        return F.cross_entropy(F.linear(x, weight_of(x), b), t, weight=cw, **kw)

    def weight_of(x):
        return weight.to(x.dtype)

    def loss_grad(fn, x, b, cw):
        leaf = x.detach().clone().requires_grad_()
        loss = fn(leaf, target, b, cw, reduction="none", **kwargs)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        return loss.detach(), grad

    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    truth = loss_grad(theirs, inputs.double(), bias.double(), as64(class_weight))
    torch32 = loss_grad(theirs, inputs, bias, class_weight)
    ours32 = loss_grad(ours, inputs, bias, class_weight)
    assert row_error(ours32[0], truth[0]) <= row_error(torch32[0], truth[0]) + EPS32
    scale = float(truth[1].abs().max())
    assert abs_error(ours32[1], truth[1]) <= abs_error(torch32[1], truth[1]) + EPS32 * scale


@pytest.mark.parametrize("magnitude", [1e4, 3e7])
def test_tied_large_logits(magnitude):
    """[M, M, 0] with target 0: ln 2 to float32 precision, whatever M (float32 holds 3e7 exactly)."""
    x = torch.tensor([[magnitude, magnitude, 0.0]])
    loss = X.cross_entropy(x, torch.tensor([0]))
    assert abs(loss.item() - 0.6931471805599453) <= 0.6931471805599453 * EPS32


# --------------------------------------------------------------------------------------------------------------
# Half precision: soft-capping in float32
# --------------------------------------------------------------------------------------------------------------

SOFTCAP_CASES = {
    "plain": dict(),
    "weights": dict(weight=True),
    "z_loss": dict(z_loss=1e-4),
    "weights-z_loss": dict(weight=True, z_loss=1e-4),
}


def softcap_case(rows, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * 30).to(torch.bfloat16)
    target = torch.randint(0, classes, (rows,), generator=g)
    weight = (torch.rand(classes, generator=g) + 0.5).to(torch.bfloat16).float()  # bfloat16 values: torch's and ours
    return x, target, weight


def composed(x, target, weight, z_loss, cap=30.0):
    """torch's composition: cap * tanh(x / cap), cross_entropy with smoothing 0.1, 'sum', plus z * sum(lse^2)."""
    y = cap * torch.tanh(x / cap)
    loss = F.cross_entropy(y, target, weight=weight, label_smoothing=0.1, reduction="sum")
    if z_loss:
        loss = loss + z_loss * (torch.logsumexp(y, 1) ** 2).sum()
    return loss


def assert_softcap_gradient_as_accurate(ours_fn, x, target, weight, z_loss):
    """bfloat16 gradient: our max error against float64 at most torch-on-x.float()'s (rounded to bfloat16 the same
    way), times 1.05, and no element more than 5% off where torch's is within 5%."""

    def grad_of(fn, dtype, w):
        leaf = x.detach().to(dtype).requires_grad_()
        (grad,) = torch.autograd.grad(fn(leaf, target, w, z_loss), leaf)
        return grad

    as_w = lambda dtype: None if weight is None else weight.to(dtype)  # noqa: E731
    truth = grad_of(composed, torch.float64, as_w(torch.float64))
    torchs = grad_of(composed, torch.float32, as_w(torch.float32)).to(torch.bfloat16)
    ours = grad_of(ours_fn, torch.bfloat16, as_w(torch.bfloat16))
    assert ours.dtype == torch.bfloat16
    ours_err, torch_err = (ours.double() - truth).abs(), (torchs.double() - truth).abs()
    tiny = 1e-30
    assert float(ours_err.max()) <= 1.05 * float(torch_err.max()) + tiny, (
        float(ours_err.max()),
        float(torch_err.max()),
    )
    far = (ours_err > 0.05 * truth.abs() + tiny) & (torch_err <= 0.05 * truth.abs() + tiny)
    assert int(far.sum()) == 0, f"{int(far.sum())} gradient elements more than 5% off"


def xentlib_softcapped(**extra):
    def run(x, target, weight, z_loss):
        return X.cross_entropy(
            x, target, weight=weight, label_smoothing=0.1, reduction="sum", softcap=30.0, z_loss=z_loss, **extra
        )

    return run


@pytest.mark.parametrize("case", SOFTCAP_CASES.values(), ids=SOFTCAP_CASES.keys())
def test_softcap_half_precision_gradient(case):
    x, target, weight = softcap_case(256, 4000)
    weight = weight if case.get("weight") else None
    assert_softcap_gradient_as_accurate(xentlib_softcapped(), x, target, weight, case.get("z_loss", 0.0))


@pytest.mark.triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("case", SOFTCAP_CASES.values(), ids=SOFTCAP_CASES.keys())
def test_triton_softcap_half_precision_gradient(case):
    available, why = _triton_available()
    if not available:
        pytest.skip(why)
    if torch.cuda.is_available():
        pytest.skip("runs in the interpreter on CPU tensors; compiled GPU runs use the same kernels")
    x, target, weight = softcap_case(16, 1000)
    weight = weight if case.get("weight") else None
    assert_softcap_gradient_as_accurate(xentlib_softcapped(backend="triton"), x, target, weight, case.get("z_loss", 0))


# --------------------------------------------------------------------------------------------------------------
# Weighted label smoothing: sum_c w_c log p_c elementwise in float32
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["cpu-kernel", "torch-ops"])
def test_weighted_smoothing_row_losses(request, path):
    """Class weights and smoothing over 2^18 classes: per-row loss error against float64 at most torch's float32
    error plus one ulp. Each row is constant, so every log p_c is the same rounded -log C and what differs between
    implementations is only how sum_c w_c log p_c is summed (a float32 matrix-vector product was 4x torch's error)."""
    if path == "cpu-kernel" and not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    if path == "torch-ops":
        request.getfixturevalue("kernel_off")
    classes = 1 << 18
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 1, generator=g).expand(8, classes).contiguous()
    target = torch.randint(0, classes, (8,), generator=g)
    weight = torch.rand(classes, generator=g) + 0.5
    kwargs = dict(weight=weight, label_smoothing=1.0, reduction="none")
    truth = F.cross_entropy(x.double(), target, **as_float64(kwargs))
    relative = lambda value: float(((value.double() - truth).abs() / truth.abs()).max())  # noqa: E731
    ours, theirs = relative(X.cross_entropy(x, target, **kwargs)), relative(F.cross_entropy(x, target, **kwargs))
    assert ours <= theirs + EPS32, (ours, theirs)
