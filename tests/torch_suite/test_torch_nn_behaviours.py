"""Behaviours that torch's test/test_nn.py checks for the family, re-expressed here and run twice: once with
torch's `torch.nn.functional` / `torch.nn`, once with xentlib's swapped in (the `implementation` fixture of
_torch_patch.py), expecting the same outcome. test_nn.py is not in the wheel; it was read from pytorch/pytorch.
Each test names the torch test(s) it covers; COVERAGE.md beside this file maps every family test of test_nn.py
to a test here, to test_torch_common_nn.py / test_torch_module_info.py, or to the reason it is left out.

The bodies look `F.<fn>` and `nn.<Module>` up at call time, so they run whichever implementation is in place.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from _torch_patch import implementation  # noqa: F401 - the fixture
from torch import nn
from torch.autograd import gradcheck
from torch.nn import functional as F

import xentlib.functional as XF

try:
    from torch.testing._internal.common_nn import loss_reference_fns
except Exception:  # noqa: BLE001 - the one test that needs it skips
    loss_reference_fns = None

pytestmark = pytest.mark.usefixtures("implementation")


def close(actual, expected, **tol):
    torch.testing.assert_close(actual, expected, **tol)


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


# --- BCELoss / binary_cross_entropy (TestNN) ------------------------------------------------------------------


def test_bce_loss_is_never_negative():  # test_bce_loss_always_nonnegative
    for value in (0.0, 1.0):
        x = torch.full((5,), value)
        assert not bool((nn.BCELoss()(x, x) < 0).any())


def test_bce_loss_input_range():  # test_bce_loss_input_range
    g = generator()
    target, valid = torch.rand(25, 25, generator=g), torch.rand(25, 25, generator=g)
    nn.BCELoss()(valid, target)
    for outside in (valid - 1.0, valid + 1.0):
        with pytest.raises(RuntimeError, match="between 0 and 1"):
            nn.BCELoss()(outside, target)


def test_bce_loss_size_mismatch():  # test_bce_loss_size_mismatch
    with pytest.raises(ValueError, match=r"Using a target size \("):
        nn.BCELoss()(torch.rand(25), torch.rand(25, 1))


def test_bce_loss_broadcasts_weights():  # test_bce_loss_broadcasts_weights
    g = generator()
    target, x = torch.rand(16, 4, generator=g), torch.sigmoid(torch.rand(16, 4, generator=g) - 0.5)
    for weight in (torch.rand(4, generator=g), torch.rand(16, 1, generator=g)):
        close(nn.BCELoss(weight)(x, target), nn.BCELoss(weight.expand(16, 4).contiguous())(x, target))


@pytest.mark.parametrize("shape", [(5, 6), ()])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_loss_scalar_shapes(shape, reduction):  # TestNNDeviceType.test_nn_scalars_reductions (BCELoss part)
    g = generator()
    x = torch.randn(shape, generator=g, requires_grad=True)
    target = torch.randint(0, 2, shape, generator=g).float()
    out = nn.BCELoss(reduction=reduction)(torch.sigmoid(x), target)
    assert out.shape == (shape if reduction == "none" else ())
    out.sum().backward()
    assert x.grad.shape == x.shape


# --- BCEWithLogitsLoss (TestNN) --------------------------------------------------------------------------------


def test_bce_with_logits_rejects_other_sizes():  # test_bce_with_logits_raises_if_target_and_input_are_different_size
    for input_shape, target_shape in (((5, 1), (5,)), ((5,), (5, 1))):
        with pytest.raises(ValueError):
            nn.BCEWithLogitsLoss()(torch.rand(input_shape), torch.rand(target_shape))


def test_bce_with_logits_equals_sigmoid_then_bce():  # test_bce_with_logits_gives_same_result_as_sigmoid_and_bce_loss
    g = generator()
    target, logits = torch.rand(64, 4, generator=g), torch.rand(64, 4, generator=g) - 0.5
    close(nn.BCEWithLogitsLoss()(logits, target), nn.BCELoss()(torch.sigmoid(logits), target))
    weight = torch.rand(4, generator=g)
    close(nn.BCEWithLogitsLoss(weight)(logits, target), nn.BCELoss(weight)(torch.sigmoid(logits), target))
    target, logits = torch.zeros(4, 1), torch.full((4, 1), -100.0)
    close(nn.BCEWithLogitsLoss()(logits, target), nn.BCELoss()(torch.sigmoid(logits), target))
    close(nn.BCEWithLogitsLoss(reduction="none")(logits, target),
          nn.BCELoss(reduction="none")(torch.sigmoid(logits), target))  # fmt: skip
    weight = torch.rand(1, generator=g)
    close(nn.BCEWithLogitsLoss(weight)(logits, target), nn.BCELoss(weight)(torch.sigmoid(logits), target))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_with_logits_equals_sigmoid_then_bce_with_grad(reduction):
    # test_bce_with_logits_gives_same_result_as_sigmoid_and_bce_loss_large_tensors_with_grad (256 x 64 here)
    g = generator()
    target = torch.rand(256, 64, generator=g)
    logits_a = (torch.rand(256, 64, generator=g) - 0.5).requires_grad_()
    logits_b = logits_a.detach().clone().requires_grad_()
    weight = torch.rand(64, generator=g)
    via_sigmoid = nn.BCELoss(weight, reduction=reduction)(torch.sigmoid(logits_a), target)
    direct = nn.BCEWithLogitsLoss(weight, reduction=reduction)(logits_b, target)
    close(direct, via_sigmoid)
    grad = torch.rand(256, 64, generator=g) if reduction == "none" else None
    via_sigmoid.backward(grad)
    direct.backward(grad)
    close(logits_b.grad, logits_a.grad)


@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_bce_with_logits_forward_mode_gradient(reduction):  # test_bce_with_logits_has_correct_forward_grad
    g = generator()
    logits = torch.randn(3, 5, dtype=torch.double, generator=g, requires_grad=True)
    target = torch.randn(3, 5, dtype=torch.double, generator=g)
    assert gradcheck(lambda x, t: nn.BCEWithLogitsLoss(reduction=reduction)(x, t), (logits, target),
                     check_forward_ad=True)  # fmt: skip


@pytest.mark.parametrize("pos_weight", [None, torch.ones(3, 1)])
def test_bce_with_logits_gradient_at_zero(pos_weight):
    # test_bce_with_logits_has_correct_grad_at_zero, test_bce_with_logits_with_pos_weight_has_correct_grad_at_zero
    logits = torch.zeros(3, 1, requires_grad=True)
    nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="sum")(logits, torch.zeros(3, 1)).backward()
    close(logits.grad, torch.full((3, 1), 0.5))


def test_bce_with_logits_broadcasts_weights():  # test_bce_with_logits_broadcasts_weights
    g = generator()
    target, logits = torch.rand(16, 4, generator=g), torch.rand(16, 4, generator=g) - 0.5
    for weight in (torch.rand(4, generator=g), torch.rand(16, 1, generator=g)):
        full = weight.expand(16, 4).contiguous()
        close(nn.BCEWithLogitsLoss(weight)(logits, target), nn.BCEWithLogitsLoss(full)(logits, target))


def test_bce_with_logits_unit_pos_weight_is_none():  # test_bce_with_logits_ones_in_pos_weights_are_the_same_as_none
    g = generator()
    target, logits = torch.rand(64, 4, generator=g), torch.rand(64, 4, generator=g) - 0.5
    close(nn.BCEWithLogitsLoss()(logits, target), nn.BCEWithLogitsLoss(pos_weight=torch.ones(64, 4))(logits, target))


def test_bce_with_logits_broadcasts_pos_weights():  # test_bce_with_logits_broadcasts_pos_weights
    g = generator()
    target, logits = torch.rand(64, 4, generator=g), torch.rand(64, 4, generator=g) - 0.5
    pos_weight = torch.rand(4, generator=g)
    expected = nn.BCEWithLogitsLoss(pos_weight=pos_weight)(logits, target)
    for expanded in (pos_weight.expand(1, 4), pos_weight.expand(64, 4)):
        close(nn.BCEWithLogitsLoss(pos_weight=expanded)(logits, target), expected)


def test_bce_with_logits_stability():  # test_bce_with_logits_stability
    logits, target = torch.tensor([0.0, -120.0]), torch.tensor([0.0, 1.0])
    assert bool(nn.BCEWithLogitsLoss()(logits, target).isfinite().all())
    assert bool(nn.BCEWithLogitsLoss(pos_weight=torch.ones(2))(logits, target).isfinite().all())


# --- softmax / log_softmax -------------------------------------------------------------------------------------


def test_softmin_is_softmax_of_negated_input():  # TestNN.test_softmin
    x = torch.randn(2, 16, generator=generator())
    for dim in (1, 0):
        close(F.softmin(x, dim), F.softmax(-x, dim))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_nan_propagates(name):  # TestNNDeviceType.test_nonlinearity_propagate_nan (softmax, log_softmax parts)
    assert bool(getattr(F, name)(torch.tensor([float("nan")]), 0).isnan().all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("fn", "atol"), [("log_softmax", 0.1), ("softmax", 1e-3)])
def test_half_softmax_against_float32(fn, atol, dtype):
    # TestNNDeviceType.test_log_softmax_cpu, test_softmax_cpu (200 x 200, both dims, torch's tolerances)
    inputf = torch.rand(200, 200, generator=generator(), requires_grad=True)
    for dim in (0, 1):
        inputf.grad = None
        input = inputf.detach().to(dtype).requires_grad_()
        out, outf = getattr(F, fn)(input, dim=dim), getattr(F, fn)(inputf, dim=dim)
        close(out, outf.to(dtype), atol=atol, rtol=0)
        out.sum().backward()
        outf.sum().backward()
        close(input.grad, inputf.grad.to(dtype), atol=atol, rtol=0)


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_results_with_dtype(fn):
    # TestNNDeviceType.test_softmax_results (CPU: float input, dtype=float; odd sizes, empty, shifted views;
    # first and second derivatives against a second run on a copy). To keep the run short the largest size
    # (16, 30576) is cut to (16, 3057) and the wide sizes take two of the four shifts.
    sizes = [(0, 10), (32, 20), (10, 0), (31, 20), (32, 21), (31, 23), (32, 1536), (31, 2048), (33, 2049), (16, 3057)]
    g = generator()
    cases = [(size, shift, dim) for size in sizes for shift in [(0, 0), (1, 0), (0, 1), (1, 1)] for dim in (0, 1)]
    for size, (s0, s1), dim in [c for c in cases if c[0][1] < 1000 or c[1] in ((0, 0), (1, 1))]:
        input = torch.rand(size, generator=g)[s0:, s1:].detach().requires_grad_()
        reference = input.detach().clone().requires_grad_()
        grad_output = torch.rand(size, generator=g)[s0:, s1:]
        output = getattr(F, fn)(input, dtype=torch.float, dim=dim)
        ref_output = getattr(torch, fn)(reference, dtype=torch.float, dim=dim)  # torch's tensor-level op
        (grad,) = torch.autograd.grad(output, input, grad_output, create_graph=True)
        (ref_grad,) = torch.autograd.grad(ref_output, reference, grad_output, create_graph=True)
        grad.sum().backward()
        ref_grad.sum().backward()
        close(output, ref_output)
        close(grad, ref_grad)
        close(input.grad, reference.grad)


def test_log_softmax_of_shifted_input():  # TestNNDeviceType.test_log_softmax_big
    small = torch.randint(100, (16, 4), generator=generator()).float()
    close(F.log_softmax(small, -1), F.log_softmax(small + 1e7, -1))


def test_softmax_with_dtype_casts_first():
    # TestNNDeviceType.test_softmax (onlyCUDA there; the behaviour is device independent): softmax(half input,
    # dtype=float) equals softmax of the float32 input, bitwise, and so do the gradients (cast back to half)
    input = torch.rand(32, 100, generator=generator(), dtype=torch.half, requires_grad=True)
    inputf = input.detach().float().requires_grad_()
    out, outf = F.softmax(input, dim=-1, dtype=torch.float), F.softmax(inputf, dim=-1)
    close(out, outf, atol=0, rtol=0)
    grad = torch.rand(32, 100, generator=generator(1))
    out.backward(grad)
    outf.backward(grad)
    close(input.grad, inputf.grad.to(torch.half), atol=0, rtol=0)


@pytest.mark.parametrize("scale", [None, 1000.0])
def test_softmax_module_bfloat16(scale):
    # TestNNDeviceType.test_softmax_bfloat16 (common_nn._test_bfloat16_ops with nn.Softmax on 16 x 33 x 15 x 16;
    # 4 x 33 x 15 x 16 here): bfloat16 against float32, including inputs large enough that exp() overflows
    prec = 1e-2 if scale is None else 0.05
    g = generator()
    for dim in range(4):
        base = torch.randn(4, 33, 15, 16, generator=g)
        if scale is not None:
            base = (torch.rand(4, 33, 15, 16, generator=g).bfloat16() * scale).float()
        inputf = base.requires_grad_()
        outf = nn.Softmax(dim=dim)(inputf)
        grad = torch.randn(outf.shape, generator=g)
        outf.backward(grad)
        input = inputf.detach().bfloat16().requires_grad_()
        out = nn.Softmax(dim=dim).bfloat16()(input)
        out.backward(grad.bfloat16())
        close(out, outf, atol=prec, rtol=prec, check_dtype=False)
        close(input.grad, inputf.grad, atol=prec, rtol=prec, check_dtype=False)


def test_kl_div_of_log_softmax_target():  # TestNN.test_kl_div_log_softmax_target
    a = torch.tensor([[1.0, 2, 3], [5.0, 5, 5]])
    kl = F.kl_div(F.log_softmax(a, 1), F.log_softmax(a.clone(), 1), reduction="none", log_target=True)
    close(kl, torch.zeros_like(a))


# --- nll_loss / NLLLoss (TestNNDeviceType) ---------------------------------------------------------------------


def test_nll_loss_mismatched_batch():  # test_nll_loss_mismatched_batch
    with pytest.raises(ValueError, match="Expected.*batch_size"):
        F.nll_loss(torch.randn(10, 3, requires_grad=True), torch.zeros(3, dtype=torch.int64))


def test_nll_loss_out_of_bounds_ignore_index():  # test_nll_loss_out_of_bounds_ignore_index
    x = torch.randn(6, 3, generator=generator(), requires_grad=True)
    t = torch.tensor([0, 1, 255, 0, 1, 2])
    for reduction in ("mean", "none"):
        F.nll_loss(x, t, ignore_index=255, reduction=reduction).sum().backward()


def test_nll_loss_invalid_target_dim():  # test_nll_loss_invalid_target_dim
    with pytest.raises(RuntimeError, match="1D target tensor expected"):
        F.nll_loss(torch.randn(10, 3), torch.zeros(10, 2, dtype=torch.int64))


def test_nll_loss_invalid_weights():  # test_nll_loss_invalid_weights
    t = torch.randint(0, 3, (10,), generator=generator())
    for weight in (torch.randn(4), torch.randn(1, 3)):
        with pytest.raises(
            RuntimeError, match="weight tensor should be defined either for all 3 classes or no classes"
        ):
            F.nll_loss(torch.randn(10, 3), t, weight=weight)


EMPTY_SHAPES = [[0, 3], [0, 3, 5, 7], [2, 3, 0, 7], [2, 3, 5, 0], [2, 3, 5, 7, 0]]


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_nll_loss_empty_tensor(reduction):
    # test_nll_loss_empty_tensor_reduction_none / _mean / _sum
    g = generator()
    for shape in EMPTY_SHAPES:
        input = torch.rand(shape, generator=g, requires_grad=True)
        target = torch.randint(shape[1], (shape[0], *shape[2:]), generator=g)
        output = F.nll_loss(input, target, reduction=reduction)
        expected = {"none": torch.empty(target.shape), "mean": torch.tensor(float("nan")), "sum": torch.tensor(0.0)}
        close(output, expected[reduction], equal_nan=True)
        output.sum().backward()
        assert input.grad.shape == input.shape


@pytest.mark.parametrize("shape", [[2, 3], [2, 3, 5, 7], [2, 3, 5, 7, 9]])
def test_nll_loss_total_weight_zero_and_all_ignored(shape):
    # test_nll_loss_total_weight_is_zero, test_nll_loss_all_ignored
    input = torch.ones(shape, requires_grad=True)
    target = torch.zeros((shape[0], *shape[2:]), dtype=torch.long)
    for kwargs in ({"weight": torch.zeros(shape[1])}, {"ignore_index": 0}):
        assert F.nll_loss(input, target, reduction="sum", **kwargs).item() == 0.0
        assert torch.isnan(F.nll_loss(input, target, reduction="mean", **kwargs))
        close(F.nll_loss(input, target, reduction="none", **kwargs), torch.zeros(target.shape))


def test_nll_loss_byte_target_matches_long():  # test_nll_loss_byte_target_matches_long
    g = generator()
    input = torch.randn(10, 4, generator=g)
    target = torch.randint(0, 4, (10,), generator=g)
    for reduction in ("none", "mean", "sum"):
        results = []
        for dtype in (torch.long, torch.uint8):
            x = input.detach().clone().requires_grad_()
            result = nn.NLLLoss(reduction=reduction)(F.log_softmax(x, dim=-1), target.to(dtype))
            result.sum().backward()
            results.append((result, x.grad))
        close(results[1], results[0])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_nll_loss_matches_float64(reduction):
    # test_nll_loss_large_tensor (onlyCUDA, 2^16 x 2^16 there): the CPU result against a float64 evaluation on a
    # modest size, with torch's float32 tolerances
    g = generator()
    input = torch.randn(512, 513, generator=g, requires_grad=True)
    labels = torch.randint(512, (512,), generator=g)
    out = F.nll_loss(input, labels, reduction=reduction)
    input64 = input.detach().double().requires_grad_()
    out64 = F.nll_loss(input64, labels, reduction=reduction)
    close(out, out64.float())
    if reduction != "none":
        out.backward()
        out64.backward()
        close(input.grad, input64.grad.float())


# --- cross_entropy / CrossEntropyLoss --------------------------------------------------------------------------


def test_cross_entropy_loss_bfloat16():  # TestNN.test_cross_entropy_loss
    g = generator()
    inputf = torch.randn(15, 10, generator=g, requires_grad=True)
    input = inputf.detach().bfloat16().requires_grad_()
    target = torch.randint(0, 10, (15,), generator=g)
    outf, out = nn.CrossEntropyLoss()(inputf, target), nn.CrossEntropyLoss()(input, target)
    close(out, outf.bfloat16(), atol=1e-1, rtol=0)
    outf.backward()
    out.backward()
    close(input.grad, inputf.grad.bfloat16(), atol=1e-1, rtol=0)


def test_cross_entropy_loss_precision():
    # TestNN.test_cross_entropy_loss_precision (128 x 2 x 768 x 768 there, 8 x 2 x 256 x 256 here): a float32
    # mean over many spatial positions equals the float64 one to float32 tolerance
    g = generator()
    inputf = torch.randn(8, 2, 256, 256, generator=g)
    target = torch.randint(2, (8, 256, 256), generator=g)
    close(nn.CrossEntropyLoss()(inputf, target), nn.CrossEntropyLoss()(inputf.double(), target), check_dtype=False)


def test_cross_entropy_loss_zero_classes():  # TestNN.test_cross_entropy_loss_zero_div
    nn.CrossEntropyLoss()(torch.rand(5, 0), torch.rand(5, 0))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_matches_float64(reduction):
    # TestNNDeviceType.test_cross_entropy_large_tensor / test_cross_entropy_64bit (onlyCUDA, tens of GB there):
    # CPU against float64 on a modest size
    g = generator()
    logits = torch.randn(256, 1025, generator=g, requires_grad=True)
    labels = torch.randint(1025, (256,), generator=g)
    logits64 = logits.detach().double().requires_grad_()
    loss, loss64 = (
        F.cross_entropy(logits, labels, reduction=reduction),
        F.cross_entropy(logits64, labels, reduction=reduction),
    )
    close(loss, loss64.float())
    if reduction != "none":
        loss.backward()
        loss64.backward()
        close(logits.grad, logits64.grad.float())


def test_cross_entropy_module_on_permuted_half_logits():
    # TestNNDeviceType.test_softmax_forward_64bit_indexing (onlyCUDA, 70 x 2047 x 50000 there): uniform half
    # logits given as a permuted (N, C, L) view; every loss is log(C)
    logits = torch.ones(3, 31, 500, dtype=torch.float16)
    nll = nn.CrossEntropyLoss(reduction="none")(logits.permute(0, 2, 1), torch.zeros(3, 31, dtype=torch.long))
    close(nll.float(), torch.full((3, 31), torch.log(torch.tensor(500.0)).item()), rtol=1e-3, atol=1e-3)


def test_cross_entropy_out_of_bounds_class_index():
    # TestNNDeviceType.test_cross_entropy_loss_2d_out_of_bounds_class_index (onlyCUDA: a device-side assert
    # there); on CPU the same call raises IndexError
    labels = torch.zeros(2, 4, 5, dtype=torch.int64)
    labels[1, 2, 3] = 254
    with pytest.raises(IndexError):
        F.cross_entropy(torch.randn(2, 3, 4, 5), labels, reduction="none", ignore_index=255)


def _k_dims(k, g):
    return [int(torch.randint(2, 5, (1,), generator=g)) for _ in range(k)]


@pytest.mark.skipif(loss_reference_fns is None, reason="torch.testing._internal is not usable")
def test_cross_entropy_prob_target_all_reductions():  # test_cross_entropy_loss_prob_target_all_reductions
    g = generator()
    for k in range(5):
        shape = (5, 4, *_k_dims(k, g))
        input = torch.randn(shape, generator=g, requires_grad=True)
        target = torch.randn(shape, generator=g, requires_grad=True)
        weight = torch.randn(4, generator=g).abs()
        for reduction, w in itertools.product(["none", "mean", "sum"], [None, weight]):
            expected = loss_reference_fns["CrossEntropyLoss"](input, target, reduction=reduction, weight=w)
            close(nn.CrossEntropyLoss(weight=w, reduction=reduction)(input, target), expected)


@pytest.mark.parametrize("target_kind", ["probabilities", "indices"])
def test_cross_entropy_unit_weights_are_no_weights(target_kind):
    # test_cross_entropy_loss_prob_target_unit_weights, test_cross_entropy_loss_index_target_unit_weights
    g = generator()
    for k in range(5):
        dims = _k_dims(k, g)
        input = torch.randn(5, 4, *dims, generator=g, requires_grad=True)
        if target_kind == "probabilities":
            target = torch.randn(5, 4, *dims, generator=g, requires_grad=True)
        else:
            target = torch.randint(0, 4, (5, *dims), generator=g)
        for reduction in ("none", "mean", "sum"):
            unit = nn.CrossEntropyLoss(weight=torch.ones(4), reduction=reduction)
            close(nn.CrossEntropyLoss(reduction=reduction)(input, target), unit(input, target))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_cross_entropy_prob_target_no_batch_dim(
    reduction, weighted
):  # test_cross_entropy_loss_prob_target_no_batch_dim
    g = generator()
    input = torch.randn(5, generator=g).log_softmax(dim=-1)
    target = torch.randn(5, generator=g).softmax(dim=-1)
    loss = nn.CrossEntropyLoss(reduction=reduction, weight=torch.randn(5, generator=g) if weighted else None)
    batched = loss(input.unsqueeze(0), target.unsqueeze(0))
    close(loss(input, target), batched.squeeze(0) if reduction == "none" else batched)


def _one_hot(target, classes, dtype):
    one_hot = F.one_hot(target, num_classes=classes)
    return one_hot.permute(0, -1, *range(1, one_hot.dim() - 1)).to(dtype)


def test_cross_entropy_one_hot_target():  # test_cross_entropy_loss_one_hot_target
    g = generator()
    for k in range(5):
        dims = _k_dims(k, g)
        input = torch.randn(5, 4, *dims, generator=g, requires_grad=True)
        target = torch.randint(0, 4, (5, *dims), generator=g)
        weight = torch.randn(4, generator=g).abs()
        for reduction, w in itertools.product(["none", "mean", "sum"], [None, weight]):
            if reduction == "mean" and w is not None:  # the two paths weight the mean differently (by design)
                continue
            loss = nn.CrossEntropyLoss(weight=w, reduction=reduction)
            close(loss(input, target), loss(input, _one_hot(target, 4, input.dtype)))


def test_cross_entropy_label_smoothing_errors():  # test_cross_entropy_label_smoothing_errors
    g = generator()
    for target in (torch.arange(0, 4), torch.randn(3, 4, generator=g)):
        input = torch.randn(3, 4, generator=g) if target.dim() == 2 else torch.randn(4, 4, generator=g)
        with pytest.raises(RuntimeError, match=r"label_smoothing must be between 0\.0"):
            nn.CrossEntropyLoss(label_smoothing=1.2)(input, target)


def test_cross_entropy_label_smoothing_index_target_equals_smoothed_probs():
    # test_cross_entropy_label_smoothing_consistent_index_target_and_probs (float64, torch's tolerances)
    g = generator()
    for k, reduction, smoothing in itertools.product(range(5), ["none", "mean", "sum"], [0.05, 0.15]):
        dims = _k_dims(k, g)
        input = torch.randn(10, 4, *dims, generator=g, dtype=torch.double, requires_grad=True)
        target = torch.randint(0, 4, (10, *dims), generator=g)
        smoothed = _one_hot(target, 4, torch.double) * (1 - smoothing) + smoothing / 4
        with_probs = nn.CrossEntropyLoss(reduction=reduction)(input, smoothed)
        with_index = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing)(input, target)
        close(with_probs, with_index, rtol=1e-07, atol=1e-05)


def test_cross_entropy_label_smoothing_with_probs():  # test_cross_entropy_label_smoothing_with_probs
    g = generator()
    for k, smoothing in itertools.product(range(5), [0.05, 0.15]):
        dims = _k_dims(k, g)
        input = torch.randn(10, 4, *dims, generator=g, requires_grad=True)
        target = F.log_softmax(torch.randn(10, 4, *dims, generator=g), dim=1)
        for reduction in ("none", "mean", "sum"):
            smoothed = nn.CrossEntropyLoss(reduction=reduction, label_smoothing=smoothing)(input, target)
            manual = nn.CrossEntropyLoss(reduction=reduction)(input, target * (1 - smoothing) + smoothing / 4)
            close(smoothed, manual)


def test_cross_entropy_label_smoothing_weight_ignore_indices():
    # test_cross_entropy_label_smoothing_weight_ignore_indices
    weight = torch.tensor([0.3, 0.6])
    inp1, inp2 = torch.tensor([[0.3, 0.4], [1, 2]]), torch.tensor([[0.3, 0.6], [1, 2]])
    targets = {-100: torch.tensor([-100, 1]), -2: torch.tensor([-2, 1]), 2: torch.tensor([2, 1])}
    for reduction, smoothing, w in itertools.product(["none", "sum", "mean"], [0.05, 0.15], [None, weight]):
        for ignore_index, target in targets.items():
            loss = nn.CrossEntropyLoss(
                reduction=reduction, label_smoothing=smoothing, ignore_index=ignore_index, weight=w
            )
            close(loss(inp1, target), loss(inp2, target))  # the ignored row does not count
            if reduction != "none":  # nor does it count in the mean's denominator
                close(loss(inp1, target), loss(inp2[1:], target[1:]))


# --- argument checks shared by the family (TestNNDeviceType.test_invalid_reduction_strings) ----------------------


@pytest.mark.parametrize("reduction", ["none", "invalid"])
def test_invalid_reduction_strings(reduction):
    g = generator()
    input = torch.randn(3, 5, generator=g, requires_grad=True)
    target = torch.tensor([1, 0, 4])
    calls = [
        lambda: F.nll_loss(input, target, reduction=reduction),
        lambda: F.cross_entropy(input, target, reduction=reduction),
        lambda: F.binary_cross_entropy(torch.sigmoid(input), input.gt(0).float(), reduction=reduction),
        lambda: F.binary_cross_entropy_with_logits(input, input, reduction=reduction),
    ]
    for call in calls:
        if reduction == "invalid":
            with pytest.raises(ValueError):
                call()
        else:
            call()


def test_legacy_size_average_warns_once_per_call():
    # not a test_nn.py test: the deprecation path that common_nn's BCEWithLogitsLoss_legacy_enum entry uses
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.binary_cross_entropy_with_logits(torch.zeros(2), torch.ones(2), size_average=False)
    assert [str(w.message) for w in caught] == [
        "size_average and reduce args will be deprecated, please use reduction='sum' instead."
    ]


# --- found by this suite -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5)])
def test_none_reduction_gradient_keeps_float64(shape):
    """reduction='none' scales the saved gradient by grad_output per element; in float64 that product must not
    pass through float32 (it did: ~1e-8 errors, found by ModuleInfo's CrossEntropyLoss samples)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(3, (shape[0], *shape[2:]), generator=g)
    grad_output = torch.rand(t.shape, dtype=torch.float64, generator=g) + 0.5
    ours = torch.autograd.grad(XF.cross_entropy(x, t, reduction="none"), x, grad_output)[0]
    theirs = torch.autograd.grad(torch.nn.functional.cross_entropy(x, t, reduction="none"), x, grad_output)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("name", ["binary_cross_entropy", "binary_cross_entropy_with_logits"])
def test_forward_mode_ad_with_the_family_swapped(name):
    """Under forward-mode AD the binary losses hand over to torch's aten op; they looked it up through
    torch.nn.functional, which recursed forever once torch.nn.functional was swapped for xentlib."""
    g = generator()
    x = torch.rand(4, 3, dtype=torch.double, generator=g) * 0.8 + 0.1
    tangent = torch.randn(4, 3, dtype=torch.double, generator=g)
    target = torch.rand(4, 3, dtype=torch.double, generator=g)
    weight = torch.rand(3, dtype=torch.double, generator=g)
    expected = torch.func.jvp(
        lambda v: getattr(torch.ops.aten, name)(v, target, weight.expand(4, 3), reduction=0), (x,), (tangent,)
    )
    actual = torch.func.jvp(lambda v: getattr(F, name)(v, target, weight, reduction="none"), (x,), (tangent,))
    close(actual, expected)
