"""Per-token log-probabilities and entropy (xentlib.log_probs, xentlib.linear_log_probs).

Truths: the float64 NumPy reference (xentlib.reference.log_probs, analytic backward), itself checked against
torch autograd in float64; the torch composition `log_softmax(softcap(x @ W.T + b) / T).gather(...)` in the
input's dtype (bfloat16: our error against float64 at most the composition's own); torch._dynamo.explain and
torch.library.opcheck for the ops.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import xentlib
from xentlib import reference

IGNORE = -100


def _torch_log_probs(z, target, temperature=1.0, softcap=None, ignore_index=IGNORE):
    """The composition an RL trainer writes: log_softmax(...).gather(...), masked; the entropy -(p log p).sum."""
    y = z if softcap is None else softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(y / temperature, dim=-1)
    valid = target != ignore_index
    logp = log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(log_p.exp() * log_p).sum(-1) * valid
    return logp, entropy


def _problem(lead, hidden, vocab, dtype=torch.float32, bias=True, ignored=(1,), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 2 / hidden**0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, vocab, lead, generator=gen)
    flat = t.view(-1)
    for i in ignored:
        if i < flat.numel():
            flat[i] = IGNORE
    advantages = torch.randn(lead, generator=gen, dtype=torch.float64)
    leaves = [a.to(dtype).requires_grad_() for a in (x, w) + ((b,) if bias else ())]
    return leaves, t, advantages


def _rl_loss(logp, entropy, advantages, beta=0.37):
    """The policy-gradient objective the outputs feed: -(A * logp).sum() - beta * H.sum()."""
    loss = -(advantages.to(logp.dtype) * logp).sum()
    return loss if entropy is None else loss - beta * entropy.sum()


# ------------------------------------------------------------------------------------------ the reference


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.3, None), (3.0, 2.5)])
def test_reference_matches_torch_autograd_in_float64(temperature, softcap):
    (x, w, b), t, adv = _problem((3, 5), 4, 11, torch.float64)
    z = (x @ w.T + b).detach().requires_grad_()
    logp, entropy = _torch_log_probs(z, t, temperature, softcap)
    grad_h = torch.randn(t.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logp, entropy), z, (adv, grad_h))
    ref = reference.log_probs(z.detach().numpy(), t.numpy(), temperature=temperature, softcap=softcap)
    np.testing.assert_allclose(ref.log_prob, logp.detach().numpy(), rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(ref.entropy, entropy.detach().numpy(), rtol=1e-12, atol=1e-13)
    ref_grad = reference.log_probs_backward(
        adv.numpy(), grad_h.numpy(), z.detach().numpy(), t.numpy(), temperature=temperature, softcap=softcap
    )
    np.testing.assert_allclose(ref_grad, grad.numpy(), rtol=1e-10, atol=1e-12)
    lin = reference.linear_log_probs_backward(
        adv.numpy(), grad_h.numpy(), x.detach().numpy(), w.detach().numpy(), t.numpy(), b.detach().numpy(),
        temperature=temperature, softcap=softcap,
    )  # fmt: skip
    torch_lin = torch.autograd.grad(_torch_log_probs(x @ w.T + b, t, temperature, softcap), (x, w, b), (adv, grad_h))
    for ours, theirs in zip(lin, torch_lin):
        np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------- xentlib against the reference

OPTIONS = list(itertools.product([1.0, 0.3, 3.0], [None, 4.0], [True, False]))  # temperature, softcap, bias


def _reference_all(x, w, b, t, adv, grad_h, temperature, softcap):
    args = [a.detach().double().numpy() for a in (x, w)]
    bias = None if b is None else b.detach().double().numpy()
    kw = dict(temperature=temperature, softcap=softcap)
    out = reference.linear_log_probs(*args, t.numpy(), bias, **kw)
    gh = None if grad_h is None else grad_h.numpy()
    grads = reference.linear_log_probs_backward(-adv.numpy(), gh, *args, t.numpy(), bias, **kw)
    return out, grads


@pytest.mark.parametrize("temperature,softcap,bias", OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_log_probs_matches_reference(temperature, softcap, bias, dtype):
    leaves, t, adv = _problem((3, 7), 5, 23, dtype, bias=bias, ignored=(0, 9))
    x, w, b = leaves + [None] * (3 - len(leaves))
    logp, entropy = xentlib.linear_log_probs(
        x, w, t, b, temperature=temperature, softcap=softcap, return_entropy=True, chunk_size=4
    )
    assert logp.shape == entropy.shape == t.shape
    assert logp.dtype == entropy.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    beta = 0.37
    grads = torch.autograd.grad(_rl_loss(logp, entropy, adv, beta), leaves)
    ref, ref_grads = _reference_all(
        x, w, b, t, adv, torch.full(t.shape, -beta, dtype=torch.float64), temperature, softcap
    )
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(logp.detach().numpy(), ref.log_prob, **tol)
    np.testing.assert_allclose(entropy.detach().numpy(), ref.entropy, **tol)
    for ours, theirs in zip(grads, ref_grads):
        np.testing.assert_allclose(ours.double().numpy(), theirs, **tol)


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.3, 4.0), (3.0, None)])
def test_log_probs_matches_reference(temperature, softcap):
    gen = torch.Generator().manual_seed(1)
    z = (torch.randn(2, 5, 17, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    t = torch.randint(0, 17, (2, 5), generator=gen)
    t[1, 2] = IGNORE
    adv, grad_h = torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64)
    logp, entropy = xentlib.log_probs(z, t, temperature=temperature, softcap=softcap, return_entropy=True)
    (grad,) = torch.autograd.grad((logp, entropy), z, (adv, grad_h))
    ref = reference.log_probs(z.detach().numpy(), t.numpy(), temperature=temperature, softcap=softcap)
    ref_grad = reference.log_probs_backward(
        adv.numpy(), grad_h.numpy(), z.detach().numpy(), t.numpy(), temperature=temperature, softcap=softcap
    )
    np.testing.assert_allclose(logp.detach().numpy(), ref.log_prob, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(entropy.detach().numpy(), ref.entropy, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("which", ["logp", "entropy"])
def test_gradient_through_one_output_only(which):
    leaves, t, adv = _problem((9,), 3, 13, torch.float64)
    x, w, b = leaves
    logp, entropy = xentlib.linear_log_probs(x, w, t, b, return_entropy=True)
    out = logp if which == "logp" else entropy
    grads = torch.autograd.grad(out, leaves, adv)
    g = adv.numpy() if which == "logp" else None
    h = adv.numpy() if which == "entropy" else None
    args = [a.detach().numpy() for a in (x, w)]
    ref = reference.linear_log_probs_backward(g, h, *args, t.numpy(), b.detach().numpy())
    for ours, theirs in zip(grads, ref):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ against the torch composition


@pytest.mark.parametrize(
    "lead,hidden,vocab,chunk",
    [((1,), 1, 7, None), ((37,), 1, 29, 8), ((2, 3, 5), 6, 31, 7), ((130,), 8, 3, None), ((5,), 4, 1, None)],
)
def test_odd_shapes_match_torch_composition(lead, hidden, vocab, chunk):
    leaves, t, adv = _problem(lead, hidden, vocab, torch.float32, ignored=(2, 3))
    x, w, b = leaves
    logp, entropy = xentlib.linear_log_probs(x, w, t, b, return_entropy=True, chunk_size=chunk)
    ours = torch.autograd.grad(_rl_loss(logp, entropy, adv), leaves)
    ref_logp, ref_entropy = _torch_log_probs(x @ w.T + b, t)
    theirs = torch.autograd.grad(_rl_loss(ref_logp, ref_entropy, adv), leaves)
    torch.testing.assert_close(logp, ref_logp, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(entropy, ref_entropy, rtol=2e-5, atol=2e-6)
    for a, c in zip(ours, theirs):
        torch.testing.assert_close(a, c, rtol=2e-5, atol=2e-5)


def test_without_entropy_matches_torch_composition():
    leaves, t, adv = _problem((6, 4), 5, 19, torch.float32, bias=False)
    x, w = leaves
    logp = xentlib.linear_log_probs(x, w, t, temperature=0.3)
    assert isinstance(logp, torch.Tensor)
    ours = torch.autograd.grad((adv.float() * logp).sum(), leaves)
    ref = _torch_log_probs(x @ w.T, t, 0.3)[0]
    theirs = torch.autograd.grad((adv.float() * ref).sum(), leaves)
    torch.testing.assert_close(logp, ref, rtol=2e-5, atol=2e-6)
    for a, c in zip(ours, theirs):
        torch.testing.assert_close(a, c, rtol=2e-5, atol=2e-5)


def test_non_contiguous_logits():
    z = torch.randn(13, 6, dtype=torch.float64).t().requires_grad_()  # (6, 13), strided
    t = torch.randint(0, 13, (6,))
    logp, entropy = xentlib.log_probs(z, t, return_entropy=True)
    ref_logp, ref_entropy = _torch_log_probs(z, t)
    torch.testing.assert_close((logp, entropy), (ref_logp, ref_entropy))
    ours = torch.autograd.grad(logp.sum() + entropy.sum(), z)
    torch.testing.assert_close(ours, torch.autograd.grad(ref_logp.sum() + ref_entropy.sum(), z))


def test_all_rows_ignored():
    leaves, t, adv = _problem((4,), 3, 5, torch.float32)
    t.fill_(IGNORE)
    logp, entropy = xentlib.linear_log_probs(*leaves[:2], t, leaves[2], return_entropy=True)
    assert torch.equal(logp, torch.zeros(4)) and torch.equal(entropy, torch.zeros(4))
    for grad in torch.autograd.grad(_rl_loss(logp, entropy, adv), leaves):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_ignored_rows_give_exact_zero_gradients_even_for_non_finite_logits():
    z = torch.randn(3, 5, requires_grad=True)
    with torch.no_grad():
        z[1, 2] = float("nan")
        z[2, 0] = float("inf")
    t = torch.tensor([1, IGNORE, IGNORE])
    logp, entropy = xentlib.log_probs(z, t, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    (grad,) = torch.autograd.grad(logp.sum() + entropy.sum(), z)
    assert torch.equal(grad[1:], torch.zeros(2, 5)) and torch.isfinite(grad[0]).all()


def test_ignore_index_is_honoured():
    z = torch.randn(4, 6, dtype=torch.float64)
    t = torch.tensor([0, 5, 3, 5])
    logp = xentlib.log_probs(z, t, ignore_index=5)
    expected = reference.log_probs(z.numpy(), t.numpy(), ignore_index=5).log_prob
    np.testing.assert_allclose(logp.numpy(), expected, rtol=1e-12)
    assert logp[1] == 0 and logp[3] == 0


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (0.3, None), (3.0, 30.0)])
def test_bfloat16_error_at_most_torch_composition(temperature, softcap):
    """Our error against float64 is at most the error of the torch composition run in bfloat16."""
    leaves, t, adv = _problem((64,), 32, 500, torch.bfloat16, ignored=(3,))
    x, w, b = leaves
    logp, entropy = xentlib.linear_log_probs(x, w, t, b, temperature=temperature, softcap=softcap, return_entropy=True)
    ours = [logp, entropy, *torch.autograd.grad(_rl_loss(logp, entropy, adv), leaves)]
    ref_logp, ref_entropy = _torch_log_probs(x @ w.T + b, t, temperature, softcap)
    theirs = [ref_logp, ref_entropy, *torch.autograd.grad(_rl_loss(ref_logp, ref_entropy, adv), leaves)]
    x64, w64, b64 = [a.detach().double().requires_grad_() for a in leaves]
    true_logp, true_entropy = _torch_log_probs(x64 @ w64.T + b64, t, temperature, softcap)
    truth = [true_logp, true_entropy, *torch.autograd.grad(_rl_loss(true_logp, true_entropy, adv), (x64, w64, b64))]
    for name, a, c, exact in zip(("logp", "entropy", "dx", "dW", "db"), ours, theirs, truth):
        ours_err = (a.double() - exact).abs().max().item()
        torch_err = (c.double() - exact).abs().max().item()
        assert ours_err <= torch_err * 1.05 + 1e-6, (name, ours_err, torch_err)


# ------------------------------------------------------------------------------------------- validation


def _call_linear(**overrides):
    args = dict(input=torch.randn(4, 3), weight=torch.randn(7, 3), target=torch.tensor([0, 1, 6, IGNORE]))
    args.update(overrides)
    return xentlib.linear_log_probs(**args)


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(target=torch.tensor([0, 1, 2, 3], dtype=torch.int32)), RuntimeError, "Long"),
        (dict(target=torch.tensor([0, 1, 2])), ValueError, "leading shape"),
        (dict(target=torch.tensor([0, 1, 7, 0])), IndexError, "out of bounds"),
        (dict(weight=torch.randn(7, 2)), RuntimeError, "cannot be multiplied"),
        (dict(weight=torch.randn(7, 3, dtype=torch.float64)), RuntimeError, "dtype"),
        (dict(input=torch.randint(0, 3, (4, 3))), NotImplementedError, "floating"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature="hot"), TypeError, "temperature"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(backend="triton"), ValueError, "backend"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_bad_arguments_raise_torch_exception_types(overrides, error, words):
    with pytest.raises(error, match=words):
        _call_linear(**overrides)


def test_log_probs_rejects_mismatched_target():
    with pytest.raises(ValueError, match="leading shape"):
        xentlib.log_probs(torch.randn(3, 5), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="at least one dimension"):
        xentlib.log_probs(torch.tensor(1.0), torch.tensor(0))


# ------------------------------------------------------------------------------------ the PyTorch runtime


def _linear_step(x, w, b, t, adv):
    logp, entropy = xentlib.linear_log_probs(x, w, t, b, temperature=0.7, softcap=5.0, return_entropy=True)
    return _rl_loss(logp, entropy, adv)


def _plain_step(z, t, adv):
    logp, entropy = xentlib.log_probs(z, t, temperature=0.7, return_entropy=True)
    return _rl_loss(logp, entropy, adv)


def test_one_graph_and_compiled_equals_eager():
    leaves, t, adv = _problem((8,), 4, 11, torch.float32)
    adv = adv.float()
    explained = torch._dynamo.explain(_linear_step)(*leaves, t, adv)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    z = torch.randn(8, 11, requires_grad=True)
    explained = torch._dynamo.explain(_plain_step)(z, t, adv)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(_linear_step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves, t, adv)
    grads = torch.autograd.grad(loss, leaves)
    eager = _linear_step(*leaves, t, adv)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grads, torch.autograd.grad(eager, leaves))


def test_opcheck():
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(6, 3, generator=gen), torch.randn(9, 3, generator=gen), torch.randn(9, generator=gen)
    t = torch.tensor([0, 8, IGNORE, 4, 4, 1])
    z = torch.randn(6, 9, generator=gen)
    for entropy in (True, False):
        torch.library.opcheck(torch.ops.xentlib.log_probs, (z.requires_grad_(), t, 0.5, IGNORE, None, entropy))
        torch.library.opcheck(
            torch.ops.xentlib.linear_log_probs,
            (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), t, 2.0, IGNORE, 3.0, entropy, 4),
        )
    logp, entropy, lse = torch.ops.xentlib.log_probs(z.detach(), t, 0.5, IGNORE, None, True)
    g, h = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    torch.library.opcheck(torch.ops.xentlib.log_probs_backward, (z.detach(), t, lse, entropy, g, h, 0.5, IGNORE, None))
    logp, entropy, lse = torch.ops.xentlib.linear_log_probs(
        x.detach(), w.detach(), b.detach(), t, 2.0, IGNORE, 3.0, True, 4
    )
    torch.library.opcheck(
        torch.ops.xentlib.linear_log_probs_backward,
        (x.detach(), w.detach(), b.detach(), t, lse, entropy, g, None, 2.0, IGNORE, 3.0, 4, True, True, True),
    )


def test_autocast_runs_the_head_in_the_autocast_dtype_and_returns_float32():
    leaves, t, _ = _problem((5,), 4, 9, torch.float32)
    x, w, b = leaves
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = xentlib.linear_log_probs(x, w, t, b)
    assert logp.dtype == torch.float32
    ref = _torch_log_probs((x.bfloat16() @ w.bfloat16().T + b.bfloat16()).float(), t)[0]
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=1e-5)
    assert all(g.dtype == torch.float32 for g in torch.autograd.grad(logp.sum(), leaves))


# ------------------------------------------------------------------- the compiled CPU kernel and the ops


def _kernel_off(monkeypatch):
    from xentlib.backends import cpu_kernel

    monkeypatch.setitem(cpu_kernel._state, "fn", None)


@pytest.mark.parametrize("path", ["kernel", "torch ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 3.0])
def test_both_cpu_paths_match_the_reference(monkeypatch, path, dtype, temperature):
    """float32/bfloat16 CPU rows run the compiled kernel (cpu_post_training.c, xent_log_probs) unless it is off; both
    paths against the float64 reference, through both outputs, with rows of -inf logits, ignored rows and a
    vocabulary that is not a multiple of the kernel's vector width."""
    from xentlib import rl
    from xentlib.backends import cpu_kernel

    if path == "torch ops":
        _kernel_off(monkeypatch)
    elif not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    gen = torch.Generator().manual_seed(7)
    z = (torch.randn(29, 203, generator=gen) * 4).to(dtype)
    z[2, :50] = float("-inf")  # p = 0 there: zero gradient, no 0 * inf
    t = torch.randint(0, 203, (29,), generator=gen)
    t[::5] = IGNORE
    t[2] = 100  # a finite logit: log p_t is finite
    assert rl._Rows(203, z.dtype, z.device, temperature, None, True).kernel == (path == "kernel")
    leaf = z.clone().requires_grad_()
    logp, entropy = xentlib.log_probs(leaf, t, temperature=temperature, return_entropy=True)
    adv, grad_h = torch.randn(2, 29, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((logp, entropy), leaf, (adv.float(), grad_h.float()))
    z64 = z.double().numpy()
    ref = reference.log_probs(z64, t.numpy(), temperature=temperature)
    ref_grad = reference.log_probs_backward(adv.numpy(), grad_h.numpy(), z64, t.numpy(), temperature=temperature)
    np.testing.assert_allclose(logp.detach().double().numpy(), ref.log_prob, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(entropy.detach().double().numpy(), ref.entropy, rtol=1e-5, atol=2e-5)
    grad_tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-3)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad, **grad_tol)
    assert (grad[::5] == 0).all() and (grad[2, :50] == 0).all()


@pytest.mark.parametrize("path", ["kernel", "torch ops"])
def test_rows_without_a_finite_softmax_are_nan_on_both_paths(monkeypatch, path):
    if path == "torch ops":
        _kernel_off(monkeypatch)
    z = torch.randn(4, 19)
    z[0, 3], z[1, 4], z[2] = float("nan"), float("inf"), float("-inf")
    leaf = z.clone().requires_grad_()
    logp, entropy = xentlib.log_probs(leaf, torch.tensor([1, 2, 3, 4]), return_entropy=True)
    (logp.sum() + entropy.sum()).backward()
    assert logp[:3].isnan().all() and entropy[:3].isnan().all() and leaf.grad[:3].isnan().all()
    assert logp[3].isfinite() and leaf.grad[3].isfinite().all()
    torch.testing.assert_close(logp[3], torch.log_softmax(z[3], 0)[4])
