"""The clipped policy-gradient loss (xentlib.policy_loss, xentlib.linear_policy_loss).

Truths: the float64 NumPy reference (xentlib.reference.policy, analytic backward); an independent torch
composition written as TRL's GRPO trainer computes its loss (log_softmax and gather, the clipped ratio with
torch.min/torch.clamp, the k3 KL, autograd), in float64 and in the input's dtype (bfloat16: our error against
float64 at most the composition's own); torch._dynamo.explain and torch.library.opcheck for the op.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import xentlib
from xentlib import _semantics as sem
from xentlib import policy, reference
from xentlib.backends import cpu_kernel
from xentlib.policy import token_terms

IGNORE = -100


def _trl_loss(z, target, advantages, old=None, ref=None, weight=None, *, epsilon=0.2, epsilon_high=None,
              kl_coef=0.0, entropy_coef=0.0, temperature=1.0, softcap=None, reduction="mean"):  # fmt: skip
    """The loss as a GRPO trainer writes it over materialized logits, with torch autograd."""
    y = z if softcap is None else softcap * torch.tanh(z / softcap)
    log_p = torch.log_softmax(y.float() if z.dtype == torch.bfloat16 else y, dim=-1) if temperature == 1.0 else (
        torch.log_softmax((y.float() if z.dtype == torch.bfloat16 else y) / temperature, dim=-1))  # fmt: skip
    mask = (target != IGNORE).to(log_p.dtype)
    logp = log_p.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    advantages = advantages.to(log_p.dtype).expand(target.shape)
    coef_1 = torch.exp(logp - (logp.detach() if old is None else old.to(log_p.dtype)))
    high = epsilon if epsilon_high is None else epsilon_high
    coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + high)
    per_token = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if kl_coef:
        delta = ref.to(log_p.dtype) - logp
        per_token = per_token + kl_coef * (torch.exp(delta) - delta - 1)
    if entropy_coef:
        per_token = per_token + entropy_coef * (log_p.exp() * log_p).sum(-1)
    w = mask if weight is None else mask * weight.to(log_p.dtype).expand(target.shape)
    total = (per_token * w).sum()
    return total if reduction == "sum" else total / w.sum()


def _problem(lead=(3, 7), hidden=5, vocab=23, dtype=torch.float64, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) * 2 / hidden**0.5
    b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, vocab, lead, generator=gen)
    t.view(-1)[1::4] = IGNORE
    with torch.no_grad():
        logp = xentlib.linear_log_probs(x, w, t, b)
    per_token = dict(
        advantages=torch.randn(lead[0], 1, generator=gen, dtype=torch.float64),  # one per sequence, broadcast
        old=logp + 0.4 * torch.randn(lead, generator=gen, dtype=torch.float64),  # ratios in and out of the clip range
        ref=logp + 0.3 * torch.randn(lead, generator=gen, dtype=torch.float64),
        weight=torch.rand(lead, generator=gen, dtype=torch.float64),
    )
    leaves = [a.to(dtype).requires_grad_() for a in (x, w) + ((b,) if bias else ())]
    return leaves, t, per_token


OPTIONS = {
    "on-policy": dict(),
    "clipped": dict(old=True, epsilon=0.1, epsilon_high=0.28),
    "kl and entropy": dict(old=True, ref=True, kl_coef=0.05, entropy_coef=0.01),
    "weights, sum": dict(old=True, weight=True, reduction="sum"),
    "everything, T=0.3": dict(old=True, ref=True, weight=True, kl_coef=0.1, entropy_coef=0.02, temperature=0.3),
    "T=3, softcap": dict(old=True, ref=True, kl_coef=0.1, temperature=3.0, softcap=2.5),
}


def _split(option, per_token):
    """(xentlib keyword arguments, reference keyword arguments, _trl_loss arguments) of an OPTIONS entry."""
    opts = dict(OPTIONS[option])
    tensors = {name: per_token[name] if opts.pop(name, False) else None for name in ("old", "ref", "weight")}
    ours = dict(opts, old_log_probs=tensors["old"], ref_log_probs=tensors["ref"], token_weight=tensors["weight"])
    numpy = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in ours.items()}
    return ours, numpy, (tensors["old"], tensors["ref"], tensors["weight"]), opts


# ------------------------------------------------------------------------------------------ the reference


@pytest.mark.parametrize("option", list(OPTIONS))
def test_reference_matches_the_trl_composition_in_float64(option):
    (x, w, b), t, per_token = _problem()
    ours, numpy, (old, ref, weight), opts = _split(option, per_token)
    a = per_token["advantages"]
    z = (x @ w.T + b).detach().requires_grad_()
    loss = _trl_loss(z, t, a, old, ref, weight, **opts)
    (grad,) = torch.autograd.grad(loss, z)
    expected = reference.policy_loss(z.detach().numpy(), t.numpy(), a.numpy(), **numpy)
    np.testing.assert_allclose(expected, loss.item(), rtol=1e-12, atol=1e-13)
    expected_grad = reference.policy_loss_backward(1.0, z.detach().numpy(), t.numpy(), a.numpy(), **numpy)
    np.testing.assert_allclose(expected_grad, grad.numpy(), rtol=1e-10, atol=1e-13)


def test_explicit_derivatives_equal_autograd_of_the_token_loss():
    """token_terms' d_log_prob / d_entropy (used by the fused op) against autograd of its own loss, with ratios
    below, inside and above the clip range, both signs of the advantage and an exact tie."""
    gen = torch.Generator().manual_seed(5)
    n = 400
    logp = (torch.randn(n, generator=gen, dtype=torch.float64) - 2).requires_grad_()
    entropy = torch.rand(n, generator=gen, dtype=torch.float64).requires_grad_()
    old = logp.detach() + torch.randn(n, generator=gen, dtype=torch.float64) * 0.5
    old[:3] = logp.detach()[:3]  # r = 1 exactly
    advantages = torch.randn(n, generator=gen, dtype=torch.float64)
    advantages[3] = 0.0
    call = sem.PolicyCall(advantages, old, logp.detach() + 0.1, None, 0.2, 0.3, 0.07, 0.03, "sum")
    terms = token_terms(logp, entropy, call)
    d_logp, d_entropy = torch.autograd.grad(terms.loss.sum(), (logp, entropy))
    torch.testing.assert_close(terms.d_log_prob, d_logp, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(terms.d_entropy, d_entropy, rtol=0, atol=0)
    ratio = (logp - old).exp()
    assert (ratio > 1.3).any() and (ratio < 0.8).any()  # both clip regions were exercised


# ----------------------------------------------------------------------- xentlib against the reference


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_linear_policy_loss_matches_reference(option, chunk_size):
    leaves, t, per_token = _problem()
    x, w, b = leaves
    ours, numpy, _, _ = _split(option, per_token)
    a = per_token["advantages"]
    loss = xentlib.linear_policy_loss(x, w, t, a, b, chunk_size=chunk_size, **ours)
    grads = torch.autograd.grad(loss, leaves)
    arrays = [v.detach().numpy() for v in (x, w)]
    expected = reference.linear_policy_loss(*arrays, t.numpy(), a.numpy(), b.detach().numpy(), **numpy)
    expected_grads = reference.linear_policy_loss_backward(1.0, *arrays, t.numpy(), a.numpy(), b.detach().numpy(),
                                                           **numpy)  # fmt: skip
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-11, atol=1e-13)
    for ours_grad, exact in zip(grads, expected_grads):
        np.testing.assert_allclose(ours_grad.numpy(), exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("option", list(OPTIONS))
def test_policy_loss_of_logits_matches_reference(option):
    (x, w, b), t, per_token = _problem()
    ours, numpy, _, _ = _split(option, per_token)
    a = per_token["advantages"]
    z = (x @ w.T + b).detach().requires_grad_()
    loss = xentlib.policy_loss(z, t, a, **ours)
    (grad,) = torch.autograd.grad(loss, z)
    np.testing.assert_allclose(loss.item(), reference.policy_loss(z.detach().numpy(), t.numpy(), a.numpy(), **numpy),
                               rtol=1e-11, atol=1e-13)  # fmt: skip
    exact = reference.policy_loss_backward(1.0, z.detach().numpy(), t.numpy(), a.numpy(), **numpy)
    np.testing.assert_allclose(grad.numpy(), exact, rtol=1e-10, atol=1e-13)


KERNEL_OPTIONS = [option for option in OPTIONS if "softcap" not in option]  # soft-capping: the PyTorch ops


def _kernel_policy_loss(option, dtype, one_sweep, monkeypatch):
    """(loss, gradients) of the fused loss on float32/bfloat16 inputs whose rows run the compiled kernel, in one
    sweep per row or in a forward and a backward call; asserts which ran."""
    if not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    sweeps = []
    original = cpu_kernel.log_probs_rows
    spy = lambda *args, **kwargs: sweeps.append(kwargs.get("policy")) or original(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(cpu_kernel, "log_probs_rows", spy)
    monkeypatch.setattr(policy, "ONE_SWEEP", one_sweep)
    leaves, t, per_token = _problem(lead=(5, 9), hidden=6, vocab=37, dtype=dtype, seed=3)
    x, w, b = leaves
    ours, numpy, _, _ = _split(option, per_token)
    a = per_token["advantages"]
    loss = xentlib.linear_policy_loss(x, w, t, a, b, **ours)
    grads = torch.autograd.grad(loss, leaves)
    assert sweeps and all((sweep is not None) == one_sweep for sweep in sweeps)
    return loss, grads, (leaves, t, a, numpy)


@pytest.mark.parametrize("option", KERNEL_OPTIONS)
def test_the_cpu_kernels_one_sweep_matches_reference_in_float32(option, monkeypatch):
    """The kernel's one sweep per row, with its own copy of the token terms' derivatives: every option (clipping,
    KL, entropy, weights, temperatures) against the float64 reference, to float32 rounding of the largest terms."""
    loss, grads, (leaves, t, a, numpy) = _kernel_policy_loss(option, torch.float32, True, monkeypatch)
    x, w, b = (v.detach().double().numpy() for v in leaves)
    expected = reference.linear_policy_loss(x, w, t.numpy(), a.numpy(), b, **numpy)
    expected_grads = reference.linear_policy_loss_backward(1.0, x, w, t.numpy(), a.numpy(), b, **numpy)
    np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
    for ours_grad, exact in zip(grads, expected_grads):
        np.testing.assert_allclose(ours_grad.numpy(), exact, rtol=1e-4, atol=1e-5 * np.abs(exact).max())


@pytest.mark.parametrize("option", KERNEL_OPTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_kernels_one_sweep_equals_its_two_calls(option, dtype, monkeypatch):
    """The one sweep against the forward and backward calls of the same rows (the same rounded logits): equal to
    float32 rounding, and in bfloat16 to one rounding of the gradient."""
    loss, grads, _ = _kernel_policy_loss(option, dtype, True, monkeypatch)
    two_loss, two_grads, _ = _kernel_policy_loss(option, dtype, False, monkeypatch)
    torch.testing.assert_close(loss, two_loss, rtol=1e-6, atol=0)
    for one, two in zip(grads, two_grads):
        scale = two.abs().max().item()
        tol = dict(rtol=1e-5, atol=1e-6 * scale) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2 * scale)
        torch.testing.assert_close(one, two, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("lead,hidden,vocab", [((1,), 1, 1), ((13,), 1, 7), ((2, 3, 4), 3, 130), ((129,), 6, 41)])
def test_odd_shapes_and_the_cpu_kernel_match_the_composition(dtype, lead, hidden, vocab):
    """D = 1, V = 1, 3-D tokens, more rows than a chunk; float32 runs the compiled CPU kernel's rows."""
    leaves, t, per_token = _problem(lead, hidden, vocab, dtype=dtype, seed=2)
    a, old = per_token["advantages"].reshape(lead[0], *([1] * (len(lead) - 1))), per_token["old"]
    kwargs = dict(old_log_probs=old, entropy_coef=0.01, temperature=0.7)
    loss = xentlib.linear_policy_loss(*leaves[:2], t, a, leaves[2], chunk_size=32, **kwargs)
    grads = torch.autograd.grad(loss, leaves)
    z = leaves[0] @ leaves[1].T + leaves[2]
    expected = _trl_loss(z, t, a, old, entropy_coef=0.01, temperature=0.7)
    expected_grads = torch.autograd.grad(expected, leaves)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(loss, expected.to(loss.dtype), **tol)
    for ours, theirs in zip(grads, expected_grads):
        torch.testing.assert_close(ours, theirs, **tol)


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch-mm"])
def test_float32_chunk_matmuls_through_onednn_or_torch_mm(onednn, monkeypatch):
    """The chunks' matmuls with W run in oneDNN or torch.mm (which one is faster depends on the CPU: linear.py,
    `_PREFER_ONEDNN`); both ways, the policy loss and the log-probabilities match the composition, with ignored
    rows dropped before the matmuls."""
    from xentlib import linear, rl

    if onednn and not linear._ONEDNN_LINEAR:
        pytest.skip("this torch has no oneDNN linear")
    monkeypatch.setattr(linear, "_PREFER_ONEDNN", onednn)
    leaves, t, per_token = _problem((3, 7), 6, 23, dtype=torch.float32, seed=9)
    x, w, b = leaves
    assert rl._LinearChunks(x.reshape(-1, 6), w, b, None, 4).onednn == onednn
    a, old = per_token["advantages"], per_token["old"]
    loss = xentlib.linear_policy_loss(x, w, t, a, b, old_log_probs=old, entropy_coef=0.01, chunk_size=4)
    expected = _trl_loss(x @ w.T + b, t, a, old, entropy_coef=0.01)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for ours, theirs in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    logp, entropy = xentlib.linear_log_probs(x, w, t, b, return_entropy=True, chunk_size=4)
    grads = torch.autograd.grad((a.float().expand(t.shape) * logp).sum() + entropy.sum(), leaves)
    z = x @ w.T + b
    log_p = torch.log_softmax(z, -1)
    valid = t != IGNORE
    expected_logp = log_p.gather(-1, t.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    expected_entropy = -(log_p.exp() * log_p).sum(-1) * valid
    torch.testing.assert_close(logp, expected_logp, rtol=1e-5, atol=1e-6)
    objective = (a.float().expand(t.shape) * expected_logp).sum() + expected_entropy.sum()
    for ours, theirs in zip(grads, torch.autograd.grad(objective, leaves)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_token_counts(reduction):
    """Every target ignored: the loss is 0 (not 0/0) and every gradient exactly 0."""
    leaves, t, per_token = _problem()
    t = torch.full_like(t, IGNORE)
    loss = xentlib.linear_policy_loss(*leaves[:2], t, per_token["advantages"], leaves[2], reduction=reduction)
    assert loss.item() == 0.0
    assert all((g == 0).all() for g in torch.autograd.grad(loss, leaves))
    z = (leaves[0] @ leaves[1].T).detach().requires_grad_()
    loss = xentlib.policy_loss(z, t, per_token["advantages"], reduction=reduction)
    assert loss.item() == 0.0 and (torch.autograd.grad(loss, z)[0] == 0).all()


def test_upstream_gradient_scales_and_token_stats_are_linear_log_probs():
    leaves, t, per_token = _problem()
    a = per_token["advantages"]
    loss, logp, entropy = xentlib.linear_policy_loss(*leaves[:2], t, a, leaves[2], return_token_stats=True)
    grads = torch.autograd.grad(loss * 3.0, leaves)
    again = xentlib.linear_policy_loss(*leaves[:2], t, a, leaves[2])
    for scaled, plain in zip(grads, torch.autograd.grad(again, leaves)):
        torch.testing.assert_close(scaled, 3.0 * plain, rtol=1e-14, atol=1e-15)
    expected_logp, expected_entropy = xentlib.linear_log_probs(*leaves[:2], t, leaves[2], return_entropy=True)
    torch.testing.assert_close(logp, expected_logp.detach(), rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(entropy, expected_entropy.detach(), rtol=1e-13, atol=1e-14)
    assert not logp.requires_grad and logp.shape == t.shape


def test_bfloat16_error_at_most_torch_composition():
    leaves, t, per_token = _problem((64,), 32, 500, dtype=torch.bfloat16, seed=4)
    a = torch.randn(64, generator=torch.Generator().manual_seed(12), dtype=torch.float64)  # one per token
    old, ref = per_token["old"], per_token["ref"]
    kwargs = dict(epsilon=0.2, kl_coef=0.05, entropy_coef=0.01, temperature=0.8)
    loss = xentlib.linear_policy_loss(*leaves[:2], t, a, leaves[2], old_log_probs=old, ref_log_probs=ref, **kwargs)
    ours = [loss, *torch.autograd.grad(loss, leaves)]
    composed = _trl_loss(leaves[0] @ leaves[1].T + leaves[2], t, a, old, ref, **kwargs)
    theirs = [composed, *torch.autograd.grad(composed, leaves)]
    wide = [v.detach().double().requires_grad_() for v in leaves]
    exact = _trl_loss(wide[0] @ wide[1].T + wide[2], t, a, old, ref, **kwargs)
    truth = [exact, *torch.autograd.grad(exact, wide)]
    for name, o, c, e in zip(("loss", "dx", "dW", "db"), ours, theirs, truth):
        ours_err, torch_err = (o.double() - e).abs().max().item(), (c.double() - e).abs().max().item()
        assert ours_err <= torch_err * 1.05 + 1e-6, (name, ours_err, torch_err)


# ------------------------------------------------------------------------------------------- validation


def _call(**overrides):
    args = dict(
        input=torch.randn(2, 3, 4), weight=torch.randn(7, 4), target=torch.tensor([[0, 1, 6], [2, IGNORE, 3]]),
        advantages=torch.randn(2, 1),
    )  # fmt: skip
    args.update(overrides)
    return xentlib.linear_policy_loss(**args)


@pytest.mark.parametrize(
    "overrides,error,words",
    [
        (dict(advantages=torch.randn(4)), ValueError, "does not broadcast"),
        (dict(advantages=torch.ones(2, 1, dtype=torch.long)), RuntimeError, "floating"),
        (dict(advantages=[1.0, 2.0]), TypeError, "advantages"),
        (dict(old_log_probs=torch.randn(3, 3)), ValueError, "old_log_probs"),
        (dict(kl_coef=0.1), ValueError, "ref_log_probs"),
        (dict(epsilon=1.0), ValueError, "epsilon"),
        (dict(epsilon=-0.1), ValueError, "epsilon"),
        (dict(epsilon_high=-0.1), ValueError, "epsilon_high"),
        (dict(epsilon=float("nan")), ValueError, "finite"),
        (dict(entropy_coef="a lot"), TypeError, "entropy_coef"),
        (dict(reduction="batchmean"), ValueError, "reduction"),
        (dict(target=torch.tensor([[0, 1, 7], [2, IGNORE, 3]])), IndexError, "out of bounds"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_bad_arguments_raise_torch_exception_types(overrides, error, words):
    with pytest.raises(error, match=words):
        _call(**overrides)


def test_a_second_backward_and_a_forward_without_grad_mode_recompute():
    """The forward hands its gradients to the first backward; a second backward (retain_graph) or a forward
    whose gradients were not made runs the op again, with the same result."""
    gen = torch.Generator().manual_seed(8)
    x, w = torch.randn(4, 3, generator=gen, requires_grad=True), torch.randn(5, 3, generator=gen)
    t, a = torch.tensor([0, 1, 2, 3]), torch.randn(4, generator=gen)
    loss = xentlib.linear_policy_loss(x, w, t, a)
    (first,) = torch.autograd.grad(loss * 2.0, x, retain_graph=True)
    (second,) = torch.autograd.grad(loss * 2.0, x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    flat = (x.detach(), w, None, t, a, None, None, None, 1.0, IGNORE, None, 0.2, 0.2, 0.0, 0.0, "mean", False, 0)
    leaf = x.detach().requires_grad_()
    loss = torch.ops.xentlib.linear_policy_loss(leaf, *flat[1:], False, False, False)[0]
    (third,) = torch.autograd.grad(loss * 2.0, leaf)
    torch.testing.assert_close(third, first, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ the PyTorch runtime


def _step(x, w, b, t, a, old, ref):
    return xentlib.linear_policy_loss(x, w, t, a, b, old_log_probs=old, ref_log_probs=ref, kl_coef=0.1,
                                      entropy_coef=0.01, temperature=0.7, softcap=5.0)  # fmt: skip


def test_one_graph_and_compiled_equals_eager():
    leaves, t, per_token = _problem(dtype=torch.float32)
    extras = [per_token[k].float() for k in ("advantages", "old", "ref")]
    explained = torch._dynamo.explain(_step)(*leaves, t, *extras)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    compiled = torch.compile(_step, fullgraph=True, backend="aot_eager")
    loss = compiled(*leaves, t, *extras)
    grads = torch.autograd.grad(loss, leaves)
    eager = _step(*leaves, t, *extras)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(grads, torch.autograd.grad(eager, leaves))


def test_opcheck():
    leaves, t, per_token = _problem((6,), 3, 9, dtype=torch.float32, seed=3)
    x, w, b = leaves
    a, old, ref, weight = (per_token[k].reshape(-1)[:6].float() for k in ("advantages", "old", "ref", "weight"))
    for grads in ((True, True, True), (False, False, False)):
        torch.library.opcheck(
            torch.ops.xentlib.linear_policy_loss,
            (x, w, b, t, a, old, ref, weight, 0.8, IGNORE, None, 0.2, 0.3, 0.1, 0.01, "mean", True, 4, *grads),
        )


def test_the_ops_gradient_outputs_are_not_changed_by_backward():
    leaves, t, per_token = _problem((6,), 3, 9, dtype=torch.float64, seed=6)
    a = torch.randn(6, dtype=torch.float64)
    call = (*leaves, t, a, None, None, None, 1.0, IGNORE, None, 0.2, 0.2, 0.0, 0.0, "mean", False, 0, True, True, True)
    out = torch.ops.xentlib.linear_policy_loss(*call)
    held = [g.clone() for g in out[3:]]
    grads = torch.autograd.grad(out[0] * 3.0, leaves)
    for before, now, grad in zip(held, out[3:], grads):
        assert torch.equal(before, now)
        torch.testing.assert_close(grad, 3.0 * before, rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------- a peer's convention


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo"])
def test_matches_liger_kernels_grpo_loss_where_installed(loss_type):
    """Liger Kernel's chunked GRPO loss (pure PyTorch; skipped where liger-kernel is not installed) agrees with
    ours where their conventions meet: token-level ratio, k3 KL, its loss types as token weights (float64 inputs;
    its loss is accumulated in float32)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    leaves, t, per_token = _problem((3, 7), 5, 23, dtype=torch.float64, bias=False, seed=11)
    x, w = leaves
    mask = (t != IGNORE).long()
    a, old, ref = per_token["advantages"][:, 0], per_token["old"], per_token["ref"]
    theirs_fn = liger.LigerFusedLinearGRPOLoss(
        beta=0.05, loss_type=loss_type, max_completion_length=7, epsilon_low=0.2, epsilon_high=0.28, temperature=0.7,
        compiled=False,
    )  # fmt: skip
    theirs = theirs_fn(x, w, t.clamp(min=0), mask, a, ref_per_token_logps=ref, old_per_token_logps=old)[0]
    weight = None if loss_type == "bnpo" else torch.full(t.shape, 1.0 / (3 * 7), dtype=torch.float64)
    ours = xentlib.linear_policy_loss(
        x, w, t, a[:, None], old_log_probs=old, ref_log_probs=ref, kl_coef=0.05, epsilon=0.2, epsilon_high=0.28,
        temperature=0.7, token_weight=weight, reduction="mean" if loss_type == "bnpo" else "sum",
    )  # fmt: skip
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-7)  # theirs: a float32 loss
    for a_grad, b_grad in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves)):
        torch.testing.assert_close(a_grad, b_grad, rtol=1e-5, atol=1e-6)
