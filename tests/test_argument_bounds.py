"""Integer arguments at the edges of int64, like torch: ignore_index in [-2**63, 2**63 - 1] is accepted (the
accepted edges are in test_errors.py), one past either edge raises torch's ValueError ("Overflow when unpacking
long long"). The overflow case in test_errors.py (2**64) is far from the edge and cannot tell `< 2**63` from
`<= 2**63`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import check_against_torch

import xentlib.functional as X


def logits() -> torch.Tensor:
    return torch.randn(4, 3, generator=torch.Generator().manual_seed(0))


TARGET = torch.tensor([0, 1, 2, 0])


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1], ids=["2**63", "-2**63-1"])
@pytest.mark.parametrize("fn", ["cross_entropy", "nll_loss"])
def test_ignore_index_one_past_int64_raises_like_torch(fn, ignore_index):
    input = logits() if fn == "cross_entropy" else torch.log_softmax(logits(), 1)
    error = check_against_torch(getattr(X, fn), getattr(F, fn), input, TARGET, ignore_index=ignore_index)
    assert isinstance(error, ValueError) and "Overflow" in str(error), error


def test_ignore_index_one_past_int64_with_probability_targets_raises_like_torch():
    probabilities = torch.softmax(logits(), 1)
    error = check_against_torch(X.cross_entropy, F.cross_entropy, logits(), probabilities, ignore_index=-(2**63) - 1)
    assert isinstance(error, ValueError), error
