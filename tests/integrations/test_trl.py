"""xentlib's per-token log-probabilities in TRL: the same numbers as TRL's own functions on a tiny causal LM
(random weights, no Hub), and GRPO-style training steps that end in the same parameters.

Truths: `trl.trainer.utils.selective_log_softmax` / `entropy_from_logits` on the model's logits, and TRL's own
`add_fused_lm_head` (the head its GRPOTrainer installs) on an identical copy of the model.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.hf
transformers = pytest.importorskip("transformers")
trl_utils = pytest.importorskip("trl.trainer.utils")

import xentlib  # noqa: E402
from xentlib.integrations import trl as xtrl  # noqa: E402


def _tiny_llama(seed=0, **config):
    torch.manual_seed(seed)
    sizes = dict(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes, **config)).float()


def _batch(seed=1, batch=3, length=10, prompt=4):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (batch, length), generator=gen)
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[0, -2:] = 0  # right padding of a shorter completion
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :prompt] = -100  # only the completion is scored, as GRPOTrainer does
    return ids, attention, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_per_token_log_probs_equal_trls_selective_log_softmax(temperature):
    model = _tiny_llama()
    ids, attention, _ = _batch()
    out = model(input_ids=ids, attention_mask=attention, output_hidden_states=True)
    hidden = out.hidden_states[-1][:, :-1]
    logits = out.logits[:, :-1] / temperature
    theirs = trl_utils.selective_log_softmax(logits, ids[:, 1:])
    their_entropy = trl_utils.entropy_from_logits(logits)
    ours, entropy = xentlib.linear_log_probs(
        hidden, model.lm_head.weight, ids[:, 1:], temperature=temperature, return_entropy=True
    )
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, their_entropy, rtol=1e-5, atol=1e-5)


def _fused_pair(temperature=0.8):
    theirs = _tiny_llama()
    ours = copy.deepcopy(theirs)
    outputs = ("log_probs", "entropy")
    trl_utils.add_fused_lm_head(theirs, temperature=temperature, outputs=outputs)
    xtrl.add_fused_lm_head(ours, temperature=temperature, outputs=outputs)
    return ours, theirs


def test_fused_head_protocol_equals_trls():
    ours, theirs = _fused_pair()
    ids, attention, labels = _batch()
    a = ours(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    b = theirs(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    for field in ("loss", "log_probs", "entropy"):
        torch.testing.assert_close(getattr(a, field), getattr(b, field), rtol=1e-5, atol=1e-5)
    assert torch.equal(a.label_mask, b.label_mask)
    plain = ours(input_ids=ids, attention_mask=attention)  # without fused_lm_head: the model's own forward
    assert plain.logits.shape == (*ids.shape, 97)


def _grpo_loss(model, ids, attention, labels, advantages, old_logps, beta=0.01, eps=0.2):
    """GRPO's clipped per-token objective (TRL's loss_type='grpo' shape) with an entropy bonus."""
    out = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    mask = out.label_mask.float()
    ratio = torch.exp(out.log_probs - old_logps)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv) - beta * out.entropy
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def test_grpo_steps_match_trls_head_and_lower_the_loss():
    ours, theirs = _fused_pair()
    ids, attention, labels = _batch()
    advantages = torch.tensor([1.0, -0.5, 0.8])
    losses = []
    for model in (ours, theirs):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        with torch.no_grad():
            old = model(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True).log_probs
        steps = []
        for _ in range(3):
            loss = _grpo_loss(model, ids, attention, labels, advantages, old)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps.append(loss.item())
        losses.append(steps)
    assert losses[0][-1] < losses[0][0]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_patch_trl_trainers_swaps_the_head_grpo_trainer_installs():
    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    original = grpo.add_fused_lm_head
    try:
        assert "trl.trainer.grpo_trainer" in xtrl.patch_trl_trainers()
        assert grpo.add_fused_lm_head is xtrl.add_fused_lm_head
    finally:
        xtrl.unpatch_trl_trainers()
    assert grpo.add_fused_lm_head is original


def test_unsupported_outputs_raise():
    with pytest.raises(NotImplementedError, match="is_top1"):
        xtrl.add_fused_lm_head(_tiny_llama(), outputs=("log_probs", "is_top1"))


# ------------------------------------------------------------------ GRPO's loss by xentlib.linear_policy_loss


def _grpo_inputs(model, seed=3, batch=3, prompt=4, completion=6, beta=0.0):
    gen = torch.Generator().manual_seed(seed)
    completion_mask = torch.ones(batch, completion, dtype=torch.long)
    completion_mask[0, -2:] = 0  # a shorter completion, padded on the right
    completion_mask[2, 1:] = 0
    inputs = {
        "prompt_ids": torch.randint(0, 97, (batch, prompt), generator=gen),
        "prompt_mask": torch.ones(batch, prompt, dtype=torch.long),
        "completion_ids": torch.randint(0, 97, (batch, completion), generator=gen),
        "completion_mask": completion_mask,
        "advantages": torch.randn(batch, generator=gen),
        "num_items_in_batch": completion_mask.sum().float() * 2,
    }
    with torch.no_grad():
        logps = _trl_per_token_logps(model, inputs, 0.7)
    inputs["old_per_token_logps"] = logps + 0.3 * torch.randn(logps.shape, generator=gen)
    inputs["ref_per_token_logps"] = logps + 0.2 * torch.randn(logps.shape, generator=gen)
    return inputs


def _trl_per_token_logps(model, inputs, temperature):
    """As GRPOTrainer._get_per_token_logps_and_entropies: the completion's logits / T, selective_log_softmax."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    attention = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    keep = inputs["completion_ids"].shape[1]
    logits = model(input_ids=ids, attention_mask=attention).logits[:, -keep - 1 : -1] / temperature
    return trl_utils.selective_log_softmax(logits, inputs["completion_ids"])


def _trl_grpo_loss(model, inputs, loss_type, beta, eps_low, eps_high, temperature, max_len, accumulation, dapo_scale):
    """GRPOTrainer._compute_loss's arithmetic (trl 1.16) for token-level importance sampling, written out."""
    logps = _trl_per_token_logps(model, inputs, temperature)
    mask = inputs["completion_mask"].float()
    advantages = inputs["advantages"].unsqueeze(1)
    coef_1 = torch.exp(logps - inputs["old_per_token_logps"])
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta:
        delta = inputs["ref_per_token_logps"] - logps
        per_token = per_token + beta * (torch.exp(delta) - delta - 1)
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    if loss_type == "bnpo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (per_token.size(0) * max_len) / accumulation
    return (per_token * mask).sum() / (inputs["num_items_in_batch"].clamp(min=1.0) * dapo_scale)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_linear_loss_equals_trls_loss_and_gradients(loss_type, beta):
    model = _tiny_llama()
    inputs = _grpo_inputs(model)
    options = dict(loss_type=loss_type, beta=beta, epsilon_low=0.2, epsilon_high=0.28, temperature=0.7,
                   max_completion_length=6, accumulation=2, dapo_scale=0.5)  # fmt: skip
    ours = xtrl.grpo_linear_loss(model, inputs, **options)
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    theirs = _trl_grpo_loss(model, inputs, loss_type, beta, 0.2, 0.28, 0.7, 6, 2, 0.5)
    their_grads = torch.autograd.grad(theirs, list(model.parameters()))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def _fake_grpo_trainer(**changes):
    import types

    args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=4)
    trainer = types.SimpleNamespace(
        args=args, loss_type="dapo", importance_sampling_level="token", _entropy_bonus_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, use_vllm=False, beta=0.04, epsilon_low=0.2,
        epsilon_high=0.28, temperature=0.9, max_completion_length=64, current_gradient_accumulation_steps=2,
        model=torch.nn.Linear(1, 1), accelerator=types.SimpleNamespace(num_processes=2),
    )  # fmt: skip
    for name, value in changes.items():
        setattr(args if name in vars(args) else trainer, name, value)
    return trainer


def test_grpo_options_read_the_trainer_and_refuse_what_the_fused_loss_does_not_compute():
    options = xtrl.grpo_options(_fake_grpo_trainer())
    assert options == dict(loss_type="dapo", beta=0.04, epsilon_low=0.2, epsilon_high=0.28, temperature=0.9,
                           max_completion_length=64, accumulation=2, dapo_scale=0.25)  # fmt: skip
    for change in (dict(importance_sampling_level="sequence"), dict(loss_type="cispo"), dict(delta=4.0),
                   dict(_entropy_bonus_enabled=True), dict(top_entropy_quantile=0.2),
                   dict(use_bias_correction_kl=True), dict(aux_loss_enabled=True)):  # fmt: skip
        with pytest.raises(NotImplementedError, match=next(iter(change)).strip("_").split("_")[0]):
            xtrl.grpo_options(_fake_grpo_trainer(**change))
    inputs = _grpo_inputs(_tiny_llama(), completion=3)
    with pytest.raises(NotImplementedError, match="pixel_values"):
        xtrl.grpo_linear_loss(_tiny_llama(), dict(inputs, pixel_values=torch.zeros(1, 3)))


def _grpo_trainer_without_init(model, loss_type):
    """A GRPOTrainer with only what `_compute_loss` reads (built without Trainer.__init__, as the GKD tests do):
    its configuration, a single-process accelerator, no vLLM, no entropy terms, no auxiliary loss."""
    import contextlib
    import types
    from collections import defaultdict

    grpo = pytest.importorskip("trl.trainer.grpo_trainer")
    accelerator = types.SimpleNamespace(
        num_processes=1, is_main_process=True, autocast=contextlib.nullcontext, gather=lambda t: t,
        gather_for_metrics=lambda t: t, reduce=lambda t, reduction="sum": t,
    )  # fmt: skip
    trainer = object.__new__(grpo.GRPOTrainer)
    trainer.__dict__.update(
        _fake_grpo_trainer(loss_type=loss_type, temperature=0.7, max_completion_length=6).__dict__,
        model=model, accelerator=accelerator, aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )  # fmt: skip
    return trainer


@pytest.mark.parametrize("tool_mask", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_linear_loss_equals_grpo_trainers_own_compute_loss(loss_type, tool_mask):
    """The documented override against TRL's own `GRPOTrainer._compute_loss` (which reads the per-token
    log-probabilities from TRL's fused LM head) on the same model and inputs: loss and every gradient; with a
    `tool_mask` (tool-output tokens, which TRL leaves out of the loss) or without."""
    model = _tiny_llama()
    inputs = _grpo_inputs(model)
    if tool_mask:
        inputs["tool_mask"] = torch.ones_like(inputs["completion_mask"])
        inputs["tool_mask"][1, 2:4] = 0
    trl_utils.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    trainer = _grpo_trainer_without_init(model, loss_type)
    theirs = type(trainer)._compute_loss(trainer, model, inputs)
    their_grads = torch.autograd.grad(theirs, list(model.parameters()))
    ours = xtrl.grpo_linear_loss(model, inputs, **xtrl.grpo_options(trainer))
    our_grads = torch.autograd.grad(ours, list(model.parameters()))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), our_grads, their_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)
