"""Arguments every loss of the family shares: reductions and the legacy flags, Python-level argument types,
dtype names, and the keyword-only extensions."""

from __future__ import annotations

import math
import numbers
import warnings

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


def check_head_bias_and_dtype(fn: str, input: Tensor, weight: Tensor, bias: Tensor | None, names=("weight", "bias")):
    """The operands of a linear head `input @ weight.T + bias`: a (V, D) weight takes a (V,) bias, and both have
    the input's dtype (`names`: how the function calls its weight and bias)."""
    weight_name, bias_name = names
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"{fn}: {bias_name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, other in ((weight_name, weight), (bias_name, bias)):
        if other is not None and other.dtype != input.dtype:
            raise RuntimeError(
                f"{fn}: expected {name} to have the input's dtype {dtype_name(input.dtype)}, "
                f"got {dtype_name(other.dtype)}"
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


def check_chunk_size(chunk_size, fn: str | None = None) -> int:
    """Rows per chunk as the torch ops take it: a positive int, or 0 for None (the backend's default)."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        prefix = f"{fn}: " if fn else ""
        raise ValueError(f"{prefix}chunk_size must be a positive int (rows per chunk), got {chunk_size!r}")
    return chunk_size


def normalizer_operands(normalizer) -> tuple[Tensor | None, float]:
    """A checked normalizer as the torch ops take it: (a 0-d tensor or None, a number > 0 or 0 for none)."""
    if isinstance(normalizer, Tensor):
        return normalizer, 0.0
    return None, 0.0 if normalizer is None else float(normalizer)


def normalizer_from_operands(tensor: Tensor | None, value: float) -> Tensor | float | None:
    """The inverse of `normalizer_operands`, inside an op."""
    return tensor if tensor is not None else (value if value > 0 else None)
