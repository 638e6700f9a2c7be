"""Shared helpers for the tests that hold xentlib to torch 2.13: one comparison helper, one error helper.

`check_against_torch(ours, theirs, *args, **kwargs)` is the workhorse: it calls both functions on independent
copies of the same tensors and requires the same outcome, i.e. either the same exception type, or the same
output (value, dtype, shape, NaN/inf positions) and the same gradients for every tensor argument that requires
grad, under a random grad_output.

Test modules import these helpers with `from conftest import ...`. pytest imports every non-package
conftest.py under the name "conftest", so a tests/<dir>/conftest.py would shadow this one for modules collected
after it: give such a directory an __init__.py, or keep its helpers in a differently named module.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

# (rtol, atol) for comparing xentlib with torch in a given dtype. float64 and float32: both sides compute the
# same formula, only the summation order differs. float16/bfloat16: torch rounds intermediate results to the
# half type (we accumulate in float32 and round once), so the two may differ by a few half ulps.
TOLERANCES = {
    torch.float64: (1e-9, 1e-11),
    torch.float32: (2e-5, 2e-6),
    torch.float16: (4e-3, 2e-3),
    torch.bfloat16: (3e-2, 2e-2),
}
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def tolerance(*dtypes: torch.dtype) -> tuple[float, float]:
    """The loosest tolerance among `dtypes` (integer dtypes compare exactly)."""
    tols = [TOLERANCES[d] for d in dtypes if d in TOLERANCES]
    return (max(t[0] for t in tols), max(t[1] for t in tols)) if tols else (0.0, 0.0)


def assert_same(actual, expected, what: str = "", tol: tuple[float, float] | None = None, truth=None) -> None:
    """Same result type, shape, dtype; values within tolerance; NaN and +-inf where torch has them.

    `truth` (optional, same structure) is a float64 evaluation: where we differ from torch by more than the
    tolerance, we pass if our error against it is at most torch's own (plus the tolerance), because torch's
    half-precision kernels round intermediate results and a more accurate answer is welcome.
    Tuples/lists compare element by element; None only equals None.
    """
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: got {actual!r}, torch gives {expected!r}"
        return
    if isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), what
        truths = truth if truth is not None else [None] * len(expected)
        for i, (a, e, t) in enumerate(zip(actual, expected, truths, strict=True)):
            assert_same(a, e, f"{what}[{i}]", tol, t)
        return
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != torch's {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != torch's {expected.dtype}"
    assert actual.requires_grad == expected.requires_grad, f"{what}: requires_grad differs from torch's"
    rtol, atol = tol if tol is not None else tolerance(expected.dtype)
    actual, expected = actual.detach(), expected.detach()
    if truth is not None and actual.is_floating_point():
        ours_err, torch_err = _error(actual, truth), _error(expected, truth)
        allowed = torch_err + atol + rtol * truth.detach().double().abs()
        at_least_as_good = (ours_err <= allowed) & torch_err.isfinite()  # non-finite results must match torch
        actual = torch.where(at_least_as_good, expected, actual)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _error(value: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    return (value.double() - truth.detach().double()).abs()


def assert_same_error(ours, theirs, words: str | None = None) -> BaseException:
    """`theirs()` raises; `ours()` raises exactly the same exception type, with `words` in both messages."""
    with pytest.raises(Exception) as expected:
        theirs()
    with pytest.raises(Exception) as actual:
        ours()
    assert type(actual.value) is type(expected.value), (
        f"xentlib raised {type(actual.value).__name__}({actual.value}), torch {type(expected.value).__name__}"
        f"({expected.value})"
    )
    if words is not None:
        assert words in str(expected.value), f"torch's message changed: {expected.value}"
        assert words in str(actual.value), f"xentlib's message lacks {words!r}: {actual.value}"
    return actual.value


def fresh_copy(value):
    """An independent leaf with the same values, strides (non-contiguity survives) and requires_grad."""
    if not isinstance(value, torch.Tensor):
        return value
    copy = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=value.device)
    with torch.no_grad():
        copy.copy_(value.detach())
    return copy.requires_grad_(value.requires_grad)


def random_like(tensor: torch.Tensor, seed: int) -> torch.Tensor:
    """A reproducible random grad_output for `tensor` (away from 1, so the scaling is tested too)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(tensor.shape, generator=g, dtype=torch.float64) + 0.5).to(tensor.dtype)


def _run(fn, args, kwargs):
    """Call fn on fresh copies; return (outputs, leaves needing grad, warning categories) or the exception."""
    args = [fresh_copy(a) for a in args]
    kwargs = {k: fresh_copy(v) for k, v in kwargs.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - compared with torch's exception below
            return error, [], []
    leaves = [t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor) and t.requires_grad]
    categories = sorted({w.category.__name__ for w in caught if issubclass(w.category, (UserWarning, FutureWarning))})
    return out, leaves, categories


def upcast(value):
    """A float64 copy of a floating tensor (anything else unchanged) that keeps requires_grad."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double().requires_grad_(value.requires_grad)
    return value


def check_against_torch(ours, theirs, *args, tol=None, words: str | None = None, seed: int = 0, **kwargs):
    """Run `theirs(*args, **kwargs)` and `ours(...)`; require the same exception type or the same results.

    Compared: output (value, dtype, shape, NaN/inf positions), the categories of user/future warnings, and the
    gradient wrt every tensor argument that requires grad, from torch.autograd.grad with a random grad_output.
    With float16/bfloat16 tensors, torch is also run in float64 and we may be closer to that than torch is.
    Returns our output (or exception) for further checks.
    """
    expected, expected_leaves, expected_warnings = _run(theirs, args, kwargs)
    actual, actual_leaves, actual_warnings = _run(ours, args, kwargs)
    if isinstance(expected, Exception):
        assert isinstance(actual, Exception), f"torch raised {type(expected).__name__}({expected}), xentlib did not"
        assert type(actual) is type(expected), (
            f"xentlib raised {type(actual).__name__}({actual}), torch {type(expected).__name__}({expected})"
        )
        if words is not None:
            assert words in str(expected), f"torch's message changed: {expected}"
            assert words in str(actual), f"xentlib's message lacks {words!r}: {actual}"
        return actual
    if isinstance(actual, Exception):
        raise AssertionError(f"xentlib raised {type(actual).__name__}: {actual}; torch did not") from actual
    assert actual_warnings == expected_warnings, f"warnings {actual_warnings} != torch's {expected_warnings}"
    tensors = [t for t in [*args, *kwargs.values(), expected] if isinstance(t, torch.Tensor)]
    if tol is None:
        tol = tolerance(*(t.dtype for t in tensors))
    truth = truth_leaves = None
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors):
        truth, truth_leaves, _ = _run(theirs, [upcast(a) for a in args], {k: upcast(v) for k, v in kwargs.items()})
    assert_same(actual, expected, "output", tol, truth)
    grad_output = random_like(expected, seed) if expected.is_floating_point() else None
    expected_grads = gradients(expected, expected_leaves, grad_output)
    actual_grads = gradients(actual, actual_leaves, grad_output)
    truth_grads = None if truth is None else gradients(truth, truth_leaves, grad_output)
    if expected_grads is None:
        assert actual_grads is None, "xentlib's output requires grad but torch's does not"
        return actual
    assert actual_grads is not None, "xentlib's output does not require grad but torch's does"
    for i, (a, e) in enumerate(zip(actual_grads, expected_grads, strict=True)):
        if e is None:  # torch reports no dependence; ours may give zeros
            assert a is None or not bool(a.any()), f"grad[{i}]: torch has none, xentlib is nonzero"
            continue
        assert_same(a, e, f"grad[{i}]", tol, None if truth_grads is None else truth_grads[i])
    return actual


def gradients(output, leaves, grad_output):
    """d(output)/d(leaves) for grad_output (cast to the output dtype); None when nothing needs grad."""
    if not leaves or not output.requires_grad:
        return None
    return torch.autograd.grad(output, leaves, grad_output.to(output.dtype), allow_unused=True)


def composed_cross_entropy(
    x, t, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
    normalizer=None,
):  # fmt: skip
    """The pinned extension semantics written with torch ops in float64, cast to torch's output dtype.

    y = softcap tanh(x / softcap); row = torch's 'none' loss on y + z_loss lse(y)^2 on non-ignored rows;
    'mean' divides the sum by torch's own denominator (weighted count, or row count for probabilities);
    'sum' divides by the normalizer.
    """
    probabilities = x.shape == t.shape
    out_dtype = torch.promote_types(x.dtype, t.dtype) if probabilities else x.dtype
    if probabilities and weight is not None:
        out_dtype = torch.promote_types(out_dtype, weight.dtype)
    y = x.double()
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    w = None if weight is None else weight.double()
    target = t.double() if probabilities else t
    rows = F.cross_entropy(y, target, w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(y, 0 if x.dim() == 1 else 1)
    valid = torch.ones_like(lse, dtype=torch.bool) if probabilities else t != ignore_index
    rows = rows + torch.where(valid, z_loss * lse * lse, 0.0)
    if reduction == "none":
        return rows.to(out_dtype)
    total = rows.sum()
    if reduction == "mean":
        if probabilities:
            count = torch.tensor(float(lse.numel()), dtype=torch.float64)
        elif w is None:
            count = valid.sum().double()
        else:
            count = torch.where(valid, w[torch.where(valid, t, 0)], 0.0).sum()
        total = total / count
    elif normalizer is not None:
        total = total / normalizer
    return total.to(out_dtype)
