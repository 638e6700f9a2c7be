"""The cross-entropy family with `torch.nn.functional`'s signatures, defaults, results, gradients and errors.

Swap `torch.nn.functional` for `xentlib.functional` and nothing changes but speed and memory. Extensions are
keyword-only and off by default: `z_loss`, `softcap`, `normalizer`, `return_stats`, `backend`, `chunk_size`,
`inplace_backward`. The rules live in `xentlib._semantics`; the arithmetic in `xentlib.backends`.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from xentlib import _semantics as sem
from xentlib.backends import common_call
from xentlib.backends import ops as _ops  # registers torch.ops.xentlib.*
from xentlib.backends.bce import BinaryCrossEntropyFunction, BinaryCrossEntropyWithLogitsFunction
from xentlib.backends.composite import CrossEntropyStats, composite_rows, reduce_rows
from xentlib.backends.composite import transforms_active as _transformed
from xentlib.backends.dispatch import BACKENDS, traced
from xentlib.backends.inplace import InplaceCrossEntropy, check_writable
from xentlib.backends.softmax import SoftmaxFunction

__all__ = [
    "CrossEntropyStats",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "cross_entropy",
    "log_softmax",
    "nll_loss",
    "softmax",
]


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    normalizer: float | Tensor | None = None,
    return_stats: bool = False,
    backend: str = "auto",
    chunk_size: int | None = None,
    inplace_backward: bool = False,
):
    r"""Cross-entropy between logits and class indices or class probabilities, as `torch.nn.functional`.

    For a row with logits :math:`x`, log-probabilities :math:`\log p_c = x_c - \log\sum_k e^{x_k}` and class
    index :math:`t`: :math:`\ell = -w_t \log p_t`; with probabilities :math:`q`:
    :math:`\ell = -\sum_c w_c q_c \log p_c`. Label smoothing :math:`\varepsilon` mixes in the uniform
    distribution, exactly as torch does. 'mean' divides by :math:`\sum w_{t_n}` over non-ignored rows (class
    indices) or by the number of rows (probabilities).

    Args:
        input: logits of shape (C), (N, C) or (N, C, d1, ..., dk).
        target: class indices (), (N) or (N, d1, ..., dk) (int64, or uint8 for inputs of at most 2 dims), or
            class probabilities of the input's shape.
        weight: per-class weight of shape (C), same dtype as the input for class indices.
        size_average, reduce: deprecated, as in torch (they override `reduction`, with a warning).
        ignore_index: a class-index target value that contributes neither loss nor gradient.
        reduction: 'none' | 'mean' | 'sum'.
        label_smoothing: in [0, 1]; torch's rule: values <= 0 or NaN mean no smoothing, > 1 raises.
        z_loss: keyword-only; adds `z_loss * lse**2` per non-ignored row (unweighted).
        softcap: keyword-only; logits become `softcap * tanh(logits / softcap)` before anything else.
        normalizer: keyword-only, with reduction='sum': the sum is divided by it (a number or 0-d tensor), the
            way to get the exact global token mean under gradient accumulation and data parallelism.
        return_stats: keyword-only; also return `CrossEntropyStats(lse, loss, argmax, correct, entropy)` per row.
        backend: 'auto' | 'cpu' | 'torch' | 'triton' (see `xentlib.backends.explain_dispatch`).
        chunk_size: rows per chunk of the PyTorch ops (default: about 8 MiB of float32 per chunk). Giving it on
            CPU runs the chunked PyTorch ops instead of the compiled kernel, which has no chunks.
        inplace_backward: write the gradient into the logits' memory (they are marked as modified): no extra
            gradient-sized buffer at all. The logits' values are lost after the call.

    Example::

        >>> logits = torch.tensor([[0.0541, 0.1762, 0.9489], [-0.0288, -0.8072, 0.4909]])
        >>> cross_entropy(logits, torch.tensor([0, 2]), reduction="none")
        tensor([1.5210, 0.6247])
    """
    if _only_common_options(weight, size_average, reduce, label_smoothing, z_loss, softcap, normalizer, return_stats,
                            backend, chunk_size, inplace_backward):  # fmt: skip
        loss = common_call.cross_entropy(input, target, ignore_index, reduction)
        if loss is not None:
            return loss
    reduction = sem.resolve_reduction(size_average, reduce, reduction)
    autocast = _runs_in_float32(input)
    call = sem.check_cross_entropy(
        input, target, weight, ignore_index, reduction, label_smoothing,
        z_loss=z_loss, softcap=softcap, normalizer=normalizer, autocast=autocast,
    )  # fmt: skip
    if autocast:  # torch's autocast runs cross_entropy in float32: so do we, from the logits as they are
        call.output_dtype = torch.promote_types(call.output_dtype, torch.float32)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(repr(b) for b in BACKENDS)}, got {backend!r}")
    chunk = sem.check_chunk_size(chunk_size)
    if _transformed(input, target, weight):
        loss, stats = _composite_cross_entropy(call, return_stats)
    elif inplace_backward and not traced():
        _check_inplace(input, target, weight, return_stats)
        problem = sem.problem_from_call(call)
        loss, stats = InplaceCrossEntropy.apply(input, problem, _ops.rows_for(problem, backend, chunk)), None
    else:
        loss, stats = _fused_cross_entropy(call, backend, chunk, return_stats)
    if not return_stats:
        return loss
    return loss, CrossEntropyStats(**stats, correct=_correct(call, target, stats["argmax"]))


def _only_common_options(weight, size_average, reduce, smoothing, z_loss, softcap, normalizer, return_stats,
                         backend, chunk_size, inplace_backward) -> bool:  # fmt: skip
    """Every option but ignore_index and reduction at its default: a call `backends/common_call.py` may take."""
    return (
        weight is None
        and size_average is None
        and reduce is None
        and type(smoothing) is float
        and smoothing == 0.0
        and type(z_loss) is float
        and z_loss == 0.0
        and softcap is None
        and normalizer is None
        and return_stats is False
        and backend == "auto"
        and chunk_size is None
        and inplace_backward is False
    )


def _fused_cross_entropy(call: sem.CrossEntropyCall, backend: str, chunk: int, return_stats: bool):
    """The op of backends/ops.py: the loss, and the statistics reshaped to the caller's shape."""
    with_grad = torch.is_grad_enabled() and call.logits.requires_grad
    normalizer, normalizer_value = sem.normalizer_operands(call.normalizer)
    op = _ops.traced_op(call.logits) if traced() else _ops.eager_cross_entropy
    loss, _, lse, entropy, row_loss, argmax = op(
        call.logits, call.target, call.weight, normalizer, normalizer_value, call.ignore_index, call.reduction,
        call.smoothing, call.z_loss, call.softcap, call.output_dtype, with_grad, return_stats, backend, chunk,
    )  # fmt: skip
    if call.reduction == "none":
        loss = loss.reshape(call.output_shape)
    if not return_stats:
        return loss, None
    return loss, _stats_in_output_shape(call, lse=lse, loss=row_loss, argmax=argmax, entropy=entropy)


def _composite_cross_entropy(call: sem.CrossEntropyCall, return_stats: bool):
    """Plain differentiable torch ops (backends/composite.py), for the torch.func transforms and forward-mode
    AD, which differentiate them like any torch code. The targets are not bounds-checked here: a transform has
    no single value to report (an out-of-range index fails in the gather)."""
    problem = sem.problem_from_call(call, check_targets=False)
    rows, lse, entropy = composite_rows(problem, problem.logits, problem.target, call.weight)
    loss = reduce_rows(problem, rows).to(call.output_dtype)
    if not return_stats:
        return loss, None
    argmax = problem.logits.detach().argmax(1)
    return loss, _stats_in_output_shape(call, lse=lse, loss=rows.to(call.output_dtype), argmax=argmax, entropy=entropy)


def _stats_in_output_shape(call: sem.CrossEntropyCall, **stats: Tensor) -> dict[str, Tensor]:
    """The per-row statistics, each reshaped from rows to the shape of a reduction='none' output."""
    return {name: value.reshape(call.output_shape) for name, value in stats.items()}


def _runs_in_float32(input: Tensor) -> bool:
    """Whether torch's autocast would run the loss in float32 for this input (it does on every device)."""
    return input.is_floating_point() and torch.is_autocast_enabled(input.device.type)


def _check_inplace(input: Tensor, target: Tensor, weight: Tensor | None, return_stats: bool) -> None:
    """In-place gradients overwrite the logits, so nothing else may need them later."""
    if return_stats:
        raise ValueError("inplace_backward=True cannot be combined with return_stats=True (stats need the logits)")
    for name, tensor in (("target", target), ("weight", weight)):
        if tensor is not None and tensor.requires_grad:
            raise ValueError(f"inplace_backward=True cannot compute a gradient for the {name}; detach it")
    if input.requires_grad and torch.is_grad_enabled():
        check_writable(input)


def _correct(call: sem.CrossEntropyCall, target: Tensor, argmax: Tensor) -> Tensor:
    if call.kind == "prob":
        return argmax == target.detach().argmax(sem.class_dim_of(target))
    index = call.target.reshape(call.output_shape)
    return (argmax == index) & (index != call.ignore_index)


# torch.nn.functional.nll_loss's signature parameter for parameter (as cross_entropy above mirrors torch's): a
# drop-in replacement keeps torch's parameters even where they repeat.
def nll_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r"""Negative log-likelihood: :math:`\ell_n = -w_{t_n} x_{n, t_n}`, as `torch.nn.functional.nll_loss`.

    The input holds log-probabilities (e.g. from `log_softmax`); it is not checked. 'mean' divides by the sum of
    the selected weights of the non-ignored targets (NaN when that is 0, with zero gradients).

    Example::

        >>> log_p = log_softmax(torch.tensor([[2.0, 0.5, 0.3], [0.2, 2.0, 0.5]]), dim=1)
        >>> nll_loss(log_p, torch.tensor([0, 1]))
        tensor(0.3344)
    """
    reduction = sem.resolve_reduction(size_average, reduce, reduction)
    autocast = _runs_in_float32(input)
    call = sem.check_nll_loss(input, target, weight, ignore_index, reduction, autocast=autocast)
    out_dtype = torch.float32 if autocast and input.dtype != torch.float64 else input.dtype
    problem = sem.problem_from_call(call, check_targets=not _transformed(input))
    # A gather is the whole computation, so plain differentiable torch ops are the fused path here.
    rows_view = sem.as_rows(input)
    if rows_view.shape[1] == 0:  # no classes: all targets were ignored (others raised); sum() keeps the graph
        picked = rows_view.sum(1)
    else:
        picked = rows_view.gather(1, problem.target.unsqueeze(1)).squeeze(1)
    rows = -(picked.to(problem.acc_dtype) * problem.target_weight)
    rows = torch.where(problem.valid, rows, torch.zeros((), dtype=rows.dtype, device=rows.device))
    if reduction == "none":
        return rows.reshape(call.output_shape).to(out_dtype)
    return (rows.sum() / problem.denominator).to(out_dtype)


def _softmax_dim(name: str, input: Tensor, dim, stacklevel: int) -> int:
    if dim is None:
        warnings.warn(
            f"Implicit dimension choice for {name} has been deprecated. Change the call to include dim=X as an "
            "argument.",
            UserWarning,
            stacklevel=stacklevel,
        )
        return 0 if input.dim() in (0, 1, 3) else 1
    return dim


def _normalize_dim(dim, ndim: int) -> int:
    low, high = (-1, 0) if ndim == 0 else (-ndim, ndim - 1)
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim must be an int, got {type(dim).__name__}")
    if not low <= dim <= high:
        raise IndexError(f"Dimension out of range (expected to be in range of [{low}, {high}], but got {dim})")
    return dim % max(ndim, 1)


def _softmax_common(name: str, input: Tensor, dim, stacklevel: int, dtype, log: bool) -> Tensor:
    sem.check_tensor(name, "input", 1, input)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}(): argument 'dtype' must be torch.dtype, not {type(dtype).__name__}")
    dim = _softmax_dim(name, input, dim, stacklevel + 1)
    if dtype is not None:
        input = input.to(dtype)
    dim = _normalize_dim(dim, input.dim())
    if not input.is_floating_point() and input.numel() > 0:  # torch passes empty tensors of any dtype through
        kernel = f"{name}_lastdim_kernel_impl" if dim == max(input.dim() - 1, 0) else f"{name}_kernel_impl"
        sem.check_floating_input(kernel, input)
    if _transformed(input):  # torch.func / forward-mode AD: torch's own kernel, which carries their rules
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        return (torch.log_softmax if log else torch.softmax)(input.to(acc), dim).to(input.dtype)
    return SoftmaxFunction.apply(input, dim, log)


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None):
    r""":math:`\log p_i = x_i - m - \log \sum_j e^{x_j - m}` with :math:`m = \max_j x_j` (stable).

    Example::

        >>> log_softmax(torch.tensor([1e4, 0.0, -1e4]), dim=0)
        tensor([     0., -10000., -20000.])
    """
    return _softmax_common("log_softmax", input, dim, _stacklevel, dtype, log=True)


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None):
    r""":math:`p_i = e^{x_i - m} / \sum_j e^{x_j - m}` with :math:`m = \max_j x_j` (stable).

    Example::

        >>> softmax(torch.tensor([1.0, 1.0]), dim=0)
        tensor([0.5000, 0.5000])
    """
    return _softmax_common("softmax", input, dim, _stacklevel, dtype, log=False)


def _check_broadcast(name: str, tensor: Tensor | None, shape: torch.Size, may_enlarge: bool = False) -> None:
    """`tensor` must broadcast to `shape` without enlarging it (torch's TensorIterator rule). may_enlarge:
    only the broadcast itself is checked (binary_cross_entropy checks the enlargement last, in its kernel)."""
    if tensor is None:
        return
    try:
        result = torch.broadcast_shapes(shape, tensor.shape)
    except RuntimeError:
        raise RuntimeError(
            f"The size of {name} {sem.shape_list(tensor.shape)} must match the input size {sem.shape_list(shape)} "
            f"at every non-singleton dimension (right-aligned broadcasting)"
        ) from None
    if result != shape and not may_enlarge:
        raise RuntimeError(
            f"output with shape {sem.shape_list(shape)} doesn't match the broadcast shape {sem.shape_list(result)} "
            f"({name} of shape {sem.shape_list(tensor.shape)} may not enlarge the output)"
        )


def binary_cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> Tensor:
    r""":math:`\ell = -w\,[y \max(\log x, -100) + (1 - y) \max(\log(1 - x), -100)]` on probabilities x in [0, 1].

    Example::

        >>> binary_cross_entropy(torch.tensor([0.0, 0.5]), torch.tensor([1.0, 1.0]), reduction="none")
        tensor([100.0000,   0.6931])
    """
    reduction = sem.resolve_reduction(size_average, reduce, reduction)
    fn = "binary_cross_entropy"
    sem.check_tensor(fn, "input", 1, input)
    sem.check_tensor(fn, "target", 2, target)
    sem.check_tensor(fn, "weight", 3, weight, optional=True)
    if target.shape != input.shape:
        raise ValueError(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}) is "
            "deprecated. Please ensure they have the same size."
        )
    # torch's order: broadcastable weight, weight requires_grad, target dtype, input dtype, value ranges, and
    # last a weight that would enlarge the output
    _check_broadcast("weight", weight, input.shape, may_enlarge=True)
    sem.check_not_requires_grad(fn, "weight", weight)
    if target.dtype != input.dtype:
        raise RuntimeError(
            f"Found dtype {sem.dtype_name(target.dtype)} but expected {sem.dtype_name(input.dtype)} "
            "(the target must have the input's dtype)"
        )
    sem.check_floating_input(fn, input)
    _check_unit_interval("input", input, " (binary_cross_entropy takes probabilities)")
    _check_unit_interval("target", target, "")
    _check_broadcast("weight", weight, input.shape)
    if _transformed(input, target):  # torch.func / forward-mode AD: torch's own op, which carries their rules
        if weight is not None:
            weight = weight.expand(torch.broadcast_shapes(target.shape, weight.shape))
        return torch._C._nn.binary_cross_entropy(input, target, weight, _reduction_enum(reduction))
    return BinaryCrossEntropyFunction.apply(input, target, weight, reduction)


def _reduction_enum(reduction: str) -> int:
    """torch's aten ops take the reduction as an enum. They are called directly (not through
    torch.nn.functional) so that code which swaps torch.nn.functional for xentlib does not recurse."""
    return torch.nn._reduction.get_enum(reduction)


def _check_unit_interval(name: str, tensor: Tensor, detail: str) -> None:
    """torch's range check of binary_cross_entropy: on the host in eager mode (its RuntimeError); inside a
    compiled graph or on an accelerator a device-side assertion, which does not synchronise."""
    outside = (tensor < 0) | (tensor > 1) | tensor.isnan()
    message = f"all elements of {name} should be between 0 and 1{detail}"
    if _transformed(tensor):  # torch's own op runs there, with its own check
        return
    if traced() or tensor.device.type != "cpu":
        torch._assert_async(~outside.any(), message)
    elif bool(outside.any()):
        raise RuntimeError(message)


def binary_cross_entropy_with_logits(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    size_average: bool | None = None,
    reduce: bool | None = None,
    reduction: str = "mean",
    pos_weight: Tensor | None = None,
) -> Tensor:
    r""":math:`\ell = w\,[(1 - y)\,x + (1 + (p - 1)\,y)\,\mathrm{softplus}(-x)]`, p = `pos_weight` (stable).

    The output has the target's dtype, as in torch.

    Example::

        >>> binary_cross_entropy_with_logits(torch.tensor([-1e4]), torch.tensor([1.0]))
        tensor(10000.)
    """
    reduction = sem.resolve_reduction(size_average, reduce, reduction)
    fn = "binary_cross_entropy_with_logits"
    sem.check_tensor(fn, "input", 1, input)
    sem.check_tensor(fn, "target", 2, target)
    sem.check_tensor(fn, "weight", 3, weight, optional=True)
    sem.check_tensor(fn, "pos_weight", 7, pos_weight, optional=True)
    if target.shape != input.shape:
        raise ValueError(f"Target size ({target.size()}) must be the same as input size ({input.size()})")
    sem.check_not_requires_grad(fn, "weight", weight)
    sem.check_not_requires_grad(fn, "pos_weight", pos_weight)
    sem.check_floating_input("log_sigmoid_cpu", input)
    if target.dtype == torch.bool:
        raise RuntimeError(
            "Subtraction, the `-` operator, with two bool tensors is not supported. Use the `^` or `logical_xor()` "
            "operator instead. (binary_cross_entropy_with_logits needs a floating point target)"
        )
    if not target.is_floating_point():
        result = torch.promote_types(input.dtype, target.dtype)
        raise RuntimeError(
            f"result type {sem.dtype_name(result)} can't be cast to the desired output type "
            f"{sem.dtype_name(target.dtype)} (the output takes the target's dtype: pass a floating point target)"
        )
    _check_broadcast("pos_weight", pos_weight, input.shape)
    _check_broadcast("weight", weight, input.shape)
    if _transformed(input, target):  # torch.func / forward-mode AD: torch's own op, which carries their rules
        return torch.binary_cross_entropy_with_logits(input, target, weight, pos_weight, _reduction_enum(reduction))
    out_dtype = target.dtype
    if _runs_in_float32(input) and out_dtype != torch.float64:  # torch's autocast runs it in float32
        out_dtype = torch.float32
    return BinaryCrossEntropyWithLogitsFunction.apply(input, target, weight, pos_weight, reduction, out_dtype)


from xentlib.linear import linear_cross_entropy  # noqa: E402, F401  (re-exported: part of the functional API)

__all__.append("linear_cross_entropy")
