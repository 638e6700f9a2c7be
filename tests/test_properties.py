"""Property-based: random shapes, options and dtypes; value and every gradient equal to torch's.

Hypothesis draws the problem (seeded, no deadline, a modest number of examples); the tensors come from a torch
generator seeded by the drawn seed, and `check_against_torch` compares the two libraries.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES, check_against_torch

import xentlib.functional as X

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies
given, settings = hypothesis.given, hypothesis.settings

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)
REDUCTIONS = st.sampled_from(["none", "mean", "sum"])


@st.composite
def cross_entropy_problems(draw):
    """(input shape, class count) with 1 to 3 extra dims, plus options for either target kind."""
    ndim = draw(st.integers(1, 4))
    dims = draw(st.lists(st.integers(0 if ndim > 1 else 1, 5), min_size=ndim, max_size=ndim))
    dims[0 if ndim == 1 else 1] = draw(st.integers(1, 9))  # at least one class
    return {
        "shape": tuple(dims),
        "dtype": draw(st.sampled_from(FLOAT_DTYPES)),
        "reduction": draw(REDUCTIONS),
        "weighted": draw(st.booleans()),
        "label_smoothing": draw(st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0])),
        "ignore_fraction": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "ignore_index": draw(st.sampled_from([-100, -1, 0, 3])),
        "scale": draw(st.sampled_from([0.1, 3.0, 30.0])),
        "seed": draw(st.integers(0, 2**16)),
    }


def tensors(problem, probabilities: bool):
    g = torch.Generator().manual_seed(problem["seed"])
    shape, dtype = problem["shape"], problem["dtype"]
    classes = shape[0] if len(shape) == 1 else shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * problem["scale"]).to(dtype).requires_grad_()
    w = None
    if problem["weighted"]:
        w = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.1).to(dtype)
        w.requires_grad_(probabilities)
    if probabilities:
        t = torch.rand(shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        return x, t, w
    target_shape = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = torch.randint(0, classes, target_shape, generator=g)
    ignored = torch.rand(target_shape, generator=g) < problem["ignore_fraction"]
    return x, torch.where(ignored, problem["ignore_index"], t), w


@SETTINGS
@given(cross_entropy_problems())
def test_cross_entropy_index_property(problem):
    x, t, w = tensors(problem, probabilities=False)
    check_against_torch(
        X.cross_entropy, F.cross_entropy, x, t, w, ignore_index=problem["ignore_index"],
        reduction=problem["reduction"], label_smoothing=problem["label_smoothing"],
    )  # fmt: skip


@SETTINGS
@given(cross_entropy_problems())
def test_cross_entropy_probability_property(problem):
    """A negative ignore_index is accepted and ignored on this path (>= 0 is an error: tests/test_errors.py)."""
    x, t, w = tensors(problem, probabilities=True)
    ignore_index = problem["ignore_index"] if problem["ignore_index"] < 0 else -100
    result = check_against_torch(
        X.cross_entropy, F.cross_entropy, x, t, w, ignore_index=ignore_index,
        reduction=problem["reduction"], label_smoothing=problem["label_smoothing"],
    )  # fmt: skip
    assert not isinstance(result, Exception), result


@SETTINGS
@given(cross_entropy_problems())
def test_nll_loss_property(problem):
    x, t, w = tensors(problem, probabilities=False)
    check_against_torch(X.nll_loss, F.nll_loss, x, t, w, ignore_index=problem["ignore_index"],
                        reduction=problem["reduction"])  # fmt: skip


@SETTINGS
@given(cross_entropy_problems(), st.sampled_from(["log_softmax", "softmax"]), st.integers(-4, 3))
def test_softmax_property(problem, fn, dim):
    """Values over valid dims, negative ones included (an out-of-range dim is an error: tests/test_errors.py)."""
    x, _, _ = tensors(problem, probabilities=False)
    ndim = x.dim()
    dim = dim % ndim - (ndim if dim < 0 else 0)
    result = check_against_torch(getattr(X, fn), getattr(F, fn), x, dim)
    assert not isinstance(result, Exception), result


@SETTINGS
@given(cross_entropy_problems(), st.sampled_from(["none", "last", "scalar"]), st.booleans())
def test_bce_property(problem, weight_kind, with_logits):
    x, t, _ = tensors(problem, probabilities=True)
    g = torch.Generator().manual_seed(problem["seed"] + 1)
    shape = x.shape
    weight_shape = {"none": None, "last": shape[-1:], "scalar": ()}[weight_kind]
    w = None if weight_shape is None else torch.rand(weight_shape, generator=g, dtype=x.dtype)
    if with_logits:
        pos_weight = None if w is None else (w + 0.5)
        check_against_torch(
            X.binary_cross_entropy_with_logits, F.binary_cross_entropy_with_logits, x, t, w,
            reduction=problem["reduction"], pos_weight=pos_weight,
        )  # fmt: skip
    else:
        probs = torch.sigmoid(x.detach().float()).to(x.dtype).requires_grad_()
        check_against_torch(
            X.binary_cross_entropy, F.binary_cross_entropy, probs, t.detach().clamp(0, 1).requires_grad_(), w,
            reduction=problem["reduction"],
        )  # fmt: skip
