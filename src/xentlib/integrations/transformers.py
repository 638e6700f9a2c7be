"""xentlib losses for Hugging Face transformers causal language models.

Two ways in, both exact (the same loss and gradients as transformers' own causal-LM loss):

1. ``model.loss_function = for_causal_lm_loss``: the model still computes its (tokens, vocab) logits;
   xentlib's fused cross-entropy turns them into the loss with one gradient-sized buffer.
2. ``patch(model)``: an instance-level, reversible patch. In training with labels the loss comes from the
   last hidden state and the output-embedding weight through `xentlib.functional.linear_cross_entropy`, so the
   logits are never held. Outside training, without labels, or with ``return_logits=True`` the model's own
   forward runs (with `for_causal_lm_loss` as its loss function) and returns logits as usual.

The patch is written once for every ``*ForCausalLM`` whose forward is "base model -> last hidden state ->
output embedding -> loss": it calls the base model with the caller's arguments, then applies the head maths
that the config declares (`final_logit_softcapping`, `logit_scale`, `logits_scaling`, `output_multiplier`).

Nothing here imports transformers at module level; the patched forward imports its output class on first use.
"""

from __future__ import annotations

import inspect
import types
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

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


def _reduction_options(num_items_in_batch, device: torch.device) -> dict[str, Any]:
    """transformers' rule: a token count given -> 'sum' / count (exact under gradient accumulation);
    none given -> 'mean' over the non-ignored tokens of this batch."""
    if num_items_in_batch is None:
        return {"reduction": "mean"}
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(device)
    return {"reduction": "sum", "normalizer": num_items_in_batch}


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
    return functional.cross_entropy(
        logits,
        shift_labels,
        ignore_index=ignore_index,
        **_reduction_options(num_items_in_batch, logits.device),
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

    ``hidden_states`` is (..., T, D) and ``labels`` (..., T): position i predicts ``labels[..., i + 1]``
    (`linear_cross_entropy`'s ``shift=True``, no copy). ``shift_labels`` (..., T), already aligned, replaces
    ``labels``. The loss is at least float32, as transformers' upcast gives.

    Scaling the logits by s equals scaling the head: s * (h W^T + b) = (s h) W^T + (s b), so a scale costs one
    (tokens, D) product, not a (tokens, vocab) one.
    """
    from xentlib import functional

    if shift_labels is not None:
        target, shift = shift_labels, False
    elif labels is not None:
        target, shift = labels, True
    else:
        raise ValueError("linear_causal_lm_loss needs labels or shift_labels")
    if logit_scale != 1.0:
        hidden_states = hidden_states * logit_scale
        bias = None if bias is None else bias * logit_scale
    device_type = hidden_states.device.type
    hidden_states, weight, bias = _autocast_operands(device_type, hidden_states, weight, bias)
    with torch.autocast(device_type, enabled=False):
        loss = functional.linear_cross_entropy(
            hidden_states,
            weight,
            target.to(hidden_states.device),
            bias=bias,
            ignore_index=ignore_index,
            shift=shift,
            softcap=softcap,
            chunk_size=chunk_size,
            backend=backend,
            **_reduction_options(num_items_in_batch, hidden_states.device),
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
# What the patch needs to know about a model
# ----------------------------------------------------------------------------------------------------------


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder that produces the last hidden state (`model.model` for most causal LMs)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        return base
    base = getattr(model, "model", None)
    if isinstance(base, torch.nn.Module):
        return base
    raise TypeError(f"{type(model).__name__} has no base model (`.model` / `.base_model`) to take hidden states from")


def _output_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The output embedding (`lm_head`), which must be a plain `nn.Linear`: the fused loss uses its weight
    and bias directly, so anything its forward would add (an adapter, a hook, a new forward) would be lost."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else getattr(model, "lm_head", None)
    if not isinstance(head, torch.nn.Linear):
        raise TypeError(
            f"{type(model).__name__} has no nn.Linear output head (`get_output_embeddings()` / `lm_head`), "
            f"found {type(head).__name__}"
        )
    modified = (
        type(head).forward is not torch.nn.Linear.forward
        or "forward" in head.__dict__
        or head._forward_hooks
        or head._forward_pre_hooks
    )
    if modified:
        raise TypeError(
            f"the output head of {type(model).__name__} has a custom forward or hooks; xentlib's fused loss "
            "would bypass them"
        )
    return head


@dataclass(frozen=True)
class _HeadMaths:
    """What the model's forward does to `lm_head(hidden)` before its loss, as its config declares it."""

    logit_scale: float = 1.0
    softcap: float | None = None


def _text_config(model: torch.nn.Module):
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _forward_source(model: torch.nn.Module) -> str | None:
    try:
        return inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return None


def _head_maths(model: torch.nn.Module) -> _HeadMaths:
    """Read the head maths from the config, counting an attribute only when the model's forward uses it
    (some configs carry e.g. `logit_scale` that their forward ignores)."""
    config = _text_config(model)
    source = _forward_source(model)

    def declared(name: str) -> float | None:
        value = getattr(config, name, None)
        if value is None or (source is not None and name not in source):
            return None
        return float(value)

    scale = 1.0
    for multiplier in ("logit_scale", "output_multiplier"):  # logits * value
        value = declared(multiplier)
        scale = scale if value is None else scale * value
    divisor = declared("logits_scaling")  # logits / value
    scale = scale if divisor is None else scale / divisor
    return _HeadMaths(logit_scale=scale, softcap=declared("final_logit_softcapping"))


def _keep_positions(hidden_states: Tensor, logits_to_keep) -> Tensor:
    """transformers' `logits_to_keep`: an int k keeps the last k positions (0 keeps all), a 1-D tensor
    lists positions, a 2-D int tensor lists positions per sample, a 2-D bool mask keeps its True positions
    (flattened)."""
    if isinstance(logits_to_keep, Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)  # -0 == 0: everything
    return hidden_states[:, logits_to_keep, :]


# ----------------------------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _PatchState:
    saved_forward: Any  # the instance's own `forward` before patching, or _ABSENT
    saved_loss_function: Any  # the instance's own `_loss_function` before patching, or _ABSENT
    patched_forward: Any  # the bound forward that patch installed
    chunk_size: int | None
    backend: str


def _original_forward(model: torch.nn.Module, state: _PatchState):
    if state.saved_forward is not _ABSENT:
        return state.saved_forward
    return type(model).forward.__get__(model)


def _call_arguments(model: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The caller's arguments by name, as the class forward would receive them (its **kwargs flattened)."""
    signature = inspect.signature(type(model).forward)
    bound = signature.bind(model, *args, **kwargs)
    arguments: dict[str, Any] = {}
    for index, (name, value) in enumerate(bound.arguments.items()):
        kind = signature.parameters[name].kind
        if index == 0:
            continue  # self
        if kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError("xentlib's patched forward takes extra positional arguments by name only")
        else:
            arguments[name] = value
    return arguments


def _wants_fused_loss(training: bool, labels, return_logits: bool | None) -> bool:
    """Fuse (no logits) in training with labels, unless the caller asks for logits; `return_logits=False`
    forces the fused loss, also in evaluation."""
    if return_logits is None:
        return training and labels is not None
    if not return_logits and labels is None:
        raise ValueError("return_logits=False computes only the loss, so it needs labels")
    return not return_logits


def _causal_lm_output(loss: Tensor, base_outputs, return_dict: bool):
    from transformers.modeling_outputs import CausalLMOutputWithPast

    output = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(base_outputs, "past_key_values", None),
        hidden_states=getattr(base_outputs, "hidden_states", None),
        attentions=getattr(base_outputs, "attentions", None),
    )
    return output if return_dict else output.to_tuple()


def _fused_forward(model: torch.nn.Module, state: _PatchState, arguments: dict[str, Any]):
    """Base model, then the loss straight from the last hidden state and the head weight."""
    labels = arguments.pop("labels")
    logits_to_keep = arguments.pop("logits_to_keep", arguments.pop("num_logits_to_keep", 0))  # older name
    return_dict = arguments.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)
    base_outputs = _base_model(model)(**arguments)  # **kwargs reach the base model, as in the original
    if getattr(base_outputs, "router_logits", None) is not None:
        raise NotImplementedError(
            "xentlib.integrations.transformers.patch does not add mixture-of-experts router losses; "
            "call the model with return_logits=True or unpatch it"
        )
    hidden_states = _keep_positions(base_outputs[0], logits_to_keep)
    head = _output_head(model)
    maths = _head_maths(model)
    loss = linear_causal_lm_loss(
        hidden_states,
        head.weight,
        labels,
        bias=getattr(head, "bias", None),
        num_items_in_batch=arguments.get("num_items_in_batch"),
        ignore_index=arguments.get("ignore_index", -100),
        shift_labels=arguments.get("shift_labels"),
        logit_scale=maths.logit_scale,
        softcap=maths.softcap,
        chunk_size=state.chunk_size,
        backend=state.backend,
    )
    return _causal_lm_output(loss, base_outputs, bool(return_dict))


def _patched_forward(model: torch.nn.Module, args: tuple, kwargs: dict, return_logits: bool | None):
    state: _PatchState = model.__dict__[_STATE_ATTRIBUTE]
    original = _original_forward(model, state)
    arguments = _call_arguments(model, args, kwargs)
    if not _wants_fused_loss(model.training, arguments.get("labels"), return_logits):
        return original(*args, **kwargs)
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


def patch(model: torch.nn.Module, *, chunk_size: int | None = None, backend: str = "auto") -> PatchHandle:
    """Patch one causal-LM instance (its class and other instances are untouched) so that in training with
    labels its loss is `linear_cross_entropy` of the last hidden state and the output-embedding weight: no
    (tokens, vocab) logits, `outputs.logits` is None. Everything else runs the model's own forward, with
    `for_causal_lm_loss` as its loss function. The patched forward also takes ``return_logits``: True runs the
    model's own forward (logits and loss), False forces the fused loss in evaluation too.

    ``chunk_size`` and ``backend`` go to `linear_cross_entropy`. Returns a `PatchHandle`; use it as a context
    manager to unpatch on exit, or call `unpatch(model)`.

    Example::

        >>> handle = patch(model)
        >>> out = model.train()(input_ids, labels=input_ids)  # the loss, without (tokens, vocab) logits
        >>> out.logits is None
        True
        >>> unpatch(model)  # forward and loss_function exactly as before
        >>> model(input_ids, labels=input_ids).logits.shape
        torch.Size([2, 8, 128])
    """
    if is_patched(model):
        raise ValueError(f"this {type(model).__name__} is already patched by xentlib; unpatch it first")
    _base_model(model)
    _output_head(model)
    instance = model.__dict__
    forward = types.MethodType(_make_forward(model), model)
    state = _PatchState(
        saved_forward=instance.get("forward", _ABSENT),
        saved_loss_function=instance.get("_loss_function", _ABSENT),
        patched_forward=forward,
        chunk_size=chunk_size,
        backend=backend,
    )
    instance[_STATE_ATTRIBUTE] = state
    instance["forward"] = forward
    instance["_loss_function"] = for_causal_lm_loss  # what the `loss_function` property returns when set
    return PatchHandle(model)


def _restore(instance: dict, name: str, saved) -> None:
    if saved is _ABSENT:
        instance.pop(name, None)
    else:
        instance[name] = saved


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `patch`: the instance's `forward` and `loss_function` are exactly what they were before `patch`.
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
    _restore(instance, "_loss_function", state.saved_loss_function)
    return model
