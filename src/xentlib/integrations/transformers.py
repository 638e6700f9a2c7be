"""xentlib losses for Hugging Face transformers causal language models.

Two ways in, both exact (the same loss and gradients as transformers' own causal-LM loss):

1. ``model.loss_function = for_causal_lm_loss``: the model still computes its (tokens, vocab) logits;
   xentlib's fused cross-entropy turns them into the loss with one gradient-sized buffer.
2. ``patch(model)``: an instance-level, reversible patch. In training with labels the loss comes from the
   last hidden state and the output-embedding weight through `xentlib.functional.linear_cross_entropy`, so the
   logits are never held. Outside training, without labels, or with ``return_logits=True`` the model's own
   forward runs (with `for_causal_lm_loss` as its loss function) and returns logits as usual.

The patch is written once for every ``*ForCausalLM`` whose forward is "base model -> last hidden state ->
output embedding -> head maths -> loss": it calls the base model with the caller's arguments, then applies the
head maths (a logit scale, a soft-cap) read from the config's public attributes. Everything it relies on is
established once, at patch time, by running the model's own forward on a probe batch: the head maths (the
model's logits must equal them), the loss (the model's must equal the fused one) and the output class. A model
the probe does not confirm is refused, never patched to a different loss.

Nothing here imports transformers: the patched forward's output class is the model's own, taken from its
forward's output at patch time.
"""

from __future__ import annotations

import inspect
import itertools
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from xentlib.integrations._hf_head import (
    HeadMaths,
    Verified,
    base_model,
    head_maths_candidates,
    keep_positions,
    output_head,
    text_config,
    verify,
)

__all__ = [
    "PatchHandle",
    "for_causal_lm_loss",
    "is_patched",
    "linear_causal_lm_loss",
    "patch",
    "unpatch",
]

_STATE_ATTRIBUTE = "_xentlib_patch"
_ABSENT = object()  # marks "the instance had no such attribute of its own before patching"


# ----------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------


def _reduction(num_items_in_batch, device: torch.device) -> tuple[str, Tensor | int | None]:
    """transformers' rule: a token count given -> 'sum' / count (exact under gradient accumulation);
    none given -> 'mean' over the non-ignored tokens of this batch. Returns (reduction, normalizer)."""
    if num_items_in_batch is None:
        return "mean", None
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(device)
    return "sum", num_items_in_batch


def _next_token_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """Position i predicts labels[i + 1]; the last position has nothing to predict and gets `ignore_index`."""
    return torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def for_causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **kwargs,
) -> Tensor:
    """Causal-LM loss with transformers' `ForCausalLMLoss` signature and semantics, computed by xentlib.

    Set it as ``model.loss_function = for_causal_lm_loss``. The logits are cast with ``.float()`` exactly as
    transformers does (so the loss is float32); position i predicts ``labels[..., i + 1]`` unless
    ``shift_labels`` (already aligned with the logits) is given. With ``num_items_in_batch`` the loss is the
    sum over non-ignored tokens divided by it, otherwise their mean. Other keyword arguments are accepted
    and ignored, as transformers does.

    Example::

        >>> reference = model(input_ids, labels=input_ids).loss  # transformers' own loss
        >>> model.loss_function = for_causal_lm_loss
        >>> torch.allclose(model(input_ids, labels=input_ids).loss, reference)
        True
    """
    from xentlib import functional

    logits = logits.float()
    if shift_labels is None:
        shift_labels = _next_token_labels(labels, ignore_index)
    logits = logits.view(-1, vocab_size)
    shift_labels = shift_labels.reshape(-1).to(logits.device)
    reduction, normalizer = _reduction(num_items_in_batch, logits.device)
    return functional.cross_entropy(
        logits, shift_labels, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer
    )


def linear_causal_lm_loss(
    hidden_states: Tensor,
    weight: Tensor,
    labels: Tensor | None,
    bias: Tensor | None = None,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """`for_causal_lm_loss` of the logits ``logit_scale * (hidden_states @ weight.T + bias)`` (soft-capped
    when ``softcap`` is given), computed without ever holding those logits.

    The rows pair up as in transformers' `ForCausalLMLoss`: the labels are shifted in their own shape
    (position i of a sequence predicts ``labels[..., i + 1]``, the last predicts nothing), then the hidden
    states (..., D) and the shifted labels are both flattened, row n against row n. So ``hidden_states`` may be
    (B, T, D) with (B, T) labels, or the (B * k, D) rows a boolean ``logits_to_keep`` mask selects with (B, k)
    labels. ``shift_labels``, already aligned, replaces ``labels``. The loss is at least float32, as
    transformers' upcast gives.

    Scaling the logits by s equals scaling the head: s * (h W^T + b) = (s h) W^T + (s b), so a scale costs one
    (tokens, D) product, not a (tokens, vocab) one.
    """
    from xentlib import functional

    if shift_labels is None:
        if labels is None:
            raise ValueError("linear_causal_lm_loss needs labels or shift_labels")
        shift_labels = _next_token_labels(labels, ignore_index)
    if logit_scale != 1.0:
        hidden_states = hidden_states * logit_scale
        bias = None if bias is None else bias * logit_scale
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    target = shift_labels.reshape(-1).to(rows.device)
    reduction, normalizer = _reduction(num_items_in_batch, rows.device)
    device_type = rows.device.type
    rows, weight, bias = _autocast_operands(device_type, rows, weight, bias)
    with torch.autocast(device_type, enabled=False):
        # by keyword, under the public API's names (nn.LinearCrossEntropyLoss passes its settings alike)
        loss = functional.linear_cross_entropy(
            rows,
            weight,
            target,
            linear_bias=bias,
            ignore_index=ignore_index,
            reduction=reduction,
            normalizer=normalizer,
            softcap=softcap,
            chunk_size=chunk_size,
            backend=backend,
        )
    return loss.to(torch.promote_types(loss.dtype, torch.float32))


def _autocast_operands(device_type: str, hidden_states: Tensor, weight: Tensor, bias: Tensor | None):
    """Under autocast the model's `lm_head` would run in the autocast dtype; cast the operands the same way
    (the casts are differentiable, so gradients reach the float32 parameters as through the head)."""
    if not torch.is_autocast_enabled(device_type):
        return hidden_states, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    return hidden_states.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


# ----------------------------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _PatchState:
    saved_forward: Any  # the instance's own `forward` before patching, or _ABSENT
    saved_loss_function: Any  # `model.loss_function` before patching
    patched_forward: Any  # the bound forward that patch installed
    positional_names: tuple[str, ...]  # the class forward's parameters a caller may pass by position
    verified: Verified
    chunk_size: int | None
    backend: str


def _original_forward(model: torch.nn.Module, state: _PatchState):
    if state.saved_forward is not _ABSENT:
        return state.saved_forward
    return type(model).forward.__get__(model)


def _positional_names(model: torch.nn.Module) -> tuple[str, ...]:
    """The class forward's parameters after `self` that a caller may pass by position."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = list(inspect.signature(type(model).forward).parameters.values())[1:]
    return tuple(p.name for p in itertools.takewhile(lambda p: p.kind in positional, parameters))


def _call_arguments(state: _PatchState, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The caller's arguments by name, as the class forward would receive them (its **kwargs flattened)."""
    if len(args) > len(state.positional_names):
        raise TypeError(
            f"the patched forward takes at most {len(state.positional_names)} positional arguments "
            f"({', '.join(state.positional_names)}), got {len(args)}"
        )
    arguments = dict(zip(state.positional_names, args, strict=False))
    twice = sorted(arguments.keys() & kwargs.keys())
    if twice:
        raise TypeError(f"the patched forward got multiple values for argument(s) {', '.join(twice)}")
    arguments.update(kwargs)
    return arguments


def _wants_fused_loss(training: bool, labels, return_logits: bool | None) -> bool:
    """Fuse (no logits) in training with labels, unless the caller asks for logits; `return_logits=False`
    forces the fused loss, also in evaluation."""
    if return_logits is None:
        return training and labels is not None
    if not return_logits and labels is None:
        raise ValueError("return_logits=False computes only the loss, so it needs labels")
    return not return_logits


def _model_output(verified: Verified, loss: Tensor, base_outputs, return_dict: bool):
    """The model's own output class, its fields (past the loss and the logits) taken from the base model's
    output by their current names, read as mapping entries (no deprecated aliases)."""
    fields = {name: base_outputs[name] for name in verified.output_fields if name in base_outputs}
    output = verified.output_class(loss=loss, logits=None, **fields)
    return output if return_dict else output.to_tuple()


def _fused_forward(model: torch.nn.Module, state: _PatchState, arguments: dict[str, Any]):
    """Base model, then the loss straight from the last hidden state and the head weight."""
    labels = arguments.pop("labels")
    logits_to_keep = arguments.pop("logits_to_keep", 0)
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    base_outputs = base_model(model)(**arguments)  # **kwargs reach the base model, as in the original
    if isinstance(base_outputs, dict) and base_outputs.get("router_logits") is not None:
        raise NotImplementedError(
            "xentlib.integrations.transformers.patch does not add mixture-of-experts router losses; "
            "call the model with return_logits=True or unpatch it"
        )
    hidden_states = keep_positions(base_outputs[0], logits_to_keep)
    head = output_head(model)
    maths = state.verified.head_maths
    loss = linear_causal_lm_loss(
        hidden_states,
        head.weight,
        labels,
        bias=head.bias,
        num_items_in_batch=arguments.get("num_items_in_batch"),
        ignore_index=arguments.get("ignore_index", -100),
        shift_labels=arguments.get("shift_labels"),
        logit_scale=maths.logit_scale,
        softcap=maths.softcap,
        chunk_size=state.chunk_size,
        backend=state.backend,
    )
    return _model_output(state.verified, loss, base_outputs, bool(return_dict))


def _patched_forward(model: torch.nn.Module, args: tuple, kwargs: dict, return_logits: bool | None):
    state: _PatchState = model.__dict__[_STATE_ATTRIBUTE]
    arguments = _call_arguments(state, args, kwargs)
    if not _wants_fused_loss(model.training, arguments.get("labels"), return_logits):
        return _original_forward(model, state)(*args, **kwargs)
    return _fused_forward(model, state, arguments)


def _forward_signature(model: torch.nn.Module) -> inspect.Signature:
    """The class forward's signature plus the keyword-only `return_logits`, so that introspection (the
    Trainer's loss-kwargs check, generation's `logits_to_keep` check) sees what it saw before."""
    signature = inspect.signature(type(model).forward)
    parameters = [p for p in signature.parameters.values() if p.name != "return_logits"]
    extra = inspect.Parameter("return_logits", inspect.Parameter.KEYWORD_ONLY, default=None)
    position = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    parameters.insert(position, extra)
    return signature.replace(parameters=parameters)


def _make_forward(model: torch.nn.Module):
    def forward(self, *args, return_logits: bool | None = None, **kwargs):
        return _patched_forward(self, args, kwargs, return_logits)

    forward.__signature__ = _forward_signature(model)
    forward.__doc__ = (
        "xentlib-patched forward: in training with labels the loss comes from the last hidden state through "
        "linear_cross_entropy and `logits` is None. `return_logits=True` runs the model's own forward; "
        "`return_logits=False` forces the fused loss (labels required).\n\n" + (type(model).forward.__doc__ or "")
    )
    return forward


# ----------------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------------


class PatchHandle:
    """Returned by `patch`; ``with patch(model): ...`` unpatches on exit, ``handle.unpatch()`` at any time."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def unpatch(self) -> torch.nn.Module:
        return unpatch(self.model)

    def __enter__(self) -> torch.nn.Module:
        return self.model

    def __exit__(self, *exc_info) -> None:
        if is_patched(self.model):
            unpatch(self.model)


def is_patched(model: torch.nn.Module) -> bool:
    return _STATE_ATTRIBUTE in model.__dict__


def patch(
    model: torch.nn.Module,
    *,
    chunk_size: int | None = None,
    backend: str = "auto",
    logit_scale: float | None = None,
    softcap: float | None = None,
) -> PatchHandle:
    """Patch one causal-LM instance (its class and other instances are untouched) so that in training with
    labels its loss is `linear_cross_entropy` of the last hidden state and the output-embedding weight: no
    (tokens, vocab) logits, `outputs.logits` is None. Everything else runs the model's own forward, with
    `for_causal_lm_loss` as its loss function. The patched forward also takes ``return_logits``: True runs the
    model's own forward (logits and loss), False forces the fused loss in evaluation too.

    The head maths (a logit scale, a soft-cap) are read from the config's public attributes
    (`logit_scale`, `output_multiplier`, `logits_scaling`, `final_logit_softcapping`), or taken from
    ``logit_scale`` / ``softcap`` when given, and verified before anything is installed: the model's own
    forward runs once on a few random tokens (eval mode, no gradients; the training flag and the random
    number generators are restored) and its logits and loss must equal the patch's. Otherwise `patch`
    raises ValueError and the model stays as it was.

    ``chunk_size`` and ``backend`` go to `linear_cross_entropy`. Returns a `PatchHandle`; use it as a context
    manager to unpatch on exit, or call `unpatch(model)`.

    Example::

        >>> handle = patch(model)
        >>> out = model.train()(input_ids, labels=input_ids)  # the loss, without (tokens, vocab) logits
        >>> out.logits is None
        True
        >>> model = unpatch(model)  # forward and loss_function exactly as before
        >>> model(input_ids, labels=input_ids).logits.shape
        torch.Size([2, 8, 128])
    """
    if is_patched(model):
        raise ValueError(f"this {type(model).__name__} is already patched by xentlib; unpatch it first")
    base_model(model)
    head = output_head(model)
    if logit_scale is None and softcap is None:
        candidates = head_maths_candidates(text_config(model))
    else:
        given = f"patch(logit_scale={logit_scale}, softcap={softcap})"
        candidates = [HeadMaths(1.0 if logit_scale is None else float(logit_scale), softcap, source=given)]
    verified = verify(model, head, candidates, {"chunk_size": chunk_size, "backend": backend})
    instance = model.__dict__
    forward = types.MethodType(_make_forward(model), model)
    state = _PatchState(
        saved_forward=instance.get("forward", _ABSENT),
        saved_loss_function=model.loss_function,
        patched_forward=forward,
        positional_names=_positional_names(model),
        verified=verified,
        chunk_size=chunk_size,
        backend=backend,
    )
    instance[_STATE_ATTRIBUTE] = state
    instance["forward"] = forward
    model.loss_function = for_causal_lm_loss
    return PatchHandle(model)


def _restore(instance: dict, name: str, saved) -> None:
    if saved is _ABSENT:
        instance.pop(name, None)
    else:
        instance[name] = saved


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch`: the instance's `forward` and `loss_function` are what they were before `patch`.
    A forward wrapped around the patched one since (e.g. accelerate's mixed-precision wrapper) goes too, with
    a warning."""
    if not is_patched(model):
        raise ValueError(f"this {type(model).__name__} is not patched by xentlib")
    instance = model.__dict__
    state: _PatchState = instance.pop(_STATE_ATTRIBUTE)
    if instance.get("forward") is not state.patched_forward:
        warnings.warn(
            f"{type(model).__name__}.forward was replaced after the patch (e.g. wrapped by accelerate); "
            "unpatch restores the forward from before the patch",
            stacklevel=2,
        )
    _restore(instance, "forward", state.saved_forward)
    model.loss_function = state.saved_loss_function
    return model
