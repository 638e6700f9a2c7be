"""The canonical cross-entropy problem: the checks that read no data (`CrossEntropyCall`), and the tensors
built from a call inside the torch op (`problem_tensors`), class-index bounds included."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from xentlib._semantics.arguments import (
    accumulation_dtype,
    check_extensions,
    check_floating_input,
    check_ignore_index,
    check_label_smoothing,
    check_not_requires_grad,
    check_smoothing_range,
    check_tensor,
    dtype_name,
    shape_list,
)

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
    # every field by name (like the keyword calls of nn.py and the transformers integration, sharing no logic with
    # them): many are tensors or floats that a positional slip would swap silently
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
    return torch.full((), value, dtype=acc, device=device)  # a factory op, which tracers record as a node


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
