"""Half precision: our float16/bfloat16 results are at least as close to a float64 evaluation as torch's.

torch's CPU half kernels round intermediate results to the half type (a 'sum' over many rows accumulates in
it); xentlib accumulates in float32 and rounds once. For each function, reduction and half dtype, the same
half-precision inputs are evaluated three ways: torch in the half type, xentlib in the half type, torch in
float64 (the truth). We require max|ours - truth| <= max|torch - truth| + half an ulp, for the output and the
input gradient (same random grad_output for all three).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_like

import xentlib.functional as X

HALF = (torch.float16, torch.bfloat16)
REDUCTIONS = ("none", "mean", "sum")
BIG = (512, 4096)
# (shape, reduction): the big shape with 'sum' (the long half-precision accumulation where torch loses most),
# smaller (N, C) and (N, C, d) shapes with every reduction (per-row rounding, gradients)
CASES = [(BIG, "sum")] + [(shape, r) for shape in [(64, 1000), (8, 50, 64)] for r in REDUCTIONS]


def half_ulp(value: float, dtype: torch.dtype) -> float:
    """Half a unit in the last place of `value` in `dtype`: the rounding error of one correct rounding."""
    return 0.5 * torch.finfo(dtype).eps * max(abs(value), torch.finfo(dtype).tiny)


def max_error(value: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype) -> float:
    """max |value - truth| where truth is representable in `dtype`; inf if `value` is non-finite anywhere else
    (or finite where the truth overflows the half type: there inf is the correctly rounded answer)."""
    value, truth = value.detach().double(), truth.detach().double()
    finite = truth.to(dtype).isfinite()
    if not torch.equal(value.isfinite(), finite):
        return math.inf
    return float((value - truth)[finite].abs().max()) if bool(finite.any()) else 0.0


def evaluate(fn, inputs, grad_seed=0):
    """(output, input gradient) of fn(*inputs) for a random grad_output; inputs[0] is differentiated."""
    leaf = inputs[0].detach().clone().requires_grad_()
    out = fn(leaf, *inputs[1:])
    (grad,) = torch.autograd.grad(out, leaf, random_like(out, grad_seed).to(out.dtype))
    return out, grad


def assert_at_least_as_accurate(ours_fn, torch_fn, inputs, dtype):
    """Our error against torch's float64 result is at most torch's half-precision error (+ half an ulp)."""
    truth_inputs = [t.double() if t is not None and t.is_floating_point() else t for t in inputs]
    truth_out, truth_grad = evaluate(torch_fn, truth_inputs)
    ours_out, ours_grad = evaluate(ours_fn, inputs)
    torch_out, torch_grad = evaluate(torch_fn, inputs)
    assert ours_out.dtype == torch_out.dtype and ours_grad.dtype == torch_grad.dtype
    results = (("output", ours_out, torch_out, truth_out), ("grad", ours_grad, torch_grad, truth_grad))
    for what, ours, theirs, truth in results:
        ours_err, torch_err = max_error(ours, truth, dtype), max_error(theirs, truth, dtype)
        assert math.isfinite(ours_err), f"{what}: non-finite where the float64 result is representable"
        scale = float(truth.detach().abs().max()) if truth.numel() else 0.0
        assert ours_err <= torch_err + half_ulp(scale, dtype), (
            f"{what}: our error {ours_err:.3e} > torch's {torch_err:.3e} (scale {scale:.3e})"
        )


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).to(dtype)
    classes = shape[1]
    target = torch.randint(0, classes, shape[:1] + shape[2:], generator=g)
    target.view(-1)[::7] = -100
    probs = torch.rand(shape, generator=g, dtype=torch.float64).softmax(1).to(dtype)
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return x, target, probs, weight


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape, reduction", CASES)
@pytest.mark.parametrize(
    "variant", ["index", "index_weight_smoothing", "prob", "prob_weight_smoothing", "nll", "nll_weight"]
)
def test_cross_entropy_family_half_precision(dtype, reduction, shape, variant):
    x, target, probs, weight = make(shape, dtype)
    w = weight if "weight" in variant else None
    eps = 0.1 if "smoothing" in variant else 0.0
    if variant.startswith("nll"):
        log_p = torch.log_softmax(x.float(), 1).to(dtype)
        inputs = [log_p, target, w]
        ours = lambda x, t, w: X.nll_loss(x, t, w, reduction=reduction)  # noqa: E731
        theirs = lambda x, t, w: F.nll_loss(x, t, w, reduction=reduction)  # noqa: E731
    else:
        inputs = [x, target if variant.startswith("index") else probs, w]
        ours = lambda x, t, w: X.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps)  # noqa: E731
        theirs = lambda x, t, w: F.cross_entropy(x, t, w, reduction=reduction, label_smoothing=eps)  # noqa: E731
    assert_at_least_as_accurate(ours, theirs, inputs, dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [BIG, (8, 50, 64)])
@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_softmax_half_precision(dtype, shape, fn):
    x, *_ = make(shape, dtype)
    assert_at_least_as_accurate(lambda x: getattr(X, fn)(x, 1), lambda x: getattr(F, fn)(x, 1), [x], dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape, reduction", [(BIG, "sum")] + [((32, 1000), r) for r in REDUCTIONS])
@pytest.mark.parametrize("fn", ["binary_cross_entropy", "binary_cross_entropy_with_logits"])
def test_bce_half_precision(dtype, reduction, shape, fn):
    x, _, probs, weight = make(shape, dtype, seed=1)
    if fn == "binary_cross_entropy":
        x = torch.sigmoid(x.float()).clamp(1e-3, 1 - 1e-3).to(dtype)
    ours = lambda x, y, w: getattr(X, fn)(x, y, w, reduction=reduction)  # noqa: E731
    theirs = lambda x, y, w: getattr(F, fn)(x, y, w, reduction=reduction)  # noqa: E731
    assert_at_least_as_accurate(ours, theirs, [x, probs, weight], dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_half_precision_gradient_is_rounded_once_for_any_grad_output(dtype, reduction):
    """With a grad_output that is not 1 (per-token weights with 'none', `loss / k` under gradient accumulation),
    the half-precision gradient is scaled in float32 before its one rounding: in every trial its error against
    float64 is at most torch's own in the same dtype."""
    generator = torch.Generator().manual_seed(11)
    for trial in range(12):
        x = (torch.randn(64, 300, generator=generator) * 3).to(dtype)
        t = torch.randint(0, 300, (64,), generator=generator)
        g = torch.rand(64, generator=generator) if reduction == "none" else torch.tensor(1 / 3)
        errors = []
        for fn in (F.cross_entropy, X.cross_entropy):
            leaf = x.clone().requires_grad_()
            (grad,) = torch.autograd.grad(fn(leaf, t, reduction=reduction), leaf, g.to(dtype))
            errors.append(grad.double())
        x64 = x.double().requires_grad_()
        (truth,) = torch.autograd.grad(F.cross_entropy(x64, t, reduction=reduction), x64, g.to(dtype).double())
        theirs, ours = ((e - truth).abs().max().item() for e in errors)
        assert ours <= theirs, f"trial {trial}: xentlib's error {ours:.3e} > torch's {theirs:.3e}"
