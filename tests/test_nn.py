"""xentlib.nn modules against torch.nn 2.13: construction, attributes, buffers, state_dict, repr, forward."""

# ruff: noqa: E501 - one case per line in the tables

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same, check_against_torch

import xentlib.functional as X
import xentlib.nn as XN

REDUCTIONS = ("none", "mean", "sum")
W3 = torch.tensor([0.5, 2.0, 1.5])

# (module name, constructor kwargs, input builder) for every loss module
LOSS_CASES = {
    "ce_plain": ("CrossEntropyLoss", {}, "logits_index"),
    "ce_all": ("CrossEntropyLoss", dict(weight=W3, ignore_index=1, reduction="sum", label_smoothing=0.2), "logits_index"),
    "ce_prob": ("CrossEntropyLoss", dict(weight=W3, label_smoothing=0.1), "logits_prob"),
    "ce_none": ("CrossEntropyLoss", dict(reduction="none"), "logits_index"),
    "nll_plain": ("NLLLoss", {}, "logits_index"),
    "nll_all": ("NLLLoss", dict(weight=W3, ignore_index=2, reduction="none"), "logits_index"),
    "bce_plain": ("BCELoss", {}, "probabilities"),
    "bce_weight": ("BCELoss", dict(weight=W3, reduction="sum"), "probabilities"),
    "bcel_plain": ("BCEWithLogitsLoss", {}, "logits_probabilities"),
    "bcel_all": ("BCEWithLogitsLoss", dict(weight=W3, pos_weight=torch.tensor([1.0, 3.0, 0.5]), reduction="none"), "logits_probabilities"),
}  # fmt: skip


def make_inputs(kind, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    t_index = torch.tensor([0, 2, 1, 1, 0])
    t_prob = torch.rand(5, 3, generator=g, dtype=torch.float64)
    if kind == "logits_index":
        return x.to(dtype).requires_grad_(), t_index
    if kind == "logits_prob":
        return x.to(dtype).requires_grad_(), t_prob.softmax(1).to(dtype).requires_grad_()
    if kind == "probabilities":
        return x.sigmoid().to(dtype).requires_grad_(), t_prob.to(dtype).requires_grad_()
    return x.to(dtype).requires_grad_(), t_prob.to(dtype).requires_grad_()


def both(name, kwargs):
    return getattr(XN, name)(**kwargs), getattr(torch.nn, name)(**kwargs)


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_module_matches_torch(case):
    name, kwargs, kind = LOSS_CASES[case]
    ours, theirs = both(name, kwargs)
    assert isinstance(ours, getattr(torch.nn, name))
    assert repr(ours) == repr(theirs)
    for attribute in ("reduction", "ignore_index", "label_smoothing"):
        assert getattr(ours, attribute, None) == getattr(theirs, attribute, None), attribute
    assert dict(ours.named_buffers()).keys() == dict(theirs.named_buffers()).keys()
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert_same(ours.state_dict()[key], value, key)
    check_against_torch(ours, theirs, *make_inputs(kind))


@pytest.mark.parametrize("case", [c for c in LOSS_CASES if LOSS_CASES[c][1].get("weight") is not None])
@pytest.mark.parametrize("direction", ["torch_to_ours", "ours_to_torch"])
def test_state_dict_round_trip(case, direction):
    """A checkpoint of one loads into the other (strict), and the loaded module computes the same loss."""
    name, kwargs, kind = LOSS_CASES[case]
    ours, theirs = both(name, kwargs)
    changed = {k: v * 2 for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    source_ours, source_theirs = both(name, {**kwargs, **changed})
    if direction == "torch_to_ours":
        ours.load_state_dict(source_theirs.state_dict(), strict=True)
    else:
        theirs.load_state_dict(source_ours.state_dict(), strict=True)
    for key, value in changed.items():
        assert_same(getattr(ours if direction == "torch_to_ours" else theirs, key), value, key)
    reference = source_theirs if direction == "torch_to_ours" else theirs
    check_against_torch(ours if direction == "torch_to_ours" else source_ours, reference, *make_inputs(kind))


@pytest.mark.parametrize("case", ["ce_all", "nll_all", "bce_weight", "bcel_all"])
def test_buffers_follow_dtype_casts(case):
    """weight / pos_weight are buffers: .double() casts them, and float64 inputs then work."""
    name, kwargs, kind = LOSS_CASES[case]
    ours, theirs = both(name, kwargs)
    ours, theirs = ours.double(), theirs.double()
    assert all(b.dtype == torch.float64 for b in ours.buffers())
    check_against_torch(ours, theirs, *make_inputs(kind, torch.float64))


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss"])
@pytest.mark.parametrize(
    "legacy", [dict(size_average=False), dict(reduce=False), dict(size_average=True, reduction="none")]
)
def test_legacy_arguments_at_construction(name, legacy):
    """size_average / reduce become self.reduction in __init__, with torch's warning."""
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        ours = getattr(XN, name)(**legacy)
    with pytest.warns(UserWarning, match="size_average and reduce args will be deprecated"):
        theirs = getattr(torch.nn, name)(**legacy)
    assert ours.reduction == theirs.reduction


@pytest.mark.parametrize("name", ["CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss"])
@pytest.mark.parametrize("reduction", ["bogus", "MEAN", "elementwise_mean"])
def test_reduction_is_validated_at_call_time(name, reduction):
    """Construction accepts any string; the call raises (or warns for 'elementwise_mean') like torch."""
    ours, theirs = both(name, dict(reduction=reduction))
    assert ours.reduction == theirs.reduction == reduction
    kind = {"CrossEntropyLoss": "logits_index", "NLLLoss": "logits_index", "BCELoss": "probabilities"}
    check_against_torch(ours, theirs, *make_inputs(kind.get(name, "logits_probabilities")))


def test_nll_loss_2d_is_deprecated():
    with pytest.warns(FutureWarning, match="NLLLoss2d"):
        ours = XN.NLLLoss2d(weight=W3)
    with pytest.warns(FutureWarning):
        theirs = torch.nn.NLLLoss2d(weight=W3)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    t = torch.randint(0, 3, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    check_against_torch(ours, theirs, x, t)


@pytest.mark.parametrize("name", ["LogSoftmax", "Softmax"])
@pytest.mark.parametrize("dim", [None, 0, 1, -1])
@pytest.mark.parametrize("shape", [(5,), (4, 5), (3, 4, 5)])
def test_softmax_modules(name, dim, shape):
    """dim=None is resolved at call time, with the warning."""
    if dim is not None and dim >= len(shape):
        pytest.skip("dim out of range")
    ours, theirs = getattr(XN, name)(dim=dim), getattr(torch.nn, name)(dim=dim)
    assert repr(ours) == repr(theirs) and ours.dim == theirs.dim
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64, requires_grad=True)
    check_against_torch(ours, theirs, x)


def test_softmax_module_state_set_after_unpickling():
    """torch's modules loaded from old pickles may lack `dim`; ours are the same class family."""
    ours = XN.Softmax(dim=1)
    del ours.dim
    ours.__setstate__(ours.__dict__)
    theirs = torch.nn.Softmax(dim=1)
    del theirs.dim
    theirs.__setstate__(theirs.__dict__)
    assert ours.dim == theirs.dim


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("extensions", [dict(z_loss=0.1), dict(softcap=2.0), dict(z_loss=0.01, softcap=5.0)])
def test_cross_entropy_module_extensions_match_functional(reduction, extensions):
    module = XN.CrossEntropyLoss(weight=W3, reduction=reduction, label_smoothing=0.1, **extensions)
    x, t = make_inputs("logits_index")
    check_against_torch(
        module,
        lambda x, t: X.cross_entropy(x, t, W3, reduction=reduction, label_smoothing=0.1, **extensions),
        x,
        t,
    )


def test_cross_entropy_module_normalizer_in_forward():
    module = XN.CrossEntropyLoss(reduction="sum", z_loss=0.1)
    x, t = make_inputs("logits_index")
    check_against_torch(
        lambda x, t: module(x, t, normalizer=4.0),
        lambda x, t: X.cross_entropy(x, t, reduction="sum", z_loss=0.1) / 4.0,
        x,
        t,
    )


def test_module_default_extensions_change_nothing():
    """A default-constructed module is torch's module: same forward as torch.nn.CrossEntropyLoss."""
    x, t = make_inputs("logits_index")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against_torch(XN.CrossEntropyLoss(), F.cross_entropy, x, t)
