"""xentlib.functional against torch.nn.functional 2.13: values, dtypes, shapes and every gradient.

Each test builds the inputs once and hands them to `check_against_torch` (tests/conftest.py), which runs both
libraries on independent copies and compares output, warnings and gradients under a random grad_output.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES, assert_same, check_against_torch, composed_cross_entropy, tolerance

import xentlib.functional as X

REDUCTIONS = ("none", "mean", "sum")
# (input shape) -> class dim 0 for 1-D, else 1; (7, 1) is C = 1
SHAPES = [(13,), (1, 13), (7, 1), (7, 13), (3, 4, 5), (7, 13, 5, 3), (2, 3, 2, 2, 3)]


def logits(shape, dtype=torch.float32, seed=0, scale=2.0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
    return x.requires_grad_(requires_grad)


def class_count(shape) -> int:
    return shape[0] if len(shape) == 1 else shape[1]


def index_target(shape, seed=0, ignore_index=-100, ignore_every=0, dtype=torch.long):
    """Class indices for an input of `shape`; every `ignore_every`-th position set to ignore_index."""
    g = torch.Generator().manual_seed(seed + 1)
    target_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = torch.randint(0, class_count(shape), target_shape, generator=g)
    if ignore_every:
        flat = t.view(-1)
        flat[::ignore_every] = ignore_index
    return t.to(dtype)


def prob_target(shape, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed + 2)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    t = (t / t.sum(dim=0 if len(shape) == 1 else 1, keepdim=True)).to(dtype)
    return t.requires_grad_(requires_grad)


def class_weight(classes, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed + 3)
    return (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------------------------
# cross_entropy with class indices
# ----------------------------------------------------------------------------------------------------------


# (weighted, label_smoothing): the plain case and everything at once; test_label_smoothing covers the rest
OPTIONS = [(False, 0.0), (True, 0.1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted, label_smoothing", OPTIONS)
def test_cross_entropy_index(shape, dtype, reduction, weighted, label_smoothing):
    x = logits(shape, dtype)
    t = index_target(shape, ignore_every=3 if len(shape) > 1 else 0)
    w = class_weight(class_count(shape), dtype) if weighted else None
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, w, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 4, 5, 255])
def test_cross_entropy_ignore_index(reduction, weighted, label_smoothing, ignore_index):
    """Any int is a valid ignore_index (compared before the bounds check); only that value is ignored."""
    x = logits((9, 5), torch.float64)
    t = index_target((9, 5), ignore_index=ignore_index, ignore_every=2)
    if ignore_index in (0, 4):
        t[1] = ignore_index  # a real class used as the ignore value
    w = class_weight(5, torch.float64) if weighted else None
    check_against_torch(
        X.cross_entropy, F.cross_entropy, x, t, w, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=label_smoothing,
    )  # fmt: skip


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, 255, 3])
def test_cross_entropy_uint8_target(reduction, ignore_index):
    """uint8 class indices are accepted for 2-D inputs; ignore_index=255 matches them, -100 never does."""
    x = logits((6, 4))
    t = torch.tensor([0, 3, ignore_index, 1, 2, ignore_index]) if ignore_index != -100 else index_target((6, 4))
    t = t.to(torch.uint8)
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_all_ignored_is_nan_with_zero_grads(reduction, label_smoothing, weighted, fn):
    """'mean' of nothing is 0/0 = NaN, and the gradient is all zeros (not NaN)."""
    x = logits((4, 3), torch.float64)
    t = torch.full((4,), -100)
    w = class_weight(3, torch.float64) if weighted else None
    ours, theirs = getattr(X, fn), getattr(F, fn)
    kwargs = {"label_smoothing": label_smoothing} if fn == "cross_entropy" else {}
    if fn == "nll_loss" and label_smoothing:
        pytest.skip("nll_loss has no label smoothing")
    out = check_against_torch(ours, theirs, x, t, w, reduction=reduction, **kwargs)
    if reduction == "mean":
        assert out.isnan()
    (grad,) = torch.autograd.grad(ours(x, t, w, reduction=reduction, **kwargs).sum(), x)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 5), (0, 5, 3), (4, 5, 0)])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_cross_entropy_empty_batch(reduction, shape, kind):
    x = logits(shape, torch.float64)
    t = index_target(shape) if kind == "index" else prob_target(shape, torch.float64)
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_zero_classes(reduction, fn, kind):
    """C = 0: only ignored targets are possible; probability 'mean' is numel / C = 0 / 0 = NaN."""
    if fn == "nll_loss" and kind == "prob":
        pytest.skip("nll_loss has no probability targets")
    x = logits((4, 0), torch.float64)
    t = torch.full((4,), -100) if kind == "index" else torch.zeros(4, 0, dtype=torch.float64)
    check_against_torch(getattr(X, fn), getattr(F, fn), x, t, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_zero_selected_weight(reduction):
    """Selected weights summing to 0: 'mean' is NaN, NaN gradient only at the target slots (0 * inf)."""
    x = logits((3, 4), torch.float64)
    w = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    check_against_torch(X.cross_entropy, F.cross_entropy, x, torch.tensor([0, 0, 0]), w, reduction=reduction)
    check_against_torch(X.nll_loss, F.nll_loss, x, torch.tensor([0, 0, 0]), w, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0, -0.5, math.nan, 1])
def test_label_smoothing(reduction, weighted, kind, label_smoothing):
    """torch's rule: eps in (0, 1] smooths; eps <= 0 or NaN silently mean none (int 1 accepted). With weights,
    the index path's 'mean' divides by the weighted count and the probability path's by the row count."""
    shape = (6, 4, 3)
    x = logits(shape, torch.float64)
    t = index_target(shape, ignore_every=4) if kind == "index" else prob_target(shape, torch.float64)
    w = class_weight(4, torch.float64, requires_grad=kind == "prob") if weighted else None
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, w, reduction=reduction, label_smoothing=label_smoothing)


def test_smoothing_index_mean_differs_from_smoothed_probabilities():
    """The documented example: x(4,3), w=[1,2,3], eps=.2: the two paths give different weighted means."""
    x = logits((4, 3), torch.float64, requires_grad=False)
    t = torch.tensor([0, 1, 2, 1])
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    smoothed = F.one_hot(t, 3).double() * 0.8 + 0.2 / 3
    index_mean = X.cross_entropy(x, t, w, label_smoothing=0.2)
    prob_mean = X.cross_entropy(x, smoothed, w)
    assert_same(index_mean, F.cross_entropy(x, t, w, label_smoothing=0.2))
    assert_same(prob_mean, F.cross_entropy(x, smoothed, w))
    assert not torch.isclose(index_mean, prob_mean)


# ----------------------------------------------------------------------------------------------------------
# cross_entropy with class probabilities
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted, label_smoothing", OPTIONS)
def test_cross_entropy_probabilities(shape, dtype, reduction, weighted, label_smoothing):
    """Gradients wrt input, target and weight (the weight is differentiable on this path only)."""
    x = logits(shape, dtype)
    t = prob_target(shape, dtype)
    w = class_weight(class_count(shape), dtype, requires_grad=True) if weighted else None
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, w, reduction=reduction, label_smoothing=label_smoothing)


@pytest.mark.parametrize(
    "input_dtype, target_dtype, weight_dtype",
    [
        (torch.float32, torch.float64, None),
        (torch.float64, torch.float32, None),
        (torch.float16, torch.float32, None),
        (torch.bfloat16, torch.float16, None),
        (torch.float32, torch.float32, torch.float64),
        (torch.float16, torch.float16, torch.float32),
    ],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_target_dtype_promotion(input_dtype, target_dtype, weight_dtype, reduction):
    """The probability path is composite in torch, so input, target and weight dtypes promote."""
    x = logits((5, 4), input_dtype)
    t = prob_target((5, 4), target_dtype)
    w = None if weight_dtype is None else class_weight(4, weight_dtype, requires_grad=True)
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, w, reduction=reduction)


@pytest.mark.parametrize("ignore_index", [-100, -1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_probability_target_negative_ignore_index_is_ignored(ignore_index, reduction):
    x, t = logits((4, 3)), prob_target((4, 3))
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_unnormalized_probability_targets_are_not_checked(reduction):
    """Negative values, values above 1, rows not summing to 1: all accepted (the loss is linear in t)."""
    x = logits((4, 3), torch.float64)
    t = (torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 3).requires_grad_()
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_kind", ["long", "float"])
def test_path_is_decided_by_shape(reduction, target_kind):
    """(3, 3) input + (3,) long target -> class indices; (C,) input + (C,) float target -> a distribution."""
    if target_kind == "long":
        check_against_torch(
            X.cross_entropy, F.cross_entropy, logits((3, 3)), torch.tensor([2, 0, 1]), reduction=reduction
        )
    else:
        check_against_torch(X.cross_entropy, F.cross_entropy, logits((5,)), prob_target((5,)), reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target", [torch.tensor(2), torch.tensor([2])])
@pytest.mark.parametrize("weighted", [False, True])
def test_unbatched_index_target(reduction, target, weighted):
    """1-D input takes a 0-d or (1,) target; 'none' gives a 0-d result; weighted 'mean' cancels the weight."""
    w = class_weight(5) if weighted else None
    # torch's backward of a (1,) target with reduction='none' fails ("size mismatch (got input: [5], target:
    # [1])"); its gradient is the 0-d target's, which is what we compare with.
    scalar_target = target.reshape(())
    for ours, theirs in ((X.cross_entropy, F.cross_entropy), (X.nll_loss, F.nll_loss)):
        check_against_torch(
            ours,
            lambda x, t, w, theirs=theirs, **k: theirs(x, scalar_target, w, **k).reshape(
                theirs(x.detach(), t, w, **k).shape
            ),
            logits((5,)),
            target,
            w,
            reduction=reduction,
        )


# ----------------------------------------------------------------------------------------------------------
# nll_loss
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(13,), (7, 1), (7, 13), (3, 4, 5), (2, 3, 2, 2, 3)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss(shape, dtype, reduction, weighted):
    """Any values are accepted as input (not only log-probabilities)."""
    x = logits(shape, dtype)
    t = index_target(shape, ignore_every=3 if len(shape) > 1 else 0)
    w = class_weight(class_count(shape), dtype) if weighted else None
    check_against_torch(X.nll_loss, F.nll_loss, x, t, w, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [-100, -1, 3, 255])
@pytest.mark.parametrize("target_dtype", [torch.long, torch.uint8])
def test_nll_loss_ignore_index(reduction, ignore_index, target_dtype):
    x = logits((8, 3), torch.float64)
    t = index_target((8, 3))
    if ignore_index >= 0 or target_dtype == torch.long:
        t[::3] = ignore_index
    check_against_torch(X.nll_loss, F.nll_loss, x, t.to(target_dtype), ignore_index=ignore_index, reduction=reduction)


def test_nll_loss_negative_weights_that_cancel():
    """Selected weights summing to 0 with nonzero terms: 'mean' is +-inf or NaN exactly as torch."""
    x = logits((2, 3), torch.float64)
    w = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    check_against_torch(X.nll_loss, F.nll_loss, x, torch.tensor([0, 1]), w)


# ----------------------------------------------------------------------------------------------------------
# log_softmax / softmax
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape, dim", [((13,), 0), ((7, 13), 1), ((7, 13), 0), ((7, 13), -1), ((3, 4, 5), 1), ((3, 4, 5), 2),
                   ((3, 4, 5), -3), ((2, 3, 4, 5), 2), ((7, 1), 1), ((), 0), ((), -1), ((0, 4), 1),
                   ((4, 0), 1)],
)  # fmt: skip
def test_softmax_family(fn, dtype, shape, dim):
    x = logits(shape, dtype)
    check_against_torch(getattr(X, fn), getattr(F, fn), x, dim)


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize("shape", [(), (5,), (4, 5), (3, 4, 5), (2, 3, 4, 5)])
def test_softmax_implicit_dim_warns_and_picks_torchs_dim(fn, shape):
    """dim=None: a UserWarning and dim 0 for 0-, 1- and 3-D inputs, else 1."""
    check_against_torch(getattr(X, fn), getattr(F, fn), logits(shape, torch.float64))


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize(
    "input_dtype, dtype",
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.float16),
     (torch.float16, torch.float32), (torch.long, torch.float32), (torch.bool, torch.float64)],
)  # fmt: skip
def test_softmax_dtype_argument(fn, input_dtype, dtype):
    """The input is cast to `dtype` first; the input's gradient keeps the input dtype."""
    x = logits((4, 6), torch.float64, requires_grad=False) * 3
    x = (x > 0) if input_dtype == torch.bool else x.to(input_dtype)
    if x.is_floating_point():
        x.requires_grad_()
    check_against_torch(getattr(X, fn), getattr(F, fn), x, 1, dtype=dtype)


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
@pytest.mark.parametrize(
    "row",
    [[1e4, 0.0, -1e4], [-math.inf, 0.0, 1.0], [-math.inf, -math.inf, -math.inf], [math.inf, 0.0, 1.0],
     [math.nan, 0.0, 1.0], [3e38, 0.0, -3e38], [-math.inf, -math.inf, 2.0]],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_softmax_non_finite(fn, row, dtype):
    x = torch.tensor([row, [0.5, 1.0, -1.0]], dtype=torch.float64).to(dtype).requires_grad_()
    check_against_torch(getattr(X, fn), getattr(F, fn), x, 1)


# ----------------------------------------------------------------------------------------------------------
# binary_cross_entropy / binary_cross_entropy_with_logits
# ----------------------------------------------------------------------------------------------------------


def probabilities(shape, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed + 4)
    return torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("shape", [(), (7, 13), (3, 4, 5)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight_shape", [None, "full", "first", "scalar"])
def test_binary_cross_entropy(shape, dtype, reduction, weight_shape):
    """Input and target gradients; the weight broadcasts over the target without enlarging it."""
    x = probabilities(shape, dtype, seed=0)
    y = probabilities(shape, dtype, seed=1)
    w = bce_weight(shape, weight_shape, dtype)
    check_against_torch(X.binary_cross_entropy, F.binary_cross_entropy, x, y, w, reduction=reduction)


def bce_weight(shape, kind, dtype):
    if kind is None:
        return None
    weight_shape = {
        "full": shape,
        "last": shape[-1:],
        "first": shape[:1] + (1,) * (len(shape) - 1),
        "scalar": (),
    }[kind]
    return probabilities(weight_shape, dtype, seed=2, requires_grad=False) + 0.5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_clamp_and_grad_eps(dtype, reduction):
    """Each log is clamped at -100 (0 * -100 = 0, no NaN); the input grad divides by max(x(1-x), f32(1e-12));
    the target grad is unclamped (+-inf at 0 and 1)."""
    x = torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1e-8, 0.5, 1 - 1e-7], dtype=dtype).requires_grad_()
    y = torch.tensor([1.0, 0.5, 0.0, 0.0, 0.5, 1.0, 0.0, 0.25, 1.0], dtype=dtype).requires_grad_()
    check_against_torch(X.binary_cross_entropy, bce_with_float32_eps, x, y, reduction=reduction)


def bce_with_float32_eps(x, y, **kwargs):
    """torch's float16 kernel rounds its eps 1e-12 to 0, so x = y in {0, 1} gives a 0/0 = NaN input gradient
    there; we keep float32's eps (gradient 0, as torch gives in float32 and float64). So float16 is compared
    with torch run in float32 and rounded (deliberate difference: test_bce_float16_grad_is_finite_...)."""
    if x.dtype != torch.float16:
        return F.binary_cross_entropy(x, y, **kwargs)
    return F.binary_cross_entropy(x.float(), y.float(), **kwargs).half()


def test_bce_float16_grad_is_finite_where_torch_is_nan():
    x = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float16, requires_grad=True)
    y = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float16)
    (ours,) = torch.autograd.grad(X.binary_cross_entropy(x, y, reduction="sum"), x)
    (theirs,) = torch.autograd.grad(F.binary_cross_entropy(x, y, reduction="sum"), x)
    assert theirs[:2].isnan().all() and torch.equal(ours, torch.zeros_like(ours))


@pytest.mark.parametrize("shape", [(), (7, 13), (3, 4, 5)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "weight_shape, pos_weight_shape", [(None, None), ("full", "last"), ("first", "scalar"), ("last", "first")]
)
def test_binary_cross_entropy_with_logits(shape, dtype, reduction, weight_shape, pos_weight_shape):
    x = logits(shape, dtype)
    y = probabilities(shape, dtype, seed=1)
    w = bce_weight(shape, weight_shape, dtype)
    p = bce_weight(shape, pos_weight_shape, dtype)
    check_against_torch(
        X.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, y, w, reduction=reduction,
        pos_weight=p,
    )  # fmt: skip


@pytest.mark.parametrize("pos_weight_shape", [(3, 1, 1), (5,), (2, 1, 1, 1), (1, 5), ()])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_pos_weight_broadcasting_nchw(pos_weight_shape, reduction):
    """(C, 1, 1) weights channels of NCHW; (C,) broadcasts over W (silently, when W == C)."""
    x = logits((2, 3, 4, 5), torch.float64)
    y = probabilities((2, 3, 4, 5), torch.float64)
    p = torch.linspace(0.5, 3.0, math.prod(pos_weight_shape), dtype=torch.float64).reshape(pos_weight_shape)
    check_against_torch(
        X.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, y, reduction=reduction,
        pos_weight=p,
    )  # fmt: skip


@pytest.mark.parametrize(
    "input_dtype, target_dtype",
    [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float32, torch.float16),
     (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)],
)  # fmt: skip
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_with_logits_output_dtype_follows_target(input_dtype, target_dtype, reduction):
    x = logits((4, 3), input_dtype)
    y = probabilities((4, 3), target_dtype)
    check_against_torch(
        X.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, y, reduction=reduction
    )


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize(
    "pos_weight",
    [None, 2.5, 1.0, -2.5],
)
def test_bce_with_logits_extreme_and_non_finite(reduction, dtype, pos_weight):
    """Stable for huge logits; +-inf give NaN where torch's formula has 0 * inf. Targets are unchecked."""
    x = torch.tensor([-1e4, 30.0, 1e4, math.inf, -math.inf, math.inf, -math.inf, 2.0, -3.0], dtype=dtype)
    y = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 2.0, -0.5], dtype=dtype)
    p = None if pos_weight is None else torch.tensor(pos_weight, dtype=dtype)
    check_against_torch(
        X.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x.requires_grad_(),
        y.requires_grad_(), reduction=reduction, pos_weight=p,
    )  # fmt: skip


@pytest.mark.parametrize("fn", ["binary_cross_entropy", "binary_cross_entropy_with_logits"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_bce_empty(fn, reduction):
    x = probabilities((0, 3), torch.float64)
    check_against_torch(getattr(X, fn), getattr(F, fn), x, probabilities((0, 3), torch.float64), reduction=reduction)


@pytest.mark.parametrize("weight_dtype", [torch.float64, torch.float16])
def test_bce_weight_may_have_another_float_dtype(weight_dtype):
    x, y = probabilities((4, 3)), probabilities((4, 3), seed=1)
    w = torch.rand(3, dtype=torch.float64).to(weight_dtype)
    check_against_torch(X.binary_cross_entropy, F.binary_cross_entropy, x, y, w)
    check_against_torch(X.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, y, w)


# ----------------------------------------------------------------------------------------------------------
# Legacy reduction arguments (functional form)
# ----------------------------------------------------------------------------------------------------------

LEGACY = [
    dict(size_average=True, reduction="sum"),
    dict(reduce=True, reduction="none"),
    dict(size_average=0),
    dict(size_average=False, reduce=False),
    dict(reduce=False),
    dict(size_average=True, reduce=True),
    dict(reduction="elementwise_mean"),
]


@pytest.mark.parametrize("legacy", LEGACY)
@pytest.mark.parametrize(
    "fn", ["cross_entropy", "nll_loss", "binary_cross_entropy", "binary_cross_entropy_with_logits"]
)
def test_legacy_reduction_arguments(legacy, fn):
    """Either legacy flag overrides `reduction` (UserWarning); 'elementwise_mean' is 'mean' with a warning."""
    if fn.startswith("binary"):
        x, t = probabilities((4, 3)), probabilities((4, 3), seed=1)
    else:
        x, t = logits((4, 3)), index_target((4, 3))
    check_against_torch(getattr(X, fn), getattr(F, fn), x, t, **legacy)


def test_positional_arguments_follow_torchs_order():
    x, t, w = logits((5, 4)), index_target((5, 4)), class_weight(4)
    t[0] = 2
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, w, None, 2, None, "sum", 0.1)
    check_against_torch(X.nll_loss, F.nll_loss, x, t, w, None, 2, None, "sum")
    p, y = probabilities((5, 4)), probabilities((5, 4), seed=1)
    check_against_torch(X.binary_cross_entropy, F.binary_cross_entropy, p, y, w, None, None, "sum")
    check_against_torch(
        X.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, y, w, None, None, "sum", w
    )


# ----------------------------------------------------------------------------------------------------------
# Non-finite logits and non-contiguous inputs
# ----------------------------------------------------------------------------------------------------------

NON_FINITE_ROWS = {
    "huge": [1e4, 0.0, -1e4, 5.0],
    "neg_inf_other": [-math.inf, 1.0, 2.0, 0.5],
    "neg_inf_target": [1.0, 2.0, -math.inf, 0.5],
    "all_neg_inf": [-math.inf] * 4,
    "pos_inf": [math.inf, 1.0, 0.0, 0.0],
    "nan_other": [math.nan, 1.0, 0.0, 0.0],
    "max_float": [3e38, 0.0, -3e38, 1.0],
}


@pytest.mark.parametrize("row", list(NON_FINITE_ROWS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_cross_entropy_non_finite_rows(row, reduction, label_smoothing, dtype):
    """Row 0 is the special one (target class 2); row 1 is ordinary; row 2 is ignored."""
    if dtype == torch.float16 and row == "max_float":
        pytest.skip("3e38 is inf in float16")
    x = torch.tensor([NON_FINITE_ROWS[row], [0.3, -0.2, 1.0, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=dtype)
    t = torch.tensor([2, 1, -100])
    check_against_torch(
        X.cross_entropy,
        F.cross_entropy,
        x.requires_grad_(),
        t,
        reduction=reduction,
        label_smoothing=label_smoothing,
    )


@pytest.mark.parametrize("row", list(NON_FINITE_ROWS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_non_finite_in_ignored_row_does_not_leak(row, reduction):
    """Same loss as torch; the ignored row's gradient is exactly 0. torch's is NaN there when the row holds
    +inf, NaN or only -inf (log_softmax's backward multiplies NaN by the row's zero gradient): we deliberately
    do not copy that, so the comparison with torch uses a torch gradient with the ignored row zeroed."""
    x = torch.tensor([[0.3, -0.2, 1.0, 0.0], NON_FINITE_ROWS[row]], dtype=torch.float32).requires_grad_()
    t = torch.tensor([1, 7])

    def torch_with_zero_ignored_grad(x, t, **kwargs):
        keep = torch.tensor([[True], [False]])
        masked = torch.where(keep, x, x.detach())  # the ignored row carries no gradient
        return F.cross_entropy(masked, t, **kwargs)

    out = check_against_torch(X.cross_entropy, torch_with_zero_ignored_grad, x, t, ignore_index=7, reduction=reduction)
    assert out.isfinite().all()


@pytest.mark.parametrize("row", list(NON_FINITE_ROWS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_non_finite_probability_target(row, reduction):
    """A -inf logit gives NaN with probability targets (0 * -inf), even where the target is 0."""
    x = torch.tensor([NON_FINITE_ROWS[row], [0.3, -0.2, 1.0, 0.0]], dtype=torch.float64).requires_grad_()
    t = torch.tensor([[0.0, 0.25, 0.75, 0.0], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64).requires_grad_()
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, reduction=reduction)


def non_contiguous(kind, shape, dtype):
    """A view of `shape` that is not contiguous: transposed from the swapped shape, or a strided slice."""
    if kind == "transposed":
        swapped = shape[:-2] + (shape[-1], shape[-2])
        base = logits(swapped, dtype, requires_grad=False)
        return base.transpose(-1, -2).requires_grad_()
    base = logits(shape[:-1] + (shape[-1] * 2,), dtype, requires_grad=False)
    return base[..., ::2].requires_grad_()


@pytest.mark.parametrize("kind", ["transposed", "sliced"])
@pytest.mark.parametrize("shape", [(7, 13), (3, 4, 5), (2, 6, 3, 4)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs(kind, shape, reduction, dtype):
    x = non_contiguous(kind, shape, dtype)
    assert not x.is_contiguous()
    t = index_target(shape, ignore_every=4)
    check_against_torch(X.cross_entropy, F.cross_entropy, x, t, reduction=reduction, label_smoothing=0.1)
    # torch's nll_loss backward rejects a non-contiguous 4-D input ("grad_input must be contiguous"); compare
    # with torch on a contiguous copy (same values, same gradient).
    check_against_torch(X.nll_loss, lambda x, *a, **k: F.nll_loss(x.contiguous(), *a, **k), x, t, reduction=reduction)
    p = non_contiguous(kind, shape, dtype).detach().softmax(1).requires_grad_()
    check_against_torch(X.cross_entropy, F.cross_entropy, x, p, reduction=reduction)
    check_against_torch(X.log_softmax, F.log_softmax, x, 1)
    check_against_torch(X.softmax, F.softmax, x, -1)
    check_against_torch(X.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, p)


TARGET_031 = torch.tensor([0, 3, 1])


# ----------------------------------------------------------------------------------------------------------
# gradcheck, double backward, retain_graph
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, make",
    [
        ("ce_index", lambda: (X.cross_entropy, (logits((3, 4), torch.float64), torch.tensor([0, 3, -100])))),
        ("ce_smooth_weighted", lambda: (
            lambda x, t, w: X.cross_entropy(x, t, w, label_smoothing=0.2, reduction="sum"),
            (logits((3, 4, 2), torch.float64), index_target((3, 4, 2)), class_weight(4, torch.float64)))),
        ("ce_prob", lambda: (
            lambda x, t, w: X.cross_entropy(x, t, w, label_smoothing=0.1),
            (logits((3, 4), torch.float64), prob_target((3, 4), torch.float64),
             class_weight(4, torch.float64, requires_grad=True)))),
        ("ce_none", lambda: (
            lambda x, t: X.cross_entropy(x, t, reduction="none"),
            (logits((3, 4), torch.float64), torch.tensor([1, 2, 0])))),
        ("ce_extensions", lambda: (
            lambda x, t: X.cross_entropy(x, t, z_loss=0.1, softcap=3.0, label_smoothing=0.1),
            (logits((3, 4), torch.float64), torch.tensor([1, 2, 0])))),
        ("log_softmax", lambda: (lambda x: X.log_softmax(x, 1), (logits((3, 4, 2), torch.float64),))),
        ("softmax", lambda: (lambda x: X.softmax(x, 0), (logits((3, 4), torch.float64),))),
        ("nll", lambda: (X.nll_loss, (logits((3, 4), torch.float64), torch.tensor([0, 3, 1])))),
        ("bce", lambda: (X.binary_cross_entropy, (probabilities((3, 4), torch.float64) * 0.8 + 0.1,
                                                  probabilities((3, 4), torch.float64, seed=1)))),
        ("bce_logits", lambda: (
            lambda x, y: X.binary_cross_entropy_with_logits(x, y, pos_weight=torch.full((4,), 2.0).double()),
            (logits((3, 4), torch.float64), probabilities((3, 4), torch.float64, seed=1)))),
    ],
)  # fmt: skip
def test_gradcheck(name, make):
    fn, inputs = make()
    inputs = tuple(t.detach().requires_grad_(t.is_floating_point() and t.requires_grad) for t in inputs)
    # nondet_tol: the first backward scales the fused buffer made in forward, a repeated one recomputes the
    # gradient by the composite formula, which may differ in the last bits (test_retain_graph_backward_twice)
    assert torch.autograd.gradcheck(fn, inputs, nondet_tol=1e-12)


@pytest.mark.parametrize(
    "name, make",
    [
        ("ce_index", lambda: (lambda x: X.cross_entropy(x, torch.tensor([0, 3, -100])),
                              (logits((3, 4), torch.float64),))),
        ("ce_index_weighted_smoothed", lambda: (
            lambda x: X.cross_entropy(x, torch.tensor([0, 3, 1]), class_weight(4, torch.float64),
                                      label_smoothing=0.3, reduction="none"),
            (logits((3, 4), torch.float64),))),
        ("ce_prob", lambda: (lambda x, t: X.cross_entropy(x, t), (logits((3, 4), torch.float64),
                                                                   prob_target((3, 4), torch.float64)))),
        ("ce_extensions", lambda: (lambda x: X.cross_entropy(x, TARGET_031, z_loss=0.2, softcap=2.0),
                                   (logits((3, 4), torch.float64),))),
        ("log_softmax", lambda: (lambda x: X.log_softmax(x, 1), (logits((3, 4), torch.float64),))),
        ("softmax", lambda: (lambda x: X.softmax(x, -1), (logits((2, 3, 4), torch.float64),))),
    ],
)  # fmt: skip
def test_gradgradcheck(name, make):
    fn, inputs = make()
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_double_backward_matches_torch(reduction, kind):
    """Hessian-vector products through create_graph=True equal torch's."""
    x = logits((4, 5), torch.float64)
    t = (
        index_target((4, 5), ignore_every=3)
        if kind == "index"
        else prob_target((4, 5), torch.float64, requires_grad=False)
    )
    w = class_weight(5, torch.float64)
    v = random_direction((4, 5))
    results = []
    for fn in (X.cross_entropy, F.cross_entropy):
        leaf = x.detach().clone().requires_grad_()
        out = fn(leaf, t, w, reduction=reduction, label_smoothing=0.1)
        (g,) = torch.autograd.grad(out.sum(), leaf, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), leaf)
        results.append((g.detach(), hv))
    assert_same(results[0], results[1], "grad, hvp")


def random_direction(shape):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_retain_graph_backward_twice(reduction, kind):
    """A second backward (after the fused buffer was handed out) gives the same gradient again."""
    x = logits((5, 4))
    t = index_target((5, 4), ignore_every=2) if kind == "index" else prob_target((5, 4), requires_grad=False)
    out = X.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1)
    g = random_like_output(out)
    (first,) = torch.autograd.grad(out, x, g, retain_graph=True)
    first = first.clone()
    (second,) = torch.autograd.grad(out, x, g)
    (expected,) = torch.autograd.grad(F.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1), x, g)
    assert_same(first, expected, "first backward")
    assert_same(second, expected, "second backward")


def random_like_output(out):
    return torch.rand(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype) + 0.5


def test_backward_accumulates_into_existing_grad():
    """.backward() twice into the same leaf adds up like torch (the fused buffer must not alias x.grad)."""
    t = index_target((5, 4))
    grads = []
    for fn in (X.cross_entropy, F.cross_entropy):
        x = logits((5, 4))
        fn(x, t).backward()
        fn(x, t, reduction="sum").backward()
        fn(x * 2, t).backward()
        grads.append(x.grad)
    assert_same(grads[0], grads[1], "accumulated grad")


# --------------------------------------------------------------------------------------------------------
# Extensions: z_loss, softcap, normalizer, return_stats, inplace_backward, chunk_size, backend
# --------------------------------------------------------------------------------------------------------


EXTENSIONS = [
    dict(z_loss=1e-2),
    dict(z_loss=0.5, label_smoothing=0.1),
    dict(softcap=3.0),
    dict(softcap=0.5, z_loss=0.1),
    dict(softcap=10.0, z_loss=1e-3, label_smoothing=0.2, weighted=True),
    dict(z_loss=0.2, weighted=True),
]


def extension_case(kind, shape, dtype, options):
    options = dict(options)
    x = logits(shape, dtype, scale=4.0)
    if kind == "index":
        t = index_target(shape, ignore_every=3 if len(shape) > 1 else 0)
    else:
        t = prob_target(shape, dtype)
    w = class_weight(class_count(shape), dtype, requires_grad=kind == "prob") if options.pop("weighted", 0) else None
    return x, t, w, options


EXTENSION_CASES = [((6, 5), torch.float64), ((3, 5, 4), torch.float64), ((6, 5), torch.float32),
                   ((5,), torch.float64), ((6, 5), torch.bfloat16)]  # fmt: skip


@pytest.mark.parametrize("options", EXTENSIONS)
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape, dtype", EXTENSION_CASES)
def test_extensions_match_composed_formula(options, kind, reduction, shape, dtype):
    x, t, w, options = extension_case(kind, shape, dtype, options)
    check_against_torch(X.cross_entropy, composed_cross_entropy, x, t, w, reduction=reduction, **options)


@pytest.mark.parametrize("normalizer", [7, 2.5, torch.tensor(3.0), torch.tensor(4, dtype=torch.long)])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("z_loss", [0.0, 0.1])
def test_normalizer_divides_the_sum(normalizer, kind, z_loss):
    x, t, w, _ = extension_case(kind, (6, 5, 2), torch.float64, {})
    check_against_torch(
        X.cross_entropy, composed_cross_entropy, x, t, reduction="sum", normalizer=normalizer, z_loss=z_loss
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("normalizer", [4, torch.tensor(4.0)])
def test_normalizer_only_with_sum(reduction, normalizer):
    with pytest.raises(ValueError, match="normalizer"):
        X.cross_entropy(logits((3, 4)), torch.tensor([0, 1, 2]), reduction=reduction, normalizer=normalizer)


@pytest.mark.parametrize(
    "kwargs",
    [dict(z_loss=-0.1), dict(z_loss=math.nan), dict(z_loss=True), dict(softcap=0.0), dict(softcap=-1.0),
     dict(reduction="sum", normalizer=torch.ones(2)), dict(reduction="sum", normalizer=0), dict(chunk_size=0),
     dict(chunk_size=1.5), dict(chunk_size=True), dict(backend="cuda-magic")],
)  # fmt: skip
def test_invalid_extension_arguments(kwargs):
    with pytest.raises(ValueError):
        X.cross_entropy(logits((3, 4)), torch.tensor([0, 1, 2]), **kwargs)


@pytest.mark.parametrize("options", EXTENSIONS[:4] + [dict(label_smoothing=0.1, weighted=True)])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extensions_match_reference(options, kind, reduction):
    """Value and gradients against xentlib.reference (NumPy, float64) with a random grad_output."""
    reference = pytest.importorskip("xentlib.reference")
    x, t, w, options = extension_case(kind, (6, 5, 3), torch.float64, options)
    normalizer = 3.5 if reduction == "sum" else None
    ours = X.cross_entropy(x, t, w, reduction=reduction, normalizer=normalizer, **options)
    args = (x.detach().numpy(), t.detach().numpy(), None if w is None else w.detach().numpy())
    expected = reference.cross_entropy(*args, reduction=reduction, normalizer=normalizer, **options)
    assert_same(ours.detach(), torch.as_tensor(expected), "loss")
    leaves = [v for v in (x, t, w) if v is not None and v.requires_grad]
    grad_output = random_like_output(ours)
    grads = torch.autograd.grad(ours, leaves, grad_output)
    ref = reference.cross_entropy_backward(
        grad_output.numpy(), *args, reduction=reduction, normalizer=normalizer, **options
    )
    ref_grads = [ref.input] + ([ref.target] if t.requires_grad else []) + ([ref.weight] if w is not None else [])
    for name, ours_grad, ref_grad in zip(("input", "target", "weight"), grads, ref_grads, strict=False):
        assert_same(ours_grad, torch.as_tensor(ref_grad), f"grad {name}")


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_return_stats(kind, dtype, softcap, reduction):
    """lse, loss, argmax, correct, entropy against torch ops in float64; lse and entropy gradients too."""
    x, t, w, _ = extension_case(kind, (6, 5, 2), dtype, {})
    if kind == "index":
        x.data[0, 2, 0] = x.data[0, :, 0].max() + 1.0  # a correct prediction on a valid row
        t[0, 0] = 2
    stat_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    a, b = (
        random_like_output(t.sum(1) if kind == "prob" else t.double()),
        random_like_output(x[:, 0].double()),
    )

    def ours(x, t):
        loss, stats = X.cross_entropy(x, t, reduction=reduction, softcap=softcap, z_loss=0.1, return_stats=True)
        return loss.double().sum() + (a * stats.lse).sum() + (b * stats.entropy).sum()

    def theirs(x, t):
        y = x.double() if softcap is None else softcap * torch.tanh(x.double() / softcap)
        lse, log_p = torch.logsumexp(y, 1), torch.log_softmax(y, 1)
        entropy = -(log_p.exp() * log_p).sum(1)
        loss = composed_cross_entropy(x, t, reduction=reduction, softcap=softcap, z_loss=0.1)
        return loss.double().sum() + (a * lse.to(stat_dtype)).sum() + (b * entropy.to(stat_dtype)).sum()

    check_against_torch(ours, theirs, x, t)
    loss, stats = X.cross_entropy(x, t, reduction=reduction, softcap=softcap, z_loss=0.1, return_stats=True)
    y = x.detach().double() if softcap is None else softcap * torch.tanh(x.detach().double() / softcap)
    expected_argmax = y.argmax(1)
    if kind == "index":
        expected_correct = (expected_argmax == t) & (t != -100)
    else:
        expected_correct = expected_argmax == t.argmax(1)
    log_p = torch.log_softmax(y, 1)
    expected = (
        torch.logsumexp(y, 1).to(stat_dtype),
        composed_cross_entropy(x.detach(), t.detach(), reduction="none", softcap=softcap, z_loss=0.1),
        expected_argmax,
        expected_correct,
        (-(log_p.exp() * log_p).sum(1)).to(stat_dtype),
    )
    assert_same(tuple(s.detach() for s in stats), expected, "stats", tolerance(dtype))
    assert bool(stats.correct.any()), "the case should have some correct predictions, or `correct` is untested"
    assert stats._fields == ("lse", "loss", "argmax", "correct", "entropy")


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("options", [{}, dict(z_loss=0.1, softcap=3.0, label_smoothing=0.1, weighted=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient(kind, reduction, options, dtype):
    x, t, w, options = extension_case(kind, (6, 5, 3), dtype, options)
    if w is not None:
        w.requires_grad_(False)
    t = t.detach()
    check_against_torch(
        lambda x, *a, **k: X.cross_entropy(x.clone(), *a, inplace_backward=True, **k),
        lambda x, *a, **k: X.cross_entropy(x.clone(), *a, **k),
        x, t, w, reduction=reduction, **options,
    )  # fmt: skip


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x: x, "leaf Variable that requires grad"),
        (lambda x: x.view(8, 6), "view of a leaf Variable"),
        (lambda x: (x[0] * 1).expand(8, 6), "more than one element"),
        (lambda x: (x * 1).as_strided((8, 6), (3, 1)), "more than one element"),
    ],
    ids=["leaf", "view-of-leaf", "expanded", "overlapping"],
)
def test_inplace_backward_refuses_what_torch_refuses(make, match, request):
    """Writing the gradient over a parameter, or over memory several logits share, is what torch's in-place ops
    refuse: the loss and gradient would be wrong (or the parameter destroyed)."""
    name = request.node.callspec.id
    x = torch.randn(8, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match=match):
        X.cross_entropy(make(x), torch.randint(0, 6, (8,)), inplace_backward=True)
    if name != "overlapping":  # torch's own verdict on an in-place write there (rows that partly overlap are
        with pytest.raises(RuntimeError, match=match):  # too hard for it to tell; we refuse them too)
            make(x).mul_(2)


def test_inplace_backward_marks_the_logits_modified():
    """A tensor saved by another op from the same logits raises on backward (not a silent wrong result)."""
    x = logits((4, 5))
    z = x * 2
    side = z.sin()  # saves z for its backward
    loss = X.cross_entropy(z, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + side.sum()).backward()


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(return_stats=True), "return_stats"), (dict(target_grad=True), "target")],
)
def test_inplace_backward_rejects_what_needs_the_logits(kwargs, match):
    t = prob_target((4, 5), requires_grad=kwargs.pop("target_grad", False))
    with pytest.raises(ValueError, match=match):
        X.cross_entropy(logits((4, 5)), t, inplace_backward=True, **kwargs)


def test_inplace_backward_second_backward_raises():
    loss = X.cross_entropy(logits((4, 5)) * 1, torch.tensor([0, 1, 2, 3]), inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace_backward"):
        loss.backward()


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 1000])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (2, 5, 3, 3)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_chunk_size_does_not_change_the_result(chunk_size, kind, shape, reduction):
    x, t, w, options = extension_case(kind, shape, torch.float32, EXTENSIONS[4])
    check_against_torch(
        lambda *a, **k: X.cross_entropy(*a, chunk_size=chunk_size, backend="torch", **k),
        X.cross_entropy, x, t, w, reduction=reduction, **options,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_explicit_torch_backend(backend):
    x, t = logits((6, 5)), index_target((6, 5), ignore_every=2)
    check_against_torch(lambda *a, **k: X.cross_entropy(*a, backend=backend, **k), F.cross_entropy, x, t)


@pytest.mark.parametrize("options", [{}, dict(softcap=2.0), dict(chunk_size=2), dict(reduction="none", z_loss=0.1)])
def test_gradient_through_statistics_only(options):
    """The loss unused: d(lse + 2 entropy)/dx alone, from the statistics' own gradients."""
    x, t = logits((5, 4), torch.float64), torch.tensor([0, 1, -100, 3, 2])
    softcap = options.get("softcap")

    def ours(x, t):
        _, stats = X.cross_entropy(x, t, return_stats=True, **options)
        return stats.lse.sum() + 2 * stats.entropy.sum()

    def theirs(x, t):
        y = x if softcap is None else softcap * torch.tanh(x / softcap)
        log_p = torch.log_softmax(y, 1)
        return torch.logsumexp(y, 1).sum() + 2 * (-(log_p.exp() * log_p).sum(1)).sum()

    check_against_torch(ours, theirs, x, t)


@pytest.mark.parametrize(
    "options", [dict(z_loss=0.1), dict(softcap=5.0), dict(z_loss=0.1, softcap=5.0, label_smoothing=0.1)]
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extensions_with_non_finite_logits(options, reduction):
    """-inf on another class, +inf, and an ignored row: same values and NaN positions as the composed formula."""
    x = torch.tensor(
        [[-math.inf, 1.0, 2.0], [1.0, 2.0, 3.0], [0.5, 0.0, 0.0], [math.inf, 0.0, 0.0]], dtype=torch.float64
    ).requires_grad_()
    t = torch.tensor([1, 2, -100, 0])
    check_against_torch(X.cross_entropy, composed_cross_entropy, x, t, reduction=reduction, **options)


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Make the PyTorch backend's default chunk a few dozen elements, so small tensors span many chunks."""
    torch_chunked = pytest.importorskip("xentlib.backends.torch_chunked")
    if not hasattr(torch_chunked, "CHUNK_ELEMENTS"):
        pytest.skip("the PyTorch backend no longer has a CHUNK_ELEMENTS setting")
    monkeypatch.setattr(torch_chunked, "CHUNK_ELEMENTS", 24)


@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 4), (2, 5, 3, 3), (9,)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_default_chunking_across_chunk_boundaries(tiny_chunks, shape, dtype, reduction):
    """backend='torch': the chunked PyTorch ops with chunks of a few dozen elements (the compiled CPU kernel,
    which `auto` picks where it can, has no chunks to cross)."""
    x = logits(shape, dtype)
    t = index_target(shape, ignore_every=3 if len(shape) > 1 else 0)
    w = class_weight(class_count(shape), dtype)
    chunked = lambda *a, **k: X.cross_entropy(*a, backend="torch", **k)  # noqa: E731
    check_against_torch(chunked, F.cross_entropy, x, t, w, reduction=reduction, label_smoothing=0.1)
    check_against_torch(chunked, F.cross_entropy, x, prob_target(shape, dtype), reduction=reduction)
    for dim in range(len(shape)):
        check_against_torch(X.log_softmax, F.log_softmax, x, dim)
        check_against_torch(X.softmax, F.softmax, x, dim)


@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_deterministic(kind, dtype):
    """The same inputs give bit-identical loss and gradient run to run."""
    x, t, w, options = extension_case(kind, (300, 37, 3), dtype, EXTENSIONS[4])
    results = []
    for _ in range(2):
        leaf = x.detach().clone().requires_grad_()
        loss = X.cross_entropy(leaf, t.detach(), None if w is None else w.detach(), **options)
        results.append((loss.detach(), torch.autograd.grad(loss, leaf)[0]))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
