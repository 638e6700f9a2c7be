"""The model side of the transformers integration: find the output head, list the readings of its maths that the
config allows, and verify one against the model's own forward on a probe batch (at patch time, never per call)."""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# ----------------------------------------------------------------------------------------------------------
# What the patch needs to know about a model
# ----------------------------------------------------------------------------------------------------------


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder that produces the last hidden state (`model.model` for most causal LMs)."""
    base = getattr(model, "base_model", None)
    if isinstance(base, torch.nn.Module) and base is not model:
        return base
    base = getattr(model, "model", None)
    if isinstance(base, torch.nn.Module):
        return base
    raise TypeError(f"{type(model).__name__} has no base model (`.model` / `.base_model`) to take hidden states from")


def output_head(model: torch.nn.Module) -> torch.nn.Linear:
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
class HeadMaths:
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


def text_config(model: torch.nn.Module):
    config = model.config
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def head_maths_candidates(config) -> list[HeadMaths]:
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
        candidates.append(HeadMaths(logit_scale=scale, softcap=cap, source=source))
    return candidates


def keep_positions(hidden_states: Tensor, logits_to_keep) -> Tensor:
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
class Verified:
    """What the probe established about a model, once, at patch time."""

    head_maths: HeadMaths
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
            hidden_states = base_model(model)(input_ids=input_ids)[0]
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


def verify(model: torch.nn.Module, head: torch.nn.Linear, candidates: list[HeadMaths], options) -> Verified:
    """Run the model's own forward and the fused loss on a probe batch; keep the first head maths whose logits
    and loss agree with the model's own, or refuse, saying what differs."""
    from xentlib.integrations.transformers import linear_causal_lm_loss  # the loss the patch will run

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
    return Verified(
        head_maths=maths,
        output_class=type(own),
        output_fields=tuple(f.name for f in dataclasses.fields(own) if f.name not in ("loss", "logits")),
    )


def _confirmed_head_maths(name: str, head_logits: Tensor, own_logits: Tensor, candidates: list[HeadMaths]):
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


def _confirm_loss(name: str, maths: HeadMaths, fused: Tensor, own_loss: Tensor, tolerance: float) -> None:
    if _relative_difference(fused, own_loss) > tolerance:
        raise ValueError(
            f"xentlib cannot patch {name}: its logits agree ({maths.source}), but its loss on the probe batch is "
            f"{own_loss.item():.6g} where the causal-LM cross-entropy of those logits is {fused.item():.6g}: its "
            "loss function is not transformers' causal-LM loss (a custom loss_function?), which the fused loss "
            "cannot reproduce. Leave the model unpatched."
        )
