"""return_stats on rows whose maximum is tied: the arg-max is the FIRST maximal class, as torch.argmax gives, on
every CPU path (the compiled kernel for float32/bfloat16 rows, the PyTorch ops for float64 and soft-capping, and
linear_cross_entropy). Random logits almost never tie, so the comparisons against the PyTorch-ops path elsewhere
cannot tell the first maximal class from the last."""

from __future__ import annotations

import pytest
import torch

import xentlib
import xentlib.functional as X
from xentlib.backends import cpu_kernel


def tied_rows(rows: int, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """Row r has its maximum 2.0 at class r % C, at the last class (in the vector tail when C is not a multiple of
    16) and half-way between them; every other logit is in [-1, 0)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(rows, classes, generator=generator, dtype=torch.float64) - 1.0
    for r in range(rows):
        first = r % classes
        x[r, [first, (first + classes - 1) // 2, classes - 1]] = 2.0
    return x.to(dtype)


# The kernel's entry point (renamed fill_rows on main; the older name on the branch this test was written on).
KERNEL_ENTRY = next(name for name in ("fill_rows", "cross_entropy_rows") if hasattr(cpu_kernel, name))


def uses_kernel(x: torch.Tensor, target: torch.Tensor, monkeypatch, **options) -> bool:
    calls = []
    original = getattr(cpu_kernel, KERNEL_ENTRY)
    monkeypatch.setattr(cpu_kernel, KERNEL_ENTRY, lambda *a: calls.append(1) or original(*a))
    X.cross_entropy(x, target, return_stats=True, **options)
    monkeypatch.setattr(cpu_kernel, KERNEL_ENTRY, original)
    return bool(calls)


@pytest.mark.parametrize("classes", [5, 37])
@pytest.mark.parametrize(
    "dtype, options, kernel",
    [
        (torch.float32, {}, True),
        (torch.bfloat16, {}, True),
        (torch.float64, {}, False),
        (torch.float32, dict(softcap=30.0), False),
    ],
    ids=["float32-kernel", "bfloat16-kernel", "float64-ops", "softcap-ops"],
)
def test_cross_entropy_argmax_ties_go_to_the_first_class(dtype, options, kernel, classes, monkeypatch):
    x = tied_rows(9, classes, dtype)
    target = torch.zeros(9, dtype=torch.long)
    if kernel and not cpu_kernel.status()[0]:
        pytest.skip(cpu_kernel.status()[1])
    assert uses_kernel(x, target, monkeypatch, **options) is kernel
    _, stats = X.cross_entropy(x, target, return_stats=True, **options)
    expected = x.double().argmax(1)  # torch: the first maximal index
    assert stats.argmax.tolist() == expected.tolist()
    assert stats.correct.tolist() == (expected == target).tolist()


def test_linear_cross_entropy_argmax_ties_go_to_the_first_class():
    """Identity weight: the logits are the input rows, ties included."""
    x = tied_rows(9, 37, torch.float32)
    weight = torch.eye(37)
    target = torch.full((9,), 36, dtype=torch.long)
    _, stats = xentlib.linear_cross_entropy(x, weight, target, return_stats=True)
    assert stats.argmax.tolist() == x.argmax(1).tolist()
