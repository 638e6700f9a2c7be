"""The clipped policy-gradient loss of PPO and GRPO, fused with the LM head: three matmuls, no (N, V) logits.

Per token n with log-probability l = log p(target) at the temperature, entropy H, advantage A, the sampling
policy's l_old (l itself when not given: on-policy, r = 1) and a reference model's l_ref:
    r = exp(l - l_old)     pg = -min(r A, clip(r, 1 - e_low, 1 + e_high) A)     kl = exp(l_ref - l) - (l_ref - l) - 1
    loss_n = pg + kl_coef kl - entropy_coef H          loss = sum_n w_n loss_n / D
with token weights w (1 when not given; 0 on ignored tokens) and D = sum_n w_n for 'mean' (0 when no token
counts: the loss is 0) or 1 for 'sum'. TRL's GRPO loss types are weights: 'bnpo' is 'mean'; 'grpo' (each
sequence's mean, then the mean over B sequences) is w = 1 / (B len_b) with 'sum'; 'dr_grpo' is w = 1 / (B L_max)
with 'sum'; 'dapo' is w = 1 / (tokens in the global batch) with 'sum' (docs/numerics.md, "The policy loss").

Why a loss of its own, beside `linear_log_probs`: a gradient through per-token outputs needs their upstream
gradients, unknown in the forward pass, so `linear_log_probs` recomputes the logits in its backward, a fourth
matmul. Here the loss is known per token as soon as its row is, so the forward turns each chunk of logits into
dL/dZ at once (dL/dZ = sum_n c_n d l_n / dZ + e_n d H_n / dZ with per-token coefficients c = w d loss_n / dl / D
and e = w d loss_n / dH / D, reference/policy.py) and accumulates dX and dW beside it, as `linear_cross_entropy`
does: three matmuls, one chunk of logits. The backward scales the saved gradients by the upstream gradient.

`policy_loss` takes materialized logits: there the loss is `log_probs` and a few ops on (N,) vectors, written
once below (`token_terms`) and differentiated by autograd; the fused op uses the same function's explicit
derivatives, which the tests check against autograd's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.backends import cpu_kernel
from xentlib.backends.composite import scale_by_grad_output_
from xentlib.linear import _autocast_operands, accumulate_chunk_grads_
from xentlib.rl import _LinearChunks, _Rows, _sub, _targets, checked_log_probs_call, log_probs

__all__ = ["linear_policy_loss", "policy_loss"]


class TokenTerms(NamedTuple):
    loss: Tensor  # loss_n (N,), differentiable through l and H with torch ops
    d_log_prob: Tensor  # d loss_n / dl, explicit (for the fused op)
    d_entropy: Tensor | None  # d loss_n / dH, None when entropy_coef = 0


def token_terms(log_prob: Tensor, entropy: Tensor | None, call: sem.PolicyCall, rows=slice(None)) -> TokenTerms:
    """Per-token loss and its derivatives for tokens `rows` of the call's per-token tensors (module docstring).

    d pg / dl = -A r where r A <= clip(r) A (the unclipped term is the minimum; at a tie both are, and agree),
    else 0 (the clipped term is constant in l). d kl / dl = 1 - exp(l_ref - l). d loss_n / dH = -entropy_coef."""
    a = call.advantages[rows]
    old = log_prob.detach() if call.old_log_probs is None else call.old_log_probs[rows]
    ratio = (log_prob - old).exp()  # on-policy: 1, with the gradient of log p
    clipped = ratio.clamp(1.0 - call.epsilon_low, 1.0 + call.epsilon_high)
    loss = -torch.minimum(ratio * a, clipped * a)
    d_log_prob = torch.where(ratio.detach() * a <= clipped.detach() * a, -a * ratio.detach(), 0.0)
    if call.kl_coef != 0.0:
        delta = call.ref_log_probs[rows] - log_prob
        loss = loss + call.kl_coef * (delta.exp() - delta - 1.0)
        d_log_prob = d_log_prob + call.kl_coef * (1.0 - delta.detach().exp())
    d_entropy = None
    if call.entropy_coef != 0.0:
        loss = loss - call.entropy_coef * entropy
        d_entropy = torch.full_like(d_log_prob, -call.entropy_coef)
    return TokenTerms(loss, d_log_prob, d_entropy)


def token_factors(valid: Tensor, call: sem.PolicyCall) -> Tensor:
    """w_n / D per token (0 on ignored tokens), computed on the device: D = sum of the kept weights for 'mean',
    where a D of 0 (no token counts) makes every factor 0, and 1 for 'sum'."""
    zero = torch.zeros((), dtype=call.advantages.dtype, device=valid.device)
    weights = torch.where(valid, 1.0 if call.token_weight is None else call.token_weight, zero)
    if call.reduction == "sum":
        return weights
    total = weights.sum()
    return torch.where(total != 0, weights / torch.where(total != 0, total, 1.0), zero)


# --------------------------------------------------------------------------------------------------------------
# policy_loss: materialized logits, log_probs and autograd
# --------------------------------------------------------------------------------------------------------------


def policy_loss(
    logits: Tensor,
    target: Tensor,
    advantages: Tensor,
    *,
    old_log_probs: Tensor | None = None,
    ref_log_probs: Tensor | None = None,
    token_weight: Tensor | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    return_token_stats: bool = False,
):
    r"""PPO/GRPO's clipped policy-gradient loss of (..., V) logits (module docstring for the formula).

    Args:
        logits: (..., V) logits of the sampled tokens' positions; target: (...) int64 sampled token ids, or
            `ignore_index` (prompt and padding tokens: they count for nothing).
        advantages: per-token advantages, any shape that broadcasts to the target's ((B, 1): one per sequence).
        old_log_probs: the sampling policy's per-token log-probabilities (broadcast like the advantages); None:
            on-policy, the ratio is 1 (its gradient still flows).
        ref_log_probs: the reference model's, needed when `kl_coef` is not 0.
        token_weight: per-token weights w (broadcast); None: 1.
        epsilon, epsilon_high: the ratio is clipped to [1 - epsilon, 1 + epsilon_high] (epsilon_high defaults to
            epsilon; DAPO raises it).
        kl_coef, entropy_coef: weights of the k3 KL estimate to the reference and of the entropy bonus.
        temperature, softcap: of the policy's distribution, as `log_probs`.
        reduction: 'mean' (sum of w loss_n over sum of w) or 'sum'.
        return_token_stats: also return the per-token log-probabilities and entropies (detached, float32, the
            target's shape, 0 on ignored tokens), e.g. to keep as the next iteration's `old_log_probs`.

    Returns:
        the loss, a float32 (float64) 0-d tensor differentiable wrt the logits; or (loss, log_probs, entropy).
        The advantages, old and reference log-probabilities and weights are constants: no gradient reaches them.
    """
    temperature, ignore_index, softcap = checked_log_probs_call(
        "policy_loss", logits, target, temperature=temperature, ignore_index=ignore_index, softcap=softcap
    )
    call = sem.check_policy_call(
        "policy_loss", logits, target, advantages, old_log_probs, ref_log_probs, token_weight, epsilon=epsilon,
        epsilon_high=epsilon_high, kl_coef=kl_coef, entropy_coef=entropy_coef, reduction=reduction,
    )  # fmt: skip
    want_entropy = call.entropy_coef != 0.0 or return_token_stats
    outputs = log_probs(
        logits, target, temperature=temperature, ignore_index=ignore_index, return_entropy=want_entropy,
        softcap=softcap,
    )  # fmt: skip
    logp, entropy = outputs if want_entropy else (outputs, None)
    flat_entropy = None if entropy is None else entropy.reshape(-1)
    terms = token_terms(logp.reshape(-1), flat_entropy, call)
    valid = target.reshape(-1) != ignore_index
    loss = (token_factors(valid, call) * torch.where(valid, terms.loss, 0.0)).sum()
    if not return_token_stats:
        return loss
    return loss, logp.detach(), entropy.detach()


# --------------------------------------------------------------------------------------------------------------
# linear_policy_loss: logits = x W^T + b one chunk at a time, the gradients made in the forward
# --------------------------------------------------------------------------------------------------------------


@torch.library.custom_op("xentlib::linear_policy_loss", mutates_args=())
def linear_policy_loss_op(
    input: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    advantages: Tensor,
    old_log_probs: Tensor | None,
    ref_log_probs: Tensor | None,
    token_weight: Tensor | None,
    temperature: float,
    ignore_index: int,
    softcap: float | None,
    epsilon_low: float,
    epsilon_high: float,
    kl_coef: float,
    entropy_coef: float,
    reduction: str,
    with_entropy: bool,
    chunk_size: int,
    grad_input: bool,
    grad_weight: bool,
    grad_bias: bool,
    grads_private: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, log p_t, entropy, dX, dW, db) of a flat (N, D) input with (N,) per-token tensors; the gradients
    (for an upstream gradient of 1) only where flagged, the entropy only `with_entropy`, else empty.
    `grads_private`: the caller never reads the gradient outputs (linear_policy_loss), so the backward may scale
    them in place instead of copying a weight-sized tensor."""
    count, vocab = input.shape[0], weight.shape[0]
    call = sem.PolicyCall(advantages, old_log_probs, ref_log_probs, token_weight, epsilon_low, epsilon_high, kl_coef,
                          entropy_coef, reduction)  # fmt: skip
    safe, valid = _targets(target, ignore_index, vocab)
    factors = token_factors(valid, call)
    with_entropy = with_entropy or entropy_coef != 0.0
    any_grad = grad_input or grad_weight or grad_bias
    rows = _Rows(vocab, input.dtype, input.device, temperature, softcap, with_entropy and any_grad)
    loss = torch.zeros((), dtype=rows.acc, device=input.device)
    logp = torch.zeros(count, dtype=rows.acc, device=input.device)
    entropy = torch.zeros_like(logp) if with_entropy else logp.new_empty((0,))
    chunks = _LinearChunks(input, weight, bias, valid, chunk_size)
    dx = torch.zeros_like(input) if grad_input else None
    # the first chunk overwrites dW (accumulate_mm_(first=True)); with no rows it stays zero
    dw = (torch.empty_like if chunks.total else torch.zeros_like)(weight) if grad_weight else None
    db = torch.zeros(vocab, dtype=rows.acc, device=input.device) if grad_bias else None
    for number, (index, x_c, z) in enumerate(chunks):
        for block in rows.blocks(z.shape[0]):
            at = _sub(index, block)
            logp[at], block_entropy, block_loss = _block_(
                rows, call, z[block], safe[at], valid[at], factors[at], at, with_entropy, any_grad
            )
            loss += block_loss
            if with_entropy:
                entropy[at] = block_entropy
        if any_grad:
            accumulate_chunk_grads_(z, weight, x_c, index, dx, dw, db, first=number == 0, onednn=chunks.onednn)
    empty = lambda: input.new_empty((0,))  # noqa: E731  (outputs of an op may not alias each other)
    return (
        loss, logp, entropy,
        dx if grad_input else empty(),
        dw if grad_weight else empty(),
        db.to(bias.dtype) if grad_bias else empty(),
    )  # fmt: skip


# Where the compiled kernel covers the rows, the fused op runs one sweep per row that makes the forward and the
# gradient (`_kernel_sweep_`); False: a forward call, then a backward call, as linear_log_probs makes them (both
# paths are tested against each other and the reference).
ONE_SWEEP = True


def _block_(rows: _Rows, call, z: Tensor, target, valid, factor, at, with_entropy: bool, with_grad: bool):
    """(log p_t, entropy or None, the block's share of the loss) of a block of logits z (R, V) whose tokens are
    `at` of the call; with `with_grad`, z becomes dL/dZ = c dl/dZ + e dH/dZ, with c = w/D dloss_n/dl and
    e = w/D dloss_n/dH (`factor` = w/D). Where the kernel runs, one sweep per row makes both."""
    if rows.kernel and with_grad and ONE_SWEEP:  # one sweep per row in C: the forward, g and h, and dL/dZ over z
        log_prob, entropy = _kernel_sweep_(rows, call, z, target, valid, factor, at, with_entropy)
        terms = token_terms(log_prob, entropy, call, at)  # the loss (its derivatives were the kernel's)
        return log_prob, entropy, (factor * torch.where(valid, terms.loss, 0.0)).sum()
    log_prob, lse, entropy = rows.forward(z, target, valid, with_entropy)  # z is kept
    terms = token_terms(log_prob, entropy, call, at)
    loss = (factor * torch.where(valid, terms.loss, 0.0)).sum()
    if with_grad:
        g = torch.where(valid, factor * terms.d_log_prob, 0.0)  # not 0 * inf on an ignored token
        h = None if terms.d_entropy is None else torch.where(valid, factor * terms.d_entropy, 0.0)
        rows.backward_(z, target, valid, lse, entropy, g, h, z)
    return log_prob, entropy, loss


def _kernel_sweep_(rows: _Rows, call, z: Tensor, target, valid, factor, at, with_entropy: bool):
    """(log p_t, entropy or None) of a block, whose logits z become dL/dZ, in one C sweep per row: the kernel
    forms g and h from each row's log p_t as `token_terms` does (`cpu_kernel.PolicySweep`)."""

    def per_token(tensor):
        return None if tensor is None else tensor[at].contiguous()

    new = lambda: torch.empty(z.shape[0], dtype=torch.float32, device="cpu")  # noqa: E731  (not a default device)
    log_prob, lse = new(), new()
    entropy = new() if with_entropy else None
    sweep = cpu_kernel.PolicySweep(
        per_token(call.advantages), per_token(call.old_log_probs), per_token(call.ref_log_probs),
        factor.contiguous(), call.epsilon_low, call.epsilon_high, call.kl_coef, call.entropy_coef,
    )  # fmt: skip
    cpu_kernel.log_probs_rows(z, target.contiguous(), valid.contiguous(), rows.temperature, (log_prob, lse, entropy),
                              grad=z, policy=sweep)  # fmt: skip
    return log_prob, entropy


@linear_policy_loss_op.register_fake
def _(input, weight, bias, target, advantages, old_log_probs, ref_log_probs, token_weight, temperature,
      ignore_index, softcap, epsilon_low, epsilon_high, kl_coef, entropy_coef, reduction, with_entropy, chunk_size,
      grad_input, grad_weight, grad_bias, grads_private=False):  # fmt: skip
    acc = sem.accumulation_dtype(input.dtype)
    count = input.shape[0]
    entropy_rows = count if with_entropy or entropy_coef != 0.0 else 0
    return (
        input.new_empty((), dtype=acc),
        input.new_empty((count,), dtype=acc),
        input.new_empty((entropy_rows,), dtype=acc),
        torch.empty_like(input) if grad_input else input.new_empty((0,)),
        torch.empty_like(weight) if grad_weight else input.new_empty((0,)),
        torch.empty_like(bias) if grad_bias else input.new_empty((0,)),
    )


def _policy_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:8])  # input, weight, bias, target and the per-token tensors: no copies
    ctx.scalars, ctx.made = inputs[8:18], inputs[18:21]  # temperature ... chunk_size; which gradients were made
    ctx.private = inputs[21]  # grads_private
    loss, logp, entropy, dx, dw, db = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(logp, entropy, dx, dw, db)
    ctx.grads = (dx, dw, db)


def _policy_backward(ctx, grad_loss, *_stats_and_grads):
    needs = ctx.needs_input_grad[:3]
    if grad_loss is None or not any(needs):
        return (None,) * 22
    saved, ctx.grads = ctx.grads, None  # handed to autograd once
    private = ctx.private
    if saved is None or any(need and not made for need, made in zip(needs, ctx.made)):
        # a second backward, or gradients the forward did not make (it ran without grad mode): run it again
        *scalars, _, chunk_size = ctx.scalars
        _, _, _, *saved = torch.ops.xentlib.linear_policy_loss(*ctx.saved_tensors, *scalars, False, chunk_size, *needs)
        private = True
    # in place where nobody else holds them (scale_by_grad_output_ skips a scale of 1); else a scaled copy
    grads = [scale_by_grad_output_("sum", g if private else g.clone(), grad_loss) if need else None
             for g, need in zip(saved, needs)]  # fmt: skip
    return (*grads, *(None,) * 19)


linear_policy_loss_op.register_autograd(_policy_backward, setup_context=_policy_setup_context)


# The keyword options repeat `policy_loss`'s: each public function spells out its signature in full (as torch's
# do), so that help() and type checkers see every parameter.
def linear_policy_loss(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    advantages: Tensor,
    bias: Tensor | None = None,
    *,
    old_log_probs: Tensor | None = None,
    ref_log_probs: Tensor | None = None,
    token_weight: Tensor | None = None,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    kl_coef: float = 0.0,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
    return_token_stats: bool = False,
    chunk_size: int | None = None,
):
    r"""`policy_loss(input @ weight.T + bias, ...)` without the (N, V) logits, in three matmuls.

    Args:
        input: (..., D) hidden states (row i predicts target i); weight: (V, D) LM head; bias: optional (V,).
        chunk_size: rows of logits per chunk (default: a fifth of the rows rounded down to a
            multiple of 128, at least 128, at most 1 GiB).
        the rest: as `policy_loss`.

    Returns:
        the loss (float32; float64 for float64 input), differentiable wrt input, weight and bias; or
        (loss, log_probs, entropy) with `return_token_stats`.

    Cost: the forward computes each chunk's logits, its rows' log-probabilities, the per-token loss and, when a
    gradient is wanted, dL/dZ in place of the logits with dX and dW beside it: three (N, D, V) matmuls and one
    chunk of logits; the gradients wait in memory for the backward, which only scales them.

    Example::

        >>> x, w = torch.randn(6, 4, requires_grad=True), torch.randn(10, 4)
        >>> t, a = torch.tensor([1, 2, 3, -100, 9, 0]), torch.randn(6)
        >>> loss = linear_policy_loss(x, w, t, a)
        >>> ref = policy_loss(x @ w.T, t, a)
        >>> torch.allclose(loss, ref, atol=1e-6)
        True
    """
    temperature, ignore_index, softcap = checked_log_probs_call(
        "linear_policy_loss", input, target, weight, bias,
        temperature=temperature, ignore_index=ignore_index, softcap=softcap,
    )  # fmt: skip
    call = sem.check_policy_call(
        "linear_policy_loss", input, target, advantages, old_log_probs, ref_log_probs, token_weight,
        epsilon=epsilon, epsilon_high=epsilon_high, kl_coef=kl_coef, entropy_coef=entropy_coef, reduction=reduction,
    )  # fmt: skip
    chunk_size = sem.check_chunk_size(chunk_size, "linear_policy_loss")
    input, weight, bias = _autocast_operands(input, weight, bias)
    wanted = [torch.is_grad_enabled() and t is not None and t.requires_grad for t in (input, weight, bias)]
    with torch.autocast(input.device.type, enabled=False):
        loss, logp, entropy, _, _, _ = torch.ops.xentlib.linear_policy_loss(
            input.reshape(-1, input.shape[-1]), weight, bias, target.reshape(-1), call.advantages,
            call.old_log_probs, call.ref_log_probs, call.token_weight, temperature, ignore_index, softcap,
            call.epsilon_low, call.epsilon_high, call.kl_coef, call.entropy_coef, call.reduction,
            bool(return_token_stats), chunk_size, *wanted, True,
        )  # fmt: skip
    if not return_token_stats:
        return loss
    return loss, logp.reshape(target.shape), entropy.reshape(target.shape)
