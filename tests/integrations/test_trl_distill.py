"""xentlib's distillation divergences against TRL's GKD loss (`GKDTrainer.generalized_jsd_loss`), the spec of
the definition, and a distillation step of tiny random Llama models built offline."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
gkd = pytest.importorskip("trl.experimental.gkd")

import xentlib  # noqa: E402
from xentlib.integrations import trl as xtrl  # noqa: E402

pytestmark = pytest.mark.hf

trl_loss = gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 0.3, 3.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
@pytest.mark.parametrize("with_labels", [True, False])
def test_equals_trl_generalized_jsd_loss(beta, temperature, reduction, with_labels):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 50, generator=gen, dtype=torch.float64) * 3
    teacher = torch.randn(3, 5, 50, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 50, (3, 5), generator=gen) if with_labels else None
    if labels is not None:
        labels[0, :2] = -100
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    theirs = trl_loss(s1, teacher, labels, beta=beta, temperature=temperature, reduction=reduction)
    ours = xentlib.distillation_loss(s2, teacher, labels, beta=beta, temperature=temperature, reduction=reduction)
    torch.testing.assert_close(ours, theirs)
    theirs.backward()
    ours.backward()
    torch.testing.assert_close(s2.grad, s1.grad)


def test_all_labels_masked_is_zero_like_trl():
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    labels = torch.full((2, 3), -100)
    torch.testing.assert_close(
        xentlib.distillation_loss(student, teacher, labels, beta=0.5), trl_loss(student, teacher, labels, beta=0.5)
    )


def tiny_llama(hidden: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_steps_match_trl(beta):
    teacher = tiny_llama(32, seed=1)
    student_trl = tiny_llama(16, seed=2)
    student_ours = copy.deepcopy(student_trl)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    # SGD: Adam would turn float32 rounding noise in near-zero gradients into steps of size lr
    opt_trl = torch.optim.SGD(student_trl.parameters(), lr=0.5)
    opt_ours = torch.optim.SGD(student_ours.parameters(), lr=0.5)
    for _ in range(3):
        with torch.no_grad():
            teacher_hidden = teacher.model(input_ids=ids).last_hidden_state
            teacher_logits = teacher.lm_head(teacher_hidden)
        # TRL: shifted logits of both models, labels shifted (GKDTrainer.compute_loss)
        logits = student_trl(input_ids=ids).logits
        loss_trl = trl_loss(logits[:, :-1], teacher_logits[:, :-1], labels[:, 1:], beta=beta)
        # xentlib: hidden states and LM heads, no logits
        hidden = student_ours.model(input_ids=ids).last_hidden_state
        loss_ours = xentlib.linear_distillation_loss(
            hidden[:, :-1], student_ours.lm_head.weight, teacher_hidden[:, :-1], teacher.lm_head.weight,
            labels[:, 1:], beta=beta,
        )  # fmt: skip
        torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-6)
        for opt, loss in ((opt_trl, loss_trl), (opt_ours, loss_ours)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert teacher.lm_head.weight.grad is None  # the teacher's head requires grad, yet receives none
    moved = [(a - b).abs().max() for a, b in zip(student_ours.parameters(), tiny_llama(16, seed=2).parameters())]
    assert max(moved) > 1e-3  # the steps did move the student
    for a, b in zip(student_ours.parameters(), student_trl.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# The recipe of docs/transformers.md: a GKDTrainer whose compute_loss is xentlib's, against TRL's own compute_loss.


class XentlibGKDTrainer(gkd.GKDTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = xtrl.gkd_linear_loss(model, self.teacher_model, inputs, self.beta, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def bare_trainer(trainer_class, teacher, beta):
    """A trainer object without Trainer.__init__ (no tokenizer, dataset or accelerator): compute_loss reads only
    the teacher and beta."""
    trainer = trainer_class.__new__(trainer_class)
    trainer.teacher_model, trainer.beta = teacher, beta
    return trainer


def gkd_batch():
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 97, (3, 10), generator=gen)
    attention = torch.ones_like(ids)
    attention[1, -3:] = 0  # right padding
    labels = ids.masked_fill(attention == 0, -100)
    labels[:, :4] = -100  # the prompt
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_items_in_batch", [None, 11])
def test_gkd_trainer_recipe_steps_equal_trls_compute_loss(beta, num_items_in_batch):
    teacher = tiny_llama(32, seed=1)
    student_trl = tiny_llama(16, seed=2).train()
    student_ours = copy.deepcopy(student_trl)
    theirs, ours = bare_trainer(gkd.GKDTrainer, teacher, beta), bare_trainer(XentlibGKDTrainer, teacher, beta)
    inputs = gkd_batch()
    items = None if num_items_in_batch is None else torch.tensor(num_items_in_batch)
    opt_trl = torch.optim.SGD(student_trl.parameters(), lr=0.5)
    opt_ours = torch.optim.SGD(student_ours.parameters(), lr=0.5)
    for _ in range(3):
        loss_trl = theirs.compute_loss(student_trl, inputs, num_items_in_batch=items)
        loss_ours = ours.compute_loss(student_ours, inputs, num_items_in_batch=items)
        torch.testing.assert_close(loss_ours, loss_trl, rtol=1e-5, atol=1e-6)
        for opt, loss in ((opt_trl, loss_trl), (opt_ours, loss_ours)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert all(parameter.grad is None for parameter in teacher.parameters())
    moved = [(a - b).abs().max() for a, b in zip(student_ours.parameters(), tiny_llama(16, seed=2).parameters())]
    assert max(moved) > 1e-3
    for a, b in zip(student_ours.parameters(), student_trl.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    loss, outputs = ours.compute_loss(student_ours, inputs, return_outputs=True)
    assert loss.ndim == 0 and outputs.last_hidden_state.shape == (3, 10, 16)
