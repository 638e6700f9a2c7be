"""The implementations `xentlib bench` compares, and the inputs they run on.

Each implementation turns a `Case` (inputs and loss options) into a `Step`: `forward()` returns a handle,
`backward(handle)` fills the gradients of the case's leaves. torch is imported inside the functions only, so
the CLI can list and validate implementation names without it. xentlib's functions are looked up when a step
is built, so the suite also runs (without the xentlib rows) while `xentlib.functional` lacks a function.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from xentlib.bench.config import DTYPES, Shape


@dataclass
class Case:
    """Inputs of one (shape, dtype) configuration: ce has `logits`; linear and logprobs have `x` and `weight`;
    distill has the student's `x` and `weight` and the teacher's `teacher_x` and `teacher_weight` (no gradient)."""

    shape: Shape
    dtype_name: str
    device: Any
    targets: str  # "index" or "prob"
    label_smoothing: float
    tensors: dict[str, Any] = field(default_factory=dict)
    xentlib_backend: str = "auto"  # the `backend=` given to xentlib's functions
    chunk_size: int | None = None  # the `chunk_size=` given to xentlib's linear_cross_entropy

    @property
    def leaves(self) -> list:
        names = ("logits",) if self.shape.problem == "ce" else ("x", "weight")
        return [self.tensors[name] for name in names]

    @property
    def target(self):
        return self.tensors["target"]

    @property
    def logits_bytes(self) -> int:
        return self.shape.n * self.shape.v * self.tensors["target_like"].element_size()


@dataclass
class Step:
    forward: Callable[[], Any]
    backward: Callable[[Any], None]


def loss_step(loss_fn: Callable[[], Any]) -> Step:
    """The usual training step: forward returns a scalar loss, backward back-propagates it."""
    return Step(forward=loss_fn, backward=lambda loss: loss.backward())


@dataclass(frozen=True)
class Impl:
    name: str
    problem: str
    role: str  # "xentlib", "baseline" (ratios are taken against these), "external" or "floor"
    build: Callable[[Case], Step]
    unavailable: Callable[[Case], str | None] = lambda case: None  # why it cannot run here, or None
    mutates_input: bool = False  # writes its gradient into the logits: inputs are restored before each call
    compiled: bool = False  # first call compiles: its time is reported as compile_s
    gpu_only: bool = False  # like the external libraries, left out silently where it cannot run


def make_case(shape: Shape, dtype_name: str, device, targets: str, label_smoothing: float, seed: int) -> Case:
    """Random inputs with realistic logit ranges (about unit variance)."""
    import torch

    dtype = getattr(torch, DTYPES[dtype_name])
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(device=device, dtype=dtype)

    case = Case(shape, dtype_name, device, targets, label_smoothing)
    n, v = shape.n, shape.v
    if shape.problem == "ce":
        case.tensors["logits"] = randn(n, v, scale=2.0).requires_grad_()
    else:
        case.tensors["x"] = randn(n, shape.d).requires_grad_()
        case.tensors["weight"] = randn(v, shape.d, scale=2.0 / math.sqrt(shape.d)).requires_grad_()
    if shape.problem == "distill":  # the teacher: a constant of the student's sizes
        case.tensors["teacher_x"] = randn(n, shape.d)
        case.tensors["teacher_weight"] = randn(v, shape.d, scale=2.0 / math.sqrt(shape.d))
    if targets == "prob":
        case.tensors["target"] = torch.softmax(randn(n, v, scale=2.0).float(), dim=1).to(dtype)
    else:
        case.tensors["target"] = torch.randint(0, v, (n,), generator=generator).to(device)
    case.tensors["target_like"] = torch.empty(0, dtype=dtype)
    return case


# --------------------------------------------------------------------------------------------- lookups


def xentlib_function(name: str):
    """`xentlib.functional.<name>`, or None while it does not exist."""
    try:
        functional = importlib.import_module("xentlib.functional")
    except ImportError:
        return None
    return getattr(functional, name, None)


def _missing_xentlib(name: str) -> Callable[[Case], str | None]:
    def unavailable(case: Case) -> str | None:
        try:
            functional = importlib.import_module("xentlib.functional")
        except ImportError as error:
            return f"xentlib.functional not importable ({error})"
        return None if hasattr(functional, name) else f"xentlib.functional.{name} not available"

    return unavailable


def _module_attr(module: str, attr: str):
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def _needs_gpu_and(module: str, attr: str, index_only: bool, no_smoothing: bool = False):
    def unavailable(case: Case) -> str | None:
        if getattr(case.device, "type", "cpu") != "cuda":
            return "GPU only"
        if index_only and case.targets != "index":
            return "class-index targets only"
        if no_smoothing and case.label_smoothing:
            return "no label smoothing"
        if _module_attr(module, attr) is None:
            return f"{module} not importable"
        return None

    return unavailable


_LIGER_GRPO = ("liger_kernel.chunked_loss", "LigerFusedLinearGRPOLoss")
_LIGER_JSD = ("liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss")


def _needs(module: str, attr: str):
    """An implementation that runs on any device: unavailable only where `module.attr` cannot be imported."""
    return lambda case: None if _module_attr(module, attr) is not None else f"{module}.{attr} not importable"


def _torch_chunked_unavailable(case: Case) -> str | None:
    import torch

    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        return "torch.nn.functional.linear_cross_entropy missing in this torch"
    if not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return "torch.nn.LinearCrossEntropyOptions missing (no chunked path in this torch)"
    return None


# ----------------------------------------------------------------------------------------- ce builders


def _ce_kwargs(case: Case) -> dict:
    return {"label_smoothing": case.label_smoothing} if case.label_smoothing else {}


def _xentlib_kwargs(case: Case) -> dict:
    backend = {"backend": case.xentlib_backend} if case.xentlib_backend != "auto" else {}
    return _ce_kwargs(case) | backend


def build_xentlib_ce(case: Case, inplace: bool = False) -> Step:
    cross_entropy = xentlib_function("cross_entropy")
    kwargs = _xentlib_kwargs(case) | ({"inplace_backward": True} if inplace else {})
    logits, target = case.tensors["logits"], case.target
    if inplace:  # logits as a model gives them (not a leaf), without paying for a copy
        as_model_output = _model_output()
        return loss_step(lambda: cross_entropy(as_model_output(logits), target, **kwargs))
    return loss_step(lambda: cross_entropy(logits, target, **kwargs))


def _model_output() -> Callable:
    """The leaf's memory as a non-leaf tensor, the way a model's last layer hands logits to the loss (the
    in-place gradient refuses leaves). Its values are restored before each call, outside the timing."""
    import torch

    class ModelOutput(torch.autograd.Function):
        @staticmethod
        def forward(ctx, leaf):
            return leaf.detach()

        @staticmethod
        def backward(ctx, grad):
            return grad

    return ModelOutput.apply


def torch_ce(case: Case) -> Callable:
    import torch.nn.functional as F

    kwargs = _ce_kwargs(case)
    return lambda logits, target: F.cross_entropy(logits, target, **kwargs)


def build_torch_eager_ce(case: Case) -> Step:
    fn, logits, target = torch_ce(case), case.tensors["logits"], case.target
    return loss_step(lambda: fn(logits, target))


def build_torch_compile_ce(case: Case) -> Step:
    import torch

    fn = torch.compile(torch_ce(case), dynamic=False)
    logits, target = case.tensors["logits"], case.target
    return loss_step(lambda: fn(logits, target))


def build_liger_ce(case: Case) -> Step:
    loss_class = _module_attr("liger_kernel.transformers.cross_entropy", "LigerCrossEntropyLoss")
    loss_module = loss_class(label_smoothing=case.label_smoothing)
    logits, target = case.tensors["logits"], case.target
    return loss_step(lambda: loss_module(logits, target))


# ------------------------------------------------------------------------------------- linear builders


def build_xentlib_linear(case: Case) -> Step:
    linear_cross_entropy = xentlib_function("linear_cross_entropy")
    kwargs = _xentlib_kwargs(case) | ({"chunk_size": case.chunk_size} if case.chunk_size else {})
    x, weight, target = case.tensors["x"], case.tensors["weight"], case.target
    return loss_step(lambda: linear_cross_entropy(x, weight, target, **kwargs))


def torch_linear_ce(case: Case) -> Callable:
    import torch.nn.functional as F

    kwargs = _ce_kwargs(case)
    return lambda x, weight, target: F.cross_entropy(x @ weight.T, target, **kwargs)


def build_xentlib_tiled_linear(case: Case) -> Step:
    """xentlib's memory-minimal Triton path: no logits in memory at all (backend="triton-tiled")."""
    linear_cross_entropy = xentlib_function("linear_cross_entropy")
    kwargs = _ce_kwargs(case) | {"backend": "triton-tiled"}
    x, weight, target = case.tensors["x"], case.tensors["weight"], case.target
    return loss_step(lambda: linear_cross_entropy(x, weight, target, **kwargs))


def _tiled_unavailable(case: Case) -> str | None:
    if getattr(case.device, "type", "cpu") != "cuda":
        return "GPU only (on CPU the Triton interpreter is for tests, not timings)"
    return _index_targets_only(case)


def build_torch_eager_linear(case: Case) -> Step:
    fn, x, weight, target = torch_linear_ce(case), case.tensors["x"], case.tensors["weight"], case.target
    return loss_step(lambda: fn(x, weight, target))


def build_torch_compile_linear(case: Case) -> Step:
    import torch

    fn = torch.compile(torch_linear_ce(case), dynamic=False)
    x, weight, target = case.tensors["x"], case.tensors["weight"], case.target
    return loss_step(lambda: fn(x, weight, target))


def build_torch_chunked_linear(case: Case) -> Step:
    """torch's own `F.linear_cross_entropy`, opted in to its chunked path by passing `options`.

    `options=None` (the default) runs the reference path `cross_entropy(linear(x, W))`, the same as
    torch-eager; a `LinearCrossEntropyOptions()` instance selects the chunked op with its automatic
    chunking and accumulation policy.
    """
    import torch

    options = torch.nn.LinearCrossEntropyOptions()
    kwargs = _ce_kwargs(case)
    x, weight, target = case.tensors["x"], case.tensors["weight"], case.target
    return loss_step(lambda: torch.nn.functional.linear_cross_entropy(x, weight, target, options=options, **kwargs))


def build_liger_linear(case: Case) -> Step:
    loss_class = _module_attr(
        "liger_kernel.transformers.fused_linear_cross_entropy", "LigerFusedLinearCrossEntropyLoss"
    )
    loss_module = loss_class(label_smoothing=case.label_smoothing)
    x, weight, target = case.tensors["x"], case.tensors["weight"], case.target
    return loss_step(lambda: loss_module(weight, x, target))


def build_cce_linear(case: Case) -> Step:
    linear_cross_entropy = _module_attr("cut_cross_entropy", "linear_cross_entropy")
    x, weight, target = case.tensors["x"], case.tensors["weight"], case.target
    return loss_step(lambda: linear_cross_entropy(x, weight, target))


def build_three_matmuls(case: Case) -> Step:
    """The floor of any linear cross-entropy: forward logits = x @ W.T; backward dx = dZ @ W, dW = dZ.T @ x.

    No loss is computed; dZ is a fixed random (N, V) tensor standing for the logits gradient.
    """
    import torch

    x, weight = case.tensors["x"].detach(), case.tensors["weight"].detach()
    grad_logits = torch.randn(case.shape.n, case.shape.v, device=x.device).to(x.dtype)

    def forward():
        return x @ weight.T

    def backward(logits):
        del logits  # as a real backward would, once the loss no longer needs them
        case.tensors["x"].grad = grad_logits @ weight
        case.tensors["weight"].grad = grad_logits.T @ x

    return Step(forward=forward, backward=backward)


# ----------------------------------------------------------------------------------- logprobs builders
# RL post-training: per-token log p(target) and entropy of the logits x @ W.T, then the policy-gradient loss
# -(A * logp).sum() - beta * H.sum() with fixed random advantages A (its gradient flows through both outputs).

ENTROPY_BONUS = 0.01


def _advantages(case: Case):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(1)
    return torch.randn(case.shape.n, generator=generator).to(case.tensors["x"].device)


def _policy_gradient_step(case: Case, per_token: Callable) -> Step:
    """forward: (logp, entropy) of every token; backward: the RL loss of them, back-propagated."""

    x, weight, target = case.tensors["x"], case.tensors["weight"], case.target
    advantages = _advantages(case)

    def backward(outputs):
        logp, entropy = outputs
        (-(advantages * logp).sum() - ENTROPY_BONUS * entropy.sum()).backward()

    return Step(forward=lambda: per_token(x, weight, target), backward=backward)


def build_xentlib_logprobs(case: Case) -> Step:
    import xentlib

    kwargs = {"chunk_size": case.chunk_size} if case.chunk_size else {}
    return _policy_gradient_step(case, lambda x, w, t: xentlib.linear_log_probs(x, w, t, return_entropy=True, **kwargs))


def build_xentlib_policy(case: Case) -> Step:
    """The same objective's gradients from the fused policy loss: on-policy its gradient wrt log p is -A, as
    -(A * logp).sum()'s, and the entropy bonus is the same; three matmuls instead of four."""
    import xentlib

    x, weight, target = case.tensors["x"], case.tensors["weight"], case.target
    advantages = _advantages(case)
    kwargs = {"chunk_size": case.chunk_size} if case.chunk_size else {}
    return loss_step(
        lambda: xentlib.linear_policy_loss(
            x, weight, target, advantages, entropy_coef=ENTROPY_BONUS, reduction="sum", **kwargs
        )
    )


def build_liger_grpo_logprobs(case: Case) -> Step:
    """Liger Kernel's chunked `LigerFusedLinearGRPOLoss` (pure PyTorch, torch.compile'd chunks: it runs on CPU
    too), on-policy, no KL and no entropy term, 'bnpo' (a mean over tokens): the same work as the xentlib-policy
    row but for the entropy bonus. Tokens as sequences of 256 (one chunk each, its default), or one sequence."""
    import torch

    loss_class = _module_attr(*_LIGER_GRPO)
    x, weight, target = case.tensors["x"], case.tensors["weight"], case.target
    seq = 256 if case.shape.n % 256 == 0 else case.shape.n
    batch = case.shape.n // seq
    loss_fn = loss_class(beta=0.0, use_ref_model=False, loss_type="bnpo")
    ids, mask = target.view(batch, seq), torch.ones(batch, seq, dtype=torch.long, device=x.device)
    advantages = _advantages(case)[:batch]
    return loss_step(lambda: loss_fn(x.view(batch, seq, -1), weight, ids, mask, advantages)[0])


def torch_logprobs(x, weight, target):
    """The composition an RL trainer writes: log_softmax of the logits, gathered; entropy -sum p log p."""
    import torch

    log_p = torch.log_softmax((x @ weight.T).float(), dim=-1)
    logp = log_p.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return logp, -(log_p.exp() * log_p).sum(-1)


def build_torch_eager_logprobs(case: Case) -> Step:
    return _policy_gradient_step(case, torch_logprobs)


def build_torch_compile_logprobs(case: Case) -> Step:
    import torch

    return _policy_gradient_step(case, torch.compile(torch_logprobs, dynamic=False))


# ------------------------------------------------------------------------------------ distill builders
# Distillation (GKD): the generalized Jensen-Shannon divergence between the student's logits x @ W.T (which gets
# the gradients of x and W) and a constant teacher's logits x_t @ W_t.T, beta = 0.5, temperature 1, 'batchmean'.

DISTILL_BETA = 0.5


def _distill_inputs(case: Case) -> tuple:
    tensors = case.tensors
    return tensors["x"], tensors["weight"], tensors["teacher_x"], tensors["teacher_weight"]


def build_xentlib_distill(case: Case) -> Step:
    import xentlib

    kwargs = {"chunk_size": case.chunk_size} if case.chunk_size else {}
    x, weight, teacher_x, teacher_weight = _distill_inputs(case)
    return loss_step(
        lambda: xentlib.linear_distillation_loss(x, weight, teacher_x, teacher_weight, beta=DISTILL_BETA, **kwargs)
    )


def build_liger_jsd_distill(case: Case) -> Step:
    """Liger Kernel's chunked `LigerFusedLinearJSDLoss` (pure PyTorch, torch.compile'd chunks), soft loss only,
    beta 0.5 (where the generalized JSD is symmetric, so its convention and TRL's agree)."""
    loss_class = _module_attr(*_LIGER_JSD)
    loss_fn = loss_class(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=DISTILL_BETA)
    x, weight, teacher_x, teacher_weight = _distill_inputs(case)
    return loss_step(lambda: loss_fn(x, weight, teacher_x, teacher_weight, case.target))


def torch_distill(x, weight, teacher_x, teacher_weight):
    """The composition of TRL's `GKDTrainer.generalized_jsd_loss` (0 < beta < 1, temperature 1, no labels), in the
    logits' dtype as TRL runs it: both log-softmaxes, log m = logsumexp of (log p + log(1 - beta), log q + log beta),
    then beta KL(q || m) + (1 - beta) KL(p || m) by `kl_div`, summed and divided by the rows ('batchmean')."""
    import torch
    import torch.nn.functional as F

    student_log_p = F.log_softmax(x @ weight.T, dim=-1)
    with torch.no_grad():
        teacher_log_q = F.log_softmax(teacher_x @ teacher_weight.T, dim=-1)
    beta = torch.tensor(DISTILL_BETA, dtype=student_log_p.dtype, device=student_log_p.device)
    mixture = torch.stack([student_log_p + torch.log1p(-beta), teacher_log_q + torch.log(beta)])
    log_m = torch.logsumexp(mixture, dim=0)
    kl_teacher = F.kl_div(log_m, teacher_log_q, reduction="none", log_target=True)
    kl_student = F.kl_div(log_m, student_log_p, reduction="none", log_target=True)
    jsd = beta * kl_teacher + (1 - beta) * kl_student
    return jsd.sum() / jsd.shape[0]


def build_torch_eager_distill(case: Case) -> Step:
    inputs = _distill_inputs(case)
    return loss_step(lambda: torch_distill(*inputs))


def build_torch_compile_distill(case: Case) -> Step:
    import torch

    fn, inputs = torch.compile(torch_distill, dynamic=False), _distill_inputs(case)
    return loss_step(lambda: fn(*inputs))


def build_four_matmuls(case: Case) -> Step:
    """The floor of any linear distillation: forward Z_s = x @ W.T and Z_t = x_t @ W_t.T; backward dx = dZ @ W,
    dW = dZ.T @ x. No divergence is computed; dZ is a fixed random (N, V) tensor standing for the logits gradient."""
    import torch

    x, weight, teacher_x, teacher_weight = (tensor.detach() for tensor in _distill_inputs(case))
    grad_logits = torch.randn(case.shape.n, case.shape.v, device=x.device).to(x.dtype)

    def forward():
        return x @ weight.T, teacher_x @ teacher_weight.T

    def backward(logits):
        del logits
        case.tensors["x"].grad = grad_logits @ weight
        case.tensors["weight"].grad = grad_logits.T @ x

    return Step(forward=forward, backward=backward)


def _index_targets_only(case: Case) -> str | None:
    return None if case.targets == "index" else "class-index targets only"


IMPLS: tuple[Impl, ...] = (
    Impl("xentlib", "ce", "xentlib", build_xentlib_ce, _missing_xentlib("cross_entropy")),
    Impl(
        "xentlib-inplace",
        "ce",
        "xentlib",
        lambda case: build_xentlib_ce(case, inplace=True),
        _missing_xentlib("cross_entropy"),
        mutates_input=True,
    ),
    Impl("torch-eager", "ce", "baseline", build_torch_eager_ce),
    Impl("torch-compile", "ce", "baseline", build_torch_compile_ce, compiled=True),
    Impl(
        "liger",
        "ce",
        "external",
        build_liger_ce,
        _needs_gpu_and("liger_kernel.transformers.cross_entropy", "LigerCrossEntropyLoss", index_only=True),
        mutates_input=True,  # writes the gradient into the logits during forward
    ),
    Impl("xentlib", "linear", "xentlib", build_xentlib_linear, _missing_xentlib("linear_cross_entropy")),
    Impl("xentlib-tiled", "linear", "xentlib", build_xentlib_tiled_linear, _tiled_unavailable, gpu_only=True),
    Impl("torch-eager", "linear", "baseline", build_torch_eager_linear),
    Impl("torch-compile", "linear", "baseline", build_torch_compile_linear, compiled=True),
    Impl("torch-chunked", "linear", "baseline", build_torch_chunked_linear, _torch_chunked_unavailable),
    Impl(
        "liger",
        "linear",
        "external",
        build_liger_linear,
        _needs_gpu_and(
            "liger_kernel.transformers.fused_linear_cross_entropy",
            "LigerFusedLinearCrossEntropyLoss",
            index_only=True,
        ),
    ),
    Impl(
        "cce",
        "linear",
        "external",
        build_cce_linear,
        _needs_gpu_and("cut_cross_entropy", "linear_cross_entropy", index_only=True, no_smoothing=True),
    ),
    Impl("3-matmuls", "linear", "floor", build_three_matmuls),
    Impl("xentlib", "logprobs", "xentlib", build_xentlib_logprobs, _needs("xentlib", "linear_log_probs")),
    Impl("xentlib-policy", "logprobs", "xentlib", build_xentlib_policy, _needs("xentlib", "linear_policy_loss")),
    Impl("torch-eager", "logprobs", "baseline", build_torch_eager_logprobs),
    Impl("torch-compile", "logprobs", "baseline", build_torch_compile_logprobs, compiled=True),
    Impl("3-matmuls", "logprobs", "floor", build_three_matmuls),
    Impl("liger-grpo", "logprobs", "external", build_liger_grpo_logprobs, _needs(*_LIGER_GRPO), compiled=True),
    Impl("xentlib", "distill", "xentlib", build_xentlib_distill, _needs("xentlib", "linear_distillation_loss")),
    Impl("torch-eager", "distill", "baseline", build_torch_eager_distill),
    Impl("torch-compile", "distill", "baseline", build_torch_compile_distill, compiled=True),
    Impl("4-matmuls", "distill", "floor", build_four_matmuls),
    Impl("liger-jsd", "distill", "external", build_liger_jsd_distill, _needs(*_LIGER_JSD), compiled=True),
)

IMPL_NAMES: tuple[str, ...] = tuple(dict.fromkeys(impl.name for impl in IMPLS))
BASELINES: tuple[str, ...] = tuple(dict.fromkeys(impl.name for impl in IMPLS if impl.role == "baseline"))


def find_impl(name: str, problem: str) -> Impl | None:
    return next((impl for impl in IMPLS if impl.name == name and impl.problem == problem), None)


def impls_for(problem: str, selected: tuple[str, ...] | None) -> list[Impl]:
    return [impl for impl in IMPLS if impl.problem == problem and (selected is None or impl.name in selected)]
