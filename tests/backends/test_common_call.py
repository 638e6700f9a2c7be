"""The common call's short path (backends/common_call.py) against the general path: the same bits, forward and
backward, for every reduction and ignore pattern; the general path for every call it does not cover; the
family's errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as torch_F

from xentlib import functional as F
from xentlib.backends import common_call, cpu_kernel

pytestmark = pytest.mark.skipif(not cpu_kernel.status()[0], reason=cpu_kernel.status()[1])

SHAPES = [(1, 1), (8, 10), (7, 1000), (300, 257)]  # the last is above the kernel's threading threshold
REDUCTIONS = ["mean", "sum", "none"]


def targets(rows: int, classes: int, pattern: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, classes, (rows,), generator=g)
    if pattern == "some ignored":
        t[::3] = -100
    elif pattern == "all ignored":
        t[:] = -100
    return t


def general(x, t, **options):
    """The same call through the general path (an explicit backend is not the common call)."""
    return F.cross_entropy(x, t, backend="cpu", **options)


def loss_and_grad(fn, x, t, grad_output, **options):
    leaf = x.clone().requires_grad_()
    loss = fn(leaf, t, **options)
    loss.backward(grad_output)
    return loss.detach(), leaf.grad


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("pattern", ["none ignored", "some ignored", "all ignored"])
def test_same_bits_as_the_general_path(shape, reduction, pattern):
    rows, classes = shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(rows * classes)) * 4
    t = targets(rows, classes, pattern, seed=classes)
    for grad_output in (torch.tensor(1.0), torch.tensor(2.5), torch.rand(rows) + 0.5):
        if (grad_output.dim() == 1) != (reduction == "none"):
            continue
        fast = loss_and_grad(F.cross_entropy, x, t, grad_output, reduction=reduction)
        slow = loss_and_grad(general, x, t, grad_output, reduction=reduction)
        assert torch.equal(fast[0], slow[0]) or (fast[0].isnan().all() and slow[0].isnan().all())
        assert torch.equal(fast[1], slow[1])
        torch.testing.assert_close(fast[0], torch_F.cross_entropy(x, t, reduction=reduction), equal_nan=True)


def test_non_finite_rows_and_another_ignore_index():
    x = torch.randn(6, 5)
    x[1, 2], x[2, 0], x[3] = float("nan"), float("inf"), float("-inf")
    t = torch.tensor([0, 1, 2, 3, 7, 4])
    for reduction in REDUCTIONS:
        fast = loss_and_grad(F.cross_entropy, x, t, None if reduction != "none" else torch.ones(6),
                             ignore_index=7, reduction=reduction)  # fmt: skip
        slow = loss_and_grad(general, x, t, None if reduction != "none" else torch.ones(6),
                             ignore_index=7, reduction=reduction)  # fmt: skip
        torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(fast[1], slow[1], rtol=0, atol=0, equal_nan=True)


def test_it_is_the_path_that_runs(monkeypatch):
    """A covered call returns the short path's result; the module and the functional both take it."""
    calls = []
    run = common_call._run
    monkeypatch.setattr(common_call, "_run", lambda *args: calls.append(1) or run(*args))
    x, t = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 2, 1, -100])
    F.cross_entropy(x, t).backward()
    from xentlib import nn

    nn.CrossEntropyLoss(reduction="sum")(x.detach(), t)
    assert len(calls) == 2


def uncovered_calls():
    x, t = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    yield "bfloat16", (x.bfloat16(), t), {}
    yield "float64", (x.double(), t), {}
    yield "3-d input", (x.view(4, 3, 1), t.view(4, 1)), {}
    yield "1-d input", (x[0], t[0]), {}
    yield "strided rows", (torch.randn(3, 4).t(), t), {}
    yield "strided target", (x, torch.tensor([0, 9, 2, 9, 1, 9, 1, 9])[::2]), {}
    yield "uint8 target", (x, t.to(torch.uint8)), {}
    yield "probabilities", (x, torch.softmax(torch.randn(4, 3), 1)), {}
    yield "empty", (torch.randn(0, 3), t[:0]), {}
    yield "no classes", (torch.randn(4, 0), t), {}
    yield "weight", (x, t), dict(weight=torch.ones(3))
    yield "smoothing", (x, t), dict(label_smoothing=0.1)
    yield "integer smoothing", (x, t), dict(label_smoothing=0)
    yield "z_loss", (x, t), dict(z_loss=1e-4)
    yield "softcap", (x, t), dict(softcap=30.0)
    yield "normalizer", (x, t), dict(reduction="sum", normalizer=4.0)
    yield "stats", (x, t), dict(return_stats=True)
    yield "backend", (x, t), dict(backend="torch")
    yield "chunk_size", (x, t), dict(chunk_size=2)
    yield "legacy flag", (x, t), dict(size_average=False)
    yield "tensor ignore_index", (x, t), dict(ignore_index=torch.tensor(1))
    yield "elementwise_mean", (x, t), dict(reduction="elementwise_mean")


@pytest.mark.parametrize("name, args, options", list(uncovered_calls()), ids=[c[0] for c in uncovered_calls()])
def test_the_general_path_takes_every_other_call(monkeypatch, name, args, options):
    """Not covered: the short path never runs, and the result is torch's (or the general path's own)."""
    monkeypatch.setattr(common_call, "_run", lambda *a: pytest.fail("the short path ran"))
    if name in ("z_loss", "softcap", "normalizer", "stats", "backend", "chunk_size"):
        F.cross_entropy(*args, **options)  # xentlib's own options: tested elsewhere; here only the route matters
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy flags' deprecation warnings
        try:
            expected = torch_F.cross_entropy(*args, **options)
        except Exception as error:
            with pytest.raises(type(error)):
                F.cross_entropy(*args, **options)
            return
        torch.testing.assert_close(F.cross_entropy(*args, **options), expected, equal_nan=True)


def test_transforms_and_the_compiler_take_the_general_path(monkeypatch):
    monkeypatch.setattr(common_call, "_run", lambda *a: pytest.fail("the short path ran"))
    x, t = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(torch.func.grad(F.cross_entropy)(x, t), torch.func.grad(torch_F.cross_entropy)(x, t))
    torch.testing.assert_close(torch.vmap(F.cross_entropy)(x, t), torch.vmap(torch_F.cross_entropy)(x, t))
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, torch.ones_like(x))
        tangent = forward_ad.unpack_dual(F.cross_entropy(dual, t)).tangent
    assert tangent is not None
    with monkeypatch.context() as patch:  # the kernel not built: the general path (and its PyTorch ops)
        patch.setitem(cpu_kernel._state, "fn", None)
        torch.testing.assert_close(F.cross_entropy(x, t), torch_F.cross_entropy(x, t))


class Logits(torch.Tensor):
    pass


def test_a_tensor_subclass_takes_the_general_path(monkeypatch):
    monkeypatch.setattr(common_call, "_run", lambda *a: pytest.fail("the short path ran"))
    x, t = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(F.cross_entropy(x.as_subclass(Logits), t), torch_F.cross_entropy(x, t))


@pytest.mark.parametrize("bad", [-1, 3, 2**40])
def test_a_target_out_of_range_raises_the_family_error(bad):
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([0, 1, bad, 2])
    with pytest.raises(IndexError) as fast:
        F.cross_entropy(x, t)
    with pytest.raises(IndexError) as slow:
        general(x, t)
    assert str(fast.value) == str(slow.value) and f"Target {bad} is out of bounds" in str(fast.value)
    with pytest.raises(IndexError):
        torch_F.cross_entropy(x, t)


def test_an_ignore_index_beyond_int64_is_refused_as_torch_does():
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 2, 2])
    with pytest.raises(ValueError, match="ignore_index"):
        F.cross_entropy(x, t, ignore_index=2**64)


def test_second_and_double_backward_match_the_general_path():
    x = torch.randn(5, 4, dtype=torch.float32)
    t = torch.tensor([0, 3, -100, 1, 2])
    grads = {}
    for name, fn in (("fast", F.cross_entropy), ("slow", general)):
        leaf = x.clone().requires_grad_()
        loss = fn(leaf, t)
        first = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
        second = torch.autograd.grad(loss, leaf, retain_graph=True)[0]
        (g,) = torch.autograd.grad(loss, leaf, create_graph=True)
        (gg,) = torch.autograd.grad((g * torch.arange(20.0).view(5, 4)).sum(), leaf)
        grads[name] = (first, second, g.detach(), gg)
    for fast, slow in zip(grads["fast"], grads["slow"]):
        torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-7)
    assert torch.equal(grads["fast"][0], grads["fast"][1])
    reference = x.clone().requires_grad_()
    (g,) = torch.autograd.grad(torch_F.cross_entropy(reference, t), reference, create_graph=True)
    (gg,) = torch.autograd.grad((g * torch.arange(20.0).view(5, 4)).sum(), reference)
    torch.testing.assert_close(grads["fast"][3], gg)


def test_the_logits_are_not_modified_and_the_gradient_accumulates():
    x = torch.randn(6, 4, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3, 0, 1])
    before = x.detach().clone()
    F.cross_entropy(x, t).backward()
    F.cross_entropy(x, t).backward()
    assert torch.equal(x.detach(), before)
    reference = before.clone().requires_grad_()
    torch_F.cross_entropy(reference, t).backward()
    torch.testing.assert_close(x.grad, 2 * reference.grad)
