"""The same loss from every implementation within reach: xentlib.reference, torch, xentlib.functional."""

from __future__ import annotations

import numpy as np

from xentlib.cli._shared import one_line
from xentlib.cli.explain.problem import Problem

AGREEMENT_TOLERANCE = 1e-9  # float64 against float64: only rounding differences are expected


def torch_loss(problem: Problem, x=None):
    """The loss from torch in float64 (x replaces the first argument, for the --plot sweep)."""
    import torch
    import torch.nn.functional as F

    tensor = lambda a: None if a is None else torch.from_numpy(a)
    x = tensor(problem.logits) if x is None else x
    weight, reduction = tensor(problem.weight), problem.reduction
    if problem.op in ("bce", "bce_with_logits"):
        y = tensor(problem.target)
        if problem.op == "bce":
            return F.binary_cross_entropy(x, y, weight=weight, reduction=reduction)
        return F.binary_cross_entropy_with_logits(
            x, y, weight=weight, reduction=reduction, pos_weight=tensor(problem.pos_weight)
        )
    target = tensor(problem.target) if problem.probability_target else tensor(problem.target).long()
    options = dict(weight=weight, ignore_index=problem.ignore_index, reduction=reduction)
    if problem.op == "nll_loss":
        return F.nll_loss(x, target, **options)
    if problem.op == "linear":
        logits = F.linear(x, tensor(problem.linear_weight), tensor(problem.bias))
        return F.cross_entropy(logits, target, label_smoothing=problem.label_smoothing, **options)
    return F.cross_entropy(x, target, label_smoothing=problem.label_smoothing, **options)


def torch_fused_linear_loss(problem: Problem):
    import torch
    import torch.nn.functional as F

    tensor = lambda a: None if a is None else torch.from_numpy(a)
    return F.linear_cross_entropy(
        tensor(problem.logits),
        tensor(problem.linear_weight),
        tensor(problem.target).long() if not problem.probability_target else tensor(problem.target),
        linear_bias=tensor(problem.bias),
        weight=tensor(problem.weight),
        reduction=problem.reduction,
        ignore_index=None if problem.probability_target else problem.ignore_index,  # torch: None only there
        label_smoothing=problem.label_smoothing,
    )


FUNCTION_NAMES = {
    "cross_entropy": "cross_entropy",
    "nll_loss": "nll_loss",
    "bce": "binary_cross_entropy",
    "bce_with_logits": "binary_cross_entropy_with_logits",
    "linear": "linear_cross_entropy",
}


def library_call(problem: Problem, module, as_array):
    """Call `module.<op>` with torch's signature; `as_array` turns numpy inputs into the module's arrays."""
    function = getattr(module, FUNCTION_NAMES[problem.op])
    x, weight = as_array(problem.logits), None if problem.weight is None else as_array(problem.weight)
    target = as_array(problem.target)
    if problem.op in ("bce", "bce_with_logits"):
        options = {"weight": weight, "reduction": problem.reduction}
        if problem.pos_weight is not None:
            options["pos_weight"] = as_array(problem.pos_weight)
        return function(x, target, **options)
    if not problem.probability_target:
        target = as_array(problem.target.astype("int64"))
    options = {"weight": weight, "ignore_index": problem.ignore_index, "reduction": problem.reduction}
    if problem.op != "nll_loss":
        options["label_smoothing"] = problem.label_smoothing
    if problem.op == "linear":  # `weight` is the layer's there; the class weights go by another name
        options.pop("weight")
        if weight is not None:
            options["class_weight"] = weight
        bias = None if problem.bias is None else as_array(problem.bias)
        return function(x, as_array(problem.linear_weight), target, bias=bias, **options)
    return function(x, target, **options)


def cross_checks(problem: Problem):
    """[(source, value or None, note)] from every implementation we can reach."""
    checks = []

    def attempt(source, compute):
        try:
            checks.append((source, to_numpy(compute()), ""))
        except (ImportError, AttributeError, NotImplementedError):
            checks.append((source, None, "not available yet"))
        except Exception as error:  # show, do not hide: a disagreement in how an error is raised is a finding
            checks.append((source, None, f"{type(error).__name__}: {one_line(error)}"))

    def reference():
        from xentlib import reference as module

        return library_call(problem, module, lambda a: np.asarray(a))

    def functional():
        import torch

        from xentlib import functional as module

        return library_call(problem, module, torch.from_numpy)

    name = FUNCTION_NAMES[problem.op]
    attempt(f"xentlib.reference.{name}", reference)
    attempt(
        f"torch (F.{'linear + F.cross_entropy' if problem.op == 'linear' else name})",
        lambda: torch_loss(problem),
    )
    if problem.op == "linear":
        attempt("torch F.linear_cross_entropy", lambda: torch_fused_linear_loss(problem))
    attempt(f"xentlib.functional.{name}", functional)
    return checks


def to_numpy(value):
    if hasattr(value, "detach"):
        value = value.detach().cpu().double().numpy()
    return np.asarray(value, dtype=np.float64)


def max_difference(a, b) -> float:
    """Largest |a - b|, where equal infinities and NaN against NaN count as agreement."""
    a, b = np.broadcast_arrays(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    if a.shape != b.shape:
        return float("inf")
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        return float(np.max(np.where(same, 0.0, np.abs(a - b)), initial=0.0))


def agrees(a, b) -> bool:
    if np.shape(a) != np.shape(b):
        return False
    scale = max(1.0, float(np.max(np.abs(np.nan_to_num(np.asarray(a), posinf=0, neginf=0)), initial=0.0)))
    return max_difference(a, b) <= AGREEMENT_TOLERANCE * scale
