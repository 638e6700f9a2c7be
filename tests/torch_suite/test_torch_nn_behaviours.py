"""Behaviours tested by torch's test/test_nn.py for the family, re-expressed here and run against xentlib."""

from __future__ import annotations

import pytest
import torch

import xentlib.functional as XF


# --- found by this suite -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5)])
def test_none_reduction_gradient_keeps_float64(shape):
    """reduction='none' scales the saved gradient by grad_output per element; in float64 that product must not
    pass through float32 (it did: ~1e-8 errors, found by ModuleInfo's CrossEntropyLoss samples)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(3, (shape[0], *shape[2:]), generator=g)
    grad_output = torch.rand(t.shape, dtype=torch.float64, generator=g) + 0.5
    ours = torch.autograd.grad(XF.cross_entropy(x, t, reduction="none"), x, grad_output)[0]
    theirs = torch.autograd.grad(torch.nn.functional.cross_entropy(x, t, reduction="none"), x, grad_output)[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-14, atol=1e-15)
