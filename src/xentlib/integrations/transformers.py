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

import dataclasses
import inspect
import itertools
import math
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
    """What the model's forward does to `lm_head(hidden)` before its loss: logits * logit_scale, then
    soft-capping. `source` says where the numbers came from, for messages."""

    logit_scale: float = 1.0
    softcap: float | None = None
    source: str = "no head maths"

    def apply(self, head_logits: Tensor) -> Tensor:
        """These maths applied to the head's logits, in float64 (the probe compares them with the model's)."""
        logits = self.logit_scale * head_logits.double()
        return logits if self.softcap is None else self.softcap * torch.tanh(logits / self.softcap)


# The head maths configs declare under public names, each with the readings seen in transformers' forwards,
# the usual one first: (config attribute, [(factor on the logits as a function of the value, description)]).
# A reading that leaves the logits alone is always tried too: some configs carry an attribute their forward
# ignores (MPT's `logit_scale`).
_SCALE_READINGS: dict[str, list[tuple[Any, str]]] = {
    "logit_scale": [(lambda value: value, "multiplies")],  # Cohere
    "output_multiplier": [(lambda value: value, "multiplies")],
    "logits_scaling": [(lambda value: 1.0 / value, "divides"), (lambda value: value, "multiplies")],  # Granite
}
_SOFTCAP_ATTRIBUTE = "final_logit_softcapping"  # Gemma 2 and 3


def _text_config(model: torch.nn.Module):
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _head_maths_candidates(config) -> list[_HeadMaths]:
    """Every reading of the head maths the config's public attributes allow, the usual readings first (fewest
    attributes read otherwise than usual). The probe keeps the first one the model's own logits confirm."""
    choices = []  # per declared attribute: [(scale factor, softcap, description)], usual reading first
    for name, readings in _SCALE_READINGS.items():
        value = getattr(config, name, None)
        if value is not None:
            value = float(value)
            used = [(factor(value), None, f"config.{name}={value:g} {verb} the logits") for factor, verb in readings]
            choices.append([*used, (1.0, None, f"config.{name} unused")])
    softcap = getattr(config, _SOFTCAP_ATTRIBUTE, None)
    if softcap is not None:
        cap = float(softcap)
        choices.append([(1.0, cap, f"config.{_SOFTCAP_ATTRIBUTE}={cap:g} soft-caps"), (1.0, None, "no soft-cap")])
    candidates = []
    for picks in sorted(itertools.product(*(range(len(c)) for c in choices)), key=lambda p: sum(map(bool, p))):
        readings = [c[pick] for c, pick in zip(choices, picks, strict=True)]
        scale = math.prod(factor for factor, _, _ in readings)
        cap = next((cap for _, cap, _ in readings if cap is not None), None)
        source = ", ".join(description for _, _, description in readings) or "no head maths in the config"
        candidates.append(_HeadMaths(logit_scale=scale, softcap=cap, source=source))
    return candidates


def _keep_positions(hidden_states: Tensor, logits_to_keep) -> Tensor:
    """transformers' `logits_to_keep`: an int k keeps the last k positions (0 keeps all), a 1-D tensor
    lists positions, a 2-D int tensor lists positions per sample, a 2-D bool mask keeps its True positions
    (flattened to (kept, D))."""
    if isinstance(logits_to_keep, Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden_states[logits_to_keep]
        return torch.take_along_dim(hidden_states, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)  # -0 == 0: everything
    return hidden_states[:, logits_to_keep, :]


# ----------------------------------------------------------------------------------------------------------
# The probe: the patch is verified against the model's own forward before it is installed
# ----------------------------------------------------------------------------------------------------------

_PROBE_SHAPE = (2, 6)  # (batch, tokens): enough to compare logits and a loss, cheap for any model


def _probe_tolerance(dtype: torch.dtype) -> float:
    """Relative agreement the model's own logits and loss must show with the patch's, in the model's dtype:
    a few roundings of a (tokens, vocab) matmul and a scale, far below any scale or cap that differs."""
    return {torch.float64: 1e-9, torch.float32: 1e-4}.get(dtype, 3e-2)


@dataclass(frozen=True)
class _Verified:
    """What the probe established about a model, once, at patch time."""

    head_maths: _HeadMaths
    output_class: type  # the model's own output class (e.g. CausalLMOutputWithPast)
    output_fields: tuple[str, ...]  # its fields other than loss and logits, taken from the base model's output


def _probe_batch(model: torch.nn.Module, head: torch.nn.Linear) -> tuple[Tensor, Tensor]:
    """A few random tokens (a private generator: the global RNG is not consumed) and their labels, one ignored."""
    vocab = head.out_features
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if isinstance(embeddings, torch.nn.Embedding):
        vocab = min(vocab, embeddings.num_embeddings)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, _PROBE_SHAPE, generator=generator).to(head.weight.device)
    labels = input_ids.clone()
    labels[1, 0] = -100
    return input_ids, labels


def _run_probe(model: torch.nn.Module, input_ids: Tensor, labels: Tensor):
    """The model's own forward (logits and loss) and its base model's last hidden state, in eval mode without
    gradients or autocast (in the parameters' dtype); every module's training flag and the random number
    generators are restored afterwards."""
    device = input_ids.device
    devices = [device] if device.type not in ("cpu", "meta") else []
    modes = [(module, module.training) for module in model.modules()]
    rng = torch.random.fork_rng(devices=devices, device_type=device.type)
    with rng, torch.no_grad(), torch.autocast(device.type, enabled=False):
        model.eval()
        try:
            own = model.forward(input_ids=input_ids, labels=labels, return_dict=True)
            hidden_states = _base_model(model)(input_ids=input_ids)[0]
        except Exception as error:
            raise RuntimeError(
                f"xentlib.integrations.transformers.patch could not run {type(model).__name__}'s forward on a "
                f"probe batch of token ids {tuple(input_ids.shape)} to verify the fused loss: {error!r}"
            ) from error
        finally:
            for module, training in modes:
                module.training = training
    return own, hidden_states


def _relative_difference(actual: Tensor, expected: Tensor) -> float:
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    return (actual.double() - expected).abs().max().item() / scale


def _verify(model: torch.nn.Module, head: torch.nn.Linear, candidates: list[_HeadMaths], options) -> _Verified:
    """Run the model's own forward and the fused loss on a probe batch; keep the first head maths whose logits
    and loss agree with the model's own, or refuse, saying what differs."""
    name = type(model).__name__
    input_ids, labels = _probe_batch(model, head)
    own, hidden_states = _run_probe(model, input_ids, labels)
    if not dataclasses.is_dataclass(own) or getattr(own, "logits", None) is None or not torch.is_tensor(own.loss):
        raise TypeError(f"{name}'s forward did not return an output with logits and a loss; xentlib cannot patch it")
    with torch.no_grad(), torch.autocast(hidden_states.device.type, enabled=False):
        maths = _confirmed_head_maths(name, head(hidden_states), own.logits, candidates)
        if own.get("router_logits") is None:  # a router's auxiliary loss is in own.loss: refused per call instead
            fused = linear_causal_lm_loss(
                hidden_states, head.weight, labels, head.bias, logit_scale=maths.logit_scale, softcap=maths.softcap,
                **options,
            )  # fmt: skip
            _confirm_loss(name, maths, fused, own.loss, _probe_tolerance(own.logits.dtype))
    return _Verified(
        head_maths=maths,
        output_class=type(own),
        output_fields=tuple(f.name for f in dataclasses.fields(own) if f.name not in ("loss", "logits")),
    )


def _confirmed_head_maths(name: str, head_logits: Tensor, own_logits: Tensor, candidates: list[_HeadMaths]):
    """The first candidate whose maths turn the head's logits into the model's own logits."""
    tolerance = _probe_tolerance(own_logits.dtype)
    differences = []
    for maths in candidates:
        difference = _relative_difference(maths.apply(head_logits), own_logits)
        if difference <= tolerance:
            return maths
        differences.append(f"{maths.source}: {difference:.3g}")
    raise ValueError(
        f"xentlib cannot patch {name}: its forward's logits are not the output head's logits under any reading "
        f"of its config's head maths (largest relative difference, tolerance {tolerance:g}: "
        f"{'; '.join(differences)}). Its forward applies maths xentlib does not know. If they are a scale and a "
        "tanh soft-cap, pass them: patch(model, logit_scale=..., softcap=...); otherwise leave the model "
        "unpatched (model.loss_function = for_causal_lm_loss still saves memory on the logits)."
    )


def _confirm_loss(name: str, maths: _HeadMaths, fused: Tensor, own_loss: Tensor, tolerance: float) -> None:
    if _relative_difference(fused, own_loss) > tolerance:
        raise ValueError(
            f"xentlib cannot patch {name}: its logits agree ({maths.source}), but its loss on the probe batch is "
            f"{own_loss.item():.6g} where the causal-LM cross-entropy of those logits is {fused.item():.6g}: its "
            "loss function is not transformers' causal-LM loss (a custom loss_function?), which the fused loss "
            "cannot reproduce. Leave the model unpatched."
        )


# ----------------------------------------------------------------------------------------------------------
# The patched forward
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _PatchState:
    saved_forward: Any  # the instance's own `forward` before patching, or _ABSENT
    saved_loss_function: Any  # `model.loss_function` before patching
    patched_forward: Any  # the bound forward that patch installed
    positional_names: tuple[str, ...]  # the class forward's parameters a caller may pass by position
    verified: _Verified
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


def _model_output(verified: _Verified, loss: Tensor, base_outputs, return_dict: bool):
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
    base_outputs = _base_model(model)(**arguments)  # **kwargs reach the base model, as in the original
    if isinstance(base_outputs, dict) and base_outputs.get("router_logits") is not None:
        raise NotImplementedError(
            "xentlib.integrations.transformers.patch does not add mixture-of-experts router losses; "
            "call the model with return_logits=True or unpatch it"
        )
    hidden_states = _keep_positions(base_outputs[0], logits_to_keep)
    head = _output_head(model)
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
        >>> unpatch(model)  # forward and loss_function exactly as before
        >>> model(input_ids, labels=input_ids).logits.shape
        torch.Size([2, 8, 128])
    """
    if is_patched(model):
        raise ValueError(f"this {type(model).__name__} is already patched by xentlib; unpatch it first")
    _base_model(model)
    head = _output_head(model)
    if logit_scale is None and softcap is None:
        candidates = _head_maths_candidates(_text_config(model))
    else:
        given = f"patch(logit_scale={logit_scale}, softcap={softcap})"
        candidates = [_HeadMaths(1.0 if logit_scale is None else float(logit_scale), softcap, source=given)]
    verified = _verify(model, head, candidates, {"chunk_size": chunk_size, "backend": backend})
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
