"""xentlib's per-token log-probabilities inside TRL's RL trainers (GRPO, RLOO).

TRL computes the policy's per-token log-probabilities (and entropies) through a "fused LM head": its trainers
call `add_fused_lm_head(model, temperature=..., outputs=(...))` once, which replaces the model's forward so
that `model(..., labels=labels, fused_lm_head=True)` returns a `FusedCausalLMOutput` (log_probs, entropy, loss,
label_mask, ...) instead of logits. This module provides the same protocol computed by
`xentlib.linear_log_probs` (the (tokens, vocab) logits are never held; exact float32 results):

    from xentlib.integrations import trl as xtrl
    xtrl.patch_trl_trainers()            # GRPOTrainer / RLOOTrainer built from now on use xentlib
    trainer = GRPOTrainer(model=..., ...)

or, for a model used by hand, `xtrl.add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))`.
The head maths a config declares (`final_logit_softcapping`, `logit_scale`, ...) are read as
`xentlib.integrations.transformers` reads them. The fields `log_sum_sq_probs`, `mean_logits` and `is_top1` are
not computed (asking for them raises). trl is imported only when a function here is called.

GRPO in three matmuls instead of four: `grpo_linear_loss` is the loss of `GRPOTrainer._compute_loss` (token-level
importance sampling, the clipped surrogate, the k3 KL to the reference; loss types 'grpo', 'bnpo', 'dr_grpo',
'dapo') computed by `xentlib.linear_policy_loss`, which makes the gradients in the forward (docs/transformers.md):

    class XentlibGRPOTrainer(GRPOTrainer):
        def _compute_loss(self, model, inputs):
            return xtrl.grpo_linear_loss(model, inputs, **xtrl.grpo_options(self))

Distillation (GKD): TRL's `GKDTrainer` has no hook for a fused loss; `gkd_linear_loss` is the loss of its
`compute_loss` computed by `xentlib.linear_distillation_loss` from both models' last hidden states and output
embeddings, never the (tokens, vocab) logits of either. Override `compute_loss` with it (docs/transformers.md):

    class XentlibGKDTrainer(GKDTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, outputs = xtrl.gkd_linear_loss(model, self.teacher_model, inputs, self.beta, num_items_in_batch)
            return (loss, outputs) if return_outputs else loss
"""

from __future__ import annotations

import functools
import importlib
import types

import torch

__all__ = ["add_fused_lm_head", "gkd_linear_loss", "grpo_linear_loss", "patch_trl_trainers", "unpatch_trl_trainers"]

SUPPORTED_OUTPUTS = ("log_probs", "entropy")
TRAINER_MODULES = ("trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer")
_ORIGINALS: dict[str, object] = {}


def add_fused_lm_head(
    model: torch.nn.Module,
    temperature: float = 1.0,
    cast_lm_head_to_fp32: bool = False,
    outputs: tuple[str, ...] = ("log_probs",),
    *,
    chunk_size: int | None = None,
) -> None:
    """TRL's `add_fused_lm_head` (same arguments, same `fused_lm_head=True` protocol and output), computed by
    `xentlib.linear_log_probs`: per-token log p(label) and entropy under softmax(softcap(scale * logits) / T),
    zero where the label is -100, for next-token labels (`labels[:, 1:]`) or pre-shifted `shift_labels`."""
    from xentlib.integrations._hf_head import base_model, head_maths_candidates, output_head, text_config, verify

    unknown = [name for name in outputs if name not in SUPPORTED_OUTPUTS]
    if unknown:
        raise NotImplementedError(f"xentlib's fused LM head computes {SUPPORTED_OUTPUTS}, not {unknown}")
    head = output_head(model)  # a plain nn.Linear head, checked once here (and looked up on each call)
    # the head maths (logit scale, soft-capping) the model's own forward confirms on a probe batch
    maths = verify(model, head, head_maths_candidates(text_config(model)), {"chunk_size": chunk_size}).head_maths
    original_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kw):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **kw, **{k: v for k, v in extra.items() if v is not None})
        kw["use_cache"] = False
        hidden = base_model(self)(*args, **kw).last_hidden_state
        if shift_labels is None:  # position t predicts label t + 1
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels
        head = output_head(self)
        hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
        return _fused_output(hidden, head, labels, maths, temperature, cast_lm_head_to_fp32, outputs, chunk_size,
                             num_items_in_batch)  # fmt: skip

    model.forward = types.MethodType(forward, model)


def _fused_output(hidden, head, labels, maths, temperature, cast_fp32, outputs, chunk_size, num_items_in_batch):
    """TRL's `FusedCausalLMOutput` from the shifted hidden states and labels."""
    from trl.trainer.utils import FusedCausalLMOutput

    import xentlib

    weight, bias = head.weight, head.bias
    if cast_fp32:
        hidden, weight, bias = hidden.float(), weight.float(), None if bias is None else bias.float()
    hidden, bias = _with_logit_scale(hidden, bias, maths.logit_scale)
    with torch.autocast(hidden.device.type, enabled=not cast_fp32 and torch.is_autocast_enabled(hidden.device.type)):
        log_probs, entropy = xentlib.linear_log_probs(
            hidden, weight, labels, bias, temperature=temperature, ignore_index=-100, return_entropy=True,
            softcap=maths.softcap, chunk_size=chunk_size,
        )  # fmt: skip
    mask = labels != -100
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    return FusedCausalLMOutput(
        loss=-log_probs.sum() / count,
        log_probs=log_probs,
        entropy=entropy if "entropy" in outputs else None,
        label_mask=mask,
    )


def _with_logit_scale(hidden, bias, scale: float):
    """The head's operands with a logit scale folded in: scale (h W^T + b) = (scale h) W^T + scale b."""
    if scale == 1.0:
        return hidden, bias
    return hidden * scale, None if bias is None else bias * scale


def patch_trl_trainers() -> list[str]:
    """Make TRL's GRPO and RLOO trainers built from now on compute their per-token log-probabilities with
    xentlib: each trainer module's `add_fused_lm_head`, which the trainer calls on its policy (and reference
    model) in `__init__`, is replaced by this module's. Returns the patched module names; idempotent."""
    patched = []
    for name in TRAINER_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "add_fused_lm_head"):
            _ORIGINALS.setdefault(name, module.add_fused_lm_head)
            module.add_fused_lm_head = add_fused_lm_head
            patched.append(name)
    return patched


def unpatch_trl_trainers() -> None:
    """Undo `patch_trl_trainers` (trainers built afterwards use TRL's own head again)."""
    for name, original in list(_ORIGINALS.items()):
        importlib.import_module(name).add_fused_lm_head = original
        del _ORIGINALS[name]


def gkd_linear_loss(model, teacher_model, inputs, beta: float, num_items_in_batch=None):
    """(loss, student decoder outputs) of `GKDTrainer.compute_loss`, with the logits never formed.

    TRL's step: both models on `input_ids` / `attention_mask` (the teacher in eval mode, without gradients), the
    causal shift (position i predicts token i + 1), then `generalized_jsd_loss(student_logits, teacher_logits,
    labels, beta=beta)` at temperature 1, 'batchmean' over the tokens whose label is not -100, or the sum divided
    by `num_items_in_batch` when the trainer passes it. Here the decoders (`get_decoder()`) give the last hidden
    states, and `xentlib.linear_distillation_loss` takes them with the output embeddings (`lm_head`) of both
    models. Models whose head is more than a linear layer (a final logit soft-cap, a logit scale) are not covered.
    """
    from xentlib.distill import linear_distillation_loss

    batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    outputs = model.get_decoder()(**batch)
    teacher_model.eval()
    with torch.no_grad():
        teacher_hidden = teacher_model.get_decoder()(**batch).last_hidden_state
    reduction = "batchmean" if num_items_in_batch is None else "sum"
    head, teacher_head = model.get_output_embeddings(), teacher_model.get_output_embeddings()
    loss = linear_distillation_loss(
        outputs.last_hidden_state[:, :-1], head.weight, teacher_hidden[:, :-1], teacher_head.weight,
        inputs["labels"][:, 1:], student_bias=getattr(head, "bias", None),
        teacher_bias=getattr(teacher_head, "bias", None), beta=beta, reduction=reduction,
    )  # fmt: skip
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return loss, outputs


GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
_MULTIMODAL_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "token_type_ids",
                      "mm_token_type_ids")  # fmt: skip


def grpo_options(trainer) -> dict:
    """The `grpo_linear_loss` options of a `GRPOTrainer` (its configuration and this step's accumulation); raises
    NotImplementedError for what the fused loss does not compute: sequence-level importance sampling, the loss
    types other than GRPO_LOSS_TYPES, two-sided clipping (`delta`), the entropy bonus or mask, the off-policy
    mask, vLLM's importance-sampling correction and the bias-corrected KL."""
    args = trainer.args
    unsupported = {
        "importance_sampling_level": getattr(trainer, "importance_sampling_level", "token") != "token",
        "loss_type": trainer.loss_type not in GRPO_LOSS_TYPES,
        "delta": getattr(args, "delta", None) is not None,
        "entropy bonus": getattr(trainer, "_entropy_bonus_enabled", False),
        "top_entropy_quantile": getattr(trainer, "top_entropy_quantile", 1.0) < 1.0,
        "off_policy_mask_threshold": getattr(trainer, "off_policy_mask_threshold", None) is not None,
        "vllm_importance_sampling_correction": getattr(trainer, "use_vllm", False)
        and getattr(trainer, "vllm_importance_sampling_correction", False),
        "use_bias_correction_kl": getattr(args, "use_bias_correction_kl", False),
        "the auxiliary (router) loss": getattr(trainer, "aux_loss_enabled", False),
    }
    named = [name for name, on in unsupported.items() if on]
    if named:
        raise NotImplementedError(f"grpo_linear_loss does not compute {', '.join(named)}; use GRPOTrainer's own loss")
    training = trainer.model.training
    options = dict(
        loss_type=trainer.loss_type, beta=trainer.beta, epsilon_low=trainer.epsilon_low,
        epsilon_high=trainer.epsilon_high, temperature=trainer.temperature,
        max_completion_length=trainer.max_completion_length,
        accumulation=trainer.current_gradient_accumulation_steps if training else 1,
    )  # fmt: skip
    if trainer.loss_type == "dapo":
        processes = trainer.accelerator.num_processes
        steps = trainer.current_gradient_accumulation_steps / args.steps_per_generation if training else 1.0
        options["dapo_scale"] = steps / processes
    return options


def grpo_linear_loss(model, inputs, *, loss_type="bnpo", beta=0.0, epsilon_low=0.2, epsilon_high=None,
                     temperature=1.0, max_completion_length=None, accumulation=1, dapo_scale=1.0):  # fmt: skip
    """The loss of `GRPOTrainer._compute_loss` from TRL's `inputs` (prompt_ids, prompt_mask, completion_ids,
    completion_mask, advantages (B,) or (B, T), old_per_token_logps, ref_per_token_logps, num_items_in_batch),
    by `xentlib.linear_policy_loss` on the decoder's last hidden states: the (B, T, V) logits are never formed and
    the gradients are made in the forward. Per token, TRL's loss types are weights of a 'sum' (docs/numerics.md,
    "The policy loss"): 'grpo' 1 / (B |completion_b| accumulation), 'bnpo' 'mean' / accumulation, 'dr_grpo'
    1 / (B max_completion_length accumulation), 'dapo' 1 / (num_items_in_batch dapo_scale)."""
    from xentlib.integrations._hf_head import base_model, head_maths_candidates, output_head, text_config
    from xentlib.policy import linear_policy_loss

    images = [key for key in _MULTIMODAL_INPUTS if inputs.get(key) is not None]
    if images:
        raise NotImplementedError(f"grpo_linear_loss takes text-only batches; these inputs are set: {images}")
    completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
    input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
    hidden = base_model(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    keep = completion_ids.shape[1]
    hidden = hidden[:, -keep - 1 : -1]  # position t predicts token t + 1: the completion's tokens
    mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]  # as TRL
    labels = completion_ids.masked_fill(mask == 0, -100)
    advantages = inputs["advantages"]
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    reduction, weight = _loss_type_weights(loss_type, mask.to(torch.float32), inputs, max_completion_length,
                                           accumulation, dapo_scale)  # fmt: skip
    head = output_head(model)
    maths = head_maths_candidates(text_config(model))[0]  # the config's usual reading (a logit scale, a soft-cap)
    hidden, bias = _with_logit_scale(hidden, head.bias, maths.logit_scale)
    loss = linear_policy_loss(
        hidden, head.weight, labels, advantages, bias, old_log_probs=inputs.get("old_per_token_logps"),
        ref_log_probs=inputs.get("ref_per_token_logps") if beta != 0.0 else None, token_weight=weight,
        epsilon=epsilon_low, epsilon_high=epsilon_high, kl_coef=beta, temperature=temperature,
        softcap=maths.softcap, reduction=reduction,
    )  # fmt: skip
    return loss / accumulation if loss_type == "bnpo" else loss


def _loss_type_weights(loss_type: str, mask, inputs, max_completion_length, accumulation, dapo_scale):
    """(reduction, token weights or None) of a TRL loss type, for `linear_policy_loss` (see `grpo_linear_loss`)."""
    batch = mask.shape[0]
    if loss_type == "grpo":
        return "sum", 1.0 / (mask.sum(1, keepdim=True).clamp(min=1.0) * batch * accumulation)
    if loss_type == "bnpo":
        return "mean", None
    if loss_type == "dr_grpo":
        return "sum", torch.full_like(mask, 1.0 / (batch * max_completion_length * accumulation))
    if loss_type == "dapo":
        return "sum", torch.full_like(mask, 1.0) / (inputs["num_items_in_batch"].clamp(min=1.0) * dapo_scale)
    raise NotImplementedError(f"grpo_linear_loss computes the loss types {GRPO_LOSS_TYPES}, not {loss_type!r}")
