"""The rules of the cross-entropy family, in one place.

Every public function validates its arguments here and receives a canonical description of the problem; the
backends (`backends/torch_chunked.py`, `backends/triton/`) and the distributed and linear variants only compute
per-row statistics and gradients from it. The checks run in the order torch 2.13 runs them and raise the same
exception types; the messages start with torch's words and then say what was expected.
See `/docs/numerics.md` for the maths and SEMANTICS.md (shared with the team) for every rule.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

# --------------------------------------------------------------------------------------------------------------
# Reductions and the legacy size_average / reduce arguments
# --------------------------------------------------------------------------------------------------------------

REDUCTIONS = ("none", "mean", "sum")


def legacy_reduction(size_average, reduce) -> str:
    """torch's legacy rule: either flag given overrides `reduction`; a missing flag counts as True."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    if size_average and reduce:
        result = "mean"
    elif reduce:
        result = "sum"
    else:
        result = "none"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{result}' instead.",
        UserWarning,
        stacklevel=4,
    )
    return result


def resolve_reduction(size_average, reduce, reduction) -> str:
    """The effective reduction: legacy flags first, then validation of the string (before any shape check)."""
    if size_average is not None or reduce is not None:
        reduction = legacy_reduction(size_average, reduce)
    return check_reduction(reduction)


def check_reduction(reduction) -> str:
    if isinstance(reduction, str) and reduction in REDUCTIONS:
        return reduction
    if isinstance(reduction, str) and reduction == "elementwise_mean":
        warnings.warn(
            "reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.",
            UserWarning,
            stacklevel=4,
        )
        return "mean"
    raise ValueError(f"{reduction} is not a valid value for reduction (expected one of 'none', 'mean', 'sum')")


# --------------------------------------------------------------------------------------------------------------
# Python-level argument types (torch's argument parser raises TypeError)
# --------------------------------------------------------------------------------------------------------------


def check_tensor(fn: str, name: str, position: int, value, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, Tensor):
        raise TypeError(f"{fn}(): argument '{name}' (position {position}) must be Tensor, not {type(value).__name__}")


def check_ignore_index(fn: str, value) -> int:
    """An int (bool excluded) or a 0-d integer tensor; values beyond int64 overflow like torch."""
    if isinstance(value, Tensor) and value.dim() == 0 and not value.is_floating_point() and value.dtype != torch.bool:
        value = int(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}(): argument 'ignore_index' (position 5) must be int, not {type(value).__name__}")
    value = int(value)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"Overflow when unpacking long long: ignore_index={value} does not fit in int64")
    return value


def check_label_smoothing(fn: str, value, check_range: bool = True) -> float:
    """torch validates only eps > 0: eps > 1 raises; eps < 0 and NaN silently mean 'no smoothing'.

    The type is checked at once (argument parsing); the range, with check_range=False, later by the caller.
    """
    if isinstance(value, Tensor) and value.dim() == 0:
        value = value.item()
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}(): argument 'label_smoothing' (position 6) must be float, not {type(value).__name__}")
    value = float(value)
    if not value > 0.0:  # also NaN
        return 0.0
    return check_smoothing_range(value) if check_range else value


def check_smoothing_range(eps: float) -> float:
    if eps > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {eps:g}")
    return eps


def check_floating_input(op: str, tensor: Tensor) -> None:
    if not (tensor.is_floating_point()):
        raise NotImplementedError(
            f"\"{op}\" not implemented for '{dtype_name(tensor.dtype)}' (expected a floating point input: "
            f"float64, float32, float16 or bfloat16)"
        )


def check_not_requires_grad(fn: str, name: str, tensor: Tensor | None) -> None:
    if tensor is not None and tensor.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"The function '{fn}' is not differentiable with respect to argument '{name}'. "
            f"This input cannot have requires_grad True."
        )


_DTYPE_NAMES = {
    torch.float64: "Double",
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def dtype_name(dtype: torch.dtype) -> str:
    """torch's C++ spelling of a dtype, as it appears in its error messages."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating type accumulates in float32 and is rounded once at the end."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def shape_list(shape) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


# --------------------------------------------------------------------------------------------------------------
# Extensions (keyword-only, default off)
# --------------------------------------------------------------------------------------------------------------


def check_extensions(reduction: str, z_loss, softcap, normalizer) -> tuple[float, float | None]:
    if not isinstance(z_loss, numbers.Real) or isinstance(z_loss, bool) or not 0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is not None:
        if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool) or not softcap > 0:
            raise ValueError(f"softcap must be None or a number > 0, got {softcap!r}")
        softcap = float(softcap)
    if normalizer is not None:
        if reduction != "sum":
            raise ValueError(
                f"normalizer is only valid with reduction='sum' (the sum is divided by it), got reduction='{reduction}'"
            )
        if isinstance(normalizer, Tensor):
            if normalizer.dim() != 0:
                raise ValueError(f"normalizer must be a number or a 0-d tensor, got shape {tuple(normalizer.shape)}")
        elif not isinstance(normalizer, numbers.Real) or isinstance(normalizer, bool) or not normalizer > 0:
            raise ValueError(f"normalizer must be a number > 0 or a 0-d tensor, got {normalizer!r}")
    return float(z_loss), softcap


# --------------------------------------------------------------------------------------------------------------
# The canonical cross-entropy problem
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CrossEntropyProblem:
    """A validated cross-entropy call, in the (B, C, S) layout every backend works on.

    Rows are the (b, s) pairs; the class dimension is 1 with stride S, so N-d inputs need no transposed copy.
    """

    logits: Tensor  # (B, C, S) view of the caller's input
    kind: str  # "index" or "prob"
    target: Tensor  # index: (B, S) int64, ignored positions replaced by 0; prob: (B, C, S) floating
    valid: Tensor  # (B, S) bool: False on ignored rows (all True for probability targets)
    target_weight: Tensor | None  # index: (B, S) accumulation dtype, w[t] on valid rows, 0 on ignored; prob: None
    class_weight: Tensor | None  # (C,) accumulation dtype, or None
    smoothing: float  # eps in [0, 1]; 0 when off
    z_loss: float  # 0 when off
    softcap: float | None
    reduction: str
    denominator: Tensor  # 0-d accumulation dtype: what the summed row losses are divided by (1 for 'none'/'sum')
    grad_scale: Tensor  # 0-d accumulation dtype: 1 / denominator ('none': 1; every row scaled by its grad later)
    output_shape: tuple[int, ...]  # shape of the reduction='none' result
    output_dtype: torch.dtype
    acc_dtype: torch.dtype

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]


def class_dim_of(input: Tensor) -> int:
    return 0 if input.dim() == 1 else 1


def as_rows(input: Tensor) -> Tensor:
    """(C,) -> (1, C, 1); (N, C) -> (N, C, 1); (N, C, d1, ..., dk) -> (N, C, d1*...*dk). A view when possible."""
    if input.dim() == 1:
        return input.reshape(1, input.shape[0], 1)
    batch, classes = input.shape[0], input.shape[1]
    spatial = math.prod(input.shape[2:])
    return input.reshape(batch, classes, spatial)


@dataclass
class CrossEntropyCall:
    """A validated cross-entropy call before any of its data is read: what the checks that need only shapes,
    dtypes and Python values found. `problem_tensors` turns it into a `CrossEntropyProblem` (reading the targets,
    inside the torch op on the device that holds them)."""

    logits: Tensor  # (B, C, S) view of the input
    target: Tensor  # index: (B, S) view of the class indices; prob: (B, C, S) view of the probabilities
    weight: Tensor | None  # (C,) class weight as given
    normalizer: Tensor | float | None
    ignore_index: int
    reduction: str
    smoothing: float
    z_loss: float
    softcap: float | None
    output_shape: tuple[int, ...]
    output_dtype: torch.dtype

    @property
    def kind(self) -> str:
        return "prob" if self.target.is_floating_point() else "index"

    @property
    def requires_grad(self) -> bool:
        return self.logits.requires_grad


def prepare_cross_entropy(input, target, weight, ignore_index, reduction: str, label_smoothing, **extensions):
    """Validate a cross_entropy call and build its problem (reads the targets: use `check_cross_entropy` and
    `problem_tensors` separately where the data must not be read on the host)."""
    call = check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, **extensions)
    return problem_from_call(call)


def problem_from_call(call: CrossEntropyCall, check_targets: bool = True) -> CrossEntropyProblem:
    problem = problem_tensors(
        call.logits, call.target, call.weight, call.normalizer, call.ignore_index, call.reduction, call.smoothing,
        call.z_loss, call.softcap, call.output_dtype, check_targets=check_targets,
    )  # fmt: skip
    problem.output_shape = call.output_shape
    return problem


def check_cross_entropy(
    input, target, weight, ignore_index, reduction: str, label_smoothing, *, z_loss=0.0, softcap=None,
    normalizer=None, autocast=False,
) -> CrossEntropyCall:  # fmt: skip
    """Every check of torch's cross_entropy that needs no data, in torch's order."""
    fn = "cross_entropy_loss"
    check_tensor(fn, "input", 1, input)
    check_tensor(fn, "target", 2, target)
    check_tensor(fn, "weight", 3, weight, optional=True)
    ignore_index = check_ignore_index(fn, ignore_index)
    eps = check_label_smoothing(fn, label_smoothing, check_range=False)
    z_loss, softcap = check_extensions(reduction, z_loss, softcap, normalizer)
    extensions = dict(z_loss=z_loss, softcap=softcap, normalizer=normalizer)
    if input.shape == target.shape:
        return _check_probability_target(input, target, weight, ignore_index, reduction, eps, **extensions)
    check_smoothing_range(eps)  # class indices: torch checks it before anything else
    if input.dim() == 0:  # torch's log_softmax(input, 1) fails before any target check
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got 1)")
    check_floating_input("log_softmax", input)
    return _check_class_index(
        "nll_loss_forward", input, target, weight, ignore_index, reduction, eps, **extensions, autocast=autocast
    )


def check_nll_loss(input, target, weight, ignore_index, reduction: str, autocast=False) -> CrossEntropyCall:
    fn = "nll_loss_nd"
    check_tensor(fn, "input", 1, input)
    check_tensor(fn, "target", 2, target)
    check_tensor(fn, "weight", 3, weight, optional=True)
    ignore_index = check_ignore_index(fn, ignore_index)
    return _check_class_index(
        "nll_loss_forward", input, target, weight, ignore_index, reduction, 0.0,
        input_kernel="nll_loss_out_frame", autocast=autocast,
    )  # fmt: skip


def _check_probability_target(input, target, weight, ignore_index, reduction, eps, **extensions):
    if not target.is_floating_point():
        raise RuntimeError(
            f"Expected floating point type for target with class probabilities, got {dtype_name(target.dtype)} "
            f"(a target with the same shape as the input is read as class probabilities; class indices need "
            f"shape {tuple(input.shape[:1]) + tuple(input.shape[2:])})"
        )
    if ignore_index >= 0:
        raise RuntimeError(
            f"ignore_index is not supported for floating point target (got ignore_index={ignore_index}; "
            f"probability targets accept only a negative ignore_index, which is ignored)"
        )
    if input.dim() == 0:
        raise IndexError("Dimension specified as 1 but tensor has no dimensions (the input needs a class dimension)")
    classes = input.shape[class_dim_of(input)]
    if weight is not None and (weight.dim() != 1 or weight.numel() != classes):
        raise RuntimeError(
            f"cross_entropy: weight tensor should be defined either for all {classes} classes or no classes but got "
            f"weight tensor of shape: {shape_list(weight.shape)}"
        )
    check_floating_input("log_softmax", input)  # torch's order: weight size, log_softmax, smoothing range
    check_smoothing_range(eps)
    output_dtype = torch.promote_types(input.dtype, target.dtype)
    if weight is not None:
        output_dtype = torch.promote_types(output_dtype, weight.dtype)
    output_shape = tuple(input.shape[:1]) + tuple(input.shape[2:]) if input.dim() > 1 else ()
    return CrossEntropyCall(
        as_rows(input), as_rows(target), weight, extensions["normalizer"], ignore_index, reduction, eps,
        extensions["z_loss"], extensions["softcap"], output_shape, output_dtype,
    )  # fmt: skip


def _check_class_index(
    fn, input, target, weight, ignore_index, reduction, eps, z_loss=0.0, softcap=None, normalizer=None,
    input_kernel=None, autocast=False,
):  # fmt: skip
    """`input_kernel`: for nll_loss, torch's kernel rejects a non-float input after the weight-size check and
    before the weight-dtype and bounds checks (cross_entropy's log_softmax checks it before everything)."""
    if input.dim() == 0:
        raise ValueError("Expected 1 or more dimensions (got 0): the input needs a class dimension")
    if input.dim() != 1:
        target_batch = target.shape[0] if target.dim() > 0 else 0
        if input.shape[0] != target_batch:
            raise ValueError(
                f"Expected input batch_size ({input.shape[0]}) to match target batch_size ({target_batch})."
            )
    check_not_requires_grad(fn, "weight", weight)
    _check_index_target_shape(input, target)
    _check_index_target_dtype(input, target)
    if input.dim() == 1 and target.dim() == 1 and target.shape[0] != 1:
        raise ValueError(f"For 1D input, 1D target must have size 1, but got target size: {target.shape[0]}")
    classes = input.shape[class_dim_of(input)]
    if weight is not None and (weight.dim() != 1 or weight.numel() != classes):
        if input.dim() <= 2:
            detail = f"all {classes} classes or no classes but got weight tensor of shape: {shape_list(weight.shape)}"
        else:
            detail = f"all or no classes (expected {classes} elements, got shape {shape_list(weight.shape)})"
        raise RuntimeError(f"weight tensor should be defined either for {detail}")
    if input_kernel is not None:
        check_floating_input(input_kernel, input)
    # under autocast torch casts the input and the weight to float32 first, so any floating pair agrees
    if weight is not None and weight.dtype != input.dtype and not (autocast and weight.is_floating_point()):
        raise RuntimeError(
            f"expected scalar type {dtype_name(input.dtype)} but found {dtype_name(weight.dtype)} "
            f"(the class weight must have the input's dtype)"
        )
    logits = as_rows(input)
    output_shape = () if input.dim() == 1 else tuple(target.shape)
    return CrossEntropyCall(
        logits, target.reshape(logits.shape[0], logits.shape[2]), weight, normalizer, ignore_index, reduction,
        eps, z_loss, softcap, output_shape, input.dtype,
    )  # fmt: skip


def problem_tensors(
    logits,
    target,
    weight,
    normalizer,
    ignore_index,
    reduction,
    smoothing,
    z_loss,
    softcap,
    output_dtype,
    check_targets: bool = True,
) -> CrossEntropyProblem:
    """The problem's tensors from a validated call's canonical views: the ignore mask, the safe class indices,
    the weights of the targets and the reduction's denominator. Class indices are checked against the number of
    classes here (torch's IndexError on CPU; a device-side assertion elsewhere, which does not synchronise).
    `output_shape` is the rows' (B, S): callers that know the caller's shape set it."""
    batch, classes, spatial = logits.shape
    prob = target.is_floating_point()
    dtypes = [logits.dtype] + ([target.dtype] if prob else []) + ([weight.dtype] if weight is not None else [])
    acc = accumulation_dtype(*dtypes)
    class_weight = None if weight is None else weight.detach().to(acc)
    if prob:
        valid = torch.ones(batch, spatial, dtype=torch.bool, device=logits.device)
        safe_index, target_weight, target_rows = None, None, target
        count = batch * spatial if classes else math.nan  # torch's numel / C: 0 / 0 without classes
    else:
        index = target.long()
        valid = index != ignore_index
        if not check_targets:
            safe_index = _safe_class_indices(index, valid)
        elif torch.compiler.is_compiling():  # the data is read inside an op, where the tracer does not follow
            safe_index = torch.ops.xentlib.class_indices(index, ignore_index, classes)
        else:
            safe_index = checked_class_indices(index, ignore_index, classes)
        if class_weight is None:
            target_weight = valid.to(acc)
        else:
            target_weight = torch.where(
                valid, class_weight[safe_index], torch.zeros((), dtype=acc, device=index.device)
            )
        target_rows = safe_index
        count = target_weight.sum()
    denominator = _denominator(reduction, count, normalizer, acc, logits.device)
    return CrossEntropyProblem(
        logits=logits,
        kind="prob" if prob else "index",
        target=target_rows,
        valid=valid,
        target_weight=target_weight,
        class_weight=class_weight,
        smoothing=smoothing,
        z_loss=z_loss,
        softcap=softcap,
        reduction=reduction,
        denominator=denominator,
        grad_scale=1.0 / denominator,
        output_shape=(batch, spatial),
        output_dtype=output_dtype,
        acc_dtype=acc,
    )


def _denominator(reduction, mean_count, normalizer, acc, device) -> Tensor:
    if reduction == "mean":
        value = mean_count
    elif normalizer is not None:
        value = normalizer
    else:
        value = 1.0
    if isinstance(value, Tensor):
        return value.detach().to(device=device, dtype=acc)
    return torch.tensor(value, dtype=acc, device=device)


def _check_index_target_shape(input: Tensor, target: Tensor) -> None:
    if input.dim() <= 2:  # for 1-D inputs the size of a 1-D target is checked after its dtype
        if target.dim() > 1:
            expected = "()" if input.dim() == 1 else f"({input.shape[0]},)"
            raise RuntimeError(
                f"0D or 1D target tensor expected, multi-target not supported (input {tuple(input.shape)} needs a "
                f"target of shape {expected}, got {tuple(target.shape)})"
            )
    elif input.dim() == 4:
        if target.dim() != 3:
            raise RuntimeError(
                f"only batches of spatial targets supported (3D tensors) but got targets of dimension: {target.dim()}"
            )
        if target.shape != input.shape[:1] + input.shape[2:]:
            raise RuntimeError(
                f"size mismatch (got input: {shape_list(input.shape)} , target: {shape_list(target.shape)}"
            )
    else:
        expected = input.shape[:1] + input.shape[2:]
        if target.shape != expected:
            raise RuntimeError(f"Expected target size {shape_list(expected)}, got {shape_list(target.shape)}")


def _check_index_target_dtype(input: Tensor, target: Tensor) -> None:
    if target.dtype == torch.long:
        return
    if target.dtype == torch.uint8 and input.dim() <= 2:
        return
    if target.dtype == torch.uint8:
        raise RuntimeError(
            "expected scalar type Long but found Byte (uint8 class indices are accepted only for 1-D and 2-D inputs)"
        )
    raise RuntimeError(
        f"expected target dtype to be Long or Byte, but got {dtype_name(target.dtype)} "
        f"(class indices must be int64, e.g. target.long())"
    )


def checked_class_indices(index: Tensor, ignore_index: int, classes: int) -> Tensor:
    """The class indices with ignored positions replaced by 0, after checking the others are in [0, C): on CPU
    torch's IndexError with the first bad value; on an accelerator a device-side assertion (reading the data on
    the host would synchronise). A torch op, so that the check stays inside a compiled graph."""
    valid = index != ignore_index
    out_of_range = valid & ((index < 0) | (index >= classes))
    if index.device.type != "cpu":
        torch._assert_async(
            ~out_of_range.any(),
            f"a target is out of bounds (expected class indices in [0, {classes - 1}] or ignore_index={ignore_index})",
        )
    elif bool(out_of_range.any()):
        bad = int(index[out_of_range][0])
        raise IndexError(
            f"Target {bad} is out of bounds. (expected class indices in [0, {classes - 1}] for {classes} classes, "
            f"or ignore_index={ignore_index})"
        )
    return _safe_class_indices(index, valid)


class_indices = torch.library.custom_op("xentlib::class_indices", mutates_args=())(checked_class_indices)


@class_indices.register_fake
def _(index, ignore_index, classes):
    return torch.empty_like(index)


def _safe_class_indices(index: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, index, torch.zeros((), dtype=torch.long, device=index.device))


# --------------------------------------------------------------------------------------------------------------
# linear_cross_entropy: the same problem, with logits = input @ weight.T + bias that are never materialized
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LinearProblem:
    """A validated linear_cross_entropy call. `rows` describes the (N, V) logits problem (its `logits` is a
    zero-stride placeholder holding no memory): a `CrossEntropyCall` before the data is read, a
    `CrossEntropyProblem` after. `input_rows[i]` is the row of `flat_input` that row i reads."""

    rows: CrossEntropyCall | CrossEntropyProblem
    flat_input: Tensor  # (M, D) view of the input
    input_rows: Tensor | None  # (N,) int64 row ids into flat_input, or None for the identity (N == M)


def logits_placeholder(rows: int, vocab: int, like: Tensor) -> Tensor:
    """A (rows, vocab) tensor of `like`'s dtype and device that holds no memory: the shape of logits that are
    never materialized."""
    return torch.empty((), dtype=like.dtype, device=like.device).expand(rows, vocab)


def check_linear_cross_entropy(
    input, weight, target, bias, class_weight, ignore_index, reduction, label_smoothing,
    *, shift=False, z_loss=0.0, softcap=None, normalizer=None, autocast=False,
) -> LinearProblem:  # fmt: skip
    """Every check of linear_cross_entropy that needs no data; `rows` is a `CrossEntropyCall`."""
    fn = "linear_cross_entropy"
    check_tensor(fn, "input", 1, input)
    check_tensor(fn, "linear_weight", 2, weight)
    check_tensor(fn, "target", 3, target)
    check_tensor(fn, "linear_bias", 4, bias, optional=True)
    if not isinstance(shift, bool):
        raise TypeError(
            f"linear_cross_entropy: shift must be a bool (True: position t predicts target t + 1), got {shift!r}"
        )
    if weight.dim() > 2:
        raise NotImplementedError(
            f"linear_cross_entropy: a K-dimensional linear_weight {tuple(weight.shape)} is not supported; "
            "xentlib takes a (C, in_features) weight (rows of the input are flattened instead)"
        )
    if input.dim() < 1 or weight.dim() != 2 or input.shape[-1] != weight.shape[1]:
        raise RuntimeError(
            f"linear_cross_entropy: input {tuple(input.shape)} and linear_weight {tuple(weight.shape)} cannot be "
            "multiplied (expected input (..., in_features) and linear_weight (C, in_features))"
        )
    vocab, hidden = weight.shape
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise RuntimeError(f"linear_cross_entropy: linear_bias must have shape ({vocab},), got {tuple(bias.shape)}")
    for name, other in (("linear_weight", weight), ("linear_bias", bias)):
        if other is not None and other.dtype != input.dtype:
            raise RuntimeError(
                f"linear_cross_entropy: expected {name} to have the input's dtype {dtype_name(input.dtype)}, "
                f"got {dtype_name(other.dtype)}"
            )
    check_floating_input("linear_cross_entropy", input)
    lead = input.shape[:-1]
    prob = target.shape == lead + (vocab,)
    target_lead = target.shape[:-1] if prob else target.shape
    if target_lead != lead:
        raise ValueError(
            f"linear_cross_entropy: target shape {tuple(target.shape)} does not match the input's leading shape "
            f"{tuple(lead)} (expected class indices of shape {tuple(lead)} or probabilities of shape "
            f"{tuple(lead) + (vocab,)})"
        )
    flat_input = input.reshape(-1, hidden)
    input_rows = None
    if shift:
        if len(lead) < 1 or lead[-1] < 1:
            raise ValueError("linear_cross_entropy: shift=True needs input of shape (..., T, D) with T >= 1")
        # position t predicts target t + 1: rows (..., :-1) of the input against target (..., 1:)
        positions = torch.arange(math.prod(lead), device=input.device).reshape(lead)
        input_rows = positions[..., :-1].reshape(-1)
        target = target[..., 1:, :] if prob else target[..., 1:]
    rows_lead = target.shape[:-1] if prob else target.shape
    count = math.prod(rows_lead)
    flat_target = target.reshape(count, vocab) if prob else target.reshape(count)
    call = check_cross_entropy(
        logits_placeholder(count, vocab, input), flat_target, class_weight, ignore_index, reduction,
        label_smoothing, z_loss=z_loss, softcap=softcap, normalizer=normalizer, autocast=autocast,
    )  # fmt: skip
    call.output_shape = tuple(rows_lead)
    return LinearProblem(rows=call, flat_input=flat_input, input_rows=input_rows)


def prepare_linear_cross_entropy(*args, **kwargs) -> LinearProblem:
    """`check_linear_cross_entropy`, with the rows' problem built (reads the targets)."""
    lp = check_linear_cross_entropy(*args, **kwargs)
    lp.rows = problem_from_call(lp.rows)
    return lp


# --------------------------------------------------------------------------------------------------------------
# Per-token log-probabilities (xentlib.rl): log p(target) and entropy of softmax(softcap(logits) / temperature)
# --------------------------------------------------------------------------------------------------------------


def check_log_probs_call(fn, input, target, weight=None, bias=None, *, temperature, ignore_index, softcap):
    """The rules of `log_probs` (weight None: `input` is the (..., V) logits) and `linear_log_probs` (`input`
    is (..., D), `weight` (V, D), `bias` (V,)). Classes lie on the last dimension; the target has the input's
    leading shape and holds int64 class indices. Returns (temperature, ignore_index, softcap) canonical."""
    check_tensor(fn, "input", 1, input)
    check_tensor(fn, "target", 3 if weight is not None else 2, target)
    check_floating_input(fn, input)
    if weight is not None:
        check_tensor(fn, "weight", 2, weight)
        check_tensor(fn, "bias", 4, bias, optional=True)
        if weight.dim() != 2 or input.dim() < 1 or input.shape[-1] != weight.shape[1]:
            raise RuntimeError(
                f"{fn}: input {tuple(input.shape)} and weight {tuple(weight.shape)} cannot be multiplied "
                "(expected input (..., D) and weight (V, D))"
            )
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise RuntimeError(f"{fn}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        for name, other in (("weight", weight), ("bias", bias)):
            if other is not None and other.dtype != input.dtype:
                raise RuntimeError(
                    f"{fn}: expected {name} to have the input's dtype {dtype_name(input.dtype)}, "
                    f"got {dtype_name(other.dtype)}"
                )
    elif input.dim() < 1:
        raise RuntimeError(f"{fn}: logits must have at least one dimension (..., V), got a 0-d tensor")
    if target.dtype != torch.long:
        raise RuntimeError(
            f"{fn}: expected target dtype Long, got {dtype_name(target.dtype)} (class indices must be int64, "
            "e.g. target.long())"
        )
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"{fn}: target shape {tuple(target.shape)} does not match the input's leading shape "
            f"{tuple(input.shape[:-1])} (one class index per row of the input; the classes lie on the last dimension)"
        )
    if isinstance(temperature, Tensor) and temperature.dim() == 0:
        temperature = temperature.item()
    if not isinstance(temperature, numbers.Real) or isinstance(temperature, bool):
        raise TypeError(f"{fn}: temperature must be a float, not {type(temperature).__name__}")
    if not 0 < temperature < math.inf:
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature!r}")
    ignore_index = check_ignore_index(fn, ignore_index)
    softcap = check_extensions("none", 0.0, softcap, None)[1]
    return float(temperature), ignore_index, softcap


# Distillation divergences (xentlib.distill): argument rules and reduction denominators
# --------------------------------------------------------------------------------------------------------------

DISTILLATION_REDUCTIONS = ("none", "batchmean", "sum", "mean")


@dataclass
class DistillationCall:
    """A validated distillation call. Rows are the leading dimensions flattened; the classes are the last one.

    `valid` is the (rows,) keep mask (`target != ignore_index`), None when every row counts (no target).
    `batch` is the 'batchmean' denominator without a target: the batch size input.shape[0] of a (B, ..., V) input
    (1 for a single (V,) row), as torch's kl_div and TRL's generalized_jsd_loss divide by it."""

    rows: int
    vocab: int
    row_shape: tuple
    valid: Tensor | None
    beta: float
    temperature: float
    reduction: str
    batch: int


def check_distillation_scalars(fn: str, beta, temperature, reduction, ignore_index) -> tuple[float, float, str, int]:
    """beta in [0, 1], temperature finite and > 0, a known reduction, an integer ignore_index."""
    for name, value in (("beta", beta), ("temperature", temperature)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{fn}(): argument '{name}' must be float, not {type(value).__name__}")
    beta, temperature = float(beta), float(temperature)
    if not 0.0 <= beta <= 1.0:  # also NaN
        raise ValueError(f"{fn}: beta must be between 0.0 and 1.0 (0: forward KL, 1: reverse KL), got {beta}")
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {temperature}")
    if not (isinstance(reduction, str) and reduction in DISTILLATION_REDUCTIONS):
        raise ValueError(
            f"{reduction} is not a valid value for reduction (expected one of "
            f"{', '.join(repr(r) for r in DISTILLATION_REDUCTIONS)})"
        )
    return beta, temperature, reduction, check_ignore_index(fn, ignore_index)


def check_distillation_pair(fn: str, student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    """Student and teacher tensors of the same floating dtype and device."""
    check_tensor(fn, f"student_{what}", 1, student)
    check_tensor(fn, f"teacher_{what}", 2, teacher)
    check_floating_input(fn, student)
    if teacher.dtype != student.dtype:
        raise RuntimeError(
            f"{fn}: expected teacher_{what} to have the student's dtype {dtype_name(student.dtype)}, "
            f"got {dtype_name(teacher.dtype)}"
        )
    if teacher.device != student.device:
        raise RuntimeError(f"{fn}: student and teacher are on different devices: {student.device} and {teacher.device}")


def check_distillation_rows(fn, lead: tuple, vocab: int, target, beta, temperature, reduction, ignore_index):
    """The rows' target mask and the reduction for student/teacher values of leading shape `lead`."""
    beta, temperature, reduction, ignore_index = check_distillation_scalars(
        fn, beta, temperature, reduction, ignore_index
    )
    rows = math.prod(lead)
    valid = None
    if target is not None:
        check_tensor(fn, "target", 3, target)
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise RuntimeError(f"{fn}: target must hold integer class indices, got dtype {dtype_name(target.dtype)}")
        if tuple(target.shape) != tuple(lead):
            raise ValueError(
                f"{fn}: target shape {tuple(target.shape)} does not match the leading shape {tuple(lead)} "
                "(one class index per row; only target == ignore_index matters)"
            )
        valid = (target.reshape(rows) != ignore_index).to(torch.bool)
    batch = lead[0] if len(lead) >= 1 else 1
    return DistillationCall(rows, vocab, tuple(lead), valid, beta, temperature, reduction, batch)


def check_distillation(fn: str, student: Tensor, teacher: Tensor, target, beta, temperature, reduction, ignore_index):
    """distillation_loss: (..., V) student and teacher logits of equal shape (at least 1-D, V >= 1)."""
    check_distillation_pair(fn, student, teacher)
    if student.shape != teacher.shape:
        raise ValueError(
            f"{fn}: student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} must have the "
            "same shape (..., V)"
        )
    if student.dim() < 1:
        raise ValueError(f"{fn}: expected logits of shape (..., V) with at least one dimension, got a 0-d tensor")
    lead, vocab = tuple(student.shape[:-1]), student.shape[-1]
    return check_distillation_rows(fn, lead, vocab, target, beta, temperature, reduction, ignore_index)


def check_linear_distillation(
    fn, student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, target, beta,
    temperature, reduction, ignore_index,
):  # fmt: skip
    """linear_distillation_loss: inputs (..., D_s) and (..., D_t) of one leading shape, weights (V, D_s) and
    (V, D_t) with the same V, biases (V,) or None; every tensor of one model shares that model's input dtype."""
    check_distillation_pair(fn, student_input, teacher_input, what="input")
    models = (
        ("student", student_input, student_weight, student_bias),
        ("teacher", teacher_input, teacher_weight, teacher_bias),
    )
    for who, x, w, b in models:
        check_tensor(fn, f"{who}_weight", 2, w)
        check_tensor(fn, f"{who}_bias", 3, b, optional=True)
        if x.dim() < 1 or w.dim() != 2 or x.shape[-1] != w.shape[1]:
            raise RuntimeError(
                f"{fn}: {who}_input {tuple(x.shape)} and {who}_weight {tuple(w.shape)} cannot be multiplied "
                "(expected input (..., D) and weight (V, D))"
            )
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise RuntimeError(f"{fn}: {who}_bias must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        for name, other in ((f"{who}_weight", w), (f"{who}_bias", b)):
            if other is not None and (other.dtype != x.dtype or other.device != x.device):
                raise RuntimeError(
                    f"{fn}: expected {name} to have the input's dtype {dtype_name(x.dtype)} and device {x.device}, "
                    f"got {dtype_name(other.dtype)} on {other.device}"
                )
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"{fn}: student and teacher vocabularies differ: {student_weight.shape[0]} and {teacher_weight.shape[0]}"
        )
    if student_input.shape[:-1] != teacher_input.shape[:-1]:
        raise ValueError(
            f"{fn}: student_input {tuple(student_input.shape)} and teacher_input {tuple(teacher_input.shape)} must "
            "have the same leading shape (one row per token)"
        )
    lead, vocab = tuple(student_input.shape[:-1]), student_weight.shape[0]
    return check_distillation_rows(fn, lead, vocab, target, beta, temperature, reduction, ignore_index)


def distillation_denominator(reduction: str, valid: Tensor | None, rows: int, batch: int, dtype, device) -> Tensor:
    """What the sum of the kept rows' divergences is divided by (a 0-d tensor; no host read of the mask):
    'none', 'sum': 1. 'mean': the number of kept rows (no kept rows: 0/0 = NaN, as cross_entropy's 'mean').
    'batchmean': with a target, the number of kept rows but at least 1 (no kept rows: 0, as TRL); without a
    target, the batch size input.shape[0] but at least 1 (as torch's kl_div and TRL)."""
    if reduction in ("none", "sum"):
        return torch.ones((), dtype=dtype, device=device)
    if valid is None:
        count = torch.tensor(float(batch if reduction == "batchmean" else rows), dtype=dtype, device=device)
    else:
        count = valid.sum().to(dtype)
    return count.clamp_min(1.0) if reduction == "batchmean" else count
