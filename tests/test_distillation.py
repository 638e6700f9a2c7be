"""distillation_loss and linear_distillation_loss against independent truths.

Truths: torch's own composition (`F.kl_div` with log-targets, and the generalized JSD written from `log_softmax`
as TRL writes it), evaluated in float64 and differentiated by autograd; the float64 NumPy reference
(`xentlib.reference.distillation`), itself checked against that composition; torch._dynamo.explain and opcheck.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xentlib
from xentlib import reference as ref

BETAS = (0.0, 0.3, 0.5, 1.0)
TEMPERATURES = (1.0, 0.3, 3.0)
REDUCTIONS = ("none", "sum", "mean", "batchmean")


def torch_rows(student: torch.Tensor, teacher: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
    """Per-row divergence by torch's kl_div (input = log of the second argument of KL, log_target=True)."""
    log_p = F.log_softmax(student / temperature, dim=-1)
    log_q = F.log_softmax(teacher / temperature, dim=-1)
    if beta == 0.0:  # KL(q || p)
        return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)
    if beta == 1.0:  # KL(p || q)
        return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
    b = torch.tensor(beta, dtype=log_p.dtype)
    log_m = torch.logsumexp(torch.stack([log_p + torch.log1p(-b), log_q + torch.log(b)]), dim=0)
    kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True).sum(-1)
    kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True).sum(-1)
    return beta * kl_q + (1 - beta) * kl_p


def torch_loss(student, teacher, target, beta, temperature, reduction, ignore_index=-100):
    """The documented reductions over torch's per-row values."""
    rows = torch_rows(student, teacher, beta, temperature)
    if target is None:
        keep = torch.ones(rows.shape, dtype=torch.bool)
        batch = student.shape[0] if student.dim() > 1 else 1
    else:
        keep = target != ignore_index
        batch = None
    rows = torch.where(keep, rows, torch.zeros((), dtype=rows.dtype))
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / keep.sum()
    return rows.sum() / max(int(keep.sum()) if batch is None else batch, 1)


def float64_truth(student, teacher, target, grad_output=None, **options):
    """(loss, d loss/d student) in float64 by torch autograd through the composition."""
    s = student.detach().double().requires_grad_()
    loss = torch_loss(s, teacher.detach().double(), target, **options)
    g = torch.ones_like(loss) if grad_output is None else grad_output.double()
    (grad,) = torch.autograd.grad(loss, s, g, allow_unused=True)
    return loss.detach(), grad


def make(shape, vocab, dtype=torch.float64, seed=0, scale=2.0, ignore=True):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    teacher = (torch.randn(*shape, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, vocab, shape, generator=gen)
    if ignore and target.numel() > 1:
        target.view(-1)[:: max(2, target.numel() // 3)] = -100
    return student, teacher, target


def ours(student, teacher, target, grad_output=None, **options):
    s = student.detach().clone().requires_grad_()
    loss = xentlib.distillation_loss(s, teacher, target, **options)
    g = torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype)
    loss.backward(g)
    return loss.detach(), s.grad


# ---------------------------------------------------------------------------------------------------------------
# The reference against torch's composition (both float64)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_reference_matches_torch_composition(beta, temperature, reduction):
    student, teacher, target = make((3, 5), 11, seed=1)
    options = dict(beta=beta, temperature=temperature, reduction=reduction)
    loss, grad = float64_truth(student, teacher, target, **options)
    assert np.allclose(ref.distillation(student.numpy(), teacher.numpy(), target.numpy(), **options), loss.numpy())
    g = ref.distillation_backward(np.ones(loss.shape), student.numpy(), teacher.numpy(), target.numpy(), **options)
    assert np.allclose(g, grad.numpy(), atol=1e-12)


def test_reference_endpoints_are_the_two_kls():
    student, teacher, _ = make((4,), 7, seed=2)
    p, q = torch.softmax(student, -1).numpy(), torch.softmax(teacher, -1).numpy()
    forward = (q * np.log(q / p)).sum(-1)
    reverse = (p * np.log(p / q)).sum(-1)
    assert np.allclose(ref.distillation(student.numpy(), teacher.numpy(), beta=0.0, reduction="none"), forward)
    assert np.allclose(ref.distillation(student.numpy(), teacher.numpy(), beta=1.0, reduction="none"), reverse)


# ---------------------------------------------------------------------------------------------------------------
# distillation_loss: every option against the float64 truth and the reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_target", [True, False])
def test_distillation_loss_float64(beta, temperature, reduction, with_target):
    student, teacher, target = make((2, 7), 13, seed=3)
    target = target if with_target else None
    options = dict(beta=beta, temperature=temperature, reduction=reduction)
    gen = torch.Generator().manual_seed(4)
    grad_output = torch.rand((2, 7) if reduction == "none" else (), generator=gen, dtype=torch.float64) + 0.5
    loss, grad = ours(student, teacher, target, grad_output, chunk_size=3, **options)
    want_loss, want_grad = float64_truth(student, teacher, target, grad_output, **options)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-9, atol=1e-12)
    tgt = None if target is None else target.numpy()
    assert np.allclose(ref.distillation(student.numpy(), teacher.numpy(), tgt, **options), loss.numpy())


def assert_error_at_most_torchs(mine, theirs, truth):
    """Our error against the float64 truth is at most torch's composition's in the same dtype, plus an ulp of the
    largest value. In float32 both errors are rounding noise of other evaluation orders (and on CPU the compiled
    kernel's exp and log polynomials, within 1.5 and 3 ulp), where torch's is sometimes far below an ulp by
    chance: there we allow twice torch's plus four ulps of the largest value. A wrong formula is off by far more."""
    mine_err = (mine.double() - truth).abs().max()
    torch_err = (theirs.double() - truth).abs().max()
    ulp = torch.finfo(mine.dtype).eps * float(truth.abs().max())
    factor, ulps = (2.0, 4.0) if mine.dtype == torch.float32 else (1.0, 1.0)
    assert mine_err <= factor * torch_err + ulps * ulp, (float(mine_err), float(torch_err))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_error_at_most_torchs(beta, temperature, dtype):
    student, teacher, target = make((37,), 301, dtype=dtype, seed=5, scale=4.0)
    for reduction in REDUCTIONS:
        options = dict(beta=beta, temperature=temperature, reduction=reduction)
        loss, grad = ours(student, teacher, target, **options)
        want_loss, want_grad = float64_truth(student, teacher, target, **options)
        s = student.detach().clone().requires_grad_()
        torch_value = torch_loss(s, teacher, target, **options)
        torch_value.backward(torch.ones_like(torch_value))
        assert loss.dtype == grad.dtype == dtype
        assert_error_at_most_torchs(loss, torch_value.detach(), want_loss)
        assert_error_at_most_torchs(grad, s.grad, want_grad)


@pytest.mark.parametrize("shape", [(5,), (1,), (2, 3, 4), ()])
def test_odd_shapes(shape):
    student, teacher, target = make(shape, 6, seed=6)
    for reduction in REDUCTIONS:
        options = dict(beta=0.5, temperature=0.7, reduction=reduction)
        loss, grad = ours(student, teacher, target, **options)
        want_loss, want_grad = float64_truth(student, teacher, target, **options)
        assert loss.shape == want_loss.shape and grad.shape == student.shape
        torch.testing.assert_close(loss, want_loss)
        torch.testing.assert_close(grad, want_grad)


def test_batchmean_without_target_divides_by_the_batch_size_as_kl_div():
    student, teacher, _ = make((3, 4), 9, seed=7)
    for beta in (0.0, 1.0):
        first, second = (student, teacher) if beta == 0.0 else (teacher, student)
        kl = F.kl_div(F.log_softmax(first, -1), F.log_softmax(second, -1), reduction="batchmean", log_target=True)
        torch.testing.assert_close(xentlib.distillation_loss(student, teacher, beta=beta), kl)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(reduction):
    student, teacher, _ = make((4,), 5, seed=8)
    target = torch.full((4,), -100)
    loss, grad = ours(student, teacher, target, beta=0.5, reduction=reduction)
    if reduction == "mean":
        assert torch.isnan(loss)
    else:
        assert torch.equal(loss, torch.zeros_like(loss))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_ignore_index_and_nan_in_ignored_rows():
    student, teacher, target = make((6,), 5, seed=9)
    target[2] = 7
    student[2] = float("nan")
    loss, grad = ours(student, teacher, target, beta=0.5, ignore_index=7, reduction="sum")
    keep = target != 7
    want_loss, want_grad = float64_truth(student[keep], teacher[keep], None, beta=0.5, temperature=1.0, reduction="sum")
    torch.testing.assert_close(loss, want_loss)
    torch.testing.assert_close(grad[keep], want_grad)
    assert torch.equal(grad[2], torch.zeros(5, dtype=grad.dtype))


def test_teacher_gets_no_gradient():
    student, teacher, target = make((4,), 5, dtype=torch.float32, seed=11)
    s, t = student.requires_grad_(), teacher.requires_grad_()
    xentlib.distillation_loss(s, t, target, beta=0.5).backward()
    assert s.grad is not None and t.grad is None


def test_second_backward_of_the_same_graph():
    student, teacher, target = make((5,), 7, seed=12)
    s = student.clone().requires_grad_()
    loss = xentlib.distillation_loss(s, teacher, target, beta=0.3)
    (first,) = torch.autograd.grad(loss, s, retain_graph=True)
    (second,) = torch.autograd.grad(loss, s, torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(second, 2 * first)
    _, want = float64_truth(student, teacher, target, beta=0.3, temperature=1.0, reduction="batchmean")
    torch.testing.assert_close(first, want)


def test_double_backward_matches_torch():
    student, teacher, target = make((3,), 4, seed=13)
    s = student.clone().requires_grad_()
    (g,) = torch.autograd.grad(xentlib.distillation_loss(s, teacher, target, beta=0.5), s, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), s)
    s2 = student.clone().requires_grad_()
    (g2,) = torch.autograd.grad(torch_loss(s2, teacher, target, 0.5, 1.0, "batchmean"), s2, create_graph=True)
    (gg2,) = torch.autograd.grad(g2.square().sum(), s2)
    torch.testing.assert_close(gg, gg2)


# ---------------------------------------------------------------------------------------------------------------
# linear_distillation_loss
# ---------------------------------------------------------------------------------------------------------------


def linear_case(lead, d_s, d_t, vocab, dtype=torch.float64, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    xs, ws, xt, wt = rand(*lead, d_s), rand(vocab, d_s), rand(*lead, d_t), rand(vocab, d_t)
    bs, bt = (rand(vocab), rand(vocab)) if bias else (None, None)
    target = torch.randint(0, vocab, lead, generator=gen)
    if target.numel() > 1:
        target.view(-1)[1::3] = -100
    return xs, ws, bs, xt, wt, bt, target


def linear_truth(xs, ws, bs, xt, wt, bt, target, grad_output=None, **options):
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (xs, ws, bs)]
    zs = F.linear(*leaves)
    zt = F.linear(xt.double(), wt.double(), None if bt is None else bt.double())
    loss = torch_loss(zs, zt, target, **options)
    g = torch.ones_like(loss) if grad_output is None else grad_output.double()
    sources = [leaf for leaf in leaves if leaf is not None]
    grads = list(torch.autograd.grad(loss, sources, g))
    return loss.detach(), [grads.pop(0) if leaf is not None else None for leaf in leaves]


def linear_ours(xs, ws, bs, xt, wt, bt, target, grad_output=None, **options):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (xs, ws, bs)]
    loss = xentlib.linear_distillation_loss(
        leaves[0], leaves[1], xt, wt, target, student_bias=leaves[2], teacher_bias=bt, **options
    )
    loss.backward(torch.ones_like(loss) if grad_output is None else grad_output.to(loss.dtype))
    return loss.detach(), [None if leaf is None else leaf.grad for leaf in leaves]


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_distillation_float64(beta, temperature, reduction):
    case = linear_case((2, 9), 5, 3, 17, seed=14)
    options = dict(beta=beta, temperature=temperature, reduction=reduction)
    gen = torch.Generator().manual_seed(15)
    grad_output = torch.rand((2, 9) if reduction == "none" else (), generator=gen, dtype=torch.float64) + 0.5
    loss, grads = linear_ours(*case, grad_output, chunk_size=4, **options)
    want_loss, want_grads = linear_truth(*case, grad_output, **options)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    xs, ws, bs, xt, wt, bt, target = (t.numpy() for t in case)
    value = ref.linear_distillation(xs, ws, xt, wt, target, student_bias=bs, teacher_bias=bt, **options)
    assert np.allclose(value, loss.numpy())
    back = ref.linear_distillation_backward(
        grad_output.numpy(), xs, ws, xt, wt, target, student_bias=bs, teacher_bias=bt, **options
    )
    for got, want in zip(back, want_grads):
        assert np.allclose(got, want.numpy())


@pytest.mark.parametrize("lead", [(1,), (7,), (3, 5), ()])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_odd_shapes_and_unit_hidden(lead, bias):
    case = linear_case(lead, 1, 1, 6, seed=16, bias=bias)  # D = 1
    for reduction in REDUCTIONS:
        options = dict(beta=0.5, temperature=3.0, reduction=reduction)
        loss, grads = linear_ours(*case, chunk_size=2, **options)
        want_loss, want_grads = linear_truth(*case, **options)
        torch.testing.assert_close(loss, want_loss)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want)


def test_linear_without_target_float32_default_chunks():
    xs, ws, bs, xt, wt, bt, _ = linear_case((300,), 16, 8, 97, dtype=torch.float32, seed=17)
    options = dict(beta=0.5, temperature=1.0, reduction="batchmean")
    loss, grads = linear_ours(xs, ws, bs, xt, wt, bt, None, **options)
    want_loss, want_grads = linear_truth(xs, ws, bs, xt, wt, bt, None, **options)
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_all_rows_ignored(reduction):
    xs, ws, bs, xt, wt, bt, target = linear_case((4,), 3, 2, 5, seed=18)
    target.fill_(-100)
    loss, grads = linear_ours(xs, ws, bs, xt, wt, bt, target, beta=0.5, reduction=reduction)
    assert torch.isnan(loss) if reduction == "mean" else torch.equal(loss, torch.zeros_like(loss))
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


def test_linear_teacher_gets_no_gradient_and_second_backward():
    xs, ws, bs, xt, wt, bt, target = linear_case((6,), 4, 3, 7, seed=19)
    ws.requires_grad_()
    wt.requires_grad_()
    loss = xentlib.linear_distillation_loss(xs, ws, xt, wt, target, beta=0.5)
    (first,) = torch.autograd.grad(loss, ws, retain_graph=True)
    (second,) = torch.autograd.grad(loss, ws)
    torch.testing.assert_close(first, second)
    assert wt.grad is None
    _, (_, want, _) = linear_truth(xs, ws, None, xt, wt, None, target, beta=0.5, temperature=1.0, reduction="batchmean")
    torch.testing.assert_close(first, want)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_linear_bf16_error_at_most_torchs(beta):
    xs, ws, bs, xt, wt, bt, target = linear_case((256,), 32, 16, 512, dtype=torch.bfloat16, seed=20)
    options = dict(beta=beta, temperature=1.0, reduction="batchmean")
    want_loss, want_grads = linear_truth(xs, ws, bs, xt, wt, bt, target, **options)
    loss, grads = linear_ours(xs, ws, bs, xt, wt, bt, target, chunk_size=64, **options)
    leaves = [t.detach().clone().requires_grad_() for t in (xs, ws, bs)]
    torch_value = torch_loss(F.linear(*leaves), F.linear(xt, wt, bt), target, **options)
    torch_value.backward()
    pairs = [(loss, torch_value.detach(), want_loss)] + [
        (g, leaf.grad, w) for g, leaf, w in zip(grads, leaves, want_grads)
    ]
    for mine, theirs, truth in pairs:
        assert mine.dtype == torch.bfloat16
        assert_error_at_most_torchs(mine, theirs, truth)


# ---------------------------------------------------------------------------------------------------------------
# Validation, the torch runtime
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(beta=-0.1), ValueError),
        (dict(beta=1.5), ValueError),
        (dict(beta=math.nan), ValueError),
        (dict(beta="0.5"), TypeError),
        (dict(temperature=0.0), ValueError),
        (dict(temperature=math.inf), ValueError),
        (dict(reduction="elementwise"), ValueError),
        (dict(ignore_index=1.5), TypeError),
    ],
)
def test_bad_scalars(kwargs, error):
    student, teacher, target = make((3,), 4, dtype=torch.float32)
    with pytest.raises(error):
        xentlib.distillation_loss(student, teacher, target, **kwargs)
    xs, ws, _, xt, wt, _, t = linear_case((3,), 2, 2, 4)
    with pytest.raises(error):
        xentlib.linear_distillation_loss(xs, ws, xt, wt, t, **kwargs)


def test_bad_tensors():
    s, t, target = make((3,), 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        xentlib.distillation_loss(s, t[:, :3])
    with pytest.raises(RuntimeError, match="dtype"):
        xentlib.distillation_loss(s, t.double())
    with pytest.raises(NotImplementedError):
        xentlib.distillation_loss(s.long(), t.long())
    with pytest.raises(ValueError, match="target shape"):
        xentlib.distillation_loss(s, t, target[:2])
    with pytest.raises(RuntimeError, match="integer"):
        xentlib.distillation_loss(s, t, target.float())
    with pytest.raises(TypeError):
        xentlib.distillation_loss(s, t.tolist())
    xs, ws, _, xt, wt, _, tg = linear_case((3,), 2, 5, 4)
    with pytest.raises(RuntimeError, match="cannot be multiplied"):
        xentlib.linear_distillation_loss(xs, ws, xt, wt[:, :2], tg)
    with pytest.raises(ValueError, match="vocabularies"):
        xentlib.linear_distillation_loss(xs, ws, xt, wt[:3], tg)
    with pytest.raises(ValueError, match="leading shape"):
        xentlib.linear_distillation_loss(xs, ws, xt[:2], wt)
    with pytest.raises(RuntimeError, match="student_bias"):
        xentlib.linear_distillation_loss(xs, ws, xt, wt, tg, student_bias=torch.zeros(3, dtype=xs.dtype))


def test_one_graph_under_dynamo_and_compiled_equals_eager():
    s, t, target = make((16,), 33, dtype=torch.float32, seed=21)
    xs, ws, bs, xt, wt, bt, tg = linear_case((16,), 8, 4, 33, dtype=torch.float32, seed=22)

    def both(s, t, xs, ws):
        return xentlib.distillation_loss(s, t, target, beta=0.5) + xentlib.linear_distillation_loss(
            xs, ws, xt, wt, tg, student_bias=bs, beta=0.3, temperature=2.0
        )

    explained = torch._dynamo.explain(both)(s, t, xs, ws)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    leaves = [a.clone().requires_grad_() for a in (s, xs, ws)]
    compiled_leaves = [a.clone().requires_grad_() for a in (s, xs, ws)]
    eager = both(leaves[0], t, leaves[1], leaves[2])
    eager.backward()
    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)(
        compiled_leaves[0], t, compiled_leaves[1], compiled_leaves[2]
    )
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(compiled_leaves, leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_opcheck():
    s, t, target = make((5,), 7, dtype=torch.float32, seed=23)
    s.requires_grad_()
    valid = target != -100
    for reduction in REDUCTIONS:
        args = (s, t, valid, None, 0.5, 2.0, reduction, 5, True, 2)
        torch.library.opcheck(torch.ops.xentlib.distillation, args)
    xs, ws, bs, xt, wt, bt, tg = linear_case((5,), 3, 2, 7, dtype=torch.float32, seed=24)
    for tensor in (xs, ws, bs):
        tensor.requires_grad_()
    for reduction in REDUCTIONS:
        args = (xs, ws, bs, xt, wt, bt, tg != -100, None, 0.0, 1.0, reduction, 5, True, True, True, 2)
        torch.library.opcheck(torch.ops.xentlib.linear_distillation, args)


# ---------------------------------------------------------------------------------------------------------------
# The compiled CPU kernel (cpu_post_training.c, xent_distillation) and the PyTorch ops, each against the reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["kernel", "torch ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 3.0])
@pytest.mark.parametrize("scale", [3.0, 15.0])
def test_both_cpu_paths_match_the_reference(monkeypatch, path, dtype, beta, temperature, scale):
    """float32/bfloat16 CPU rows run the compiled kernel unless it is off; both paths against the float64
    reference, with classes masked to -inf in both models (0 log 0 = 0: a finite divergence, zero gradient
    there), a vocabulary that is not a multiple of the kernel's vector width, and rows over its threading
    threshold. At scale 15 many probabilities underflow while their logarithms stay finite (the kernel's mixture
    log-probability takes its exact path there)."""
    from xentlib.backends import cpu_kernel

    if path == "torch ops":
        monkeypatch.setitem(cpu_kernel._state, "fn", None)
    elif not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    student, teacher, target = make((300,), 251, dtype=dtype, seed=25, scale=scale)
    student[:, :7], teacher[:, :7] = float("-inf"), float("-inf")
    loss, grad = ours(student, teacher, target, beta=beta, temperature=temperature, reduction="none")
    assert cpu_kernel.supports_distillation(student, teacher, None) == (path == "kernel")
    keep = (target != -100).numpy()
    rows = ref.distillation(student.double().numpy(), teacher.double().numpy(), beta=beta, temperature=temperature,
                            reduction="none")  # fmt: skip
    want_grad = ref.distillation_backward(np.ones(300), student.double().numpy(), teacher.double().numpy(),
                                          beta=beta, temperature=temperature, reduction="none")  # fmt: skip
    assert np.isfinite(rows).all()
    # absolute float32 errors grow with the logits (u = z / 0.3 reaches ~40 at scale 3, ~200 at scale 15)
    tol = dict(rtol=1e-4, atol=5e-5 * scale / 3) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-4 * scale / 3)
    np.testing.assert_allclose(loss.double().numpy(), np.where(keep, rows, 0.0), **tol)
    np.testing.assert_allclose(grad.double().numpy(), np.where(keep[:, None], want_grad, 0.0), **tol)
    assert (grad[:, :7] == 0).all()


@pytest.mark.parametrize("path", ["kernel", "torch ops"])
def test_rows_without_a_finite_softmax_are_nan_on_both_paths(monkeypatch, path):
    from xentlib.backends import cpu_kernel

    if path == "torch ops":
        monkeypatch.setitem(cpu_kernel._state, "fn", None)
    student, teacher, _ = make((4,), 9, dtype=torch.float32, seed=26)
    student[0, 2], teacher[1, 3], student[2] = float("nan"), float("inf"), float("-inf")
    loss, grad = ours(student, teacher, None, beta=0.5, reduction="none")
    assert loss[:3].isnan().all() and grad[:3].isnan().all()
    assert loss[3].isfinite() and grad[3].isfinite().all()
