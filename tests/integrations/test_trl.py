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
